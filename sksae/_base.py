"""Shared estimator plumbing: dtype resolution, numpy <-> torch, batching, failure safety.

Device handling (resolution, CUDA graphs, autocast) lives in
:mod:`sksae._accel.device`, the one module that names ``torch.cuda``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import warnings

import numpy as np
import torch

__all__ = [
    "torch_dtype",
    "as_tensor",
    "to_numpy",
    "make_generator",
    "batched_apply",
    "inference_chunk_rows",
    "final_step",
    "n_latents",
    "sparse_coder",
    "restore_on_failure",
    "TrainingDivergedError",
]

_NP_TO_TORCH = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.float16): torch.float16,
}


def torch_dtype(dtype):
    """The torch dtype of a numpy floating dtype."""
    return _NP_TO_TORCH[np.dtype(dtype)]


def as_tensor(X, device, dtype=None):
    """A torch view (CPU, no copy when possible) or copy (other devices) of ``X``.

    Parameters
    ----------
    X : ndarray or torch.Tensor
    device : torch.device
    dtype : torch.dtype, default=None
        Keep ``X``'s dtype when None.
    """
    if isinstance(X, torch.Tensor):
        t = X
    else:
        with warnings.catch_warnings():
            # Read-only arrays (memory maps) are only read here, never written.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            t = torch.from_numpy(np.ascontiguousarray(X))
    non_blocking = t.is_pinned()  # only host tensors are pinned
    return t.to(device=device, dtype=dtype, non_blocking=non_blocking)


def to_numpy(t, dtype=None):
    """A CPU numpy copy of tensor ``t`` (detached), optionally cast to ``dtype``."""
    arr = t.detach().to("cpu").numpy()
    if dtype is not None and arr.dtype != dtype:
        arr = arr.astype(dtype)
    return arr


def make_generator(random_state):
    """A seeded CPU :class:`torch.Generator` drawn from a numpy ``RandomState``.

    Random tensors are drawn on the CPU and then moved, so the same
    ``random_state`` gives the same initialisation on every device.
    """
    seed = int(random_state.randint(np.iinfo(np.int32).max))
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def inference_chunk_rows(n_columns, itemsize=4, budget_bytes=256 * 2**20):
    """Rows per chunk so that an (rows, n_columns) intermediate stays within budget."""
    return int(max(1, min(65536, budget_bytes // max(1, n_columns * itemsize))))


def final_step(estimator):
    """The last step of a Pipeline, or the estimator itself."""
    return estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator


def n_latents(estimator):
    """The number of latents (codes' columns) of a fitted dictionary estimator or Pipeline.

    ``n_components_`` where it has one, else the rows of ``components_``.
    """
    final = final_step(estimator)
    n = getattr(final, "n_components_", None)
    return int(n) if n is not None else int(np.shape(final.components_)[0])


def sparse_coder(estimator):
    """``estimator``, or a shallow copy whose ``transform`` returns sparse codes.

    A :class:`~sksae.SparseAutoencoder` with ``sparse_output=False`` returns
    dense codes: (rows, n_components) floats, 6 GB for 65,536 rows of 24,576
    latents, and a dense product to decode them. Its copy (sharing the
    fitted arrays) codes sparse; other estimators are returned as they are.
    """
    import copy

    if getattr(estimator, "sparse_output", None) is False:
        estimator = copy.copy(estimator)
        estimator.sparse_output = True
    return estimator


def batched_apply(fn, X, *, device, dtype, chunk_rows):
    """Apply ``fn`` (tensor -> tensor) to row chunks of ``X`` and stack as numpy.

    Memory stays bounded by ``chunk_rows`` rows of intermediates whatever the
    size of ``X``; each row's result depends on that row only.

    Parameters
    ----------
    fn : callable
        Maps a (rows, n_features) tensor on ``device`` to a (rows, m) tensor.
    X : ndarray of shape (n_samples, n_features)
    device : torch.device
    dtype : torch.dtype
        Compute dtype; the output has the matching numpy dtype.
    chunk_rows : int

    Returns
    -------
    out : ndarray of shape (n_samples, m)
    """
    outs = []
    with torch.inference_mode():
        for start in range(0, X.shape[0], chunk_rows):
            xb = as_tensor(X[start : start + chunk_rows], device, dtype)
            outs.append(to_numpy(fn(xb)))
    if not outs:
        raise ValueError("Found array with 0 sample(s) (shape=(0, ...)).")
    return np.concatenate(outs, axis=0)


class TrainingDivergedError(FloatingPointError, ValueError):
    """Training produced a non-finite loss, gradient norm or parameter.

    Raised by ``fit`` and ``partial_fit`` of :class:`~sksae.SparseAutoencoder`
    and :class:`~sksae.DictionaryLearnerGPU` when a step diverges (too large a
    learning rate, data of too large a scale for its dtype, ...). The
    estimator is left exactly as it was before the call. A subclass of
    :class:`FloatingPointError` (hence :class:`ArithmeticError`) and of
    :class:`ValueError`.

    Parameters
    ----------
    message : str
    step : int, default=None
        The step of the call (counted from 1) whose value was not finite, when
        known.
    metric : str, default=None
        What was not finite: ``"loss"``, ``"grad_norm"``, ``"parameters"``, ...
    value : float, default=None
        The value read (``nan``, ``inf`` or ``-inf``), when it is a scalar.

    Attributes
    ----------
    step : int or None
    metric : str or None
    value : float or None

    Examples
    --------
    >>> import numpy as np
    >>> from sksae import SparseAutoencoder, TrainingDivergedError
    >>> X = np.random.RandomState(0).randn(200, 8)
    >>> sae = SparseAutoencoder(n_components=16, k=2, max_iter=2, learning_rate=1e30,
    ...                         device="cpu", random_state=0)
    >>> try:
    ...     sae.fit(X)
    ... except TrainingDivergedError as exc:
    ...     print(exc.metric)
    grad_norm
    >>> hasattr(sae, "components_")
    False
    """

    def __init__(self, message, *, step=None, metric=None, value=None):
        super().__init__(message)
        self.step = step
        self.metric = metric
        self.value = value


def _restorable_generators(estimator):
    """The numpy ``RandomState`` objects the estimator holds, but numpy's global one."""
    global_rng = np.random.mtrand._rand
    return [v for v in vars(estimator).values()
            if isinstance(v, np.random.RandomState) and v is not global_rng]


class restore_on_failure:
    """Context manager: if the block raises, put back the estimator's state.

    On any exception, :class:`KeyboardInterrupt` included, the fitted
    attributes (names ending in ``_``) and private state (names starting with
    ``_``) are put back as they were, attributes set by the block are deleted
    (an interrupted first fit leaves the estimator unfitted), and every numpy
    ``RandomState`` the estimator holds (its ``random_state`` or a private
    generator; not numpy's global one) is rewound, so that a failed ``fit`` or
    ``partial_fit`` leaves the estimator exactly as it was. The attributes are
    kept by reference (copy on write): training code must build new arrays and
    tensors rather than mutate the ones the estimator holds.
    """

    def __init__(self, estimator):
        self.estimator = estimator

    def __enter__(self):
        self.saved = {k: v for k, v in vars(self.estimator).items()
                      if k.endswith("_") or k.startswith("_")}
        self.rng_states = [(rng, rng.get_state())
                           for rng in _restorable_generators(self.estimator)]
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            state = vars(self.estimator)
            for k in [k for k in state if (k.endswith("_") or k.startswith("_"))
                      and k not in self.saved]:
                del state[k]
            state.update(self.saved)
            for rng, rng_state in self.rng_states:
                rng.set_state(rng_state)
        return False


@contextlib.contextmanager
def deferred_interrupts():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block has ended.

    For a few steps that must happen together (the renames that replace a
    saved folder's files): an interrupt then lands before them or after them,
    never between. Only the main thread receives signals; elsewhere (and where
    SIGINT has no Python handler) the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def check_finite_output(out, X, estimator):
    """Raise ValueError when finite ``X`` gives non-finite ``out`` (an overflow); return ``out``."""
    if not np.isfinite(out).all() and np.isfinite(X).all():
        raise ValueError(
            f"{type(estimator).__name__}.transform overflowed: X's values are too large for "
            f"{out.dtype} with this model (largest |x| = {np.abs(X).max():.3g}). Scale X "
            "down, or pass float64 data.")
    return out

