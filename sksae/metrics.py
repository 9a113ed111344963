"""Metrics for sparse dictionaries and autoencoders, and scorers for model search.

Each metric has one definition, stated with its formula in its docstring
(peer libraries disagree on several of them, e.g. whether the fraction of
variance explained is centred or averaged per row). Inputs may be numpy
arrays, array-likes or torch tensors; code matrices may also be sparse.

Scorers follow scikit-learn's ``scorer(estimator, X, y=None)`` protocol, so
they plug into ``GridSearchCV(scoring=...)`` and ``cross_validate``; a larger
score is always better.
"""

from __future__ import annotations

from numbers import Real

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from sklearn.utils import Bunch
from sklearn.utils._param_validation import Interval, validate_params
from sklearn.utils.validation import check_array

__all__ = [
    "fraction_variance_explained",
    "l0",
    "feature_density",
    "dead_fraction",
    "max_cosine_similarity",
    "mean_max_cosine_similarity",
    "duplicate_fraction",
    "relative_reconstruction_bias",
    "match_dictionaries",
    "fve_scorer",
    "make_sparsity_scorer",
    "make_mmcs_scorer",
    "evaluate",
]

_CHUNK_ROWS = 65536


def _to_numpy(a):
    """A numpy view of a torch tensor (detached, on the CPU); other inputs as is."""
    if type(a).__module__.split(".")[0] == "torch":
        return a.detach().cpu().numpy()
    return a


def _check_dense(a, name, ensure_2d=True):
    return check_array(
        _to_numpy(a),
        dtype=[np.float64, np.float32],
        ensure_2d=ensure_2d,
        input_name=name,
    )


def _check_codes(codes):
    """Codes as a CSR matrix or a 2-D array (any numeric dtype)."""
    codes = _to_numpy(codes)
    return check_array(
        codes, accept_sparse="csr", dtype=None, ensure_all_finite=False,
        input_name="codes",
    )


def _check_pair(X, X_hat):
    X = _check_dense(X, "X")
    X_hat = _check_dense(X_hat, "X_hat")
    if X.shape != X_hat.shape:
        raise ValueError(
            f"X and X_hat must have the same shape, got {X.shape} and {X_hat.shape}."
        )
    return X, X_hat


def _row_chunks(n):
    for start in range(0, n, _CHUNK_ROWS):
        yield slice(start, min(start + _CHUNK_ROWS, n))


@validate_params(
    {"X": ["array-like"], "X_hat": ["array-like"]},
    prefer_skip_nested_validation=True,
)
def fraction_variance_explained(X, X_hat):
    r"""Fraction of the variance of ``X`` explained by its reconstruction.

    .. math::

        \mathrm{FVE} = 1 - \frac{\sum_n \lVert x_n - \hat x_n \rVert^2}
                                {\sum_n \lVert x_n - \bar x \rVert^2},

    with :math:`\bar x` the mean of the rows of ``X`` (one mean per input
    feature, over the evaluated rows). This is
    ``sklearn.metrics.r2_score(X, X_hat, multioutput="variance_weighted")``;
    ``1 - FVE`` is the fraction of variance unexplained (FVU). Neither a mean
    of per-row ratios nor an uncentred ratio, which some libraries report.

    Sums are accumulated in float64 over chunks of rows, so memory stays
    bounded for large ``X``.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        The data.
    X_hat : array-like of shape (n_samples, n_features)
        Its reconstruction.

    Returns
    -------
    fve : float
        At most 1; 1 for a perfect reconstruction, 0 for reconstructing every
        row by the mean, negative when worse. When ``X`` has no variance:
        1.0 if ``X_hat == X``, else 0.0 (as ``r2_score``).

    Notes
    -----
    ``r2_score`` drops the columns of ``X`` with zero variance from the
    numerator; the formula above keeps them. They differ only when ``X`` has a
    constant column that ``X_hat`` does not reproduce.

    Examples
    --------
    >>> import numpy as np
    >>> from sksae.metrics import fraction_variance_explained
    >>> X = np.array([[0.0, 1.0], [2.0, 3.0]])
    >>> fraction_variance_explained(X, X)
    1.0
    >>> fraction_variance_explained(X, np.array([[1.0, 2.0], [1.0, 2.0]]))
    0.0
    """
    X, X_hat = _check_pair(X, X_hat)
    mean = X.mean(axis=0, dtype=np.float64)
    num = den = 0.0
    for rows in _row_chunks(X.shape[0]):
        x = X[rows].astype(np.float64)
        num += float(np.square(x - X_hat[rows]).sum())
        den += float(np.square(x - mean).sum())
    if den == 0.0:
        return 1.0 if num == 0.0 else 0.0
    return 1.0 - num / den


