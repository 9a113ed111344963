"""Ground-truth recovery across toy-data variants: the recovery recipe vs scikit-learn.

Issue 22 ("Recover the ground truth"). Every variant is a setting of
:func:`sksae.datasets.make_sparse_superposition` with 256 dimensions and about
5 active features per row; each one changes one thing from the base (512 true
features, correlated by the low-rank copula, frequencies decaying by 0.99,
magnitudes uniform on [0, 1], unit-norm features, no noise). Each method is
fitted on the same 200k rows, side by side in one process:

- ``recipe``: the documented recovery recipe (user guide, "Recovering the
  ground truth"), verbatim::

      RefinedAutoencoder(SparseAutoencoder(n_components=2 * G, k=6, max_iter=1))

  one pass of a TopK SAE, then eight rounds of non-negative OMP codes and
  least-squares (MOD) dictionary updates with residual re-seeding
  (:func:`sksae.refine_dictionary`);
- ``sae``: the same SAE alone (the recipe's first stage);
- ``sklearn``: ``MiniBatchDictionaryLearning(n_components=2 * G, alpha=0.1,
  batch_size=256, max_iter=1)``, one pass over the same rows (its recovery is
  scored with ``|cos|``: its atoms have no sign).

``G`` is the true feature count (the recipe's ``n_components`` is twice the
count; use the size sweep's estimate where it is unknown). Printed per
variant and method: fit seconds, recovered@0.9 (fraction of true features
with a learned atom of cosine > 0.9), recovered@0.99 (the stricter threshold
that separates methods which both find every feature at 0.9), MMCS, and the
expected number of rows in which the rarest true feature fires
(``n_rows * p_min``): below ~20, no method can learn it from these rows.

"fit s" is wall-clock time; "CPU s" the process's CPU time (both cores
summed), which a shared machine inflates much less: on an idle 2-core
machine the wall time is at most the CPU time.

``--sweep`` also runs :func:`sksae.model_selection.dictionary_size_sweep`
with the recipe (six refinement rounds instead of eight, to save time) on the
sweep variants and prints its estimate of the feature count against the truth.

Run: ``python benchmarks/bench_ground_truth.py`` (add ``--sweep``; ``--quick``
for a small smoke run; ``--variants base,indep`` to pick variants). The table
is written to ``benchmarks/results/ground_truth.txt`` unless ``--no-save``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import MiniBatchDictionaryLearning

from sksae import RefinedAutoencoder, SparseAutoencoder
from sksae.datasets import firing_probabilities, make_sparse_superposition
from sksae.metrics import max_cosine_similarity
from sksae.model_selection import dictionary_size_sweep

RESULTS = Path(__file__).resolve().parent / "results" / "ground_truth.txt"
BASE = dict(correlated=True)
# name -> (true features, make_sparse_superposition settings)
VARIANTS = {
    "base": (512, BASE),
    "independent": (512, dict()),
    "dense-corr": (512, dict(correlated=True, correlation="dense")),
    "exponential": (512, dict(BASE, magnitude="exponential")),
    "lognormal": (512, dict(BASE, magnitude="lognormal")),
    "fixed-1": (512, dict(BASE, magnitude=1.0)),
    "decay-1.0": (512, dict(BASE, frequency_decay=1.0)),
    "decay-0.995": (512, dict(BASE, frequency_decay=0.995)),
    "scales": (512, dict(BASE, feature_norms=(0.5, 2.0))),
    "noise-0.02": (512, dict(BASE, noise=0.02)),
    "1x-256": (256, BASE),
    "4x-1024-decay-0.995": (1024, dict(BASE, frequency_decay=0.995)),
    "4x-1024-decay-0.99": (1024, BASE),
}
# Variants whose feature count the size sweep estimates, with their grids.
SWEEPS = {
    "base": [256, 512, 768, 1024],
    "independent": [256, 512, 768, 1024],
    "decay-0.995": [256, 512, 768, 1024],
    "4x-1024-decay-1.0": [1024, 1536, 2048],
    "4x-1024-decay-0.995": [1024, 1536, 2048],
}
EXTRA = {"4x-1024-decay-1.0": (1024, dict(BASE, frequency_decay=1.0))}


def recipe(n_components, random_state=0):
    """The recovery recipe of the user guide ("Recovering the ground truth")."""
    return RefinedAutoencoder(
        SparseAutoencoder(n_components=n_components, k=6, max_iter=1,
                          random_state=random_state))


def methods(G, random_state=0):
    return {
        "recipe": recipe(2 * G, random_state),
        "sae": SparseAutoencoder(n_components=2 * G, k=6, max_iter=1,
                                 random_state=random_state),
        # Alternatives measured on the base variant (--methods ...): longer
        # TopK training, resampling, and the penalty-based architectures.
        "topk-5ep": SparseAutoencoder(n_components=2 * G, k=6, max_iter=5,
                                      random_state=random_state),
        "topk-resample": SparseAutoencoder(n_components=2 * G, k=6, max_iter=5,
                                           resample_dead=500, random_state=random_state),
        "gated-5ep": SparseAutoencoder(n_components=2 * G, architecture="gated", max_iter=5,
                                       random_state=random_state),
        "jumprelu-5ep": SparseAutoencoder(n_components=2 * G, architecture="jumprelu",
                                          max_iter=5, random_state=random_state),
        "sklearn": MiniBatchDictionaryLearning(
            n_components=2 * G, alpha=0.1, batch_size=256, max_iter=1,
            random_state=random_state),
    }


def make(name, n_rows, random_state=0):
    G, kw = {**VARIANTS, **EXTRA}[name]
    X, F = make_sparse_superposition(n_rows, 256, G, avg_active=5.0, random_state=random_state,
                                     return_features=True, **kw)
    p_min = firing_probabilities(G, 5.0, kw.get("frequency_decay", 0.99)).min()
    return X, F, p_min * n_rows


def run_variant(name, n_rows, which):
    X, F, rarest = make(name, n_rows)
    G = F.shape[0]
    rows = []
    for method, est in methods(G).items():
        if method not in which:
            continue
        start, cpu = time.perf_counter(), time.process_time()
        est.fit(X)
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu
        m = max_cosine_similarity(F, est.components_, absolute=method == "sklearn")
        rows.append(dict(variant=name, G=G, method=method, seconds=seconds, cpu=cpu,
                         recovered=float(np.mean(m > 0.9)), mmcs=float(m.mean()),
                         recovered99=float(np.mean(m > 0.99)), rarest=rarest))
        print(f"  {name:22s} {method:13s} {seconds:7.1f} s ({cpu:6.1f} CPU s)  recovered@0.9 {rows[-1]['recovered']:.3f}"
              f"  @0.99 {rows[-1]['recovered99']:.3f}  MMCS {rows[-1]['mmcs']:.3f}", flush=True)
    return rows


def run_sweep(name, n_rows, grid):
    X, F, _ = make(name, n_rows)
    start = time.perf_counter()
    # Six refinement rounds instead of eight: the sweep fits one model per size.
    est = recipe(grid[0]).set_params(n_iter=6)
    res = dictionary_size_sweep(est, X, grid, X_eval=X[:20_000],
                                true_features=F, param_name="estimator__n_components")
    seconds = time.perf_counter() - start
    rec = [float(np.mean(max_cosine_similarity(F, e.components_) > 0.9))
           for e in res.estimators]
    return dict(variant=name, G=F.shape[0], grid=list(res.n_components),
                n_shared=[int(v) if np.isfinite(v) else None for v in res.n_shared],
                recovered=rec, estimate=res.n_features_estimate,
                error=abs(res.n_features_estimate - F.shape[0]) / F.shape[0],
                seconds=seconds, rule=res.estimate_rule)


def format_rows(rows):
    lines = [f"{'variant':22s} {'G':>5s} {'method':13s} {'fit s':>7s} {'CPU s':>7s} "
             f"{'recovered@0.9':>13s} {'@0.99':>6s} {'MMCS':>6s} {'rarest rows':>11s}  note",
             "-" * 100]
    by_variant = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    for name, rs in by_variant.items():
        skl = next((r for r in rs if r["method"] == "sklearn"), None)
        for r in rs:
            note = ""
            if r["method"] == "recipe":
                ok = r["recovered"] >= 0.95
                note = ">=95%" if ok else "<95%"
                if skl is not None:
                    if r["recovered"] > skl["recovered"]:
                        note += ", beats sklearn"
                    elif r["recovered"] == skl["recovered"] and r["recovered99"] > skl["recovered99"]:
                        # Both at the same fraction (1.0): the stricter threshold decides.
                        note += ", beats sklearn at cos > 0.99 (tied at 0.9)"
                    else:
                        note += ", NOT above sklearn"
                if r["rarest"] < 20:
                    note += f" (rarest feature fires in ~{r['rarest']:.1f} of the rows: unlearnable)"
            lines.append(f"{name:22s} {r['G']:5d} {r['method']:13s} {r['seconds']:7.1f} "
                         f"{r['cpu']:7.1f} {r['recovered']:13.3f} {r['recovered99']:6.3f} {r['mmcs']:6.3f} {r['rarest']:11.1f}  {note}")
    return "\n".join(lines)


def format_sweeps(sweeps):
    lines = [f"{'variant':22s} {'G':>5s} {'estimate':>8s} {'error':>6s} {'sweep s':>7s}  "
             "grid: n_shared (recovered@0.9 of each size)", "-" * 100]
    for s in sweeps:
        detail = ", ".join(f"{k}: {'-' if n is None else n} ({r:.2f})"
                           for k, n, r in zip(s["grid"], s["n_shared"], s["recovered"]))
        lines.append(f"{s['variant']:22s} {s['G']:5d} {s['estimate']:8d} {s['error']:6.1%} "
                     f"{s['seconds']:7.0f}  {detail}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true", help="20k rows, two variants")
    parser.add_argument("--variants", default=None, help="comma-separated names")
    parser.add_argument("--methods", default="recipe,sae,sklearn")
    parser.add_argument("--sweep", action="store_true", help="also run the size sweeps")
    parser.add_argument("--sweep-only", action="store_true")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    n_rows = 20_000 if args.quick else args.rows
    names = (args.variants.split(",") if args.variants
             else ["base", "independent"] if args.quick else list(VARIANTS))
    header = (f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {n_rows} rows x 256 dims, "
              f"~5 active; torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f} at start")
    print(header, flush=True)
    out = [header]
    if not args.sweep_only:
        rows = []
        for name in names:
            rows += run_variant(name, n_rows, args.methods.split(","))
        table = format_rows(rows)
        print(table)
        out.append(table)
    if args.sweep or args.sweep_only:
        sweeps = []
        for name, grid in SWEEPS.items():
            if args.variants and name not in args.variants.split(","):
                continue
            sweeps.append(run_sweep(name, n_rows, grid))
            print(format_sweeps(sweeps[-1:]).splitlines()[-1], flush=True)
        table = format_sweeps(sweeps)
        print(table)
        print("rule:", sweeps[0]["rule"] if sweeps else "")
        out.append(table)
    out.append(f"# load average {os.getloadavg()[0]:.1f} at the end")
    if not args.no_save:
        with open(args.output, "a") as f:
            f.write("\n".join(out) + "\n\n")
    return out


if __name__ == "__main__":
    main()
