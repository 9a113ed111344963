"""Fast paths of the TopK family's forward: the encoder product and the selections.

The architectures state what they select (:mod:`sksae.architectures.topk`,
:mod:`sksae.architectures.batchtopk`); this module runs it fast:

- :func:`encoder_product` splits a CPU product by rows over sksae's threads
  (:mod:`.threads`) without waking torch's OpenMP team;
- :func:`selection_pre_activation` computes the pre-activations that only
  *select* latents in the workspace's ``selection_dtype`` (bf16 where the CPU
  multiplies it natively); values and gradients stay in the parameters'
  precision (:func:`sksae._accel.sparse.gather_pre`);
- :func:`topk`, :func:`select_topk` and :func:`batch_topk_pattern` take the
  compiled selections of :mod:`._topk_nb` on the CPU, and elsewhere the Triton
  radix selection of :mod:`.fused` where it measured faster than
  ``torch.topk``, else ``torch.topk``. All select the same sets up to ties
  (among equal entries the compiled and Triton kernels keep the earlier ones);
  AuxK's picks (:func:`dead_latent_picks`) read only the dead columns where
  they can.
"""

from __future__ import annotations

import numpy as np
import torch

from . import fused
from .compiled import kernel
from .sparse import Pattern, row_offsets
from .threads import even_bounds, parallel, run_ranges

__all__ = ["encoder_product", "pre_activation", "selection_pre_activation", "topk",
           "select_topk", "batch_topk_pattern", "pattern_of", "dead_latent_picks"]

#: magnitude-bit masks of the float formats the compiled selections read as integers
_BITS = {torch.bfloat16: (torch.int16, 0x7FFF), torch.float32: (torch.int32, 0x7FFFFFFF)}


def encoder_product(bias, centred, W, out=None):
    """``bias + centred W^T`` (into ``out`` when given).

    ``bias=None``: ``centred W^T`` alone. With ``out`` (a CPU buffer) the rows
    are split into ranges run on sksae's threads, each a product on one torch
    thread, which gives the same bits for any split.
    """
    def product(rows, into):
        if bias is None:
            return torch.mm(rows, W.T, out=into)
        return torch.addmm(bias, rows, W.T, out=into)

    if out is None:
        with parallel(centred):
            return product(centred, None)

    with parallel(centred, own=True):  # a range of a few rows would take GEMV's other path
        run_ranges(lambda a, b: product(centred[a:b], out[a:b]),
                   even_bounds(centred.shape[0], min_size=16))
    return out


def pre_activation(p, x_BD, ws=None, centred=None):
    """``(x - b_dec) W_enc^T + b_enc``, into a reused buffer of ``ws`` on the CPU."""
    centred = x_BD - p["b_dec"] if centred is None else centred
    W = p["W_enc"]
    out = None if ws is None else ws.scratch("pre", (x_BD.shape[0], W.shape[0]), W)
    return encoder_product(p["b_enc"], centred, W, out)


def selection_pre_activation(p, x_BD, ws, centred=None):
    """The pre-activations a training step selects from, without a graph.

    With ``ws.selection_dtype`` lower than the parameters' on the CPU (bf16)
    the product runs on bf16 copies of ``x - b_dec`` and ``W_enc``; a
    rounding error can then only swap latents whose pre-activations tie to
    within bf16's 3 significant digits.
    """
    W = p["W_enc"]
    low = ws.selection_dtype
    if low is None or low == W.dtype or W.device.type != "cpu":
        return pre_activation(p, x_BD, ws, centred)
    centred = x_BD - p["b_dec"] if centred is None else centred
    # the bias rides in the product: a column of ones in x meets b_enc in W
    B, D = centred.shape
    W_low = ws.scratch("W_enc low", (W.shape[0], D + 2), W, dtype=low,
                       init=lambda t: t[:, D + 1].zero_())
    x_low = ws.scratch("x low", (B, D + 2), W, dtype=low,
                       init=lambda t: t[:, D:].copy_(t.new_tensor([1, 0])))
    with parallel(W, own=True):
        run_ranges(lambda a, b: W_low[a:b, :D].copy_(W[a:b]), even_bounds(W.shape[0]))
    W_low[:, D].copy_(p["b_enc"])
    x_low[:, :D].copy_(centred)
    out = ws.scratch("pre low", (B, W.shape[0]), W, dtype=low)
    return encoder_product(None, x_low, W_low, out)


