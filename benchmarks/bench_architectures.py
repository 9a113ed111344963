"""Every SAE architecture and MiniBatchDictionaryLearning on toy data, at matched L0.

Toy superposition (Sharkey et al. 2022, ``sksae.datasets.make_sparse_superposition``):
``n_true`` unit ground-truth directions in ``n_features`` dimensions, ~5 active per
row with magnitudes uniform in [0, 1]. Every model gets ``2 * n_true`` latents and
the same training rows; metrics are on held-out rows:

- FVE: fraction of variance explained of the reconstruction;
- L0: mean active latents per row (``transform``, i.e. per-sample inference);
- MMCS / rec@0.9: mean max cosine similarity of the ground-truth directions to the
  learned atoms, and the fraction above 0.9;
- shrinkage: relative reconstruction bias (1 is unbiased; > 1 the codes undershoot);
- dead: fraction of latents that never fire on the held-out rows;
- fit s: wall-clock seconds of ``fit`` (calibration fits not counted).

Matched L0: TopK, BatchTopK and Matryoshka BatchTopK (its default prefixes,
``n_components // 8``, ``// 4`` and ``// 2``) take ``k = target``; MiniBatchDictionaryLearning
codes with OMP at ``transform_n_nonzero_coefs = target``; the penalty-based
architectures (ReLU+L1 and Gated: ``alpha``, JumpReLU: ``l0_coefficient``) are
calibrated by a few fits of a multiplicative secant search on the coefficient,
keeping the one whose held-out L0 is closest to the target.

Run ``python benchmarks/bench_architectures.py --quick`` for a small version (a few
minutes on 2 busy cores). Results: benchmarks/results/architectures.txt.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
from sklearn.decomposition import MiniBatchDictionaryLearning
from sklearn.exceptions import ConvergenceWarning

from sksae import SparseAutoencoder
from sksae.datasets import make_sparse_superposition
from sksae.metrics import (
    dead_fraction,
    fraction_variance_explained,
    l0,
    mean_max_cosine_similarity,
    relative_reconstruction_bias,
)

# the sparsity coefficient of each penalty-based architecture, and where to start
PENALTIES = {"relu": ("alpha", 5.0), "jumprelu": ("l0_coefficient", 1.0),
             "gated": ("alpha", 5.0)}


def evaluate(name, model, X_test, features, fit_s, setting=""):
    codes = model.transform(X_test)
    X_hat = codes @ model.components_
    if hasattr(model, "decoder_bias_"):
        X_hat = X_hat + model.decoder_bias_
    mmcs, rec = mean_max_cosine_similarity(features, model.components_, threshold=0.9)
    return dict(name=name, setting=setting, fve=fraction_variance_explained(X_test, X_hat),
                l0=l0(codes), mmcs=mmcs, rec=rec,
                shrink=relative_reconstruction_bias(X_test, X_hat),
                dead=dead_fraction(codes), fit=fit_s)


def fit_sae(X, architecture, params):
    sae = SparseAutoencoder(architecture=architecture, **params)
    t = time.perf_counter()
    sae.fit(X)
    return sae, time.perf_counter() - t


def calibrate(X, X_test, architecture, params, target, n_fits):
    """Fits with a multiplicative secant search on the sparsity coefficient."""
    key, coef = PENALTIES[architecture]
    tried = []  # (log coef, log L0, sae, seconds)
    for _ in range(n_fits):
        sae, secs = fit_sae(X, architecture, {**params, key: coef})
        l0_test = max(l0(sae.transform(X_test)), 1e-3)
        tried.append((math.log(coef), math.log(l0_test), sae, secs))
        if abs(l0_test - target) < 0.05 * target:
            break
        if len(tried) == 1:
            slope = -1.0  # L0 roughly inversely proportional to the coefficient
        else:
            (c0, l0_, *_), (c1, l1_, *_) = tried[-2], tried[-1]
            slope = (l1_ - l0_) / (c1 - c0) if c1 != c0 and l1_ != l0_ else -1.0
            slope = min(slope, -0.2)  # keep the search monotone and bounded
        coef = math.exp(tried[-1][0] + (math.log(target) - tried[-1][1]) / slope)
    best = min(tried, key=lambda t: abs(math.exp(t[1]) - target))
    return best[2], best[3], f"{key}={math.exp(best[0]):.3g} ({len(tried)} fits)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (minutes)")
    parser.add_argument("--target-l0", type=int, default=5)
    parser.add_argument("--max-iter", type=int, default=None, help="epochs per fit")
    parser.add_argument("--calibration-fits", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 is fastest on a busy machine)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-sklearn", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.quick:
        n, n_test, n_features, n_true, max_iter, n_cal = 8_000, 2_000, 32, 64, 15, 4
    else:
        n, n_test, n_features, n_true, max_iter, n_cal = 40_000, 5_000, 64, 128, 20, 5
    max_iter = args.max_iter or max_iter
    n_cal = args.calibration_fits or n_cal
    X, features = make_sparse_superposition(n_samples=n + n_test, n_features=n_features,
                                            n_components=n_true, avg_active=5,
                                            random_state=0, return_features=True)
    X, X_test = X[:n], X[n:]
    k = args.target_l0
    # every model runs all its epochs (no early stopping): same budget for all
    params = dict(n_components=2 * n_true, batch_size=256, max_iter=max_iter,
                  max_no_improvement=None, device=args.device, random_state=0)
    print(f"toy superposition: train {X.shape}, test {X_test.shape}, {n_true} true "
          f"features, {2 * n_true} latents, target L0 {k}, {max_iter} epochs, "
          f"threads={torch.get_num_threads()}")

    rows = []
    for arch in ("relu", "topk", "batchtopk", "matryoshka", "jumprelu", "gated"):
        if arch in PENALTIES:
            sae, secs, setting = calibrate(X, X_test, arch, params, k, n_cal)
        else:
            sae, secs = fit_sae(X, arch, {**params, "k": k})
            setting = f"k={k}"
            if arch == "matryoshka":  # the default prefixes of the dictionary
                prefixes = sae._architecture(sae.n_components_, sae.n_features_in_).prefix_sizes
                setting += f", prefixes {prefixes}"
        rows.append(evaluate(arch, sae, X_test, features, secs, setting))
        print(f"  done {arch}: {setting}", flush=True)
    if not args.skip_sklearn:
        mbdl = MiniBatchDictionaryLearning(
            n_components=2 * n_true, alpha=0.1, batch_size=256, max_iter=max_iter,
            transform_algorithm="omp", transform_n_nonzero_coefs=k, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            t = time.perf_counter()
            mbdl.fit(X)
            secs = time.perf_counter() - t
        rows.append(evaluate("sklearn MBDL", mbdl, X_test, features, secs,
                             f"alpha=0.1, omp k={k}"))

    header = (f"{'model':13s} {'FVE':>6s} {'L0':>6s} {'MMCS':>6s} {'rec@0.9':>8s} "
              f"{'shrink':>7s} {'dead':>6s} {'fit s':>7s}  setting")
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:13s} {r['fve']:6.3f} {r['l0']:6.2f} {r['mmcs']:6.3f} "
              f"{r['rec']:8.3f} {r['shrink']:7.3f} {r['dead']:6.3f} {r['fit']:7.1f}  "
              f"{r['setting']}")
    return rows


if __name__ == "__main__":
    main()
