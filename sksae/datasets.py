"""Synthetic data with known ground truth: features in superposition.

The generator follows Sharkey, Braun & Millidge (2022), "Taking features out of
superposition with sparse autoencoders": many more unit-norm feature
directions than input dimensions, each firing rarely and with a frequency that
decays with its index, so that a dictionary learner can be scored against the
true dictionary (see :func:`sksae.metrics.mean_max_cosine_similarity`).
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import scipy.sparse as sp
from scipy.special import ndtri
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions, validate_params

__all__ = ["make_sparse_superposition", "firing_probabilities"]

# Default correlation strength for ``correlated=True``.
_DEFAULT_CORRELATION = 0.5
# Rank of the random factor behind the latent correlation matrix.
_MAX_FACTOR_RANK = 16
# Elements of the (rows, n_components) random draws per chunk (about 16 MiB).
_CHUNK_ELEMENTS = 2**22


@validate_params(
    {
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "avg_active": [Interval(Real, 0, None, closed="left")],
        "frequency_decay": [Interval(Real, 0, 1, closed="right")],
    },
    prefer_skip_nested_validation=True,
)
def firing_probabilities(n_components, avg_active=5.0, frequency_decay=0.99):
    """Per-feature firing probabilities with a decaying frequency profile.

    ``p_i = min(1, s * frequency_decay ** i)``, with the scale ``s`` solved so
    that ``sum_i p_i = avg_active`` exactly (the probabilities that would
    exceed 1 are clipped and the scale is re-solved on the others).

    Parameters
    ----------
    n_components : int
        Number of features.
    avg_active : float, default=5.0
        Expected number of active features per sample; at most ``n_components``.
    frequency_decay : float in (0, 1], default=0.99
        Ratio between the firing probabilities of consecutive features;
        1 gives equally frequent features.

    Returns
    -------
    p : ndarray of shape (n_components,)
        Firing probabilities, non-increasing, summing to ``avg_active``.

    Examples
    --------
    >>> from sksae.datasets import firing_probabilities
    >>> p = firing_probabilities(4, avg_active=2.0, frequency_decay=0.5)
    >>> float(p.sum())
    2.0
    >>> p.round(3).tolist()
    [1.0, 0.571, 0.286, 0.143]
    """
    if avg_active > n_components:
        raise ValueError(
            f"avg_active={avg_active} cannot exceed n_components={n_components}."
        )
    w = float(frequency_decay) ** np.arange(n_components, dtype=np.float64)
    tail = np.cumsum(w[::-1])[::-1]  # tail[m] = sum_{i >= m} w_i
    # The first m features fire always; the others get s * w_i <= 1.
    for m in range(n_components):
        s = (avg_active - m) / tail[m]
        if s * w[m] <= 1.0:
            p = np.minimum(s * w, 1.0)
            p[:m] = 1.0
            return p
    return np.ones(n_components)


def _magnitude_sampler(magnitude):
    """A function ``draw(rng, size)`` of the active magnitudes."""
    if magnitude == "exponential":
        return lambda rng, size: rng.exponential(1.0, size=size)
    if magnitude == "lognormal":
        return lambda rng, size: rng.lognormal(0.0, 1.0, size=size)
    if isinstance(magnitude, str):  # "uniform"
        low, high = 0.0, 1.0
    elif isinstance(magnitude, Real):
        if magnitude <= 0:
            raise ValueError(f"magnitude must be positive, got {magnitude}.")
        low = high = float(magnitude)
    else:
        low, high = (float(v) for v in magnitude)
        if not 0 <= low <= high:
            raise ValueError(
                f"magnitude=(low, high) needs 0 <= low <= high, got {magnitude!r}."
            )
    return lambda rng, size: rng.uniform(low, high, size=size)


def _feature_norms(feature_norms, n_components, rng):
    """Norms of the features: log-uniform on ``feature_norms = (low, high)``."""
    low, high = (float(v) for v in feature_norms)
    if not 0 < low <= high:
        raise ValueError(
            f"feature_norms=(low, high) needs 0 < low <= high, got {feature_norms!r}."
        )
    return np.exp(rng.uniform(np.log(low), np.log(high), size=n_components))


def _correlation_factor(structure, n_components, rho, rng):
    """Factor ``L`` with unit-norm rows scaled by sqrt(rho): ``C = L L^T + (1 - rho) I``."""
    if structure == "low_rank":
        rank = min(n_components, _MAX_FACTOR_RANK)
        factor = rng.standard_normal((n_components, rank))
    else:  # "dense": full rank, eigenvalues of L L^T decaying as 1 / j
        factor = rng.standard_normal((n_components, n_components))
        factor *= 1.0 / np.sqrt(np.arange(1, n_components + 1))
    factor *= np.sqrt(rho) / np.linalg.norm(factor, axis=1, keepdims=True)
    return factor.astype(np.float32)


def _correlation_strength(correlated):
    if correlated is True:
        return _DEFAULT_CORRELATION
    if correlated is False or correlated is None:
        return 0.0
    strength = float(correlated)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"correlated must be a bool or in [0, 1], got {correlated}.")
    return strength


@validate_params(
    {
        "n_samples": [Interval(Integral, 1, None, closed="left")],
        "n_features": [Interval(Integral, 1, None, closed="left")],
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "avg_active": [Interval(Real, 0, None, closed="left")],
        "frequency_decay": [Interval(Real, 0, 1, closed="right")],
        "correlated": ["boolean", Interval(Real, 0, 1, closed="both")],
        "correlation": [StrOptions({"low_rank", "dense"})],
        "magnitude": [
            StrOptions({"uniform", "exponential", "lognormal"}),
            Interval(Real, 0, None, closed="neither"),
            tuple,
            list,
        ],
        "feature_norms": [None, tuple, list],
        "noise": [Interval(Real, 0, None, closed="left")],
        "dtype": "no_validation",
        "sparse_codes": ["boolean"],
        "random_state": ["random_state"],
        "return_features": ["boolean"],
        "return_codes": ["boolean"],
    },
    prefer_skip_nested_validation=True,
)
def make_sparse_superposition(
    n_samples=1000,
    n_features=256,
    n_components=512,
    *,
    avg_active=5.0,
    frequency_decay=0.99,
    correlated=False,
    correlation="low_rank",
    magnitude="uniform",
    feature_norms=None,
    noise=0.0,
    dtype=np.float32,
    sparse_codes=False,
    random_state=None,
    return_features=False,
    return_codes=False,
):
    """Sparse non-negative combinations of many unit-norm feature directions.

    The toy model of superposition of Sharkey, Braun & Millidge (2022):

    - ``features``: ``n_components`` random Gaussian directions in
      ``R^n_features``, each scaled to unit norm;
    - feature ``i`` fires with probability ``p_i = min(1, s * frequency_decay**i)``,
      ``s`` chosen so that on average ``avg_active`` features fire per sample
      (see :func:`firing_probabilities`);
    - an active feature gets a positive magnitude drawn from the law
      ``magnitude`` (uniform on ``[0, 1]`` by default), an inactive one 0,
      giving non-negative ``codes``;
    - with ``feature_norms=(low, high)`` feature ``i`` is scaled to a norm
      drawn log-uniformly in ``[low, high]`` (features of different scales, as
      in real networks; Sharkey et al.'s "feature scales" point);
    - ``X = codes @ features + noise * N(0, 1)``.

    With ``correlated`` features co-fire through a Gaussian copula: a latent
    Gaussian vector ``z ~ N(0, C)`` is drawn per sample, with the correlation
    matrix ``C = rho * L L^T + (1 - rho) * I`` (``L`` a random Gaussian factor
    with unit-norm rows, ``rho`` the correlation strength), and feature ``i``
    fires when ``Phi(z_i) < p_i`` (``Phi`` the standard normal CDF). Each
    ``Phi(z_i)`` is uniform, so the marginal firing probabilities are exactly
    ``p_i`` whatever ``rho``. ``correlation`` picks ``L``:

    - ``"low_rank"``: rank ``min(n_components, 16)``, a few latent factors
      shared by all features;
    - ``"dense"``: a full-rank ``L`` whose ``j``-th column is scaled by
      ``1 / sqrt(j)``, so that ``L L^T`` is a dense random correlation matrix
      with eigenvalues decaying as ``1 / j`` (drawing a row costs
      ``n_components**2`` operations instead of ``16 * n_components``).

    The variants of the issue "Recover the ground truth" (magnitudes, the two
    correlation structures, frequency decays 1, 0.995 and 0.99, feature counts
    1x to 4x ``n_features``, feature scales, noise) are all settings of this
    function; ``benchmarks/bench_ground_truth.py`` runs them.

    Rows are generated in chunks, the codes of a chunk as a sparse matrix, so
    the peak memory is the output plus a few tens of MiB (and the codes when
    they are returned).

    Parameters
    ----------
    n_samples : int, default=1000
        Number of samples (rows of ``X``).
    n_features : int, default=256
        Number of input dimensions (columns of ``X``).
    n_components : int, default=512
        Number of ground-truth features.
    avg_active : float, default=5.0
        Expected number of active features per sample, at most ``n_components``.
    frequency_decay : float in (0, 1], default=0.99
        Ratio of the firing probabilities of consecutive features.
    correlated : bool or float in [0, 1], default=False
        Correlation strength ``rho`` of the latent Gaussians deciding which
        features fire; False is 0 (independent features), True is 0.5.
    correlation : {"low_rank", "dense"}, default="low_rank"
        Structure of the latent correlation matrix when ``correlated`` is
        not 0 (see above).
    magnitude : {"uniform", "exponential", "lognormal"}, float or (low, high), \
            default="uniform"
        Law of the magnitude of an active feature: ``"uniform"`` is uniform on
        ``[0, 1]``, ``"exponential"`` exponential with mean 1,
        ``"lognormal"`` ``exp(N(0, 1))`` (median 1, heavy upper tail),
        ``(low, high)`` uniform on ``[low, high]`` (``0 <= low``), a positive
        float that constant magnitude (``1.0``: every active feature at 1).
    feature_norms : (low, high) or None, default=None
        Norms of the features, log-uniform on ``[low, high]``
        (``0 < low <= high``); None gives unit-norm features.
    noise : float, default=0.0
        Standard deviation of the Gaussian noise added to ``X``.
    dtype : numpy floating dtype, default=np.float32
        Dtype of ``X``, ``features`` and ``codes``. float32 by default: the
        dtype the torch estimators train in, and half the memory of float64.
    sparse_codes : bool, default=False
        Return ``codes`` as a ``scipy.sparse.csr_matrix`` instead of a dense
        array (a dense array of 1M x 4096 codes needs 16 GiB).
    random_state : int, RandomState instance or None, default=None
        Seed of all the randomness; the same seed gives the same data.
    return_features : bool, default=False
        Also return the ground-truth features.
    return_codes : bool, default=False
        Also return the codes.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
        The data.
    features : ndarray of shape (n_components, n_features)
        Feature directions, most frequent first; unit-norm unless
        ``feature_norms`` is given. Only returned when
        ``return_features=True``.
    codes : ndarray or csr_matrix of shape (n_samples, n_components)
        Non-negative codes, ``X = codes @ features`` when ``noise=0``. Only
        returned when ``return_codes=True``.

    See Also
    --------
    sklearn.datasets.make_sparse_coded_signal : Dense dictionary, exactly
        ``n_nonzero_coefs`` Gaussian codes per sample, no frequency profile.

    References
    ----------
    Sharkey, L., Braun, D. & Millidge, B. (2022). Taking features out of
    superposition with sparse autoencoders. AI Alignment Forum.

    Examples
    --------
    >>> from sksae.datasets import make_sparse_superposition
    >>> X, features, codes = make_sparse_superposition(
    ...     200, 16, 64, avg_active=3, random_state=0,
    ...     return_features=True, return_codes=True)
    >>> X.shape, features.shape, codes.shape
    ((200, 16), (64, 16), (200, 64))
    >>> bool(np.allclose(X, codes @ features, atol=1e-5))
    True
    """
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating dtype, got {dtype}.")
    draw_magnitudes = _magnitude_sampler(magnitude)
    rho = _correlation_strength(correlated)
    p = firing_probabilities(n_components, avg_active, frequency_decay)

    seed_rng = check_random_state(random_state)
    # A numpy Generator is several times faster than RandomState for the bulk
    # draws; it is seeded from the user's random_state, so results reproduce.
    rng = np.random.default_rng(seed_rng.randint(np.iinfo(np.int32).max, size=4))

    features = rng.standard_normal((n_components, n_features))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    if feature_norms is not None:
        features *= _feature_norms(feature_norms, n_components, rng)[:, None]

    if rho > 0:
        factor = _correlation_factor(correlation, n_components, rho, rng)
        # Fire when z_i < Phi^-1(p_i), i.e. Phi(z_i) < p_i.
        threshold = ndtri(p).astype(np.float32)

    X = np.empty((n_samples, n_features), dtype=dtype)
    code_chunks = []
    chunk_rows = max(1, _CHUNK_ELEMENTS // n_components)
    for start in range(0, n_samples, chunk_rows):
        rows = min(chunk_rows, n_samples - start)
        if rho > 0:
            # z = sqrt(rho) L g + sqrt(1 - rho) e, in float32 to bound memory.
            z = rng.standard_normal((rows, n_components), dtype=np.float32)
            z *= np.float32(np.sqrt(1.0 - rho))
            z += rng.standard_normal((rows, factor.shape[1]), dtype=np.float32) @ factor.T
            active = z < threshold
            del z
        else:
            active = rng.random((rows, n_components), dtype=np.float32) < p
        row_ind, col_ind = np.nonzero(active)
        del active
        values = draw_magnitudes(rng, row_ind.size)
        codes = sp.csr_matrix(
            (values, (row_ind, col_ind)), shape=(rows, n_components)
        )
        Xc = codes @ features
        if noise > 0:
            Xc += noise * rng.standard_normal((rows, n_features))
        X[start : start + rows] = Xc
        if return_codes:
            code_chunks.append(codes.astype(dtype))

    out = [X]
    if return_features:
        out.append(features.astype(dtype))
    if return_codes:
        codes = sp.vstack(code_chunks, format="csr")
        out.append(codes if sparse_codes else codes.toarray())
    return out[0] if len(out) == 1 else tuple(out)