def topk(pre_BF, k):
    """``(values, indices)`` of each row's ``k`` largest entries, unsorted; values keep the graph.

    ``torch.topk`` on the fit's threads, or the Triton radix selection where
    :func:`sksae._accel.fused.selection_kernels` measured it faster, its
    values gathered (the same sets up to ties).
    """
    triton = fused.selection_kernels(pre_BF, k)
    if triton is not None:
        indices = triton.radix_topk(pre_BF.detach(), k)[0]
        return pre_BF.gather(-1, indices), indices
    return _torch_topk(pre_BF, k)


def _torch_topk(pre_BF, k):
    with parallel(pre_BF):
        return tuple(torch.topk(pre_BF, k, dim=-1, sorted=False))


def select_topk(pre_BF, k):
    """Indices (B, k) of each row's ``k`` largest entries, in no particular order.

    Where :func:`sksae._accel.fused.selection_kernels` measured it faster (on
    CUDA) the Triton radix selection runs. On the CPU the compiled kernel runs
    where ``16 k <= F`` (its sampled threshold then leaves about ``2 k``
    candidates a row; for larger shares ``torch.topk`` is faster), split by
    rows over sksae's threads.
    """
    triton = fused.selection_kernels(pre_BF, k)
    if triton is not None:
        return triton.radix_topk(pre_BF, k)[0]
    B, F = pre_BF.shape
    fits = pre_BF.device.type == "cpu" and pre_BF.dtype in _BITS and 0 < 16 * k <= F and B > 0
    rows = kernel("topk") if fits else None
    if rows is None:
        return _torch_topk(pre_BF, k)[1]
    int_dtype, magnitude = _BITS[pre_BF.dtype]
    bits = pre_BF.contiguous().view(int_dtype).numpy()
    out = np.empty((B, k), dtype=np.int64)

    with parallel(pre_BF, own=True):
        run_ranges(lambda a, b: rows(bits, k, magnitude, a, b, out), even_bounds(B))
    return torch.from_numpy(out)


def batch_topk_pattern(pre_BF, K):
    """The ``K`` largest entries of ``pre`` over the whole batch, as a row-ordered pattern."""
    compiled = _compiled_batch_topk(pre_BF, K)
    if compiled is not None:
        return compiled
    flat = pre_BF.reshape(-1)
    with parallel(pre_BF):
        chosen = torch.topk(flat, K, sorted=False).indices
    return _flat_pattern(torch.sort(chosen).values, *pre_BF.shape)


def pattern_of(mask_BF):
    """The entries of a (B, F) boolean mask, as a row-ordered pattern."""
    return _flat_pattern(mask_BF.reshape(-1).nonzero().reshape(-1), *mask_BF.shape)


def _flat_pattern(chosen, B, F):
    """The :class:`Pattern` of the ascending positions ``chosen`` in a row-major (B, F) array."""
    rows = torch.div(chosen, F, rounding_mode="floor")
    return Pattern(chosen - rows * F, row_offsets(rows, B), F)


