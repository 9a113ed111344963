"""DictionaryLearnerGPU vs scikit-learn's MiniBatchDictionaryLearning, side by side.

Both libraries get the same float32 data and the same parameters; we report
fit seconds, transform seconds for ``omp`` and ``lasso_lars`` and the held-out
objective ``mean 0.5 ||x - D^T u||^2 + alpha ||u||_1`` of each learned
dictionary (codes from the exact lasso solver, the same for both).

Data sets
---------
(a) toy superposition (Sharkey et al. 2022): 512 unit ground-truth directions in
    256 dimensions, ~5 active per row with magnitudes in [0, 1];
    1024 atoms, alpha=0.1, batch_size=256.
(b) 7x7 patches of scikit-learn's ``china.jpg`` (grey, half size), centred and
    scaled per feature as in scikit-learn's image-denoising example;
    100 atoms, alpha=1, batch_size=256.

Run ``python benchmarks/bench_dictionary_learning.py --quick`` for a small
version (a few minutes on 2 cores; scikit-learn dominates the run time).

Each library is warmed up (untimed fit on two minibatches, tiny transforms)
before timing; transforms are the best of ``--repeat`` runs (default 3).

Measured at full size (20k rows; 2 shared CPU cores, torch 2.13 CPU,
scikit-learn 1.9.1 with its default BLAS threads, torch's 2 threads; see
benchmarks/results/dictionary_learning.txt for the output and the load), with
``--sklearn-max-steps 8`` (scikit-learn's full toy fit takes too long here; its
fit is then compared per minibatch step):

    numba 0.68.1      toy    fit/step x58.0  omp x28.7  lasso x75.0
                      china  fit x63.6       omp x92.3  lasso x152.8

The header line "sksae lasso/omp coder backend" says which CPU path ran: the
numba-compiled per-row kernels (numba is a dependency of sksae) or, with
``--no-numba``, the batched torch coders (the implementation of other devices,
and the CPU's fallback when numba cannot be loaded). Held-out objectives:
china sksae/sklearn 0.998 (both full fits); toy 0.2214 (scikit-learn's 8-step
number is not comparable). The ratios move with the load of the shared machine
(scikit-learn's china fit took 9 to 23 s over the day); compiled, the china
step is ~1.8 ms against ~115 ms.
"""

from __future__ import annotations

import argparse
import importlib
import time
import warnings

import numpy as np
import torch
from sklearn.base import clone
from sklearn.decomposition import MiniBatchDictionaryLearning
from sklearn.exceptions import ConvergenceWarning

from sksae import DictionaryLearnerGPU, sparse_encode
from sksae._accel.device import resolve_device, synchronize


def toy_superposition(n_samples, n_features=256, n_true=512, mean_active=5, seed=0):
    rng = np.random.RandomState(seed)
    F = rng.randn(n_true, n_features)
    F /= np.linalg.norm(F, axis=1, keepdims=True)
    p = 0.99 ** np.arange(n_true)
    p = np.minimum(p / p.sum() * mean_active, 1)
    active = rng.rand(n_samples, n_true) < p
    return ((active * rng.rand(n_samples, n_true)) @ F).astype(np.float32)


def china_patches(n_samples, seed=0):
    from sklearn.datasets import load_sample_image
    from sklearn.feature_extraction.image import extract_patches_2d

    img = load_sample_image("china.jpg").mean(axis=2) / 255.0
    img = img[::2, ::2]
    data = extract_patches_2d(img, (7, 7), max_patches=n_samples, random_state=seed)
    data = data.reshape(len(data), -1)
    data -= data.mean(axis=0)
    data /= data.std(axis=0)
    return data.astype(np.float32)


def objective(X, D, alpha, device):
    code = sparse_encode(X.astype(np.float64), D.astype(np.float64), algorithm="lasso_cd",
                         alpha=alpha, device=device)
    resid = X - code @ D
    return float(np.mean(0.5 * (resid**2).sum(1) + alpha * np.abs(code).sum(1)))


def timed(fn, device):
    synchronize(device)
    t = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t