@validate_params(
    {"X": ["array-like"], "X_hat": ["array-like"]},
    prefer_skip_nested_validation=True,
)
def relative_reconstruction_bias(X, X_hat):
    r"""Shrinkage of a reconstruction: the best rescaling of ``X_hat`` towards ``X``.

    .. math::

        \gamma = \frac{\sum_n \langle \hat x_n - \bar x, x_n - \bar x \rangle}
                      {\sum_n \lVert \hat x_n - \bar x \rVert^2},

    :math:`\bar x` being the mean of the rows of ``X`` (both ``X`` and
    ``X_hat`` are centred by it). :math:`\gamma` minimises
    :math:`\sum_n \lVert \gamma (\hat x_n - \bar x) - (x_n - \bar x)\rVert^2`:
    1 means unbiased, above 1 the codes undershoot (the shrinkage an L1
    penalty causes), below 1 they overshoot (Wright & Sharkey, 2024,
    "Addressing feature suppression in SAEs").

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        The data.
    X_hat : array-like of shape (n_samples, n_features)
        Its reconstruction.

    Returns
    -------
    gamma : float
        ``nan`` when the centred ``X_hat`` is zero.

    Examples
    --------
    >>> import numpy as np
    >>> from sksae.metrics import relative_reconstruction_bias
    >>> X = np.array([[0.0, 2.0], [2.0, 0.0]])
    >>> relative_reconstruction_bias(X, 0.5 * X + 0.5)
    2.0
    """
    X, X_hat = _check_pair(X, X_hat)
    mean = X.mean(axis=0, dtype=np.float64)
    num = den = 0.0
    for rows in _row_chunks(X.shape[0]):
        xh = X_hat[rows].astype(np.float64) - mean
        num += float(np.einsum("ij,ij->", xh, X[rows] - mean))
        den += float(np.square(xh).sum())
    return num / den if den > 0 else float("nan")


def _active_counts_per_atom(codes):
    """Number of rows in which each column is non-zero."""
    if sp.issparse(codes):
        codes = codes.copy()
        codes.eliminate_zeros()
        return np.bincount(codes.indices, minlength=codes.shape[1])
    return np.count_nonzero(codes, axis=0)


@validate_params(
    {"codes": ["array-like", "sparse matrix"]},
    prefer_skip_nested_validation=True,
)
def l0(codes):
    r"""Mean number of non-zero codes per row.

    .. math::

        L_0 = \frac{1}{N} \sum_n \#\{i : u_{ni} \neq 0\}.

    Parameters
    ----------
    codes : {array-like, sparse matrix} of shape (n_samples, n_components)
        Codes, e.g. the output of ``transform``.

    Returns
    -------
    l0 : float

    Examples
    --------
    >>> import numpy as np
    >>> from sksae.metrics import l0
    >>> l0(np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]]))
    1.5
    """
    codes = _check_codes(codes)
    nnz = _active_counts_per_atom(codes).sum()
    return float(nnz) / codes.shape[0]


@validate_params(
    {"codes": ["array-like", "sparse matrix"]},
    prefer_skip_nested_validation=True,
)
def feature_density(codes):
    r"""Fraction of rows in which each atom fires.

    .. math::

        \rho_i = \frac{1}{N} \#\{n : u_{ni} \neq 0\}.

    Parameters
    ----------
    codes : {array-like, sparse matrix} of shape (n_samples, n_components)

    Returns
    -------
    density : ndarray of shape (n_components,)

    Examples
    --------
    >>> import numpy as np
    >>> from sksae.metrics import feature_density
    >>> feature_density(np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])).tolist()
    [0.0, 0.5, 1.0]
    """
    codes = _check_codes(codes)
    return _active_counts_per_atom(codes) / codes.shape[0]


