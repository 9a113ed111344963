"""The demo run by ``python -m sksae demo``: ground-truth recovery, SAE versus scikit-learn."""

from __future__ import annotations

import time

import numpy as np

__all__ = ["run_demo", "evaluate_recovery", "format_table"]


def evaluate_recovery(name, model, X_test, features, seconds):
    """One table row: fit seconds, held-out FVE, L0, MMCS and recovery at 0.9."""
    from .metrics import fraction_variance_explained, l0, mean_max_cosine_similarity

    codes = model.transform(X_test)
    X_hat = model.inverse_transform(codes)
    mmcs, recovered = mean_max_cosine_similarity(features, model.components_, threshold=0.9)
    return {
        "model": name,
        "fit s": seconds,
        "held-out FVE": fraction_variance_explained(X_test, X_hat),
        "L0": l0(codes),
        "MMCS": mmcs,
        "recovered@0.9": recovered,
    }


def format_table(rows):
    """Rows of dicts as an aligned plain-text table."""
    cols = list(rows[0])
    cells = [[f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def run_demo(n_samples=20_000, n_features=64, n_true=128, n_components=256,
             random_state=0, device="auto", verbose=0, figure=None):
    """Fit SparseAutoencoder and MiniBatchDictionaryLearning on toy superposition data.

    Prints one table: fit seconds, held-out fraction of variance explained,
    mean L0, mean max cosine similarity (MMCS) to the true features and the
    fraction recovered above 0.9 cosine.

    Parameters
    ----------
    n_samples : int, default=20_000
        Training rows (a fifth more are generated for the held-out set).
    n_features : int, default=64
        Input dimensions.
    n_true : int, default=128
        Ground-truth features in superposition (~5 active per row, correlated).
    n_components : int, default=256
        Dictionary size of both models.
    random_state : int, default=0
    device : str, default="auto"
    verbose : int, default=0
    figure : str or None, default=None
        Path of a PNG summary figure to write (needs matplotlib).

    Returns
    -------
    rows : list of dict
        One row of the table per model.
    """
    from sklearn.decomposition import MiniBatchDictionaryLearning

    from ._sae import SparseAutoencoder
    from .datasets import make_sparse_superposition

    n_test = n_samples // 5
    X, features = make_sparse_superposition(
        n_samples + n_test, n_features, n_true, correlated=True, random_state=random_state,
        return_features=True)
    X_train, X_test = X[:n_samples], X[n_samples:]
    print(f"Toy data: {n_samples} rows, {n_features} dims, {n_true} true features "
          f"in superposition (~5 active per row, correlated); {n_components} atoms.\n")

    models = [
        ("SparseAutoencoder(topk, k=8)",
         SparseAutoencoder(n_components=n_components, k=8, max_iter=10, device=device,
                           random_state=random_state, verbose=verbose)),
        ("sklearn MiniBatchDictionaryLearning",
         MiniBatchDictionaryLearning(n_components=n_components, alpha=0.1, batch_size=256,
                                     max_iter=3, transform_algorithm="lasso_lars",
                                     transform_alpha=0.1, random_state=random_state)),
    ]
    rows, fitted = [], {}
    for name, model in models:
        start = time.perf_counter()
        model.fit(X_train)
        seconds = time.perf_counter() - start
        rows.append(evaluate_recovery(name, model, X_test, features, seconds))
        fitted[name] = model
    print(format_table(rows))
    if figure is not None:
        _summary_figure(fitted, features, figure)
        print(f"\nSummary figure written to {figure}")
    return rows


def _summary_figure(models, features, path):
    """Histogram of each model's max cosine similarity to the true features."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import max_cosine_similarity

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 41)
    for name, model in models.items():
        ax.hist(max_cosine_similarity(features, model.components_), bins=bins, alpha=0.6,
                label=name)
    ax.set_xlabel("max cosine similarity of a true feature to any atom")
    ax.set_ylabel("true features")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
