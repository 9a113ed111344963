"""Plots of fitted dictionaries and their training (needs matplotlib: ``pip install "sksae[plot]"``).

Every function takes a fitted estimator (or plain arrays) and an optional
matplotlib ``ax`` / ``axes`` to draw into, and returns what it drew on.
matplotlib is imported when a function is first called, not with
:mod:`sksae`.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "plot_training_curves",
    "plot_feature_density",
    "plot_atoms",
    "plot_recovery",
    "plot_dictionary_size_sweep",
]

_LABELS = {
    "loss": "training loss",
    "fve": "FVE",
    "fvu": "FVU",
    "l0": "L0 (active latents per row)",
    "dead_fraction": "dead fraction",
    "lr": "learning rate",
    "mse": "MSE",
    "duplicate_fraction": "duplicate fraction",
    "mmcs_to_previous": "MMCS to previous size",
    "mmcs_to_truth": "MMCS to true features",
}


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "sksae.plotting needs matplotlib: pip install \"sksae[plot]\" "
            "(or pip install matplotlib)."
        ) from exc
    return plt


def _axes(axes, n, figsize):
    """``n`` Axes: the given ones, or a new row of subplots."""
    if axes is None:
        plt = _pyplot()
        _, axes = plt.subplots(1, n, figsize=figsize, squeeze=False)
        return axes[0]
    axes = np.atleast_1d(np.asarray(axes, dtype=object)).ravel()
    if axes.size != n:
        raise ValueError(f"Expected {n} Axes, got {axes.size}.")
    return axes


def _components(model_or_components):
    if hasattr(model_or_components, "components_"):
        return np.asarray(model_or_components.components_)
    return np.asarray(model_or_components)


def plot_training_curves(model, keys=("loss", "fve", "l0", "dead_fraction"), *,
                         per="step", axes=None, smooth=None):
    """Training curves from ``history_``: one panel per metric.

    Parameters
    ----------
    model : SparseAutoencoder or dict
        A fitted estimator with ``history_``, or a ``history_`` dict.
    keys : sequence of str, default=("loss", "fve", "l0", "dead_fraction")
        Metrics to plot; those missing from the history are skipped
        (e.g. ``"lr"``, ``"mse"``, ``"fvu"``, architecture loss terms).
    per : {"step", "epoch"}, default="step"
        Per-step records or per-epoch means.
    axes : array-like of matplotlib Axes, default=None
        One Axes per plotted metric; None creates a row of subplots.
    smooth : int or None, default=None
        Width of a moving average drawn over per-step curves.

    Returns
    -------
    axes : ndarray of matplotlib Axes
    """
    history = model if isinstance(model, dict) else getattr(model, "history_", None)
    if not isinstance(history, dict) or per not in history:
        raise ValueError("model must be a fitted estimator with history_ or a history_ dict "
                         f"with a {per!r} entry.")
    records = history[per]
    keys = [k for k in keys if k in records]
    if not keys:
        raise ValueError(f"None of the requested metrics is in history_[{per!r}] "
                         f"(available: {sorted(records)}).")
    axes = _axes(axes, len(keys), (3.2 * len(keys), 2.8))
    x = np.arange(1, len(records[keys[0]]) + 1)
    for ax, key in zip(axes, keys):
        y = np.asarray(records[key], dtype=float)
        ax.plot(x, y, lw=1, alpha=0.5 if smooth else 1.0)
        if smooth and per == "step" and len(y) >= smooth > 1:
            kernel = np.ones(smooth) / smooth
            ax.plot(x[smooth - 1:], np.convolve(y, kernel, mode="valid"), lw=1.5)
        ax.set_xlabel(per)
        ax.set_title(_LABELS.get(key, key), fontsize=10)
        if key == "loss" and np.all(y > 0):
            ax.set_yscale("log")
    axes[0].figure.tight_layout()
    return axes


def plot_feature_density(model, X=None, *, ax=None, bins=40, label=None):
    """Histogram of log10 feature density (fraction of rows where each atom fires).

    Dead atoms (density 0) cannot be placed on a log axis; their number is
    given in the legend.

    Parameters
    ----------
    model : fitted transformer or array-like of shape (n_samples, n_components)
        An estimator (then ``X`` is required and encoded) or codes.
    X : array-like of shape (n_samples, n_features), default=None
        Rows to encode with ``model``.
    ax : matplotlib Axes, default=None
    bins : int, default=40
    label : str, default=None
        Legend label (useful to overlay several models on one ``ax``).

    Returns
    -------
    ax : matplotlib Axes
    """
    from .metrics import feature_density

    if hasattr(model, "transform"):
        if X is None:
            raise ValueError("X is required to compute the density of an estimator's codes.")
        codes = model.transform(X)
    else:
        codes = model
    density = feature_density(codes)
    alive = density[density > 0]
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(5, 3.2))
    n_dead = density.size - alive.size
    text = f"{n_dead} dead of {density.size}"
    ax.hist(np.log10(alive), bins=bins, alpha=0.7,
            label=f"{label}: {text}" if label else text)
    ax.set_xlabel("log10 feature density")
    ax.set_ylabel("atoms")
    ax.legend(fontsize=8)
    return ax


def plot_atoms(model, patch_shape, *, n_atoms=64, ncols=None, ax=None, cmap="gray",
               order=None):
    """Atoms shown as images, in one grid (for dictionaries of image patches).

    Each atom is reshaped to ``patch_shape`` and scaled to its own range.

    Parameters
    ----------
    model : fitted estimator or array-like of shape (n_components, n_features)
        An estimator with ``components_``, or the atoms.
    patch_shape : tuple of int
        ``(height, width)`` or ``(height, width, channels)`` with
        ``prod(patch_shape) == n_features``.
    n_atoms : int, default=64
        Number of atoms shown (the first ones, or the first of ``order``).
    ncols : int, default=None
        Grid columns; None makes the grid roughly square.
    ax : matplotlib Axes, default=None
    cmap : str, default="gray"
    order : array-like of int, default=None
        Atom indices to show first, e.g. ``np.argsort(-density)``.

    Returns
    -------
    ax : matplotlib Axes
    """
    atoms = _components(model)
    patch_shape = tuple(int(s) for s in patch_shape)
    if int(np.prod(patch_shape)) != atoms.shape[1]:
        raise ValueError(f"patch_shape {patch_shape} has {int(np.prod(patch_shape))} "
                         f"pixels; the atoms have {atoms.shape[1]} features.")
    idx = np.arange(len(atoms)) if order is None else np.asarray(order)
    idx = idx[:n_atoms]
    ncols = ncols or int(np.ceil(np.sqrt(len(idx))))
    nrows = int(np.ceil(len(idx) / ncols))
    h, w = patch_shape[:2]
    channels = patch_shape[2:]
    grid = np.full((nrows * (h + 1) + 1, ncols * (w + 1) + 1, *channels), np.nan)
    for pos, i in enumerate(idx):
        img = atoms[i].reshape(patch_shape).astype(float)
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        r, c = divmod(pos, ncols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = img
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(0.45 * ncols + 1, 0.45 * nrows + 1))
    if channels:
        grid = np.nan_to_num(grid, nan=1.0)
    ax.imshow(grid, cmap=cmap, interpolation="nearest", vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(f"{len(idx)} of {len(atoms)} atoms", fontsize=10)
    return ax


def plot_recovery(true_features, model, *, threshold=0.9, ax=None, label=None, bins=40):
    """Histogram of each true feature's best cosine similarity to a learned atom.

    The mean of these values is the MMCS (mean max cosine similarity); the
    fraction above ``threshold`` counts as recovered. Both are in the legend.

    Parameters
    ----------
    true_features : array-like of shape (n_true, n_features)
        Ground-truth directions, e.g. from
        :func:`sksae.datasets.make_sparse_superposition` with
        ``return_features=True``.
    model : fitted estimator or array-like of shape (n_components, n_features)
        An estimator with ``components_``, or the atoms.
    threshold : float, default=0.9
    ax : matplotlib Axes, default=None
    label : str, default=None
        Legend label prefix (to overlay several models on one ``ax``).
    bins : int, default=40

    Returns
    -------
    ax : matplotlib Axes
    """
    from .metrics import max_cosine_similarity

    sims = max_cosine_similarity(np.asarray(true_features), _components(model))
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(5, 3.2))
    text = f"MMCS {sims.mean():.3f}, {np.mean(sims >= threshold):.0%} >= {threshold}"
    ax.hist(sims, bins=np.linspace(min(0.0, sims.min()), 1, bins + 1), alpha=0.6,
            label=f"{label}: {text}" if label else text)
    ax.axvline(threshold, color="k", ls="--", lw=1)
    ax.set_xlabel("max cosine similarity of a true feature to any atom")
    ax.set_ylabel("true features")
    ax.legend(fontsize=8)
    return ax


def plot_dictionary_size_sweep(result, keys=("fve", "l0", "dead_fraction",
                                             "duplicate_fraction", "mmcs_to_previous",
                                             "mmcs_to_truth"), *, axes=None, label=None):
    """Metrics against dictionary size, from :func:`sksae.model_selection.dictionary_size_sweep`.

    Parameters
    ----------
    result : Bunch
        The sweep's result (``n_components`` and one array per metric).
    keys : sequence of str
        Metrics to plot; those missing from ``result`` are skipped.
    axes : array-like of matplotlib Axes, default=None
        One Axes per plotted metric; None creates a row of subplots.
    label : str, default=None
        Legend label (to overlay the sweeps of several estimators).

    Returns
    -------
    axes : ndarray of matplotlib Axes
    """
    sizes = np.asarray(result["n_components"])
    keys = [k for k in keys if k in result and result[k] is not None]
    if not keys:
        raise ValueError("result has none of the requested metrics.")
    axes = _axes(axes, len(keys), (3.0 * len(keys), 2.8))
    for ax, key in zip(axes, keys):
        ax.plot(sizes, np.asarray(result[key], dtype=float), "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n_components")
        ax.set_title(_LABELS.get(key, key), fontsize=10)
        if label:
            ax.legend(fontsize=8)
    axes[0].figure.tight_layout()
    return axes