@validate_params(
    {"codes": ["array-like", "sparse matrix"]},
    prefer_skip_nested_validation=True,
)
def dead_fraction(codes):
    r"""Fraction of atoms that never fire on the given rows.

    .. math::

        \frac{1}{K} \#\{i : u_{ni} = 0 \text{ for every row } n\}.

    "Dead" is relative to the rows passed: evaluate on enough rows that an
    alive but rare atom fires (peer libraries use ~10M tokens).

    Parameters
    ----------
    codes : {array-like, sparse matrix} of shape (n_samples, n_components)

    Returns
    -------
    dead_fraction : float

    Examples
    --------
    >>> import numpy as np
    >>> from sksae.metrics import dead_fraction
    >>> dead_fraction(np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]]))
    0.3333333333333333
    """
    codes = _check_codes(codes)
    return float(np.mean(_active_counts_per_atom(codes) == 0))


def _unit_rows(A):
    norms = np.linalg.norm(A, axis=1, keepdims=True)
    return A / np.where(norms > 0, norms, 1.0)


def _check_atoms(true_atoms, learned_atoms):
    A = _unit_rows(_check_dense(true_atoms, "true_atoms").astype(np.float64))
    B = _unit_rows(_check_dense(learned_atoms, "learned_atoms").astype(np.float64))
    if A.shape[1] != B.shape[1]:
        raise ValueError(
            "Both dictionaries need the same number of features (columns), got "
            f"{A.shape[1]} and {B.shape[1]}."
        )
    return A, B


@validate_params(
    {
        "true_atoms": ["array-like"],
        "learned_atoms": ["array-like"],
        "absolute": ["boolean"],
    },
    prefer_skip_nested_validation=True,
)
def max_cosine_similarity(true_atoms, learned_atoms, *, absolute=False):
    r"""For each reference atom, its largest cosine similarity to a learned atom.

    .. math::

        m_i = \max_j \frac{\langle a_i, b_j \rangle}
                          {\lVert a_i \rVert \lVert b_j \rVert}.

    Parameters
    ----------
    true_atoms : array-like of shape (n_true, n_features)
        Reference dictionary, one atom per row (need not be unit-norm).
    learned_atoms : array-like of shape (n_learned, n_features)
        Learned dictionary, e.g. ``estimator.components_``.
    absolute : bool, default=False
        Use ``|cos|``, for dictionaries whose atoms have no sign (codes of
        either sign, as in ``MiniBatchDictionaryLearning``). The default,
        signed, suits non-negative codes (sparse autoencoders).

    Returns
    -------
    max_cos : ndarray of shape (n_true,)
        0 for a zero atom.
    """
    A, B = _check_atoms(true_atoms, learned_atoms)
    out = np.empty(A.shape[0])
    for rows in _row_chunks(A.shape[0]):  # bounds the (rows, n_learned) block
        cos = A[rows] @ B.T
        out[rows] = (np.abs(cos) if absolute else cos).max(axis=1)
    return out


@validate_params(
    {
        "true_atoms": ["array-like"],
        "learned_atoms": ["array-like"],
        "threshold": [Interval(Real, -1, 1, closed="both"), None],
        "absolute": ["boolean"],
    },
    prefer_skip_nested_validation=True,
)
def mean_max_cosine_similarity(true_atoms, learned_atoms, threshold=None, *,
                               absolute=False):
    r"""Mean max cosine similarity (MMCS) of a learned dictionary to a reference.

    .. math::

        \mathrm{MMCS} = \frac{1}{G} \sum_{i=1}^{G} \max_j
            \frac{\langle a_i, b_j \rangle}{\lVert a_i \rVert \lVert b_j \rVert},

    over the ``G`` reference atoms :math:`a_i` (Sharkey, Braun & Millidge,
    2022). With a ``threshold`` ``t`` also the recovery rate, the fraction of
    reference atoms with a max cosine above ``t``:
    :math:`\frac{1}{G} \#\{i : \max_j \cos(a_i, b_j) > t\}` (0.9 is usual).

    MMCS is not symmetric: it asks whether every reference atom has a learned
    counterpart, not whether every learned atom is meaningful; for a
    one-to-one comparison see :func:`match_dictionaries`.

    Parameters
    ----------
    true_atoms : array-like of shape (n_true, n_features)
        Reference (e.g. ground-truth) dictionary, one atom per row.
    learned_atoms : array-like of shape (n_learned, n_features)
        Learned dictionary, e.g. ``estimator.components_``.
    threshold : float in [-1, 1], default=None
        When given, also return the recovery rate above it.
    absolute : bool, default=False
        Use ``|cos|`` (see :func:`max_cosine_similarity`).

    Returns
    -------
    mmcs : float
        When ``threshold`` is None.
    (mmcs, recovery_rate) : tuple of float
        When ``threshold`` is given.

    Examples
    --------
    >>> import numpy as np
    >>> from sksae.metrics import mean_max_cosine_similarity
    >>> D = np.eye(3)
    >>> mean_max_cosine_similarity(D, 2.0 * D[[2, 0, 1]])
    1.0
    >>> mean_max_cosine_similarity(D, D[:2], threshold=0.9)
    (0.6666666666666666, 0.6666666666666666)
    """
    m = max_cosine_similarity(true_atoms, learned_atoms, absolute=absolute)
    mmcs = float(m.mean())
    if threshold is None:
        return mmcs
    return mmcs, float(np.mean(m > threshold))


