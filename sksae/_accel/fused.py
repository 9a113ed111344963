"""Launchers of the Triton kernels (:mod:`._triton_kernels`) and the rule that enables them.

The TopK family's sparse step (:mod:`.sparse`) and its selections
(:mod:`.select`) call :func:`kernels_for` with their tensors: it returns the
launchers when the Triton kernels should run on them, else None (and the
callers run their torch or numba paths, which compute the same thing).

They run on CUDA tensors when Triton imports. On CPU tensors they run only
when a test forces them (:func:`forced`) with ``TRITON_INTERPRET=1`` set
before Triton was first imported: Triton's interpreter then executes them
with numpy, which is how CI checks them without a GPU.

Every launcher sums in float32 (float64 for float64 tensors) and writes in
its output's dtype; none synchronises with the host, so the step can still
be recorded as a CUDA graph.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings

import torch

from .device import is_capturing, time_call

__all__ = ["available", "forced", "kernels_for", "selection_kernels", "fastest", "dead_columns",
           "TOPK_DTYPES"]

#: dtypes whose bits the radix selection reads as order-preserving keys
TOPK_DTYPES = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32}

_FORCED = False
#: (B, F, k, dtype, device) -> whether the radix selection beat ``torch.topk`` there
_SELECTION_TIMINGS = {}


@functools.cache
def _module():
    """The compiled-kernel module, or None when Triton cannot be imported."""
    try:
        return importlib.import_module("sksae._accel._triton_kernels")
    except Exception:  # noqa: BLE001 - a broken Triton is a missing one
        return None


def available():
    """Whether the Triton kernels can be loaded here."""
    return _module() is not None


def interpreting():
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def forced():
    """Run the Triton kernels wherever they apply inside the block, on CPU tensors too.

    For tests: on the CPU this needs ``TRITON_INTERPRET=1`` in the environment
    before Triton's first import (the conftest sets it when no GPU is present).
    """
    global _FORCED
    if not available():
        raise RuntimeError("Triton is not installed, or fails to import.")
    previous, _FORCED = _FORCED, True
    try:
        yield
    finally:
        _FORCED = previous


def kernels_for(*tensors):
    """The launchers when the Triton kernels should run on ``tensors``, else None.

    All tensors on one CUDA device (or on the CPU inside :func:`forced` with
    the interpreter on), and Triton importable.
    """
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        return None
    if device.type == "cuda" or (_FORCED and device.type == "cpu" and interpreting()):
        return _module() and _launchers
    return None


def selection_kernels(pre_BF, k):
    """The launchers when their radix top-k should select ``k`` of each row of ``pre``, else None.

    The rule is a measurement: the first time a shape (B, F, k, dtype) comes on
    a device, both ``torch.topk`` and the radix selection run on it a few
    times and the faster is kept for that shape (never while a CUDA graph is
    recording: the step then keeps what was measured, or ``torch.topk``).
    Inside :func:`forced` the radix selection always runs.
    """
    triton = kernels_for(pre_BF)
    if triton is None or pre_BF.dtype not in TOPK_DTYPES or pre_BF.dim() != 2 or k <= 0:
        return None
    if _FORCED:
        return triton
    key = (*pre_BF.shape, k, pre_BF.dtype, pre_BF.device)
    wins = _SELECTION_TIMINGS.get(key)
    if wins is None:
        if is_capturing(pre_BF.device):
            return None
        pre = pre_BF.detach()
        choice, _ = fastest({"triton": lambda: triton.radix_topk(pre, k),
                             "torch": lambda: torch.topk(pre, k, dim=-1, sorted=False)},
                            pre.device)
        wins = _SELECTION_TIMINGS[key] = choice == "triton"
    return triton if wins else None


def fastest(options, device):
    """The fastest of ``options`` on ``device``, timed here: ``(name, {name: seconds})``.

    ``options`` maps names to zero-argument callables, each run a few times
    (:func:`sksae._accel.device.time_call`). One that raises (a kernel Triton
    cannot build on this GPU, say) is reported in a warning and loses.
    """
    times = {}
    for name, fn in options.items():
        try:
            times[name] = time_call(fn, device)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"{name!r} failed while being timed ({type(exc).__name__}: {exc}); "
                          "another way runs instead.", RuntimeWarning, stacklevel=3)
            times[name] = float("inf")
    return min(times, key=times.get), times


def dead_columns(dead_F):
    """``(columns, n)``: the dead latents' indices first (ascending), their count on the device."""
    order = torch.sort((~dead_F).to(torch.uint8), stable=True).indices
    return order, dead_F.sum()


def _grid_rows(n):
    return (max(int(n), 0),)