def run_case(name, X, X_test, params, device, skip_sklearn=False, sklearn_max_steps=None,
             repeat=3):
    print(f"\n== {name}: train {X.shape}, test {X_test.shape}, {params}")
    rows = {}
    cap = None
    if sklearn_max_steps and sklearn_max_steps * params["batch_size"] < len(X):
        # scikit-learn fits only the first steps' rows (same work per step); fit
        # times are then compared per step, and its held-out objective is that of
        # a dictionary trained on fewer rows (not comparable).
        cap = sklearn_max_steps * params["batch_size"]
        print(f"   (scikit-learn fit capped at {sklearn_max_steps} steps = {cap} rows; "
              "fit compared per step)")
    ours = DictionaryLearnerGPU(**params, device=device)
    libs = [("sksae", ours)]
    if not skip_sklearn:
        libs.append(("sklearn", MiniBatchDictionaryLearning(**params)))
    for lib, est in libs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            # Untimed warm-up of each library on two minibatches (one-off costs
            # of a process: lazy imports, library initialisation, first calls,
            # and the load or first compile of sksae's numba kernels for this
            # dtype).
            warm = clone(est).fit(X[:2 * params["batch_size"]])
            for algo in ("omp", "lasso_lars"):
                warm.set_params(transform_algorithm=algo).transform(X_test[:16])
            Xf = X[:cap] if (cap and lib == "sklearn") else X
            _, t_fit = timed(lambda: est.fit(Xf), device)
            r = {"fit": t_fit, "steps": est.n_steps_,
                 "obj": objective(X_test, est.components_, params["alpha"], device)}
            for algo in ("omp", "lasso_lars"):
                est.set_params(transform_algorithm=algo)
                # Best of `repeat` runs for both libraries (the first call of a
                # process pays one-off allocations; a single run is noisy here).
                r[algo] = min(timed(lambda: est.transform(X_test), device)[1]
                              for _ in range(repeat))
        rows[lib] = r
    print(f"{'':8s} {'fit s':>9s} {'steps':>6s} {'s/step':>8s} {'omp s':>9s} {'lasso s':>9s}"
          f" {'held-out obj':>13s}")
    for lib, r in rows.items():
        print(f"{lib:8s} {r['fit']:9.3f} {r['steps']:6d} {r['fit'] / r['steps']:8.4f}"
              f" {r['omp']:9.4f} {r['lasso_lars']:9.4f} {r['obj']:13.6f}")
    if "sklearn" in rows:
        a, b = rows["sklearn"], rows["sksae"]
        per_step = (a["fit"] / a["steps"]) / (b["fit"] / b["steps"])
        fit = f"fit/step x{per_step:.1f}" if cap else f"fit x{a['fit'] / b['fit']:.1f}"
        print(f"ratio    {fit}  omp x{a['omp'] / b['omp']:.1f}  "
              f"lasso x{a['lasso_lars'] / b['lasso_lars']:.1f}  "
              f"objective sksae/sklearn {b['obj'] / a['obj']:.4f}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (minutes)")
    parser.add_argument("--n-samples", type=int, default=None)
    parser.add_argument("--max-iter", type=int, default=1, help="passes over the data")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads (default: torch's; pass 1 on a busy "
                             "shared machine, where extra threads stall)")
    parser.add_argument("--only", choices=["toy", "china"], default=None)
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--repeat", type=int, default=3,
                        help="time each transform as the best of this many runs (both "
                             "libraries)")
    parser.add_argument("--no-numba", action="store_true",
                        help="run sksae's torch lasso and omp coders on the CPU instead of "
                             "the numba kernels (the fallback's timings)")
    parser.add_argument("--sklearn-max-steps", type=int, default=None,
                        help="fit scikit-learn on only this many minibatch steps' rows "
                             "and compare fit time per step (its full toy fit is slow)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    n = args.n_samples or (2_000 if args.quick else 20_000)
    n_test = max(n // 10, 200)
    print(f"device={device}, threads={torch.get_num_threads()}, n_samples={n}")
    compiled = importlib.import_module("sksae._accel.compiled")
    if args.no_numba:
        compiled._USE_NUMBA = False
    if device.type != "cpu":
        backend = "torch (batched)"
    elif compiled.compiled_backend():
        import numba

        backend = f"numba {numba.__version__} (compiled per row)"
    else:
        backend = "torch (batched; numba disabled or not loadable)"
    print(f"sksae lasso/omp coder backend: {backend}")
    common = dict(batch_size=256, max_iter=args.max_iter, random_state=0)
    if args.only in (None, "toy"):
        X = toy_superposition(n + n_test)
        run_case("toy superposition", X[:n], X[n:],
                 dict(n_components=256 if args.quick else 1024, alpha=0.1, **common),
                 device, args.skip_sklearn, args.sklearn_max_steps, args.repeat)
    if args.only in (None, "china"):
        X = china_patches(n + n_test)
        run_case("china.jpg 7x7 patches", X[:n], X[n:],
                 dict(n_components=100, alpha=1.0, **common), device, args.skip_sklearn,
                 args.sklearn_max_steps if args.only == "china" else None, args.repeat)


if __name__ == "__main__":
    main()