@validate_params(
    {
        "atoms": ["array-like"],
        "threshold": [Interval(Real, -1, 1, closed="both")],
        "absolute": ["boolean"],
    },
    prefer_skip_nested_validation=True,
)
def duplicate_fraction(atoms, threshold=0.9, *, absolute=False):
    r"""Fraction of atoms nearly parallel to another atom of the same dictionary.

    .. math::

        \frac{1}{K} \#\{i : \max_{j \neq i} \cos(d_i, d_j) > t\}.

    Both atoms of a duplicated pair count. Zero atoms are never duplicates.

    Parameters
    ----------
    atoms : array-like of shape (n_components, n_features)
        A dictionary, one atom per row.
    threshold : float in [-1, 1], default=0.9
        Cosine above which two atoms are duplicates.
    absolute : bool, default=False
        Use ``|cos|`` (see :func:`max_cosine_similarity`).

    Returns
    -------
    duplicate_fraction : float

    Examples
    --------
    >>> import numpy as np
    >>> from sksae.metrics import duplicate_fraction
    >>> duplicate_fraction(np.array([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0]]))
    0.6666666666666666
    """
    A = _unit_rows(_check_dense(atoms, "atoms").astype(np.float64))
    if A.shape[0] < 2:
        return 0.0
    dup = np.zeros(A.shape[0], dtype=bool)
    for rows in _row_chunks(A.shape[0]):
        cos = A[rows] @ A.T
        if absolute:
            cos = np.abs(cos)
        idx = np.arange(rows.start, rows.stop)
        cos[idx - rows.start, idx] = -np.inf
        dup[rows] = cos.max(axis=1) > threshold
    return float(dup.mean())


@validate_params(
    {"A": ["array-like"], "B": ["array-like"], "absolute": ["boolean"]},
    prefer_skip_nested_validation=True,
)
def match_dictionaries(A, B, *, absolute=False):
    r"""One-to-one matching of the atoms of two dictionaries (Hungarian algorithm).

    Finds the injective pairing :math:`\pi` of rows of the smaller dictionary
    with rows of the other that maximises the total cosine similarity
    :math:`\sum_i \cos(a_i, b_{\pi(i)})`
    (``scipy.optimize.linear_sum_assignment``). Unlike MMCS, two reference
    atoms cannot both claim the same learned atom, so
    ``cosine.mean()`` rewards a dictionary only for distinct recoveries.

    Parameters
    ----------
    A : array-like of shape (n_atoms_a, n_features)
        First dictionary, one atom per row.
    B : array-like of shape (n_atoms_b, n_features)
        Second dictionary.
    absolute : bool, default=False
        Match on ``|cos|``; the returned cosines are then absolute values too.
        The default, signed cosines, suits sign-definite atoms (SAE decoders).

    Returns
    -------
    ind_a : ndarray of shape (n_pairs,)
        Row indices into ``A``, increasing; ``n_pairs = min(n_atoms_a, n_atoms_b)``.
    ind_b : ndarray of shape (n_pairs,)
        Matched row indices into ``B``.
    cosine : ndarray of shape (n_pairs,)
        Cosine similarity of each matched pair.

    Examples
    --------
    >>> import numpy as np
    >>> from sksae.metrics import match_dictionaries
    >>> A = np.eye(3)
    >>> ind_a, ind_b, cos = match_dictionaries(A, 3.0 * A[[2, 0, 1]])
    >>> ind_b.tolist(), cos.tolist()
    ([1, 2, 0], [1.0, 1.0, 1.0])
    """
    A, B = _check_atoms(A, B)
    cos = A @ B.T
    if absolute:
        cos = np.abs(cos)
    ind_a, ind_b = linear_sum_assignment(cos, maximize=True)
    return ind_a, ind_b, cos[ind_a, ind_b]


