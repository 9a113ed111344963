"""Command-line interface: ``python -m sksae COMMAND``.

Commands: ``demo`` (recovery comparison on toy data, PNG summary), ``fit``
(train a sparse autoencoder on a .npy array and save it), ``transform``
(encode a .npy array with a saved model), ``bench`` (a quick built-in
comparison of every SAE architecture and the dictionary learners).
"""

from __future__ import annotations

import argparse
import json
import sys

from . import architectures


def _demo(args):
    from ._demo import run_demo

    figure = None
    if not args.no_figure:
        try:
            import matplotlib  # noqa: F401

            figure = args.figure
        except ImportError:
            print("(matplotlib is not installed: no summary figure)")
    run_demo(n_samples=args.n_samples, device=args.device, random_state=args.random_state,
             verbose=args.verbose, figure=figure)
    return 0


def _load_rows(path):
    """A .npy file memory-mapped (no pickle), as a 2-D array."""
    import numpy as np

    if not str(path).endswith(".npy"):
        raise SystemExit(f"error: {path} is not a .npy file (save arrays with numpy.save).")
    X = np.load(path, mmap_mode="r", allow_pickle=False)
    if X.ndim != 2:
        X = X.reshape(-1, X.shape[-1])  # e.g. (batch, tokens, d_model) activations
    return X


def _load_model(folder):
    """An sksae folder, or a SAELens or sparsify SAE folder."""
    from pathlib import Path

    from . import interop
    from ._io import CONFIG_FILE, load

    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file():
        return load(folder)
    if (folder / interop.SAELENS_WEIGHTS).is_file():
        return interop.from_saelens(folder)
    if (folder / interop.SPARSIFY_WEIGHTS).is_file():
        return interop.from_sparsify(folder)
    raise SystemExit(f"error: {folder} is not an sksae, SAELens or sparsify model folder.")


