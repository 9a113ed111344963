"""Dictionary refinement: alternate sparse coding and a least-squares dictionary update.

An SAE's decoder is trained through its amortised encoder, which finds the
frequent features quickly but leaves rare ones unlearned (O'Neill et al. 2025:
the amortisation gap). :func:`refine_dictionary` takes a learned dictionary
and alternates, over all rows at once,

1. sparse coding of every row with the current atoms by non-negative
   orthogonal matching pursuit (:func:`nonnegative_omp`), stopping a row once
   its residual holds less than ``tol`` of its energy;
2. the Method of Optimal Directions update (Engan, Aase & Husoy 1999): the
   least-squares dictionary for those codes, ``D = (U^T U + ridge I)^-1 U^T X``,
   from the sufficient statistics ``U^T U`` and ``U^T X`` of the sparse codes;
3. re-seeding of the atoms that are unused (fewer than ``min_usage`` rows)
   or duplicate another atom (cosine above ``duplicate_threshold``): they
   become the unit residuals ``x - u D`` of the worst-reconstructed rows,
   where the features the dictionary misses are, taken in decreasing residual
   energy but skipping directions within cosine 0.7 of a kept atom or of a
   seed already taken (the resampling rule of Bricken et al. 2023, applied to
   the residual instead of the input, and made to spread the seeds);
4. repair of opposed atoms: of two atoms that point apart (cosine below
   -0.25) yet code a good share of the same rows, the less used one loses
   its component along the other (:func:`_repair_opposed`): non-negative
   codes let an atom ``a - c b`` beside ``b`` span the rows of two
   co-firing features as well as ``a`` does, and the least-squares update
   alone keeps such a mixture;
5. normalisation of the atoms to unit norm.

The rows a rare feature fires on are few, but every one of them counts in the
least-squares update, where a stochastic gradient step would weight it by one
learning-rate step.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import (BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin,
                          _fit_context, clone)
from sklearn.utils._param_validation import HasMethods, Interval
from sklearn.utils.validation import check_is_fitted, validate_data

from ._accel.compiled import kernel as compiled_kernel
from ._base import restore_on_failure
from ._accel.threads import even_bounds, parallel, run_ranges, serial

__all__ = ["RefinedAutoencoder", "nonnegative_omp", "refine_dictionary"]

_BLOCK_ELEMENTS = 2**22  # (rows, n_components) correlations per block, 16 MiB in float32


def _omp_block(C0, G, k, tol_energy, min_gain):
    """Non-negative OMP of one block from its correlations ``C0 = X D^T``.

    The batched torch path of the compiled kernel (same stops: no positive
    correlation left, ``tol_energy`` explained, or an atom that would add less
    than ``min_gain``). Returns (indices (b, k), values (b, k)) with unused
    slots at value 0.
    """
    b, K = C0.shape
    rows = torch.arange(b)
    corr = C0.clone()
    S = torch.empty(b, 0, dtype=torch.long)
    vals = torch.zeros(b, k, dtype=C0.dtype)
    done = torch.zeros(b, dtype=torch.bool)
    before = torch.zeros(b, dtype=C0.dtype)
    for s in range(k):
        j = corr.argmax(dim=1)
        done |= corr[rows, j] <= 0  # no atom left that reduces the residual
        S = torch.cat([S, j[:, None]], dim=1)
        rhs = C0.gather(1, S)  # (b, s+1)
        Gss = G[S[:, :, None], S[:, None, :]]
        Gss = Gss + 1e-6 * torch.eye(s + 1, dtype=G.dtype)
        c = torch.linalg.solve(Gss, rhs)
        c = c.clamp(min=0)
        # ||x - D_S^T c||^2 = ||x||^2 - 2 c.rhs + c^T G_SS c
        explained = 2 * (c * rhs).sum(1) - (c[:, None, :] @ Gss @ c[:, :, None]).view(-1)
        done |= explained - before < min_gain  # the new atom adds too little: not taken
        keep = ~done
        vals[keep, : s + 1] = c[keep]
        before = explained
        done |= explained >= tol_energy
        if s + 1 < k:
            # corr = C0 - sum_s c_s G[S_s]: a weighted sum of Gram rows per row.
            corr = C0 - torch.nn.functional.embedding_bag(
                S, G, per_sample_weights=c, mode="sum")
            corr[rows[:, None], S] = -torch.inf
    return S, vals


def nonnegative_omp(X, dictionary, n_nonzero_coefs, *, tol=1e-3, min_gain=0.0):
    """Non-negative orthogonal matching pursuit, returned as a sparse matrix.

    Each row picks, ``n_nonzero_coefs`` times at most, the atom with the largest
    positive correlation with its residual and re-solves the least squares on
    the picked atoms (negative coefficients clipped to 0). A row stops when the
    residual holds less than ``tol`` of its squared norm, or when no atom
    correlates positively with the residual.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    dictionary : ndarray of shape (n_components, n_features)
        Unit-norm atoms.
    n_nonzero_coefs : int
    tol : float, default=1e-3
    min_gain : float, default=0.0
        A row also stops before an atom that would explain less than
        ``min_gain`` of its squared norm: atoms that only fit the
        dictionary's remaining error are left out, however many the budget
        ``n_nonzero_coefs`` still allows.

    Returns
    -------
    codes : scipy.sparse.csr_matrix of shape (n_samples, n_components)
        Non-negative codes, ``X ~ codes @ dictionary``.
    """
    import scipy.sparse as sp

    X = np.ascontiguousarray(X, dtype=np.float32)
    D = np.ascontiguousarray(dictionary, dtype=np.float32)
    n, K = X.shape[0], D.shape[0]
    k = int(min(n_nonzero_coefs, K))
    idx = np.zeros((n, k), np.int64)
    val = np.zeros((n, k), np.float32)
    kernel = compiled_kernel("nnomp")
    X_t, D_t = torch.from_numpy(X), torch.from_numpy(D)
    G_t = D_t @ D_t.T
    G = G_t.numpy()
    consts = np.array([np.finfo(np.float32).eps, 1.0, 0.0], dtype=np.float32)
    block = max(1, _BLOCK_ELEMENTS // max(K, 1))

    def run(lo, hi):
        # Rows lo:hi in blocks that bound the (rows, K) correlations' memory.
        for a in range(lo, hi, block):
            b = min(hi, a + block)
            Xb = X_t[a:b]
            energy = torch.einsum("ij,ij->i", Xb, Xb)
            target = torch.stack([(1 - tol) * energy, min_gain * energy], dim=1)
            C0 = Xb @ D_t.T
            if kernel is not None:
                kernel(C0.numpy(), G, k, consts, target.numpy(), idx[a:b], val[a:b])
            else:
                S, v = _omp_block(C0, G_t, k, target[:, 0], target[:, 1])
                idx[a:b, : S.shape[1]] = S.numpy()
                val[a:b, : S.shape[1]] = v.numpy()

    if kernel is not None:
        # The compiled kernel releases the GIL: one range of rows per thread.
        with serial(X_t), parallel(X_t, own=True):
            run_ranges(run, even_bounds(n, min_size=256))
    else:
        run(0, n)
    indptr = np.arange(0, n * k + 1, k)
    codes = sp.csr_matrix((val.ravel(), idx.ravel(), indptr), shape=(n, K))
    codes.sum_duplicates()
    codes.eliminate_zeros()
    return codes


def _residual_seeds(X, U, D, kept, n_seeds, *, pool=20, max_cos=0.7):
    """Up to ``n_seeds`` distinct unit residual directions of the worst rows.

    The ``pool * n_seeds`` rows with the largest residual ``x - u D`` are
    candidates, in decreasing residual energy; a candidate is taken unless its
    direction has a cosine above ``max_cos`` with a kept atom or a seed already
    taken (several bad rows usually miss the same feature).
    """
    R = X - np.asarray(U @ D)
    r2 = np.einsum("ij,ij->i", R, R)
    n_cand = min(len(r2), pool * n_seeds)
    cand = np.argpartition(r2, -n_cand)[-n_cand:]
    cand = cand[np.argsort(r2[cand])[::-1]]
    dirs = R[cand] / np.maximum(np.sqrt(r2[cand])[:, None], 1e-12)
    ok = (dirs @ kept.T).max(axis=1) <= max_cos if len(kept) else np.ones(n_cand, bool)
    taken = []
    for i in np.flatnonzero(ok):
        if taken and (dirs[taken] @ dirs[i]).max() > max_cos:
            continue
        taken.append(i)
        if len(taken) == n_seeds:
            break
    return dirs[taken]


#: two atoms with a cosine below -OPPOSED_COS (random directions of 256 dimensions
#: have a standard deviation of 1/16: -0.25 is 4 of them) ...
OPPOSED_COS = 0.25
#: ... that code together at least this fraction of the rows of the less used one
OPPOSED_SHARE = 0.2


def _repair_opposed(D, unit, cos, U, usage):
    """Remove from an atom its negative component along an atom it codes rows with.

    With non-negative codes, an atom ``a - c b`` used together with ``b``
    spans the same rows as ``a`` and ``b`` wherever ``a``'s feature fires
    with ``b``'s: the least-squares update cannot tell them apart, and the
    mixture persists. Two atoms that point apart (cosine below
    ``-OPPOSED_COS``, beyond what random directions reach) yet code a good
    share of the same rows are such a pair: the less used one, which leans
    on the other to cancel its negative part, loses its component along the
    other (in place). Returns the number of atoms changed.
    """
    i, j = np.nonzero(np.triu(cos < -OPPOSED_COS))
    if not len(i):
        return 0
    P = U.tocsc(copy=True)
    P.data[:] = 1
    shared = np.asarray(P[:, i].multiply(P[:, j]).sum(0)).ravel()
    keep = shared >= OPPOSED_SHARE * np.minimum(usage[i], usage[j])
    repaired = set()
    for a, b in zip(i[keep], j[keep]):
        fix, other = (a, b) if usage[a] <= usage[b] else (b, a)
        if fix in repaired or other in repaired:
            continue
        D[fix] = unit[fix] - cos[fix, other] * unit[other]
        repaired.add(fix)
    return len(repaired)


def refine_dictionary(X, dictionary, *, n_nonzero_coefs, n_iter=8, tol=1e-3,
                      min_gain=0.0, min_usage=20, duplicate_threshold=0.95, ridge=1e-4,
                      verbose=0, callback=None):
    """Refine a dictionary by alternating non-negative OMP and MOD updates.

    See the module docstring for the steps. The last iteration re-seeds and
    repairs nothing, so every returned atom was fitted to the data.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Training rows, centred as the dictionary expects (for an SAE,
        ``X - sae.decoder_bias_``).
    dictionary : ndarray of shape (n_components, n_features)
        Starting atoms, e.g. ``sae.components_``.
    n_nonzero_coefs : int
        Largest number of atoms per row in the coding step.
    n_iter : int, default=8
        Coding / update rounds.
    tol : float, default=1e-3
        Relative residual energy at which a row's coding stops.
    min_gain : float, default=0.0
        A row's coding also stops before an atom that would explain less
        than this fraction of its energy (:func:`nonnegative_omp`). Round
        ``t`` of ``n_iter`` (from 1) uses ``min_gain * t / n_iter``: permissive
        early, while the atoms of rare features are still poor, and strict
        at the end, where small corrective codes would keep atoms that mix
        two correlated features.
    min_usage : int, default=20
        Atoms used by fewer rows are re-seeded.
    duplicate_threshold : float, default=0.95
        Of two atoms with a larger cosine, the less used one is re-seeded.
    ridge : float, default=1e-4
        Ridge added to ``U^T U`` in the least-squares update.
    verbose : int, default=0
        Print one line per iteration.
    callback : callable, default=None
        ``callback(iteration, dictionary)`` after every iteration.

    Returns
    -------
    dictionary : ndarray of shape (n_components, n_features)
        Unit-norm atoms (float32).
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    D = np.array(dictionary, dtype=np.float32)
    D /= np.maximum(np.linalg.norm(D, axis=1, keepdims=True), 1e-12)
    K = D.shape[0]
    for it in range(n_iter):
        # min_gain grows over the rounds: early codes may use the imperfect
        # atoms of rare features (small gains), late ones drop the small
        # corrective codes that keep mixtures of correlated features alive.
        gain = min_gain * (it + 1) / n_iter
        U = nonnegative_omp(X, D, n_nonzero_coefs, tol=tol, min_gain=gain)
        Ut = U.T.tocsr()
        A = (Ut @ U).toarray().astype(np.float64)
        B = np.asarray(Ut @ X, dtype=np.float64)
        usage = np.diff(U.tocsc().indptr)
        D_new = np.linalg.solve(A + ridge * np.eye(K), B)
        norms = np.linalg.norm(D_new, axis=1)
        n_reseeded = 0
        if it < n_iter - 1:
            unit = D_new / np.maximum(norms[:, None], 1e-12)
            cos = unit @ unit.T
            np.fill_diagonal(cos, 0)
            n_repaired = _repair_opposed(D_new, unit, cos, U, usage)
            if n_repaired:
                norms = np.linalg.norm(D_new, axis=1)
                unit = D_new / np.maximum(norms[:, None], 1e-12)
                cos = unit @ unit.T
                np.fill_diagonal(cos, 0)
            i, j = np.nonzero(np.triu(cos > duplicate_threshold))
            bad = (usage < min_usage) | (norms < 1e-6)
            bad[np.where(usage[i] < usage[j], i, j)] = True
            n_reseeded = int(bad.sum())
            if n_reseeded:
                seeds = _residual_seeds(X, U, D, unit[~bad], n_reseeded)
                D_new[np.flatnonzero(bad)[: len(seeds)]] = seeds
                norms = np.linalg.norm(D_new, axis=1)
        D = (D_new / np.maximum(norms[:, None], 1e-12)).astype(np.float32)
        if verbose:
            print(f"refine_dictionary: iteration {it + 1}/{n_iter}, "
                  f"mean atoms per row {U.nnz / max(1, X.shape[0]):.2f}, "
                  f"re-seeded {n_reseeded}")
        if callback is not None:
            callback(it, D)
    return D