# --------------------------------------------------------------------- scorers


def _encode_decode(estimator, X):
    """Codes and reconstruction of ``X`` by a fitted dictionary estimator."""
    from ._base import final_step

    codes = estimator.transform(X)
    if hasattr(estimator, "inverse_transform"):
        X_hat = estimator.inverse_transform(codes)
    else:
        X_hat = codes @ final_step(estimator).components_
    return codes, X_hat


def fve_scorer(estimator, X, y=None):
    """Scorer: fraction of variance of ``X`` explained by a fitted estimator.

    ``fraction_variance_explained(X, X_hat)`` with
    ``X_hat = estimator.inverse_transform(estimator.transform(X))``; for
    ``GridSearchCV(scoring=fve_scorer)``. Without ``inverse_transform``
    the reconstruction is ``codes @ components_``.

    Parameters
    ----------
    estimator : fitted estimator
        With ``transform`` and ``inverse_transform`` (or ``components_``).
    X : array-like of shape (n_samples, n_features)
        Evaluation rows, encoded chunk by chunk in bounded memory (as
        :func:`evaluate` does). An activation store (or a fold of one), a
        memory map, zarr or h5py array, and float16 or bfloat16 values in
        memory are also read chunk by chunk, never copied whole into float64.
    y : None
        Ignored.

    Returns
    -------
    score : float
        See :func:`fraction_variance_explained`.
    """
    # chunk by chunk for every X: a fold's codes at once are n_samples x n_components
    return _core_sums(estimator, X).result().explained_variance


class _SparsityScorer:
    """FVE penalised by the excess of L0 over a budget (see make_sparsity_scorer)."""

    def __init__(self, l0_budget, penalty):
        self.l0_budget = l0_budget
        self.penalty = penalty

    def __call__(self, estimator, X, y=None):
        sums = _core_sums(estimator, X).result()
        fve, mean_l0 = sums.explained_variance, sums.l0
        excess = max(0.0, mean_l0 / self.l0_budget - 1.0)
        if excess == 0.0:
            return fve
        return fve - self.penalty * excess

    def __repr__(self):
        return (
            f"make_sparsity_scorer(l0_budget={self.l0_budget}, "
            f"penalty={self.penalty})"
        )


@validate_params(
    {
        "l0_budget": [Interval(Real, 0, None, closed="neither")],
        "penalty": [Interval(Real, 0, None, closed="both")],  # inf allowed
    },
    prefer_skip_nested_validation=True,
)
def make_sparsity_scorer(l0_budget, *, penalty=1.0):
    r"""Scorer: fraction of variance explained subject to an L0 budget.

    .. math::

        \mathrm{score} = \mathrm{FVE} - \lambda \max\left(0,
            \frac{L_0}{B} - 1\right),

    with ``B = l0_budget`` and ``lambda = penalty``: the plain FVE while the
    mean number of active codes per row stays within the budget, minus
    ``penalty`` per 100% of overshoot beyond it. ``penalty=np.inf`` makes the
    budget a hard constraint (score ``-inf`` above it). A grid search with this
    scorer picks the most faithful model among the sparse-enough ones.

    Parameters
    ----------
    l0_budget : float
        Largest acceptable mean number of active codes per row.
    penalty : float, default=1.0
        Score lost per unit of relative excess ``L0 / l0_budget - 1``.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y=None) -> float``, picklable. Every ``X`` is
        encoded chunk by chunk in bounded memory, as by :func:`fve_scorer`;
        an out-of-core ``X`` (an activation store or a fold of one, a memory
        map) is also read chunk by chunk.

    Examples
    --------
    >>> from sksae.metrics import make_sparsity_scorer
    >>> make_sparsity_scorer(8)
    make_sparsity_scorer(l0_budget=8, penalty=1.0)
    """
    return _SparsityScorer(l0_budget, penalty)