class _Launchers:
    """The launchers, reached through :func:`kernels_for` (so that no caller skips the rule)."""

    @staticmethod
    def radix_topk(pre_BF, k, cols=None, block=None, num_warps=4):
        """Columns (B, k) of each row's ``k`` largest entries, ascending, and their validity.

        The same sets as ``torch.topk`` up to ties (among equal entries the
        earlier columns are kept). With ``cols`` (int64 (n,) or (F,) with a
        count) only those columns are candidates: ``cols`` is a pair
        ``(columns, n)`` with ``n`` a 0-dim int64 tensor on the device (no host
        read). Rows with fewer than k candidates are padded with column 0,
        marked invalid. ``block`` (columns per iteration, a power of two) and
        ``num_warps`` tune the launch (benchmarks/bench_topk_gpu.py).
        """
        K = _module()
        pre = pre_BF if pre_BF.stride(-1) == 1 else pre_BF.contiguous()
        B, F = pre.shape
        out = torch.empty((B, k), dtype=torch.int64, device=pre.device)
        valid = torch.empty((B, k), dtype=torch.bool, device=pre.device)
        if B == 0 or k == 0:
            return out, valid
        if cols is None:
            columns, n = out, out  # unused pointers
        else:
            columns, n = cols
        _run(K.radix_topk_kernel, _grid_rows(B),
             pre, columns, n, out, valid, F, pre.stride(0), k,
             KEY_BITS=TOPK_DTYPES[pre.dtype], HAS_COLS=cols is not None,
             BLOCK=block or min(1024, _pow2(F)), num_warps=num_warps)
        return out, valid

    @staticmethod
    def decode(pat, values_N, W_FD, bias_D=None):
        """``S @ W (+ bias)`` (B, D) in ``W``'s dtype, ``S`` carrying ``values`` on ``pat``."""
        K = _module()
        W = W_FD.contiguous()
        B, D = pat.n_rows, W.shape[1]
        out = W.new_empty((B, D))
        if B == 0:
            return out
        bias = W if bias_D is None else bias_D.contiguous()
        block_d = min(256, _pow2(D))
        _run(K.decode_kernel, (B, -(-D // block_d)),
             pat.indices, values_N.contiguous(), pat.crow, W, bias, out, D,
             HAS_BIAS=bias_D is not None, ACC=_acc(out), BLOCK_E=32, BLOCK_D=block_d)
        return out

    @staticmethod
    def dots(pat, A_BD, W_FD, bias_F=None, dtype=None):
        """``<A[b], W[f]> (+ bias[f])`` for each entry (b, f) of ``pat``, shape (N,)."""
        K = _module()
        A, W = A_BD.contiguous(), W_FD.contiguous()
        out = W.new_empty(pat.indices.shape[0], dtype=dtype or W.dtype)
        if pat.n_rows == 0 or out.numel() == 0:
            return out
        bias = W if bias_F is None else bias_F.contiguous()
        _run(K.dots_kernel, _grid_rows(pat.n_rows),
             pat.indices, pat.crow, A, W, bias, out, W.shape[1],
             HAS_BIAS=bias_F is not None, ACC=_acc(out), BLOCK_E=16,
             BLOCK_D=min(128, _pow2(W.shape[1])))
        return out

    @staticmethod
    def by_latent(transposed, weights_N, Y_BD, out_FD, dots_N=None, W_FD=None, sums=False):
        """``S^T @ Y`` into ``out`` (F, D), row by row over the transposed pattern.

        ``transposed``: ``(order, crow_T, rows)`` (:func:`sksae._accel.sparse._transpose`);
        ``weights`` and ``dots`` are in the pattern's order. With ``dots`` and
        ``W`` each row loses its radial part ``(sum_e w_e dots_e) W[f]``.
        Returns ``(sum_e w_e per latent or None, the rows' squared norms)``.
        """
        K = _module()
        order, crow_T, rows = transposed
        F_, D = out_FD.shape
        wt = weights_N.index_select(0, order)
        project = dots_N is not None
        dots = dots_N.index_select(0, order) if project else wt
        W = W_FD.contiguous() if project else out_FD
        total = out_FD.new_empty(F_) if sums else None
        sq = torch.empty(F_, dtype=torch.promote_types(out_FD.dtype, torch.float32),
                         device=out_FD.device)
        if F_ == 0:
            return total, sq
        _run(K.by_latent_kernel, _grid_rows(F_),
             crow_T, rows, wt, dots, Y_BD.contiguous(), W, out_FD,
             sq if total is None else total, sq, D,
             PROJECT=project, SUM=sums, ACC=_acc(out_FD), BLOCK_E=16, BLOCK_D=min(256, _pow2(D)))
        return total, sq


#: when a list, every launch appends ``(kernel, args, constexprs)`` to it (tests/test_triton.py
#: compiles what was launched for CUDA targets, on a machine without a GPU)
_LAUNCHES = None


def _run(kernel, grid, *args, num_warps=4, **constexprs):
    """Launch ``kernel`` on ``grid`` (noting the launch where :data:`_LAUNCHES` asks)."""
    if _LAUNCHES is not None:
        _LAUNCHES.append((kernel, args, constexprs))
    kernel[grid](*args, num_warps=num_warps, **constexprs)


def _acc(out):
    """The kernels' accumulator type for an output tensor: float64 for float64, else float32."""
    import triton.language as tl
    return tl.float64 if out.dtype == torch.float64 else tl.float32


def _pow2(n):
    """The smallest power of two at least ``n`` (and at least 16: Triton's smallest block)."""
    return max(16, 1 << max(int(n) - 1, 0).bit_length())


_launchers = _Launchers()
