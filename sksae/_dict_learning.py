"""DictionaryLearnerGPU: scikit-learn's minibatch dictionary learning on torch.

Same parameters, defaults and results as
:class:`sklearn.decomposition.MiniBatchDictionaryLearning` (scikit-learn 1.9),
plus ``device``. The numerical kernels live in :mod:`sksae.coders` (sparse
coding) and :mod:`sksae._online` (initialisation, sufficient statistics,
dictionary update); the minibatch loop and its early stopping are the shared
:mod:`sksae._engine`.
"""

from __future__ import annotations

import math
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_array, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions, validate_params
from sklearn.utils.validation import _num_features, check_is_fitted, validate_data

from ._accel.device import free_host_value, local_rank_device, resolve_device
from ._base import (
    check_finite_output,
    TrainingDivergedError,
    as_tensor,
    batched_apply,
    inference_chunk_rows,
    make_generator,
    restore_on_failure,
    to_numpy,
    torch_dtype,
)
from ._data import (FULL_SCAN_BYTES, Rows, check_codes, check_input, is_out_of_core,
                    iter_chunks, sample_rows, take, take_tensor)
from ._engine import BatchSource, EarlyStopping, _diverged, run_minibatch_loop
from ._stream import StreamSource
from ._online import forgetting_factor, init_dictionary, update_dictionary, update_stats
from .distributed._group import (GlobalRows, check_data_parallel, resolve_group,
                                 shared_random_state)
from ._accel.threads import parallel, serial
from .coders import check_positive_coding, encode

__all__ = ["DictionaryLearnerGPU", "sparse_encode"]

# Relative duality gap of the codes inside fit: the dictionary update averages
# over many rows, so codes beyond this accuracy do not change the learned
# dictionary measurably (the held-out objective tests check it), while the
# last digits cost most of the coding time on ill-conditioned batches.
_FIT_TOL = 1e-4

#: rows of the randomized-SVD initialisation on an out-of-core X too large to load
_INIT_SAMPLE_ROWS = 65536

_ALGORITHMS = {"lasso_lars", "lasso_cd", "lars", "omp", "threshold"}

_DIVERGENCE_HINT = ("Scale X down (e.g. with sklearn.preprocessing.StandardScaler) or "
                    "train on float64 data. The model is left as it was before this call.")


def _finite(D):
    """Whether every entry of the dictionary is finite.

    One reduction: after a step every atom lies in the unit ball, so the sum
    cannot overflow and is finite exactly when every entry is (a sum that is
    not is confirmed entry by entry).
    """
    return math.isfinite(float(D.sum())) or bool(torch.isfinite(D).all())


def _code_rows(X, D, algorithm, *, n_nonzero_coefs, alpha, max_iter, positive, device,
               init=None):
    """Codes of numpy ``X`` on numpy ``D``, batched over rows on ``device``."""
    dtype = torch_dtype(X.dtype)
    Dt = as_tensor(D, device, dtype)
    gram = Dt @ Dt.T
    flags, offset = [], 0

    def fn(xb):
        nonlocal offset
        ib = None if init is None else as_tensor(init[offset:offset + len(xb)], device, dtype)
        offset += len(xb)
        code, ok = encode(xb, Dt, algorithm, n_nonzero_coefs=n_nonzero_coefs, alpha=alpha,
                          gram=gram, max_iter=max_iter, positive=positive, init=ib)
        flags.append(ok)
        return code

    chunk = min(inference_chunk_rows(D.shape[0], X.dtype.itemsize), 4096)
    code = batched_apply(fn, X, device=device, dtype=dtype, chunk_rows=chunk)
    if not all(flags):
        warnings.warn(
            f"{algorithm} did not converge in max_iter={max_iter} iterations for some "
            "rows; increase max_iter (transform_max_iter).", ConvergenceWarning,
            stacklevel=3,
        )
    return code