class _MMCSScorer:
    """Ground-truth MMCS (or recovery rate) of components_ (see make_mmcs_scorer)."""

    def __init__(self, true_features, threshold, absolute):
        self.true_features = true_features
        self.threshold = threshold
        self.absolute = absolute

    def __call__(self, estimator, X=None, y=None):
        from ._base import final_step

        learned = final_step(estimator).components_
        m = max_cosine_similarity(self.true_features, learned, absolute=self.absolute)
        if self.threshold is None:
            return float(m.mean())
        return float(np.mean(m > self.threshold))

    def __repr__(self):
        return (
            f"make_mmcs_scorer(<{self.true_features.shape[0]} true features>, "
            f"threshold={self.threshold}, absolute={self.absolute})"
        )


@validate_params(
    {
        "true_features": ["array-like"],
        "threshold": [Interval(Real, -1, 1, closed="both"), None],
        "absolute": ["boolean"],
    },
    prefer_skip_nested_validation=True,
)
def make_mmcs_scorer(true_features, *, threshold=None, absolute=False):
    """Scorer: how well ``components_`` recovers a known dictionary (toy data).

    The score is :func:`mean_max_cosine_similarity` of ``true_features`` to the
    fitted ``components_`` (of the last step of a Pipeline), or with a
    ``threshold`` the recovery rate, the fraction of true features with a
    learned atom of cosine above it. ``X`` is not used: the score depends on
    the dictionary only, so every cross-validation fold scores the model
    fitted on its training rows.

    Parameters
    ----------
    true_features : array-like of shape (n_true, n_features)
        Ground-truth dictionary, e.g. from
        :func:`sksae.datasets.make_sparse_superposition` with
        ``return_features=True``.
    threshold : float in [-1, 1], default=None
        Score the recovery rate above this cosine instead of the MMCS.
    absolute : bool, default=False
        Use ``|cos|`` (for atoms without a sign).

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y=None) -> float``, picklable.

    Examples
    --------
    >>> import numpy as np
    >>> from sksae.metrics import make_mmcs_scorer
    >>> make_mmcs_scorer(np.eye(4), threshold=0.9)
    make_mmcs_scorer(<4 true features>, threshold=0.9, absolute=False)
    """
    true_features = _check_dense(true_features, "true_features")
    return _MMCSScorer(true_features, threshold, absolute)


# ------------------------------------------------------------------ evaluate


def _chunks(X, chunk_rows):
    """``(start, float32/float64 ndarray)`` chunks of an array, memory map, store or tensor."""
    import torch

    from ._data import iter_chunks

    rows = _streamed(X)
    X = _check_dense(X, "X") if rows is None else rows
    dtype = torch.float64 if X.dtype == np.float64 else torch.float32
    for start, chunk in iter_chunks(X, chunk_rows, torch.device("cpu"), dtype):
        yield start, chunk.numpy()


def _streamed(X):
    """``X`` as :class:`~sksae._data.Rows` when it is read in chunks, else None.

    Out-of-core inputs and half precision in memory (:func:`sksae._data.streamed`);
    :class:`Rows` are returned as they are, so a caller that already made them
    passes them on without converting ``X`` again.
    """
    from ._data import Rows, streamed

    return X if isinstance(X, Rows) else streamed(X)


def _core_sums(estimator, X, chunk_rows=None):
    """:class:`_CoreSums` of ``estimator`` over ``X``, encoded ``chunk_rows`` rows at a time.

    A SparseAutoencoder's codes are taken sparse (:func:`sksae._base.sparse_coder`):
    counted and decoded over the active latents only.
    """
    from ._base import inference_chunk_rows, n_latents, sparse_coder

    n_components = n_latents(estimator)
    n_features = X.shape[1] if hasattr(X, "shape") else np.asarray(X).shape[1]
    if chunk_rows is None:
        chunk_rows = inference_chunk_rows(max(n_components, n_features), 8)
    sums = _CoreSums(n_features, n_components)
    coder = sparse_coder(estimator)
    for _, chunk in _chunks(X, int(chunk_rows)):
        codes, X_hat = _encode_decode(coder, chunk)
        sums.add(chunk, np.asarray(X_hat), codes)
    return sums


