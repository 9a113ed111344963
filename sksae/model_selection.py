"""Model selection for dictionaries: sweeps over the dictionary size.

Scorers for ``GridSearchCV`` live in :mod:`sksae.metrics`
(:func:`~sksae.metrics.fve_scorer`, :func:`~sksae.metrics.make_sparsity_scorer`,
:func:`~sksae.metrics.make_mmcs_scorer`).
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import clone
from sklearn.utils import Bunch
from sklearn.utils._param_validation import Interval, validate_params

from ._base import final_step
from .metrics import (
    _core_sums,
    _encode_decode,
    _streamed,
    duplicate_fraction,
    feature_density,
    fraction_variance_explained,
    l0,
    match_dictionaries,
    max_cosine_similarity,
)

__all__ = ["dictionary_size_sweep", "shared_atom_count"]


def _distinct(atoms, threshold, absolute):
    """The atoms without an earlier atom of cosine above ``threshold``."""
    unit = atoms / np.maximum(np.linalg.norm(atoms, axis=1, keepdims=True), 1e-12)
    cos = unit @ unit.T
    if absolute:
        cos = np.abs(cos)
    later_copy = np.triu(cos > threshold, 1).any(axis=0)
    return atoms[~later_copy]


def shared_atom_count(A, B, threshold=0.9, *, absolute=False):
    """Number of distinct atoms two dictionaries share, one to one.

    Each dictionary is first reduced to its distinct atoms (an atom with an
    earlier atom of cosine above ``threshold`` is dropped), then the two are
    matched one to one (:func:`~sksae.metrics.match_dictionaries`, Hungarian
    algorithm) and the pairs with a cosine above ``threshold`` are counted.

    Parameters
    ----------
    A, B : array-like of shape (n_atoms_a, n_features), (n_atoms_b, n_features)
        Two dictionaries, one atom per row.
    threshold : float, default=0.9
        Cosine above which two atoms are the same direction.
    absolute : bool, default=False
        Compare by ``|cos|``.

    Returns
    -------
    n_shared : int

    Examples
    --------
    >>> import numpy as np
    >>> from sksae.model_selection import shared_atom_count
    >>> A = np.eye(4)
    >>> shared_atom_count(A[:3], np.vstack([A, A[0]]))
    3
    """
    A = _distinct(np.asarray(A, dtype=np.float64), threshold, absolute)
    B = _distinct(np.asarray(B, dtype=np.float64), threshold, absolute)
    if len(A) == 0 or len(B) == 0:
        return 0
    _, _, cos = match_dictionaries(A, B, absolute=absolute)
    return int(np.sum(cos > threshold))


def _estimate(sizes, n_shared):
    """The plateau of the shared-atom curve: its maximum, and the rule in words."""
    if sizes.size < 2 or np.all(np.isnan(n_shared)):
        return np.nan, "needs at least two sizes"
    j = int(np.nanargmax(n_shared))
    estimate = int(n_shared[j])
    rule = (
        "maximum of n_shared, the number of distinct atoms shared one to one "
        "(cosine > threshold) by the dictionaries of neighbouring sizes: it grows "
        "with the size while the smaller dictionary holds fewer atoms than the data "
        "has features, and levels off at the feature count once both hold every "
        f"feature (reached between {sizes[j - 1]} and {sizes[j]} atoms)"
    )
    if estimate >= 0.9 * sizes[j - 1]:
        rule += (
            f"; not levelled off: {estimate} shared atoms is over 90% of the smaller "
            f"size {sizes[j - 1]}, so the data may hold more features than the grid "
            "covers (a lower bound)"
        )
    return estimate, rule


def _fit_and_evaluate(estimator, X, X_eval, param_name, size, duplicate_threshold,
                      absolute):
    est = clone(estimator).set_params(**{param_name: int(size)}).fit(X)
    rows = _streamed(X_eval)
    if rows is not None:  # encoded chunk by chunk: codes of every row never held
        sums = _core_sums(est, rows).result()
        density, fve, mean_l0 = sums.feature_density, sums.explained_variance, sums.l0
    else:
        codes, X_hat = _encode_decode(est, X_eval)
        density = feature_density(codes)
        fve, mean_l0 = fraction_variance_explained(X_eval, X_hat), l0(codes)
    components = np.asarray(final_step(est).components_)
    alive = density > 0
    n_dup = 0.0
    if alive.any():  # duplicates among the alive atoms, as a fraction of all atoms
        n_dup = duplicate_fraction(
            components[alive], duplicate_threshold, absolute=absolute
        ) * alive.sum()
    return dict(
        estimator=est,
        components=components,
        alive=alive,
        fve=fve,
        l0=mean_l0,
        dead_fraction=float(np.mean(~alive)),
        duplicate_fraction=n_dup / alive.size,
    )


@validate_params(
    {
        "estimator": [object],
        "X": ["array-like"],
        "n_components_grid": ["array-like"],
        "X_eval": ["array-like", None],
        "true_features": ["array-like", None],
        "param_name": [str],
        "duplicate_threshold": [Interval(Real, -1, 1, closed="both")],
        "absolute": ["boolean"],
        "n_jobs": [Integral, None],
        "verbose": ["verbose"],
    },
    prefer_skip_nested_validation=False,
)
def dictionary_size_sweep(
    estimator,
    X,
    n_components_grid,
    *,
    X_eval=None,
    true_features=None,
    param_name="n_components",
    duplicate_threshold=0.9,
    absolute=False,
    n_jobs=None,
    verbose=0,
):
    r"""Fit one dictionary per size and compare neighbouring sizes.

    The procedure of Sharkey, Braun & Millidge (2022) for estimating how many
    features the data holds: while the dictionary is smaller than the true
    feature count, a larger dictionary splits or finds new directions, so it
    agrees poorly with the next smaller one; past the true count the extra
    atoms go dead or duplicate existing ones, and dictionaries of neighbouring
    sizes agree (their cross-size MMCS saturates near 1). The knee of these
    curves estimates the number of features.

    For each size ``K`` (sorted increasingly) a clone of ``estimator`` with
    ``param_name=K`` is fitted on ``X`` and evaluated on ``X_eval``:

    - ``fve``: :func:`~sksae.metrics.fraction_variance_explained` of
      ``X_eval`` by ``inverse_transform(transform(X_eval))``;
    - ``l0``: :func:`~sksae.metrics.l0` of the codes of ``X_eval``;
    - ``dead_fraction``: fraction of atoms that never fire on ``X_eval``;
    - ``duplicate_fraction``: fraction of the ``K`` atoms that are alive and
      have another alive atom with a cosine above ``duplicate_threshold``
      (:func:`~sksae.metrics.duplicate_fraction` on the alive atoms, times the
      alive fraction);
    - ``mmcs_to_previous``: the MMCS of the alive atoms of the next smaller
      dictionary to the alive atoms of this one,
      :math:`\frac{1}{|A|}\sum_{a \in A} \max_{b \in B} \cos(a, b)` with ``A``
      the smaller dictionary: does the larger dictionary contain the smaller
      one? ``nan`` for the first size (and when either has no alive atom);
    - ``mmcs_to_truth`` (when ``true_features`` is given): the MMCS of the
      true features to all atoms of this dictionary.

    Parameters
    ----------
    estimator : estimator instance
        Unfitted dictionary learner with ``fit``, ``transform``,
        ``inverse_transform`` and ``components_`` (e.g.
        :class:`sksae.SparseAutoencoder`, :class:`sksae.DictionaryLearnerGPU`,
        ``sklearn.decomposition.MiniBatchDictionaryLearning``), or a Pipeline
        ending in one (set ``param_name`` accordingly).
    X : array-like of shape (n_samples, n_features)
        Training data: an array, or an activation store (or a subset of one),
        memory map, zarr or h5py array, which the fits stream.
    n_components_grid : array-like of int
        Dictionary sizes to fit; sorted and deduplicated.
    X_eval : array-like of shape (n_eval, n_features), default=None
        Rows on which the metrics are computed; ``X`` when None. An
        out-of-core ``X_eval`` is encoded chunk by chunk with float64 sums (as
        :func:`~sksae.metrics.evaluate`), so neither it nor its codes are held
        whole.
    true_features : array-like of shape (n_true, n_features), default=None
        Ground-truth dictionary (toy data) for ``mmcs_to_truth``.
    param_name : str, default="n_components"
        Name of the size parameter in ``estimator.get_params()``
        (e.g. ``"sae__n_components"`` for a Pipeline step named ``sae``).
    duplicate_threshold : float in [-1, 1], default=0.9
        Cosine above which two atoms count as duplicates.
    absolute : bool, default=False
        Compare atoms by ``|cos|`` (for dictionaries whose atoms have no sign).
    n_jobs : int, default=None
        Number of sizes fitted in parallel by joblib; None means 1 unless in
        a ``joblib.parallel_backend`` context, -1 means all processors.
    verbose : int, default=0
        joblib verbosity.

    Returns
    -------
    result : :class:`~sklearn.utils.Bunch`
        With, each of shape (n_sizes,) unless stated: ``n_components`` (int),
        ``fve``, ``l0``, ``dead_fraction``, ``duplicate_fraction``,
        ``mmcs_to_previous``, ``mmcs_to_truth`` (only with
        ``true_features``), and ``estimators`` (list of the fitted clones).

    Examples
    --------
    >>> from sklearn.decomposition import MiniBatchDictionaryLearning
    >>> from sksae.datasets import make_sparse_superposition
    >>> from sksae.model_selection import dictionary_size_sweep
    >>> X = make_sparse_superposition(300, 8, 12, avg_active=2, random_state=0)
    >>> mbdl = MiniBatchDictionaryLearning(
    ...     max_iter=2, transform_algorithm="lasso_lars", random_state=0)
    >>> res = dictionary_size_sweep(mbdl, X, [4, 8, 16])
    >>> res.n_components.tolist(), bool(np.isnan(res.mmcs_to_previous[0]))
    ([4, 8, 16], True)
    """
    sizes = np.unique(np.asarray(n_components_grid, dtype=np.int64))
    if sizes.size == 0 or sizes[0] < 1:
        raise ValueError(
            f"n_components_grid must hold positive sizes, got {n_components_grid!r}."
        )
    if param_name not in estimator.get_params():
        raise ValueError(
            f"{type(estimator).__name__} has no parameter {param_name!r}; "
            "set param_name to the name of its dictionary-size parameter."
        )
    if X_eval is None:
        X_eval = X

    results = Parallel(n_jobs=n_jobs, verbose=verbose)(
        delayed(_fit_and_evaluate)(
            estimator, X, X_eval, param_name, size, duplicate_threshold, absolute
        )
        for size in sizes
    )

    mmcs_prev = np.full(sizes.size, np.nan)
    n_shared = np.full(sizes.size, np.nan)
    for j in range(1, sizes.size):
        prev, cur = results[j - 1], results[j]
        if prev["alive"].any() and cur["alive"].any():
            A = prev["components"][prev["alive"]]
            B = cur["components"][cur["alive"]]
            mmcs_prev[j] = max_cosine_similarity(A, B, absolute=absolute).mean()
            n_shared[j] = shared_atom_count(A, B, duplicate_threshold, absolute=absolute)
        else:
            n_shared[j] = 0
    estimate, rule = _estimate(sizes, n_shared)

    out = Bunch(
        n_components=sizes,
        fve=np.array([r["fve"] for r in results]),
        l0=np.array([r["l0"] for r in results]),
        dead_fraction=np.array([r["dead_fraction"] for r in results]),
        duplicate_fraction=np.array([r["duplicate_fraction"] for r in results]),
        mmcs_to_previous=mmcs_prev,
        n_shared=n_shared,
        n_features_estimate=estimate,
        estimate_rule=rule,
    )
    if true_features is not None:
        out.mmcs_to_truth = np.array(
            [
                max_cosine_similarity(
                    true_features, r["components"], absolute=absolute
                ).mean()
                for r in results
            ]
        )
    out.estimators = [r["estimator"] for r in results]
    return out