@validate_params(
    {
        "X": ["array-like"],
        "dictionary": ["array-like"],
        "gram": ["array-like", None],
        "cov": ["array-like", None],
        "algorithm": [StrOptions(_ALGORITHMS)],
        "n_nonzero_coefs": [Interval(Integral, 1, None, closed="left"), None],
        "alpha": [Interval(Real, 0, None, closed="left"), None],
        "copy_cov": ["boolean"],
        "init": ["array-like", None],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "n_jobs": [Integral, None],
        "check_input": ["boolean"],
        "verbose": ["verbose"],
        "positive": ["boolean"],
        "device": [str, torch.device],
    },
    prefer_skip_nested_validation=True,
)
def sparse_encode(X, dictionary, *, gram=None, cov=None, algorithm="lasso_lars",
                  n_nonzero_coefs=None, alpha=None, copy_cov=True, init=None,
                  max_iter=1000, n_jobs=None, check_input=True, verbose=0,
                  positive=False, device="auto"):
    """Sparse coding on torch: :func:`sklearn.decomposition.sparse_encode`'s contract.

    Each row of the result is the solution of a sparse coding problem, so that
    ``X ~= code @ dictionary``. ``lasso_lars`` and ``lasso_cd`` both solve
    ``0.5 ||x - dictionary.T u||^2 + alpha ||u||_1`` to a tight duality gap
    (with one fast solver); ``omp`` and ``lars`` return scikit-learn's codes.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Data matrix.
    dictionary : array-like of shape (n_components, n_features)
        Atoms, one per row (unit norm for meaningful ``alpha``).
    gram : array-like of shape (n_components, n_components), default=None
        Precomputed ``dictionary @ dictionary.T``.
    cov : array-like of shape (n_components, n_samples), default=None
        Precomputed ``dictionary @ X.T``.
    algorithm : {"lasso_lars", "lasso_cd", "lars", "omp", "threshold"}, \
            default="lasso_lars"
        Coding method, as in scikit-learn.
    n_nonzero_coefs : int, default=None
        Atoms per row for ``lars`` and ``omp``; None means
        ``min(max(n_features / 10, 1), n_components)``.
    alpha : float, default=None
        L1 penalty (lasso) or threshold (``threshold``); None means 1.
    copy_cov : bool, default=True
        Accepted for compatibility; ``cov`` is never modified.
    init : array-like of shape (n_samples, n_components), default=None
        Warm start for the lasso coders.
    max_iter : int, default=1000
        Maximum number of solver sweeps for the lasso coders.
    n_jobs : int, default=None
        Accepted for compatibility; torch uses its own threads.
    check_input : bool, default=True
        Validate ``X`` and ``dictionary``.
    verbose : int, default=0
        Accepted for compatibility.
    positive : bool, default=False
        Non-negative codes (lasso and threshold only).
    device : str or torch.device, default="auto"
        Where to compute.

    Returns
    -------
    code : ndarray of shape (n_samples, n_components)
        Same floating dtype as ``X`` (float32 stays float32).

    Examples
    --------
    >>> import numpy as np
    >>> from sksae import sparse_encode
    >>> X = np.array([[-1, -1, -1], [0, 0, 3]])
    >>> dictionary = np.array([[0, 1, 0], [-1, -1, 2], [1, 1, 1], [0, 1, 1], [0, 2, 1]],
    ...                       dtype=np.float64)
    >>> sparse_encode(X, dictionary, alpha=0.5, device="cpu").round(4)
    array([[ 0.    ,  0.    , -0.8333,  0.    ,  0.    ],
           [ 0.    ,  0.9167,  0.8333,  0.    ,  0.    ]])
    >>> sparse_encode(X, dictionary, algorithm="omp", n_nonzero_coefs=2, device="cpu")
    array([[ 0.,  0., -1.,  0.,  0.],
           [ 0.,  1.,  1.,  0.,  0.]])
    """
    if check_input:
        dictionary = check_array(dictionary, dtype=[np.float64, np.float32])
        X = check_array(X, dtype=[np.float64, np.float32])
    else:
        X, dictionary = np.asarray(X), np.asarray(dictionary)
    if dictionary.shape[1] != X.shape[1]:
        raise ValueError(
            "Dictionary and X have different numbers of features: "
            f"dictionary.shape: {dictionary.shape} X.shape: {X.shape}"
        )
    check_positive_coding(algorithm, positive)
    dictionary = dictionary.astype(X.dtype, copy=False)
    if init is not None:
        init = check_array(init, dtype=X.dtype)
    # gram and cov are recomputed on the device: cheaper than moving them.
    return _code_rows(X, dictionary, algorithm, n_nonzero_coefs=n_nonzero_coefs,
                      alpha=alpha, max_iter=max_iter, positive=positive,
                      device=resolve_device(device), init=init)