class _CoreSums:
    """Float64 sums over chunks of rows, from which :func:`evaluate` computes the core metrics.

    Sums of ``x`` and ``x_hat`` are taken about ``K``, the first chunk's
    mean, so that centring them afterwards loses no precision to a large
    common offset (the shifted-data algorithm).
    """

    def __init__(self, n_features, n_components):
        z = np.zeros(n_features)
        self.n = 0
        self.shift = None
        self.s_x, self.s_xx, self.s_h, self.s_hh, self.s_xh = z, z.copy(), z.copy(), \
            z.copy(), z.copy()
        self.sse = self.cos = self.ratio = 0.0
        self.n_ratio = 0
        self.nnz = self.l1 = 0.0
        self.active = np.zeros(n_components, dtype=np.int64)

    def add(self, x, x_hat, codes):
        x = x.astype(np.float64)
        x_hat = x_hat.astype(np.float64)
        if self.shift is None:
            self.shift = x.mean(axis=0)
        xs, hs = x - self.shift, x_hat - self.shift
        self.n += x.shape[0]
        self.s_x += xs.sum(0)
        self.s_xx += np.square(xs).sum(0)
        self.s_h += hs.sum(0)
        self.s_hh += np.square(hs).sum(0)
        self.s_xh += np.einsum("ij,ij->j", xs, hs)
        self.sse += float(np.square(x - x_hat).sum())
        nx, nh = np.linalg.norm(x, axis=1), np.linalg.norm(x_hat, axis=1)
        dot = np.einsum("ij,ij->i", x, x_hat)
        both = (nx > 0) & (nh > 0)
        self.cos += float((dot[both] / (nx[both] * nh[both])).sum())
        self.ratio += float((nh[nx > 0] / nx[nx > 0]).sum())
        self.n_ratio += int((nx > 0).sum())
        if sp.issparse(codes):
            codes = sp.csr_array(codes)
            codes.eliminate_zeros()
            self.nnz += codes.nnz
            self.l1 += float(np.abs(codes.data).sum(dtype=np.float64))
            self.active += np.bincount(codes.indices, minlength=len(self.active))
        else:
            codes = np.asarray(codes)
            nz = codes != 0
            self.nnz += int(nz.sum())
            self.l1 += float(np.abs(codes).sum(dtype=np.float64))
            self.active += nz.sum(axis=0)

    def result(self):
        n, d = self.n, self.s_x / self.n
        tss = float((self.s_xx - n * d * d).sum())
        rrb_num = float((self.s_xh - d * self.s_h).sum())
        rrb_den = float((self.s_hh - 2 * d * self.s_h + n * d * d).sum())
        if tss > 0:
            fve = 1.0 - self.sse / tss
        else:
            fve = 1.0 if self.sse == 0 else 0.0
        density = self.active / n
        return Bunch(
            explained_variance=fve,
            mse=self.sse / (n * len(d)),
            cossim=self.cos / n,
            l2_ratio=self.ratio / self.n_ratio if self.n_ratio else float("nan"),
            relative_reconstruction_bias=rrb_num / rrb_den if rrb_den > 0 else float("nan"),
            l0=self.nnz / n,
            l1=self.l1 / n,
            frac_alive=float(np.mean(density > 0)),
            freq_over_1_percent=float(np.mean(density > 0.01)),
            freq_over_10_percent=float(np.mean(density > 0.1)),
            feature_density=density,
            n_samples=n,
        )