def _compiled_batch_topk(pre_BF, K):
    """The ``K`` largest entries of a CPU bf16 or float32 batch as a pattern, or None.

    The compiled kernels of :mod:`._topk_nb` bucket the keys (a float's bits,
    ordered as integers) by their high 16 bits: a histogram of a strided
    sample gives a bucket that about ``2 K`` entries reach, one pass per row
    range counts and one collects those candidates, and an exact histogram of
    the candidates finds the cut. Among equal values the earlier entries
    (row-major order) are kept. None (the torch path) off the CPU, without
    numba, for other dtypes, or when ties leave more than ``max(8 K + F, 65536)``
    candidates.
    """
    if pre_BF.device.type != "cpu" or pre_BF.dtype not in _BITS or K <= 0:
        return None
    names = ("batch_sample_buckets", "batch_count", "batch_fill", "batch_select")
    kernels = [kernel(name) for name in names]
    if any(k is None for k in kernels):
        return None
    sample, count, fill, select = kernels
    int_dtype, magnitude = _BITS[pre_BF.dtype]
    shift = 16 if int_dtype == torch.int32 else 0  # bucket by the high 16 bits
    bits = pre_BF.contiguous().view(int_dtype).numpy()
    B, F = bits.shape
    counts = np.empty(B, np.int64)
    with parallel(pre_BF, own=True):
        bounds = even_bounds(B)
        # one histogram per row range (integer counts: their sum does not depend on the split)
        hists = {}

        def sample_rows(a, b):
            hists[a] = sample(bits, magnitude, shift, 8, a, b)

        run_ranges(sample_rows, bounds)
        hist = sum(hists.values())
        # the bucket that twice the sample's expected share of K reaches: a margin
        # for sampling noise (fewer than K candidates is retried below)
        reached = np.cumsum(hist[::-1])
        want = 2 * K * reached[-1] / (B * F) + 64
        bucket = max(0, len(hist) - 1 - int(np.searchsorted(reached, want)))
        run_ranges(lambda a, b: count(bits, magnitude, shift, bucket, counts, a, b), bounds)
        if counts.sum() < K:  # the sample overshot: every entry is a candidate
            bucket = 0
            counts[:] = F
        total = int(counts.sum())
        if total > max(8 * K + F, 1 << 16):  # massive ties: too many candidates to hold
            return None
        offsets = np.zeros(B + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        keys, cols = np.empty(total, np.int64), np.empty(total, np.int64)
        run_ranges(lambda a, b: fill(bits, magnitude, shift, bucket, offsets, keys, cols, a, b),
                   bounds)
    chosen, crow = np.empty(K, np.int64), np.empty(B + 1, np.int64)
    select(keys, cols, offsets, K, shift, chosen, crow)
    return Pattern(torch.from_numpy(chosen), torch.from_numpy(crow), F)


def dead_latent_picks(pre_BF, dead_F, k_aux, may_overwrite=False):
    """The ``k_aux`` largest pre-activations of each row among the dead latents.

    Returns ``(indices, valid)``. On the CPU host-side checks are free: the
    picks are made among the dead columns only, and the picks whose
    pre-activation is negative (clamped to 0 by the ReLU: they reconstruct
    nothing and get no gradient) are dropped, giving a row-ordered
    :class:`Pattern` and ``valid=None``; ``indices`` is None when no latent is
    dead. Off the CPU nothing is read back to the host: a fixed-shape (B,
    k_aux) top-k, ``valid`` marking the picks that are dead latents; where the
    Triton radix selection runs (:func:`sksae._accel.fused.selection_kernels`)
    it reads the dead columns only, else ``torch.topk`` takes the masked
    pre-activations. ``pre_BF`` (without a graph) is masked in place
    when ``may_overwrite``.
    """
    triton = fused.selection_kernels(pre_BF, k_aux)
    if triton is not None:
        # the picks among the dead columns only: O(B n_dead), with no host read
        return triton.radix_topk(pre_BF, k_aux, fused.dead_columns(dead_F))
    if pre_BF.device.type != "cpu":
        picked, idx = torch.topk(pre_BF.masked_fill(~dead_F, float("-inf")), k_aux,
                                 dim=-1, sorted=False)
        return idx, picked > float("-inf")
    dead_idx = dead_F.nonzero().flatten()
    n_dead = dead_idx.numel()
    if n_dead == 0:
        return None, None
    if n_dead <= k_aux:  # every dead latent is picked: no selection
        idx = dead_idx.expand(pre_BF.shape[0], n_dead)
    elif 2 * n_dead <= dead_F.numel():
        idx = dead_idx[select_topk(pre_BF.index_select(1, dead_idx), k_aux)]
    else:
        masked = pre_BF.masked_fill_ if may_overwrite else pre_BF.masked_fill
        idx = select_topk(masked(~dead_F, float("-inf")), k_aux)
    keep = pre_BF.gather(1, idx) >= 0
    crow = idx.new_zeros(idx.shape[0] + 1)
    torch.cumsum(keep.sum(1), 0, out=crow[1:])
    return Pattern(idx[keep], crow, pre_BF.shape[1]), None