class DictionaryLearnerGPU(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Minibatch dictionary learning on torch, a drop-in for scikit-learn's.

    Finds a dictionary ``components_`` (atoms of unit norm at most) and sparse
    codes ``U`` minimising ``0.5 ||X - U components_||_F^2 + alpha ||U||_1,1`` by
    the online algorithm of Mairal et al. (2009, 2010), exactly as
    :class:`sklearn.decomposition.MiniBatchDictionaryLearning` does, with every
    minibatch coded at once on ``device``. ``DictionaryLearnerGPU(
    **MiniBatchDictionaryLearning(...).get_params())`` works.

    Parameters
    ----------
    n_components : int, default=None
        Number of atoms; None means ``n_features``. The algorithm keeps an
        ``(n_components, n_components)`` statistic and codes through the
        atoms' Gram matrix, as scikit-learn's: memory grows with its square
        (4 GB of float32 at 32,768 atoms). For dictionaries of 10^5 latents
        and more, train a :class:`~sksae.SparseAutoencoder`.
    alpha : float, default=1
        Sparsity penalty.
    max_iter : int, default=1000
        Maximum number of passes over the data (early stopping may end sooner).
    fit_algorithm : {"lars", "cd"}, default="lars"
        Coder used during fit (``"lasso_" + fit_algorithm``); both reach the
        lasso optimum here.
    n_jobs : int, default=None
        Accepted for compatibility; torch uses its own threads.
    batch_size : int, default=256
        Rows per minibatch.
    shuffle : bool, default=True
        Shuffle the rows once before cycling through them. For an activation
        store, zarr or h5py array (:mod:`sksae.activations`), where random row
        reads are slow, the block shuffle of
        :class:`~sksae.SparseAutoencoder` (``shuffle="blocks"``) instead.
    dict_init : ndarray of shape (n_components, n_features), default=None
        Initial dictionary (else a randomized SVD of ``X``; of a random
        sample of ``_INIT_SAMPLE_ROWS = 65536`` rows when ``X`` is read batch
        by batch (out of core, half precision in memory, or a tensor on a
        GPU) and larger than 2 GiB).
    transform_algorithm : {"lasso_lars", "lasso_cd", "lars", "omp", \
            "threshold"}, default="omp"
        Coder used by :meth:`transform`.
    transform_n_nonzero_coefs : int, default=None
        Atoms per row for ``lars`` and ``omp``; None means
        ``min(max(n_features / 10, 1), n_components)``.
    transform_alpha : float, default=None
        Penalty or threshold of :meth:`transform`; None means ``alpha``.
    verbose : bool or int, default=False
        Progress bar during fit.
    split_sign : bool, default=False
        Return ``[max(U, 0), max(-U, 0)]`` from :meth:`transform`.
    random_state : int, RandomState instance or None, default=None
        Seeds the initialisation, the shuffle and atom resampling.
    positive_code : bool, default=False
        Non-negative codes.
    positive_dict : bool, default=False
        Non-negative atoms.
    transform_max_iter : int, default=1000
        Maximum solver iterations of the lasso coders.
    callback : callable, default=None
        Called after every minibatch step with the loop's locals.
    tol : float, default=1e-3
        Stop when ``||D_new - D_old||_F / n_components <= tol`` (0 disables).
    max_no_improvement : int, default=10
        Stop after this many steps without improvement of the smoothed batch
        cost (None disables).
    device : str or torch.device, default="auto"
        Where to compute: "auto" (CUDA when available), "cpu", "cuda", ...
    distributed : {"auto", "data"} or False, default="auto"
        Data-parallel ``fit`` across processes (user guide: "Training across
        processes"). ``"auto"``: inside an initialised ``torch.distributed``
        process group of more than one process (as under ``torchrun``); each
        rank codes its part of every batch of ``batch_size`` rows, the batch
        cost and the sufficient statistics' increments are summed across
        ranks, and every rank updates the dictionary, then takes rank 0's
        (broadcast after every step: on a GPU the ranks' sweeps may round
        differently), ending with the dictionary one process learns with the
        same ``batch_size`` and ``random_state`` (up to the order of
        floating-point sums).
        ``"data"`` requires a process group (one process included); False
        fits in one process even inside a group. ``partial_fit`` always
        runs in one process.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        The atoms (numpy, whatever the device).
    n_iter_ : int
        Number of passes over the data.
    n_steps_ : int
        Number of minibatch steps.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of features seen during fit, when ``X`` has string column names.

    See Also
    --------
    sklearn.decomposition.MiniBatchDictionaryLearning : The CPU original.
    sparse_encode : The coders as a function.

    References
    ----------
    J. Mairal, F. Bach, J. Ponce, G. Sapiro. Online dictionary learning for
    sparse coding. ICML 2009; Online learning for matrix factorization and
    sparse coding. JMLR 11, 2010.

    Examples
    --------
    >>> import numpy as np
    >>> from sksae import DictionaryLearnerGPU
    >>> rng = np.random.RandomState(0)
    >>> X = rng.randn(100, 8)
    >>> dl = DictionaryLearnerGPU(n_components=5, alpha=0.1, max_iter=3,
    ...                           random_state=0, device="cpu").fit(X)
    >>> dl.components_.shape
    (5, 8)
    >>> dl.transform(X[:2]).shape
    (2, 5)
    """

    _parameter_constraints: dict = {
        "n_components": [Interval(Integral, 1, None, closed="left"), None],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "fit_algorithm": [StrOptions({"cd", "lars"})],
        "n_jobs": [None, Integral],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "shuffle": ["boolean"],
        "dict_init": [None, np.ndarray],
        "transform_algorithm": [StrOptions(_ALGORITHMS)],
        "transform_n_nonzero_coefs": [Interval(Integral, 1, None, closed="left"), None],
        "transform_alpha": [Interval(Real, 0, None, closed="left"), None],
        "verbose": ["verbose"],
        "split_sign": ["boolean"],
        "random_state": ["random_state"],
        "positive_code": ["boolean"],
        "positive_dict": ["boolean"],
        "transform_max_iter": [Interval(Integral, 0, None, closed="left")],
        "callback": [None, callable],
        "tol": [Interval(Real, 0, None, closed="left")],
        "max_no_improvement": [Interval(Integral, 0, None, closed="left"), None],
        "device": [str, torch.device],
        "distributed": [StrOptions({"auto", "data"}), "boolean"],
    }

    def __init__(self, n_components=None, *, alpha=1, max_iter=1_000, fit_algorithm="lars",
                 n_jobs=None, batch_size=256, shuffle=True, dict_init=None,
                 transform_algorithm="omp", transform_n_nonzero_coefs=None,
                 transform_alpha=None, verbose=False, split_sign=False, random_state=None,
                 positive_code=False, positive_dict=False, transform_max_iter=1000,
                 callback=None, tol=1e-3, max_no_improvement=10, device="auto",
                 distributed="auto"):
        self.n_components = n_components
        self.alpha = alpha
        self.max_iter = max_iter
        self.fit_algorithm = fit_algorithm
        self.n_jobs = n_jobs
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.dict_init = dict_init
        self.transform_algorithm = transform_algorithm
        self.transform_n_nonzero_coefs = transform_n_nonzero_coefs
        self.transform_alpha = transform_alpha
        self.verbose = verbose
        self.split_sign = split_sign
        self.random_state = random_state
        self.positive_code = positive_code
        self.positive_dict = positive_dict
        self.transform_max_iter = transform_max_iter
        self.callback = callback
        self.tol = tol
        self.max_no_improvement = max_no_improvement
        self.device = device
        self.distributed = distributed

    # -- fitting -----------------------------------------------------------------
    def _validate_before_data(self, X):
        """Every check that can fail, run before any fitted attribute changes."""
        check_positive_coding(self.fit_algorithm, self.positive_code)
        device = resolve_device(self.device)
        try:
            n_features = _num_features(X)
        except TypeError:
            n_features = None  # validate_data raises scikit-learn's error for this X
        n_components = self.n_components if self.n_components is not None else n_features
        if (self.dict_init is not None and n_features is not None
                and self.dict_init.shape[1] != n_features):
            raise ValueError(
                f"dict_init has {self.dict_init.shape[1]} features, X has {n_features}."
            )
        return device, n_components

    def _start(self, X, device, n_components, random_state):
        """Initial dictionary and zeroed sufficient statistics, as tensors."""
        dtype = torch_dtype(X.dtype)
        if isinstance(X, Rows):
            # all of it when it fits in memory, as for an array; else a random sample
            n = X.n_samples
            if n * X.shape[1] * X.dtype.itemsize <= FULL_SCAN_BYTES:
                rows = np.arange(n)
            else:
                rows = np.sort(sample_rows(random_state, n, _INIT_SAMPLE_ROWS))
            Xt = take_tensor(X, rows, device, dtype)
        else:
            Xt = as_tensor(X, device, dtype)
        dict_init = None if self.dict_init is None else as_tensor(
            check_array(self.dict_init, dtype=X.dtype), device, dtype)
        gen = make_generator(random_state) if dict_init is None else None
        try:
            D = init_dictionary(Xt, n_components, gen, dict_init)
        except RuntimeError as exc:  # e.g. torch's LinAlgError on an ill-conditioned X
            raise ValueError(f"The dictionary could not be initialised from X ({exc}). "
                             f"{_DIVERGENCE_HINT}") from None
        if not _finite(D):
            raise TrainingDivergedError(
                f"{type(self).__name__} could not initialise: the initial dictionary is not "
                f"finite (X's scale overflows {X.dtype} in the randomized SVD). "
                f"{_DIVERGENCE_HINT}", step=0, metric="parameters", value=None)
        A = torch.zeros(n_components, n_components, dtype=dtype, device=device)
        B = torch.zeros(X.shape[1], n_components, dtype=dtype, device=device)
        return D, A, B

    def _step(self, Xb, D, A, B, step, random_state, group=None, n_rows=None):
        """One minibatch step (scikit-learn's ``_minibatch_step``); returns the batch cost.

        On the CPU the statistics and dictionary updates run on the fit's
        threads (:mod:`sksae._accel.threads`). A non-finite batch cost raises
        :class:`~sksae.TrainingDivergedError` before the statistics take it in
        where reading it is free (the CPU); elsewhere the training loop checks
        it with the metrics it reads.

        With a process group ``Xb`` is this rank's part of a global batch of
        ``n_rows`` rows: the codes are per row, the batch cost and the
        statistics' increments ``code^T code`` and ``X^T code`` are sums over
        rows, summed across ranks in one all-reduce, and every rank takes the
        same update (a dead atom's replacement row comes from the rank that
        holds it).
        """
        code, _ = encode(Xb, D, "lasso_" + self.fit_algorithm, alpha=self.alpha,
                         max_iter=self.transform_max_iter, positive=self.positive_code,
                         tol=_FIT_TOL)
        with serial(Xb), parallel(Xb):
            resid = torch.addmm(Xb, code, D, alpha=-1.0)
            cost = 0.5 * resid.square().sum() + self.alpha * code.abs().sum()
            rows = Xb
            if group is not None:
                k, d = code.shape[1], Xb.shape[1]
                sums = group.sum_(torch.cat([(code.T @ code).reshape(-1),
                                             (Xb.T @ code).reshape(-1), cost.reshape(1)]))
                cost, rows = sums[-1], GlobalRows(Xb, group, n_rows)
            cost = cost / rows.shape[0]
            value = free_host_value(cost)
            if value is not None and not math.isfinite(value):
                # read for free on the CPU: raise before the statistics take it in
                raise TrainingDivergedError(f"The batch cost is {value}.", metric="loss",
                                            value=value)
            if group is None:
                update_stats(A, B, Xb, code, step)
            else:
                beta = forgetting_factor(step, n_rows)
                A.mul_(beta).add_(sums[:k * k].view(k, k), alpha=1.0 / n_rows)
                B.mul_(beta).add_(sums[k * k:k * k + d * k].view(d, k), alpha=1.0 / n_rows)
            update_dictionary(D, A, B, rows, random_state, positive=self.positive_dict)
            if group is not None:
                # on a GPU each rank times where its sweep runs (device or host copies), and
                # the two round differently: rank 0's dictionary, to the bit, on every rank
                group.broadcast_(D)
        return cost

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn the dictionary from ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data. float32 stays float32; other types become float64.
        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : object
            Fitted estimator.

        Raises
        ------
        sksae.TrainingDivergedError
            When training diverges: a batch cost or the dictionary is not
            finite (data too large for its dtype). The message names the
            step. On the CPU a step whose cost is not finite is never applied.

        Notes
        -----
        Whatever the exception, :class:`KeyboardInterrupt` included, the
        estimator is left exactly as it was before the call: fitted
        attributes, sufficient statistics and random state (a first fit that
        fails leaves it unfitted).
        A ``RandomState`` instance given as ``random_state`` is rewound too;
        numpy's global one (used with ``random_state=None``) is not.
        """
        with restore_on_failure(self):
            self._fit(X)
        return self

    def _fit(self, X):
        device, n_components = self._validate_before_data(X)
        X = check_input(self, X, reset=True, order="C")
        n_components = n_components or X.shape[1]
        group = resolve_group(self.distributed)
        if group is not None:
            device = local_rank_device(self.device)
            check_data_parallel(group, self, *X.shape, device)
        random_state = shared_random_state(group, self.random_state)
        D, A, B = self._start(X, device, n_components, random_state)
        if group is not None:  # the same draws on every rank: rank 0's, to the bit
            group.broadcast_(D)
        batch_size = min(self.batch_size, X.shape[0])
        gen = make_generator(random_state) if self.shuffle else None
        if isinstance(X, Rows):
            shuffle = ("blocks" if X.blocks else "once") if self.shuffle else "none"
            source = StreamSource(X, batch_size, device, D.dtype, gen, shuffle=shuffle,
                                  group=group)
        else:
            source = BatchSource(X, batch_size, device, D.dtype, gen,
                                 shuffle="once" if self.shuffle else "none", group=group)
        stopper = EarlyStopping(X.shape[0], batch_size, tol=self.tol,
                                max_no_improvement=self.max_no_improvement)
        old = D.clone()

        def step(batch, i, total):
            old.copy_(D)
            return {"loss": self._step(batch, D, A, B, i, random_state, group,
                                       source.rows_in_step(i))}

        def change():
            return float(torch.linalg.matrix_norm(D - old)) / n_components

        result = run_minibatch_loop(step, source, max_epochs=self.max_iter, stopper=stopper,
                                    callback=self.callback,
                                    verbose=int(self.verbose) if group is None or group.rank == 0
                                    else 0,
                                    desc="DictionaryLearnerGPU", param_change=change,
                                    state_finite=lambda: _finite(D),
                                    divergence_hint=_DIVERGENCE_HINT)
        if not _finite(D):  # e.g. no step to check (max_iter=0) or an overflow at the last
            raise _diverged(type(self).__name__, result.n_steps, source.steps_per_epoch,
                            "parameters", None, _DIVERGENCE_HINT)
        self.n_steps_ = result.n_steps
        self.n_iter_ = int(np.ceil(self.n_steps_ / source.steps_per_epoch))
        self._set_state(D, A, B, random_state)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Update the dictionary with one minibatch ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            One minibatch. An out-of-core input (:mod:`sksae.activations`) is
            taken ``batch_size`` rows at a time, one step each.
        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : object
            Updated estimator.

        Raises
        ------
        sksae.TrainingDivergedError
            When training diverges: a batch cost or the dictionary is not
            finite (data too large for its dtype). The message names the
            step. On the CPU a step whose cost is not finite is never applied.

        Notes
        -----
        Whatever the exception, :class:`KeyboardInterrupt` included, the
        estimator is left exactly as it was before the call: fitted
        attributes, sufficient statistics and random state (a first fit that
        fails leaves it unfitted).
        A ``RandomState`` instance given as ``random_state`` is rewound too;
        numpy's global one (used with ``random_state=None``) is not.
        """
        with restore_on_failure(self):
            checked = check_input(self, X, reset=not hasattr(self, "components_"))
            if isinstance(checked, Rows) and not is_out_of_core(X) \
                    and checked.nbytes <= FULL_SCAN_BYTES:
                # in memory (float16, or a tensor on a GPU): one minibatch, as an array's
                self._partial_fit(take(checked, np.arange(checked.n_samples)))
            elif isinstance(checked, Rows):
                # one step per batch_size rows, in order (a store is never one minibatch)
                for start in range(0, checked.n_samples, self.batch_size):
                    stop = min(start + self.batch_size, checked.n_samples)
                    self._partial_fit(take(checked, np.arange(start, stop)))
            else:
                self._partial_fit(checked)
        return self

    def _partial_fit(self, X):
        first = not hasattr(self, "components_")
        device, n_components = self._validate_before_data(X)
        X = validate_data(self, X, dtype=[np.float64, np.float32], order="C", reset=first)
        n_components = n_components or X.shape[1]
        if first:
            random_state = check_random_state(self.random_state)
            D, A, B = self._start(X, device, n_components, random_state)
            n_steps = 0
        else:
            dtype = torch_dtype(X.dtype)
            random_state = self._random_state
            D, A, B = (as_tensor(a, device, dtype) for a in (self.components_, self._A, self._B))
            D, A, B = D.clone(), A.clone(), B.clone()
            n_steps = self.n_steps_
        try:
            cost = float(self._step(as_tensor(X, device, D.dtype), D, A, B, n_steps,
                                    random_state))
        except TrainingDivergedError as exc:
            raise _diverged(type(self).__name__, 1, 1, exc.metric, exc.value,
                            _DIVERGENCE_HINT) from None
        if not math.isfinite(cost):
            raise _diverged(type(self).__name__, 1, 1, "loss", cost, _DIVERGENCE_HINT)
        if not _finite(D):
            raise _diverged(type(self).__name__, 1, 1, "parameters", None, _DIVERGENCE_HINT)
        self.n_steps_ = n_steps + 1
        self.n_iter_ = getattr(self, "n_iter_", 0)
        self._set_state(D, A, B, random_state)

    def _set_state(self, D, A, B, random_state):
        # Device-free numpy state: a model fitted on a GPU unpickles on a CPU.
        self.components_ = to_numpy(D)
        self._A, self._B = to_numpy(A), to_numpy(B)
        self._random_state = random_state

    # -- coding ------------------------------------------------------------------
    def transform(self, X):
        """Encode ``X`` as sparse combinations of the atoms.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Data to encode.

        Returns
        -------
        code : ndarray of shape (n_samples, n_components)
            Codes (``2 * n_components`` columns with ``split_sign``), in ``X``'s
            floating dtype (float32 for float16 and bfloat16 inputs).

        Raises
        ------
        ValueError
            When finite ``X`` overflows the codes' dtype with this model.
        """
        check_is_fitted(self)
        X = check_input(self, X, reset=False)
        check_positive_coding(self.transform_algorithm, self.positive_code)
        alpha = self.alpha if self.transform_alpha is None else self.transform_alpha
        device = resolve_device(self.device)

        def code_of(Xc):
            code = _code_rows(Xc, self.components_.astype(Xc.dtype, copy=False),
                              self.transform_algorithm,
                              n_nonzero_coefs=self.transform_n_nonzero_coefs, alpha=alpha,
                              max_iter=self.transform_max_iter, positive=self.positive_code,
                              device=device)
            return check_finite_output(code, Xc, self)

        if isinstance(X, Rows):  # chunk by chunk, each checked as it is read
            code = np.concatenate([code_of(chunk.cpu().numpy()) for _, chunk in
                                   iter_chunks(X, 65536, "cpu", torch_dtype(X.dtype))])
        else:
            code = code_of(X)
        if self.split_sign:
            code = np.hstack([np.maximum(code, 0), -np.minimum(code, 0)])
        return code

    def inverse_transform(self, X):
        """Map codes back to data space: ``X @ components_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_components)
            Codes (``2 * n_components`` columns with ``split_sign``).

        Returns
        -------
        X_original : ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        code = check_codes(X)
        expected = self.components_.shape[0] * (2 if self.split_sign else 1)
        if code.shape[1] != expected:
            raise ValueError(
                "The number of components in the code is different from the number of "
                f"components in the dictionary. Expected {expected}, got {code.shape[1]}."
            )
        if self.split_sign:
            half = code.shape[1] // 2
            code = code[:, :half] - code[:, half:]
        return code @ self.components_.astype(code.dtype, copy=False)

    @property
    def _n_features_out(self):
        return self.components_.shape[0] * (2 if self.split_sign else 1)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