class RefinedAutoencoder(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """A sparse autoencoder whose dictionary is refined by :func:`refine_dictionary`.

    The ground-truth recovery recipe of ``benchmarks/bench_ground_truth.py``:
    fit ``estimator`` (a short SAE fit finds the frequent features), then
    alternate non-negative OMP codes and least-squares (MOD) updates of its
    decoder over all the rows, re-seeding unused and duplicate atoms from the
    worst-reconstructed rows' residuals and repairing opposed atoms (see
    :func:`refine_dictionary`). ``transform`` codes by non-negative
    OMP with the refined atoms (the encoder no longer matches them).

    Parameters
    ----------
    estimator : estimator with ``components_``, default=None
        The dictionary learner to fit first, usually a
        :class:`~sksae.SparseAutoencoder` (its ``decoder_bias_`` centres the
        rows; any other learner of ``components_``, such as scikit-learn's
        ``MiniBatchDictionaryLearning``, is refined uncentred). None means
        ``SparseAutoencoder(k=6, max_iter=1, random_state=random_state)``
        (``k`` a little above the mean number of active features, one pass).
    n_iter : int, default=8
        Refinement rounds (each one sparse coding pass over the rows).
    n_nonzero_coefs : int, default=None
        Most atoms per row in the coding steps and ``transform``; None means
        twice the estimator's ``k`` (12 for the default ``k=6``), or 12 for
        an estimator without ``k``.
    tol : float, default=1e-3
        A row's coding stops once its residual holds less than ``tol`` of its
        squared norm (centred by the decoder bias).
    min_gain : float, default=0.02
        A row's coding also stops before an atom that would explain less
        than this fraction of its squared norm (reached by a ramp over the
        refinement rounds, see :func:`refine_dictionary`; ``transform`` uses
        it whole). With the budget ``n_nonzero_coefs`` set generously, this
        decides how many atoms a row takes: rows with many active features
        get them all, and atoms that only fit the dictionary's remaining
        error are left out.
    min_usage : int, default=20
        Atoms used by fewer rows in a coding step are re-seeded.
    random_state : int or None, default=None
        Seed of the default ``estimator``.

    Attributes
    ----------
    estimator_ : the fitted SAE (its ``components_`` are the unrefined atoms).
    components_ : ndarray of shape (n_components, n_features)
        Refined unit-norm atoms.
    decoder_bias_ : ndarray of shape (n_features,)
        The SAE's decoder bias, subtracted before coding.
    n_features_in_ : int

    See Also
    --------
    refine_dictionary : The refinement on its own, for any starting atoms.
    sksae.model_selection.dictionary_size_sweep : Estimates the feature count
        with this estimator.

    Notes
    -----
    ``benchmarks/bench_ground_truth.py`` runs the recipe across the variants
    of :func:`~sksae.datasets.make_sparse_superposition`; the user guide's
    "Recovering the ground truth" has the measurements.

    Examples
    --------
    >>> from sksae import RefinedAutoencoder, SparseAutoencoder
    >>> from sksae.datasets import make_sparse_superposition
    >>> from sksae.metrics import max_cosine_similarity
    >>> X, F = make_sparse_superposition(5000, 16, 24, avg_active=2, random_state=0,
    ...                                  return_features=True)
    >>> est = RefinedAutoencoder(SparseAutoencoder(n_components=48, k=3, max_iter=1,
    ...                                            random_state=0)).fit(X)
    >>> est.transform(X[:2]).shape
    (2, 48)
    >>> bool((max_cosine_similarity(F, est.components_) > 0.9).mean() > 0.9)
    True
    """

    _parameter_constraints: dict = {
        "estimator": [HasMethods(["fit"]), None],
        "n_iter": [Interval(Integral, 0, None, closed="left")],
        "n_nonzero_coefs": [Interval(Integral, 1, None, closed="left"), None],
        "tol": [Interval(Real, 0, 1, closed="both")],
        "min_gain": [Interval(Real, 0, 1, closed="both")],
        "min_usage": [Interval(Integral, 0, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(self, estimator=None, *, n_iter=8, n_nonzero_coefs=None, tol=1e-3,
                 min_gain=0.02, min_usage=20, random_state=None):
        self.estimator = estimator
        self.n_iter = n_iter
        self.n_nonzero_coefs = n_nonzero_coefs
        self.tol = tol
        self.min_gain = min_gain
        self.min_usage = min_usage
        self.random_state = random_state

    def _k(self):
        if self.n_nonzero_coefs is not None:
            return int(self.n_nonzero_coefs)
        return 2 * int(getattr(self.estimator_, "k", None) or 6)

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None):
        """Fit the SAE on ``X``, then refine its dictionary on ``X``.

        On any exception (Ctrl-C included) the estimator is left exactly as
        it was before the call.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training rows (float32 or float64; no NaN or inf).
        y : None
            Ignored.

        Returns
        -------
        self : RefinedAutoencoder
        """
        with restore_on_failure(self):
            return self._fit(X)

    def _fit(self, X):
        X = validate_data(self, X, dtype=[np.float32, np.float64])
        if self.estimator is None:
            from ._sae import SparseAutoencoder

            est = SparseAutoencoder(k=6, max_iter=1, random_state=self.random_state)
        else:
            est = clone(self.estimator)
        self.estimator_ = est.fit(X)
        if not hasattr(est, "components_"):
            raise TypeError(f"RefinedAutoencoder: the estimator {type(est).__name__} has no "
                            "components_ after fit; it must learn a dictionary (n_components, "
                            "n_features), as SparseAutoencoder or "
                            "MiniBatchDictionaryLearning do.")
        # An SAE's decoder bias centres the rows; a classical dictionary has none.
        bias = getattr(est, "decoder_bias_", None)
        self.decoder_bias_ = (np.zeros(X.shape[1], np.float32) if bias is None
                              else np.asarray(bias, dtype=np.float32))
        self.components_ = refine_dictionary(
            X - self.decoder_bias_, est.components_, n_nonzero_coefs=self._k(),
            n_iter=self.n_iter, tol=self.tol, min_gain=self.min_gain,
            min_usage=self.min_usage)
        self._n_features_out = self.components_.shape[0]
        return self

    def transform(self, X):
        """Non-negative OMP codes of ``X`` with the refined atoms.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        codes : ndarray of shape (n_samples, n_components)
            At most ``n_nonzero_coefs`` non-negative codes per row, in ``X``'s
            dtype.
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float32, np.float64], reset=False)
        codes = nonnegative_omp(X - self.decoder_bias_, self.components_, self._k(),
                                tol=self.tol, min_gain=self.min_gain)
        return codes.toarray().astype(X.dtype, copy=False)

    def inverse_transform(self, X):
        """Reconstruction ``codes @ components_ + decoder_bias_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_components)
            Codes, as :meth:`transform` returns them.

        Returns
        -------
        X_original : ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        return np.asarray(X) @ self.components_ + self.decoder_bias_