def _architecture_params(text):
    """``--architecture-params``: a JSON object, or None."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: --architecture-params is not valid JSON ({exc}).") from None
    if not isinstance(value, dict):
        raise SystemExit("error: --architecture-params must be a JSON object, "
                         "e.g. '{\"prefix_sizes\": [64, 256]}'.")
    return value


def _fit(args):
    import time

    from ._io import save
    from ._sae import SparseAutoencoder

    X = _load_rows(args.acts)
    lr = args.learning_rate if args.learning_rate == "auto" else float(args.learning_rate)
    # penalty weights left unset keep the estimator's defaults
    penalties = {k: v for k, v in (("alpha", args.alpha), ("l0_coefficient",
                                                           args.l0_coefficient))
                 if v is not None}
    sae = SparseAutoencoder(
        n_components=args.n_components, architecture=args.architecture, k=args.k,
        architecture_params=_architecture_params(args.architecture_params),
        learning_rate=lr, batch_size=args.batch_size, max_iter=args.max_iter,
        device=args.device, precision=args.precision, random_state=args.random_state,
        verbose=0 if args.quiet else 1, **penalties)
    print(f"Fitting {sae.architecture} SAE on {X.shape[0]} rows x {X.shape[1]} features "
          f"({args.acts}, memory-mapped)")
    start = time.perf_counter()
    sae.fit(X)
    seconds = time.perf_counter() - start
    fve = sae.history_["epoch"]["fve"][-1] if "fve" in sae.history_["epoch"] else float("nan")
    l0 = sae.history_["epoch"]["l0"][-1]
    print(f"{sae.n_components_} atoms, {sae.n_steps_} steps in {seconds:.1f} s; "
          f"last epoch: FVE {fve:.3f}, L0 {l0:.1f}")
    print(f"Saved to {save(sae, args.output)}")
    return 0


def _transform(args):
    import numpy as np

    model = _load_model(args.model)
    X = _load_rows(args.acts)
    n_out = model.transform(X[:1]).shape[1]
    dtype = np.dtype(args.dtype)
    out = np.lib.format.open_memmap(args.output, mode="w+", dtype=dtype,
                                    shape=(X.shape[0], n_out))
    for start in range(0, X.shape[0], args.chunk_rows):
        stop = min(start + args.chunk_rows, X.shape[0])
        out[start:stop] = model.transform(np.asarray(X[start:stop]))
    out.flush()
    print(f"Wrote codes of shape {out.shape} ({dtype}) to {args.output}")
    return 0


def run_bench(n_samples=4000, n_features=16, device="auto", random_state=0):
    """The ``bench`` command: every estimator on one toy problem, one table.

    Returns
    -------
    rows : list of dict
    """
    import time

    from sklearn.decomposition import MiniBatchDictionaryLearning

    from ._demo import evaluate_recovery, format_table
    from ._dict_learning import DictionaryLearnerGPU
    from ._sae import SparseAutoencoder
    from .datasets import make_sparse_superposition

    n_true, n_components = 2 * n_features, 4 * n_features
    n_test = max(n_samples // 5, 1)
    X, features = make_sparse_superposition(
        n_samples + n_test, n_features, n_true, random_state=random_state,
        return_features=True)
    X = X.astype("float32")
    X_train, X_test = X[:n_samples], X[n_samples:]
    print(f"Toy data: {n_samples} rows, {n_features} dims, {n_true} true features; "
          f"{n_components} atoms.\n")
    common = dict(n_components=n_components, device=device, random_state=random_state)
    sae = dict(common, max_iter=3, batch_size=256, k=5, alpha=0.5, l0_coefficient=0.5)
    models = [(f"SAE {name}", SparseAutoencoder(architecture=name, **sae))
              for name in architectures.available()]
    models += [
        ("DictionaryLearnerGPU", DictionaryLearnerGPU(
            alpha=0.1, max_iter=1, batch_size=256, transform_algorithm="lasso_lars",
            transform_alpha=0.1, **common)),
        ("sklearn MiniBatchDictionaryLearning", MiniBatchDictionaryLearning(
            n_components=n_components, alpha=0.1, max_iter=1, batch_size=256,
            transform_algorithm="lasso_lars", transform_alpha=0.1,
            random_state=random_state)),
    ]
    rows = []
    for name, model in models:
        start = time.perf_counter()
        model.fit(X_train)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        model.transform(X_test)
        rate = len(X_test) / max(time.perf_counter() - start, 1e-9)
        row = evaluate_recovery(name, model, X_test, features, seconds)
        row["transform rows/s"] = f"{rate:,.0f}"
        rows.append(row)
        print(f"  {name}: {seconds:.1f} s", flush=True)
    print()
    print(format_table(rows))
    return rows


def _bench(args):
    run_bench(n_samples=args.n_samples, n_features=args.n_features, device=args.device,
              random_state=args.random_state)
    return 0


def build_parser():
    """The argument parser of ``python -m sksae``."""
    parser = argparse.ArgumentParser(prog="python -m sksae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fit an SAE and scikit-learn's dictionary learning "
                                       "on toy superposition data and compare them")
    demo.add_argument("--n-samples", type=int, default=20_000)
    demo.add_argument("--device", default="auto")
    demo.add_argument("--random-state", type=int, default=0)
    demo.add_argument("--figure", default="sksae_demo.png",
                      help="path of the PNG summary figure (default: %(default)s)")
    demo.add_argument("--no-figure", action="store_true", help="do not write the figure")
    demo.add_argument("-v", "--verbose", action="count", default=0)
    demo.set_defaults(func=_demo)

    fit = sub.add_parser(
        "fit", help="train a sparse autoencoder on activations in a .npy file and save it",
        description="Train a SparseAutoencoder on ACTS (a .npy array of shape (n_rows, "
                    "n_features), memory-mapped; higher-dimensional arrays are flattened "
                    "to rows) and save it with sksae.save.")
    fit.add_argument("acts", help="input .npy file")
    fit.add_argument("-o", "--output", required=True, help="model folder to write")
    fit.add_argument("--architecture", default="topk", choices=architectures.available(),
                     help="a registered architecture (default: %(default)s)")
    fit.add_argument("--architecture-params", default=None, metavar="JSON",
                     help="hyperparameters of the architecture that are not options here, "
                          "as a JSON object (e.g. '{\"prefix_sizes\": [64, 256]}')")
    fit.add_argument("--n-components", type=int, default=None,
                     help="dictionary size (default: 8 x n_features)")
    fit.add_argument("--k", type=int, default=32, help="active latents (the TopK family: topk, batchtopk, matryoshka)")
    fit.add_argument("--alpha", type=float, default=None,
                     help="L1 weight (relu, gated; default: the estimator's)")
    fit.add_argument("--l0-coefficient", type=float, default=None,
                     help="L0 weight (jumprelu; default: the estimator's)")
    fit.add_argument("--learning-rate", default="auto")
    fit.add_argument("--batch-size", type=int, default=1024)
    fit.add_argument("--max-iter", type=int, default=30, help="epochs")
    fit.add_argument("--device", default="auto")
    fit.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                     help="precision of the training step's products (see SparseAutoencoder)")
    fit.add_argument("--random-state", type=int, default=None)
    fit.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(func=_fit)

    tr = sub.add_parser(
        "transform", help="encode a .npy file with a saved model",
        description="Encode ACTS with the model in MODEL_DIR (an sksae.save folder, or a "
                    "SAELens or sparsify SAE folder) and write the codes to a .npy file, "
                    "chunk by chunk.")
    tr.add_argument("model", help="model folder")
    tr.add_argument("acts", help="input .npy file")
    tr.add_argument("-o", "--output", required=True, help="output .npy file")
    tr.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    tr.add_argument("--chunk-rows", type=int, default=65536)
    tr.set_defaults(func=_transform)

    bench = sub.add_parser(
        "bench", help="quick comparison of every SAE architecture and dictionary learner",
        description="Fit every SparseAutoencoder architecture, DictionaryLearnerGPU and "
                    "scikit-learn's MiniBatchDictionaryLearning on toy superposition data "
                    "and print fit time, transform throughput, held-out FVE, L0 and "
                    "recovery of the true features. Built in and small (well under a "
                    "minute on a CPU); the full benchmarks are the scripts in benchmarks/ "
                    "of the source repository.")
    bench.add_argument("--n-samples", type=int, default=4000)
    bench.add_argument("--n-features", type=int, default=16)
    bench.add_argument("--device", default="auto")
    bench.add_argument("--random-state", type=int, default=0)
    bench.set_defaults(func=_bench)
    return parser


def main(argv=None):
    """Entry point of ``python -m sksae`` and of the ``sksae`` script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
