"""Triton kernels of the TopK family's training step, for CUDA (imported by :mod:`.fused` only).

Each kernel is one program per row of the batch (or per latent), looping over
its entries and over the features in blocks, so that ragged shapes need no
padding and nothing is read that is not used. Under ``TRITON_INTERPRET=1``
they run on CPU tensors (the test suite's check of them, without a GPU).

- :func:`radix_topk_kernel`: an exact top-k of each row by radix selection
  over the floats' order-preserving integer keys, 8 bits per pass, then one
  pass that collects the winners in column order; optionally over a list of
  columns only (AuxK's dead latents), whose length is read on the device.
The sums accumulate in ``ACC`` (float32, or float64 for float64 tensors).

- :func:`decode_kernel`: ``S @ W (+ bias)``, a gather of the active rows of W.
- :func:`dots_kernel`: ``<A[b], W[f]> (+ bias[f])`` for every entry (b, f).
- :func:`by_latent_kernel`: ``S^T @ Y`` by latent over the transposed pattern
  (no atomics: one program owns each output row), with the decoder's radial
  projection, the weights' sum (a bias gradient) and the rows' squared norms
  fused in.
"""

from __future__ import annotations

import triton
import triton.language as tl

DIGIT_BITS = tl.constexpr(8)
N_DIGITS = tl.constexpr(256)


@triton.jit
def _keys(x, KEY_BITS: tl.constexpr):
    """Order-preserving unsigned keys (int64) of KEY_BITS-bit floats; equal floats, equal keys."""
    if KEY_BITS == 16:
        s = x.to(tl.int16, bitcast=True).to(tl.int64)
    else:
        s = x.to(tl.int32, bitcast=True).to(tl.int64)
    full = (1 << KEY_BITS) - 1
    sign = 1 << (KEY_BITS - 1)
    u = s & full
    u = tl.where(u == sign, 0, u)  # -0.0 is +0.0: equal floats have one key
    # positive floats: set the sign bit; negative ones: flip every bit (larger magnitude,
    # smaller key)
    return tl.where((u & sign) == 0, u | sign, (~u) & full)


@triton.jit
def _row_keys(pre_ptr, cols_ptr, row, j, n, stride, KEY_BITS: tl.constexpr,
              HAS_COLS: tl.constexpr):
    """Keys and columns of the entries ``j`` (a block) of one row; key 0 beyond ``n``."""
    valid = j < n
    if HAS_COLS:
        col = tl.load(cols_ptr + j, mask=valid, other=0)
    else:
        col = j.to(tl.int64)
    x = tl.load(pre_ptr + row * stride + col, mask=valid, other=0)
    return tl.where(valid, _keys(x, KEY_BITS), 0), col, valid


