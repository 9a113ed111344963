"""The sparse kernels' CPU passes, compiled with numba, each fused into one pass.

:mod:`sksae._accel.sparse` composes a TopK-family step's sparse work from torch
primitives: a sort to transpose the pattern, a sampled product, a CSR
product per weight gradient, index copies and ``index_add_`` for the biases
and the decoder's radial part. Each is a separate pass over the N entries
(and often over (F, D)), which at 1024 x 3072 costs more than the arithmetic.
The kernels here do the same sums in one pass each, visiting the entries by
latent (the transposed pattern) so that a latent's weight rows are read and
written once, in order. (The decode itself, by row, stays on
``embedding_bag``, whose prefetching kernel beat a numba loop.)

- :func:`transpose` — the transposed pattern by a counting sort (O(N + F));
- :func:`dots` — ``<A[b], W[f]> (+ bias[f])`` for every entry, written in
  the pattern's order;
- :func:`decode_backward` — a decode's value gradients ``<G[b], W[f]>`` and
  its weight gradient ``sum_e v_e G[b]``, made tangent to the unit rows of
  ``W`` from the same dots;
- :func:`gather_backward` — the encoder's weight gradient
  ``sum_e g_e X[b]`` and its bias gradient ``sum_e g_e``, skipping the zero
  gradients of entries the ReLU clamped;
- :func:`unit_rows` — the decoder's renormalisation after the optimizer
  step, the norm and the division in one pass per row.

The two backward passes also write the squared norm of each gradient row
they produce, so that gradient clipping does not read the (F, D) gradients
again.

Every kernel works on a range of latents ``[f0, f1)`` and writes only that
range's outputs (and entries), so ranges run on separate threads without
atomics and give the same bits on any number of threads: each sum is taken
in the same order (a latent's entries by row) whatever the split.

Imports numba at import time; :mod:`sksae._accel.compiled` imports this
module only when numba is installed and the compiled paths are enabled.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["transpose", "dots", "decode_backward", "gather_backward", "unit_rows"]

# reassociation lets LLVM vectorise the dot products; nothing assumes finite values
_FAST = {"reassoc", "contract"}


@numba.njit(cache=True, nogil=True, boundscheck=False)
def transpose(indices, crow, n_components, crow_T, rows_T, order):
    """The pattern by latent: a stable counting sort of its entries.

    Parameters
    ----------
    indices : ndarray of shape (N,), int64
        Latent of each entry, rows in order.
    crow : ndarray of shape (B + 1,), int64
        Row offsets.
    n_components : int
    crow_T : ndarray of shape (F + 1,), int64
        Receives each latent's offsets in the sorted order.
    rows_T, order : ndarray of shape (N,), int64
        Receive each sorted entry's row and its position in the pattern.
    """
    crow_T[:] = 0
    for e in range(indices.shape[0]):
        crow_T[indices[e] + 1] += 1
    for f in range(n_components):
        crow_T[f + 1] += crow_T[f]
    fill = crow_T[:-1].copy()
    for b in range(crow.shape[0] - 1):
        for e in range(crow[b], crow[b + 1]):
            f = indices[e]
            pos = fill[f]
            fill[f] = pos + 1
            rows_T[pos] = b
            order[pos] = e


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=_FAST)
def dots(crow_T, rows_T, order, A, W, bias, use_bias, out, f0, f1):
    """``out[e] = <A[b], W[f]> (+ bias[f])`` for the entries (b, f) of latents ``f0:f1``.

    ``A`` is (B, D), ``W`` (F, D); ``out`` (N,) is in the pattern's order.
    """
    D = A.shape[1]
    zero = np.zeros(1, A.dtype)[0]  # sums in the arrays' precision, as torch's products
    for f in range(f0, f1):
        w = W[f]
        add = bias[f] if use_bias else zero
        for s in range(crow_T[f], crow_T[f + 1]):
            a = A[rows_T[s]]
            acc = zero
            for j in range(D):
                acc += a[j] * w[j]
            out[order[s]] = acc + add


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=_FAST)
def decode_backward(crow_T, rows_T, order, values, G, W, g_values, g_W, row_sq, project,
                    f0, f1):
    """Gradients of ``S @ W`` for latents ``f0:f1``, given the output's gradient ``G`` (B, D).

    ``g_values[e] = <G[b], W[f]>`` and ``g_W[f] = sum_e values[e] G[b]``; with
    ``project``, minus the radial part ``(sum_e values[e] g_values[e]) W[f]``
    (the gradient tangent to a unit row). Rows of ``g_W`` without entries are 0.
    ``row_sq[f]`` receives ``||g_W[f]||^2``.
    """
    D = G.shape[1]
    zero = np.zeros(1, G.dtype)[0]
    for f in range(f0, f1):
        w = W[f]
        out = g_W[f]
        out[:] = zero
        radial = zero
        for s in range(crow_T[f], crow_T[f + 1]):
            g = G[rows_T[s]]
            e = order[s]
            v = values[e]
            acc = zero
            for j in range(D):
                acc += g[j] * w[j]
            g_values[e] = acc
            radial += v * acc
            if v != 0.0:
                for j in range(D):
                    out[j] += v * g[j]
        if project and radial != 0.0:
            for j in range(D):
                out[j] -= radial * w[j]
        sq = zero
        for j in range(D):
            sq += out[j] * out[j]
        row_sq[f] = sq


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=_FAST)
def gather_backward(crow_T, rows_T, order, grad, X, g_W, g_b, row_sq, f0, f1):
    """Gradients of the entries ``<X[b], W[f]> + b[f]`` for latents ``f0:f1``, given ``grad`` (N,).

    ``g_W[f] = sum_e grad[e] X[b]`` and ``g_b[f] = sum_e grad[e]``; entries
    with a zero gradient (clamped by the ReLU) are skipped. ``row_sq[f]``
    receives ``||g_W[f]||^2``.
    """
    D = X.shape[1]
    zero = np.zeros(1, X.dtype)[0]
    for f in range(f0, f1):
        out = g_W[f]
        out[:] = zero
        total = zero
        for s in range(crow_T[f], crow_T[f + 1]):
            c = grad[order[s]]
            if c != 0.0:
                x = X[rows_T[s]]
                for j in range(D):
                    out[j] += c * x[j]
                total += c
        g_b[f] = total
        sq = zero
        if crow_T[f + 1] > crow_T[f]:
            for j in range(D):
                sq += out[j] * out[j]
        row_sq[f] = sq


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=_FAST)
def unit_rows(W, eps, f0, f1):
    """Divide rows ``f0:f1`` of ``W`` by their norms (at least ``eps``), in place.

    ``eps`` is a scalar of ``W``'s dtype, so the division runs in that precision.
    """
    D = W.shape[1]
    zero = np.zeros(1, W.dtype)[0]
    for f in range(f0, f1):
        w = W[f]
        sq = zero
        for j in range(D):
            sq += w[j] * w[j]
        norm = np.sqrt(sq)
        if norm < eps:
            norm = eps
        for j in range(D):
            w[j] = w[j] / norm