def evaluate(estimator, X, *, model=None, layer=None, batches=None, loss="causal_lm",
             against_clean=False, mask="auto", logits=None, ablations=("zero", "mean"),
             dtype=None, device=None, chunk_rows=None):
    r"""The standard "core" metrics of a fitted SAE in one call, optionally with its model.

    SAEBench's core evaluation (Karvonen et al. 2025) lists the numbers
    interpretability work compares SAEs by; this computes them over ``X`` in
    bounded memory (an array, a memory map or an activation store, read and
    encoded ``chunk_rows`` rows at a time, sums in float64). With
    ``x_n`` a row of ``X``, ``\hat x_n`` its reconstruction, ``z_n`` its
    codes, ``N`` rows, ``D`` features and ``F`` latents:

    - ``explained_variance``: :func:`fraction_variance_explained`,
      :math:`1 - \sum_n \lVert x_n - \hat x_n\rVert^2 / \sum_n
      \lVert x_n - \bar x\rVert^2`. (SAEBench averages a per-row ratio
      centred on the batch mean instead; sksae keeps one definition.)
    - ``mse``: :math:`\frac{1}{ND} \sum_n \lVert x_n - \hat x_n\rVert^2`, the
      mean over entries, as ``sklearn.metrics.mean_squared_error``.
    - ``cossim``: the mean over rows of :math:`\cos(x_n, \hat x_n)` (0 for
      a zero row).
    - ``l2_ratio``: the mean over rows of
      :math:`\lVert\hat x_n\rVert / \lVert x_n\rVert` (rows with ``x_n = 0``
      left out): below 1, the reconstructions are shrunk.
    - ``relative_reconstruction_bias``: :func:`relative_reconstruction_bias`,
      :math:`\gamma` minimising
      :math:`\sum_n\lVert\gamma(\hat x_n-\bar x)-(x_n-\bar x)\rVert^2`
      (Wright & Sharkey 2024); above 1 the codes undershoot. SAEBench reports
      the uncentred reciprocal :math:`E\lVert\hat x\rVert^2 / E\langle x,
      \hat x\rangle` of Rajamanoharan et al. 2024 (eq. 10), below 1 when
      shrunk.
    - ``l0``: :func:`l0`, the mean number of non-zero codes per row;
      ``l1``: the mean of :math:`\sum_i |z_{ni}|` (SAEBench; codes of SAEs
      are non-negative).
    - ``feature_density``: :func:`feature_density`, per latent the fraction
      of rows where it is non-zero; ``frac_alive``: the fraction of latents
      that fire on at least one row (``1 -`` :func:`dead_fraction`);
      ``freq_over_1_percent`` and ``freq_over_10_percent``: the fractions of
      latents firing on more than 1% and 10% of the rows (dense latents,
      SAEBench).

    With a ``model``, its ``layer`` and ``batches`` of its inputs, the
    entries of :func:`sksae.activations.loss_recovered` are added: the
    downstream loss clean, with the reconstruction spliced into ``layer``
    and with it zero- and mean-ablated, ``loss_recovered`` (SAEBench's
    ``ce_loss_score`` for a causal language model, Gao et al. 2024's
    downstream-loss comparison) and the KL divergences and ``kl_score``.

    Parameters
    ----------
    estimator : fitted estimator
        A :class:`~sksae.SparseAutoencoder`, :class:`~sksae.DictionaryLearnerGPU`,
        scikit-learn dictionary learner or Pipeline: ``transform`` gives the
        codes, ``inverse_transform`` (or ``codes @ components_``) the
        reconstruction.
    X : array-like, memory map or activation store of shape (n_samples, n_features)
        The evaluation rows (e.g. held-out activations of ``layer``).
    model : torch.nn.Module, default=None
        The model the activations come from, for the loss-recovered entries.
    layer : str, default=None
        The submodule of ``model`` whose output ``X`` holds (needed with a model).
    batches : iterable, default=None
        The model's input batches (needed with a model).
    loss, against_clean, mask, logits, ablations, dtype, device
        As in :func:`sksae.activations.loss_recovered`.
    chunk_rows : int, default=None
        Rows encoded at a time; None: as many as 256 MiB of float64 values
        hold at ``max(n_components, n_features)`` columns (a
        SparseAutoencoder's codes are taken sparse; another estimator's dense
        codes stay near that size).

    Returns
    -------
    result : sklearn.utils.Bunch
        The entries above, and ``n_samples``.

    Examples
    --------
    >>> import numpy as np
    >>> from sksae import SparseAutoencoder
    >>> from sksae.metrics import evaluate
    >>> X = np.random.default_rng(0).normal(size=(500, 8))
    >>> sae = SparseAutoencoder(n_components=32, k=4, max_iter=5, random_state=0).fit(X)
    >>> result = evaluate(sae, X)
    >>> result.l0
    4.0
    >>> sorted(result)[:4]
    ['cossim', 'explained_variance', 'feature_density', 'frac_alive']
    """
    if model is not None and (layer is None or batches is None):
        raise ValueError("evaluate with a model needs its layer and batches.")
    result = _core_sums(estimator, X, chunk_rows).result()
    if model is not None:
        from .activations import loss_recovered

        result.update(loss_recovered(model, layer, estimator, batches, loss=loss,
                                     against_clean=against_clean, mask=mask, logits=logits,
                                     ablations=ablations, dtype=dtype, device=device))
    return result
