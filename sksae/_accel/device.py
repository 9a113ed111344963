"""Devices: resolution, capabilities, CUDA streams and graphs, host readings.

The one module that names ``torch.cuda``: every other code path is
device-agnostic (tensors are created on the device of their inputs) and asks
here when it must know what the device can do.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time

import torch

from .cluster import worker_index

__all__ = ["resolve_device", "is_accelerator", "synchronize", "native_bf16", "autocast",
           "HostReading", "side_stream", "capture_graph", "graphs_supported", "fits_on_device",
           "host_read_interval", "device_available", "free_host_value", "is_capturing",
           "time_call", "use_local_gpu"]


def resolve_device(device="auto"):
    """Turn a user's ``device`` parameter into a :class:`torch.device`.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"} or str or torch.device, default="auto"
        ``"auto"`` picks the first CUDA device when one is available, else the
        CPU; in a task of a ``dask.distributed`` worker on a host with several
        CUDA devices, the ``i``-th worker of the host
        (:func:`sksae._accel.cluster.worker_index`) takes ``cuda:{i % count}``.
        Any string torch understands (``"cuda:1"``, ``"mps"``) is accepted.

    Returns
    -------
    device : torch.device
    """
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        count = _cuda_count()
        if count == 0:
            return torch.device("cpu")
        index = worker_index() if count > 1 else None
        return torch.device("cuda") if index is None else torch.device("cuda", index % count)
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


def _cuda_count():
    """How many CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def is_accelerator(device):
    """Whether ``device`` is a GPU-like device where host synchronisation is costly."""
    return torch.device(device).type != "cpu"


def synchronize(device):
    """Wait for queued kernels on ``device`` (used by benchmarks for honest timings)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def native_bf16(device):
    """Whether ``device`` multiplies bf16 matrices natively, faster than float32.

    True on CUDA devices with bf16 support and on CPUs with AVX512-BF16 or AMX
    instructions, where oneDNN runs a bf16 product at about twice float32's
    rate.
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
    # "thread_local": only this thread's calls are checked while recording; the default
    # ("global") would also fail the read-ahead thread's pinning of the next buffer
    with torch.cuda.device(device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


def is_capturing(device):
    """Whether kernels queued on ``device`` are being recorded into a CUDA graph now."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def time_call(fn, device, repeats=5):
    """Median seconds of ``fn()`` on ``device`` over ``repeats`` calls, after one warm-up.

    On CUDA timed by events on the current stream (the GPU's time, not the
    launch's); elsewhere by the wall clock.
    """
    device = torch.device(device)
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def graphs_supported(device):
    """Whether training steps on ``device`` can be recorded and replayed as CUDA graphs."""
    return torch.device(device).type == "cuda"


def fits_on_device(nbytes, device, budget_bytes):
    """Whether data of ``nbytes`` is moved to ``device`` once (always on the CPU)."""
    return not is_accelerator(device) or nbytes <= budget_bytes


def host_read_interval(device, every_step):
    """Steps between host reads of a training loop's metrics.

    Reads are free on the CPU, so a loop that needs every step's values
    (early stopping, a callback) reads them at once; on an accelerator a read
    waits for the queue to drain, so reads are batched every 32 steps.
    """
    return 1 if every_step and not is_accelerator(device) else 32


def device_available(device):
    """Whether ``device`` (a name or :class:`torch.device`) can be used here."""
    try:
        resolve_device(device)
    except ValueError:
        return False
    return True


def free_host_value(t):
    """``float(t)`` where reading it costs no synchronisation (the CPU), else None."""
    return None if is_accelerator(t.device) else float(t)


def default_distributed_backend():
    """The ``torch.distributed`` backend for this machine: NCCL with CUDA devices, else gloo.

    With CUDA devices ``"cpu:gloo,cuda:nccl"`` (torch's own default): collectives of
    CUDA tensors go through NCCL, those of host tensors and objects through gloo, so
    that a fit on the CPU inside a GPU launch works too.
    """
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def use_local_gpu():
    """Make ``cuda:{LOCAL_RANK}`` the current CUDA device in a ``torchrun`` process.

    NCCL's object collectives (``all_gather_object``, ``broadcast_object_list``)
    run on the current device, which is ``cuda:0`` in every process until it
    is set: every rank would then share one GPU. Does nothing without CUDA or
    outside ``torchrun`` (``LOCAL_RANK`` unset).
    """
    import os

    local = os.environ.get("LOCAL_RANK")
    if local is not None and torch.cuda.is_available():
        torch.cuda.set_device(int(local) % torch.cuda.device_count())


def local_rank_device(device):
    """``device`` for this process of a ``torchrun`` launch: ``"auto"`` is its own GPU.

    Under ``torchrun`` (``LOCAL_RANK`` set) with CUDA devices, ``"auto"`` and
    ``"cuda"`` mean ``cuda:{LOCAL_RANK}``; anything else is resolved as
    :func:`resolve_device` does.
    """
    import os

    local = os.environ.get("LOCAL_RANK")
    if local is not None and str(device) in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(local) % torch.cuda.device_count())
    return resolve_device(device)