@triton.jit
def radix_topk_kernel(pre_ptr, cols_ptr, n_cols_ptr, out_ptr, valid_ptr, n_cols, stride, k,
                      KEY_BITS: tl.constexpr, HAS_COLS: tl.constexpr, BLOCK: tl.constexpr):
    """The ``k`` largest entries of row ``program_id(0)``: their columns, ascending.

    Radix selection finds the k-th largest key T one digit at a time (a
    histogram of the entries that share the digits found so far); the last
    pass takes every entry above T and, in column order, as many entries
    equal to T as the k places left. With ``HAS_COLS`` the row's candidates are
    the columns ``cols[:n]`` (``n`` read from ``n_cols_ptr``); rows with fewer
    than k candidates take them all and mark the rest invalid.
    """
    row = tl.program_id(0).to(tl.int64)
    if HAS_COLS:
        n = tl.load(n_cols_ptr).to(tl.int64)
    else:
        n = n_cols
    k_eff = tl.minimum(k, n)
    bins = tl.arange(0, 2 * N_DIGITS)
    prefix = tl.zeros((), tl.int64)
    need = k_eff
    for p in tl.static_range(KEY_BITS // DIGIT_BITS):
        shift = KEY_BITS - DIGIT_BITS * (p + 1)
        hist = tl.zeros((2 * N_DIGITS,), tl.int32)
        for start in range(0, n, BLOCK):
            key, col, valid = _row_keys(pre_ptr, cols_ptr, row, start + tl.arange(0, BLOCK), n,
                                        stride, KEY_BITS, HAS_COLS)
            match = valid & ((key >> (shift + DIGIT_BITS)) == prefix)
            # entries off the prefix go to a bin above the digits' (histogram takes no mask)
            digit = tl.where(match, (key >> shift) & (N_DIGITS - 1), N_DIGITS)
            hist += tl.histogram(digit.to(tl.int32), 2 * N_DIGITS)
        hist = tl.where(bins < N_DIGITS, hist, 0).to(tl.int64)
        at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # entries with digit >= d
        d = tl.max(tl.where(at_least >= need, bins, 0), 0)
        need -= tl.sum(tl.where(bins > d, hist, 0), 0)
        prefix = (prefix << DIGIT_BITS) | d
    # prefix is the k-th largest key; ``need`` entries equal to it complete the k
    taken = tl.zeros((), tl.int64)
    ties = tl.zeros((), tl.int64)
    for start in range(0, n, BLOCK):
        j = start + tl.arange(0, BLOCK)
        key, col, valid = _row_keys(pre_ptr, cols_ptr, row, j, n, stride, KEY_BITS, HAS_COLS)
        equal = valid & (key == prefix)
        tie_rank = ties + tl.cumsum(equal.to(tl.int64), 0)
        take = valid & ((key > prefix) | (equal & (tie_rank <= need)))
        pos = taken + tl.cumsum(take.to(tl.int64), 0) - 1
        tl.store(out_ptr + row * k + pos, col, mask=take)
        taken += tl.sum(take.to(tl.int64), 0)
        ties += tl.sum(equal.to(tl.int64), 0)
    slot = tl.arange(0, BLOCK)
    for start in range(0, k, BLOCK):
        s = start + slot
        inside = s < k
        tl.store(valid_ptr + row * k + s, s < k_eff, mask=inside)
        # unused slots point at column 0 (their values are masked by ``valid``)
        tl.store(out_ptr + row * k + s, tl.zeros((BLOCK,), tl.int64), mask=inside & (s >= k_eff))


@triton.jit
def _weighted_rows(idx_ptr, wt_ptr, M_ptr, lo, hi, d, d_in, D, ACC: tl.constexpr,
                   BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """``sum_e wt[e] M[idx[e], d]`` over the entries ``lo:hi``, columns ``d`` of M (D wide)."""
    acc = tl.zeros((BLOCK_D,), ACC)
    for start in range(lo, hi, BLOCK_E):
        e = start + tl.arange(0, BLOCK_E)
        e_in = e < hi
        r = tl.load(idx_ptr + e, mask=e_in, other=0)
        wt = tl.load(wt_ptr + e, mask=e_in, other=0).to(ACC)
        m = tl.load(M_ptr + r[:, None] * D + d[None, :], mask=e_in[:, None] & d_in[None, :],
                    other=0).to(ACC)
        acc += tl.sum(wt[:, None] * m, 0)
    return acc


@triton.jit
def decode_kernel(idx_ptr, val_ptr, crow_ptr, W_ptr, bias_ptr, out_ptr, D,
                  HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """``out[b, d-block] = sum_e val[e] W[idx[e], d-block] (+ bias)`` over row b's entries."""
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d < D
    lo = tl.load(crow_ptr + b)
    hi = tl.load(crow_ptr + b + 1)
    acc = _weighted_rows(idx_ptr, val_ptr, W_ptr, lo, hi, d, d_in, D, ACC, BLOCK_E, BLOCK_D)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d_in, other=0).to(ACC)
    tl.store(out_ptr + b * D + d, acc.to(out_ptr.dtype.element_ty), mask=d_in)


@triton.jit
def dots_kernel(idx_ptr, crow_ptr, A_ptr, W_ptr, bias_ptr, out_ptr, D,
                HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_E: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """``out[e] = <A[b], W[idx[e]]> (+ bias[idx[e]])`` for row b's entries e."""
    b = tl.program_id(0).to(tl.int64)
    lo = tl.load(crow_ptr + b)
    hi = tl.load(crow_ptr + b + 1)
    for start in range(lo, hi, BLOCK_E):
        e = start + tl.arange(0, BLOCK_E)
        e_in = e < hi
        f = tl.load(idx_ptr + e, mask=e_in, other=0)
        acc = tl.zeros((BLOCK_E,), ACC)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_in = d < D
            a = tl.load(A_ptr + b * D + d, mask=d_in, other=0).to(ACC)
            w = tl.load(W_ptr + f[:, None] * D + d[None, :], mask=e_in[:, None] & d_in[None, :],
                        other=0).to(ACC)
            acc += tl.sum(w * a[None, :], 1)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + f, mask=e_in, other=0).to(ACC)
        tl.store(out_ptr + e, acc.to(out_ptr.dtype.element_ty), mask=e_in)


@triton.jit
def by_latent_kernel(crow_T_ptr, rows_ptr, wt_ptr, dots_ptr, Y_ptr, W_ptr, out_ptr, sum_ptr,
                     sq_ptr, D, PROJECT: tl.constexpr, SUM: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row f of ``S^T @ Y``: ``out[f] = sum_e wt[e] Y[rows[e]]`` over latent f's entries.

    The entries are in the transposed pattern's order (``crow_T`` delimits
    each latent's). ``PROJECT``: minus the radial part ``(sum_e wt[e] dots[e])
    W[f]`` (the decoder's gradient on the tangent space of its unit rows).
    ``SUM``: also ``sum_e wt[e]`` into ``sum[f]``. ``sq[f]``: the written row's
    squared norm, for gradient clipping. Rows of unused latents are zeros.
    """
    f = tl.program_id(0).to(tl.int64)
    lo = tl.load(crow_T_ptr + f)
    hi = tl.load(crow_T_ptr + f + 1)
    radial = tl.zeros((), ACC)
    total = tl.zeros((), ACC)
    if PROJECT or SUM:
        for start in range(lo, hi, BLOCK_E):
            e = start + tl.arange(0, BLOCK_E)
            e_in = e < hi
            wt = tl.load(wt_ptr + e, mask=e_in, other=0).to(ACC)
            total += tl.sum(wt, 0)
            if PROJECT:
                radial += tl.sum(wt * tl.load(dots_ptr + e, mask=e_in, other=0).to(ACC), 0)
    if SUM:
        tl.store(sum_ptr + f, total.to(sum_ptr.dtype.element_ty))
    sq = tl.zeros((), ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_in = d < D
        acc = _weighted_rows(rows_ptr, wt_ptr, Y_ptr, lo, hi, d, d_in, D, ACC, BLOCK_E, BLOCK_D)
        if PROJECT:
            acc -= radial * tl.load(W_ptr + f * D + d, mask=d_in, other=0).to(ACC)
        out = acc.to(out_ptr.dtype.element_ty)
        sq += tl.sum(out.to(ACC) * out.to(ACC), 0)
        tl.store(out_ptr + f * D + d, out, mask=d_in)
    tl.store(sq_ptr + f, sq.to(sq_ptr.dtype.element_ty))
