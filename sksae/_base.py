"""Shared estimator plumbing: device and dtype resolution, numpy <-> torch, batching.

``torch.cuda`` is named in this module only, so that every other code path is
device-agnostic: tensors are created on the device of their inputs.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import numpy as np
import torch

__all__ = [
    "resolve_device",
    "is_accelerator",
    "torch_dtype",
    "as_tensor",
    "to_numpy",
    "make_generator",
    "autocast",
    "native_bf16",
    "batched_apply",
    "inference_chunk_rows",
    "restore_on_failure",
    "synchronize",
    "HostReading",
    "side_stream",
    "capture_graph",
]

_NP_TO_TORCH = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.float16): torch.float16,
}


def resolve_device(device="auto"):
    """Turn a user's ``device`` parameter into a :class:`torch.device`.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"} or str or torch.device, default="auto"
        ``"auto"`` picks the first CUDA device when one is available, else the CPU.
        Any string torch understands (``"cuda:1"``, ``"mps"``) is accepted.

    Returns
    -------
    device : torch.device
    """
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"Unknown device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was requested but CUDA is not available; "
            "use device='auto' or device='cpu'."
        )
    return dev


def is_accelerator(device):
    """Whether ``device`` is a GPU-like device where host synchronisation is costly."""
    return torch.device(device).type != "cpu"


def synchronize(device):
    """Wait for queued kernels on ``device`` (used by benchmarks for honest timings)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    non_blocking = t.device.type == "cpu" and t.is_pinned()
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


def native_bf16(device):
    """Whether ``device`` multiplies bf16 matrices natively, faster than float32.

    True on CUDA devices with bf16 support and on CPUs with AVX512-BF16 or AMX
    instructions, where oneDNN runs a bf16 product at 2-2.4x float32's rate
    (measured on a 2-core AMD EPYC: 4096 x 768 x 24576 in 391 ms against 926 ms).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_native_bf16()


@functools.lru_cache(maxsize=None)
def _cpu_native_bf16():
    if not torch.backends.mkldnn.is_available():
        return False
    # private probes (torch >= 2.1); an older torch counts as no native bf16
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast(device, enabled=True, cache=True):
    """bf16 autocast on CUDA (fp32 master weights stay fp32); a no-op elsewhere.

    ``cache=False`` recasts a weight at each use instead of caching its bf16
    copy, as a region that a CUDA graph records must (the cache would hold
    tensors of the recording that later replays do not refresh).
    """
    device = torch.device(device)
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


class HostReading:
    """A device scalar's value on the host, copied without waiting for the device.

    On CUDA the copy goes into pinned memory behind the kernels already queued
    and :meth:`value` is None until it has arrived, so the host never stalls
    the queue; elsewhere the value is read at once.
    """

    def __init__(self, t):
        self._event = None
        if t.device.type == "cuda":
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = float(t)

    def value(self, wait=False):
        """The scalar as a float, or None while its copy is on its way (``wait``: wait for it)."""
        if self._event is not None:
            if not wait and not self._event.query():
                return None
            self._event.synchronize()
            self._host, self._event = float(self._host), None
        return self._host


@contextlib.contextmanager
def side_stream(device):
    """Run the block on a fresh CUDA stream joined to the current one (no-op elsewhere).

    The warm-up before recording a CUDA graph runs there, as torch requires:
    lazily created per-stream state (cuBLAS workspaces, autograd's device
    threads) then exists before the capture.
    """
    device = torch.device(device)
    if device.type != "cuda":
        yield
        return
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)


def capture_graph(fn, device):
    """Record the kernels of ``fn()`` as a CUDA graph.

    Nothing runs during the recording. ``graph.replay()`` then launches every
    recorded kernel at once, on the same memory: ``fn``'s inputs must be
    refreshed in place between replays and its outputs are overwritten by each.

    Returns
    -------
    graph : torch.cuda.CUDAGraph
    out : the value ``fn()`` returned (tensors in the graph's memory)
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {device}.")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device), torch.cuda.graph(graph):
        out = fn()
    return graph, out


def inference_chunk_rows(n_columns, itemsize=4, budget_bytes=256 * 2**20):
    """Rows per chunk so that an (rows, n_columns) intermediate stays within budget."""
    return int(max(1, min(65536, budget_bytes // max(1, n_columns * itemsize))))


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


class restore_on_failure:
    """Context manager: if the block raises, put back the estimator's fitted state.

    Fitted attributes (names ending in ``_``) and private state (names starting
    with ``_``) are restored by reference, so a failed ``fit`` or ``partial_fit``
    on a fitted model leaves it exactly as it was. Training code must therefore
    build new arrays rather than mutate fitted ones in place.
    """

    def __init__(self, estimator):
        self.estimator = estimator

    def __enter__(self):
        self.saved = {k: v for k, v in vars(self.estimator).items()
                      if k.endswith("_") or k.startswith("_")}
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, Exception):
            state = vars(self.estimator)
            for k in [k for k in state if (k.endswith("_") or k.startswith("_"))
                      and k not in self.saved]:
                del state[k]
            state.update(self.saved)
        return False
