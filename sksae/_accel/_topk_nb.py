"""Top-k selection per row, compiled with numba: the TopK training step's selection on the CPU.

``torch.topk`` keeps a partial order of every row; a TopK SAE needs only the
indices of the ``k`` largest pre-activations. Per row this kernel takes the
``m``-th largest of a strided sample (1 entry in 8) as a threshold, keeps the
entries at or above it (about ``2k`` of them), and selects the ``k`` largest
of those with a heap; a row whose sample overshoots falls back to a heap
over all its entries. Values are compared as integers: a float's bits with
the magnitude bits of negative numbers flipped order the same way as the
floats, so bf16 rows are read as int16 without conversion.

Imports numba at import time; :mod:`sksae._accel.compiled` imports this
module only when numba is installed and the compiled paths are enabled.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["topk_rows"]


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _key(b, magnitude):
    """A float's bits (int16 or int32) as an int64 that orders as the float does."""
    v = np.int64(b)
    return v ^ ((v >> 63) & magnitude)


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _sift(keys, idx, size, p):
    """Restore the min-heap from position ``p``; among equal keys the higher index is smaller."""
    while True:
        c = 2 * p + 1
        if c >= size:
            return
        if c + 1 < size and (keys[c + 1] < keys[c]
                             or (keys[c + 1] == keys[c] and idx[c + 1] > idx[c])):
            c += 1
        if keys[c] < keys[p] or (keys[c] == keys[p] and idx[c] > idx[p]):
            keys[c], keys[p] = keys[p], keys[c]
            idx[c], idx[p] = idx[p], idx[c]
            p = c
        else:
            return


@numba.njit(cache=True, nogil=True, boundscheck=False)
def topk_rows(bits, k, magnitude, start, stop, out):
    """Indices of the ``k`` largest entries of rows ``start:stop`` of a float matrix.

    Parameters
    ----------
    bits : ndarray of shape (B, F), int16 or int32, C-contiguous
        The bits of a bf16 or float32 matrix.
    k : int
        Entries per row, ``1 <= k <= F``.
    magnitude : int
        The magnitude bits' mask: ``0x7FFF`` for bf16, ``0x7FFFFFFF`` for float32.
    start, stop : int
        Rows to select in.
    out : ndarray of shape (B, k), int64
        Receives each row's indices, in no particular order. Among equal
        values the lower indices are kept, so the result does not depend on
        how the rows are split between threads.
    """
    F = bits.shape[1]
    stride = 8
    m = 2 * k // stride + 2
    n_sample = F // stride
    sample = np.empty(m, np.int64)
    sample_idx = np.empty(m, np.int64)
    cand = np.empty(F, np.int64)
    cand_idx = np.empty(F, np.int64)
    keys = np.empty(k, np.int64)
    for r in range(start, stop):
        row = bits[r]
        idx = out[r]
        threshold = np.iinfo(np.int64).min
        if m <= n_sample and F >= 4 * k:
            for j in range(m):
                sample[j] = _key(row[j * stride], magnitude)
                sample_idx[j] = j
            for s in range(m // 2 - 1, -1, -1):
                _sift(sample, sample_idx, m, s)
            for j in range(m, n_sample):
                v = _key(row[j * stride], magnitude)
                if v > sample[0]:
                    sample[0] = v
                    sample_idx[0] = j
                    _sift(sample, sample_idx, m, 0)
            threshold = sample[0]
        n = 0
        if threshold >= 0:
            # a non-negative threshold: the keys at or above it are the raw bits at or
            # above it (negative floats have negative bits), compared without the transform
            for j in range(F):
                if np.int64(row[j]) >= threshold:
                    cand[n] = np.int64(row[j])
                    cand_idx[n] = j
                    n += 1
        else:
            for j in range(F):
                v = _key(row[j], magnitude)
                if v >= threshold:
                    cand[n] = v
                    cand_idx[n] = j
                    n += 1
        if n < k:  # fewer entries above the sample's threshold than k: all are candidates
            n = 0
            for j in range(F):
                cand[n] = _key(row[j], magnitude)
                cand_idx[n] = j
                n += 1
        for j in range(k):
            keys[j] = cand[j]
            idx[j] = cand_idx[j]
        for s in range(k // 2 - 1, -1, -1):
            _sift(keys, idx, k, s)
        for j in range(k, n):
            v = cand[j]
            if v > keys[0]:  # candidates come in index order: a tie keeps the lower index
                keys[0] = v
                idx[0] = cand_idx[j]
                _sift(keys, idx, k, 0)


# -- BatchTopK: the k B largest entries of a whole batch ----------------------------
# Keys are bucketed by their high 16 bits (all of a bf16's), shifted to 0..65535.
_BUCKETS = 65536


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _bucket(b, magnitude, shift):
    return (_key(b, magnitude) >> shift) + 32768


@numba.njit(cache=True, nogil=True, boundscheck=False)
def batch_sample_buckets(bits, magnitude, shift, stride, start, stop):
    """Histogram (65536,) of the key buckets of every ``stride``-th entry of rows ``start:stop``.

    Row r's sample starts at column ``r % stride``.
    """
    F = bits.shape[1]
    hist = np.zeros(_BUCKETS, np.int64)
    for r in range(start, stop):
        row = bits[r]
        for j in range(r % stride, F, stride):
            hist[_bucket(row[j], magnitude, shift)] += 1
    return hist


@numba.njit(cache=True, nogil=True, boundscheck=False)
def batch_count(bits, magnitude, shift, bucket, counts, start, stop):
    """``counts[r]``: entries of row r whose key bucket is at least ``bucket``, rows ``start:stop``."""
    F = bits.shape[1]
    if bucket >= 32768:
        # a non-negative key bound: compare the raw bits (negative floats have negative bits)
        bound = np.int64(bucket - 32768) << shift
        for r in range(start, stop):
            row = bits[r]
            c = 0
            for j in range(F):
                c += np.int64(row[j]) >= bound
            counts[r] = c
    else:
        for r in range(start, stop):
            row = bits[r]
            c = 0
            for j in range(F):
                c += _bucket(row[j], magnitude, shift) >= bucket
            counts[r] = c


@numba.njit(cache=True, nogil=True, boundscheck=False)
def batch_fill(bits, magnitude, shift, bucket, offsets, keys, cols, start, stop):
    """The keys and columns of rows ``start:stop``'s entries counted by :func:`batch_count`.

    Row r's go to ``offsets[r]:offsets[r + 1]``, in column order.
    """
    F = bits.shape[1]
    for r in range(start, stop):
        row = bits[r]
        n = offsets[r]
        for j in range(F):
            key = _key(row[j], magnitude)
            if (key >> shift) + 32768 >= bucket:
                keys[n] = key
                cols[n] = j
                n += 1


@numba.njit(cache=True, nogil=True, boundscheck=False)
def batch_select(keys, cols, offsets, K, shift, out_cols, crow):
    """Keep the ``K`` largest candidates (ties: the first in row-major order), as a CSR pattern.

    ``keys``/``cols`` are the candidates of each row at ``offsets[r]:offsets[r + 1]``
    (at least ``K`` in all); ``out_cols`` (K,) and ``crow`` (B + 1,) receive the
    kept entries' columns and the row offsets.
    """
    hist = np.zeros(_BUCKETS, np.int64)
    N = keys.shape[0]
    for e in range(N):
        hist[(keys[e] >> shift) + 32768] += 1
    above = 0
    edge = _BUCKETS - 1
    while above + hist[edge] < K:
        above += hist[edge]
        edge -= 1
    # the cut inside the edge bucket: the (K - above)-th largest of its keys
    inside = np.empty(hist[edge], np.int64)
    m = 0
    for e in range(N):
        if (keys[e] >> shift) + 32768 == edge:
            inside[m] = keys[e]
            m += 1
    inside.sort()
    need = K - above
    cut = inside[m - need]
    greater = 0
    for i in range(m):
        greater += inside[i] > cut
    ties = need - greater
    n = 0
    for r in range(offsets.shape[0] - 1):
        crow[r] = n
        for e in range(offsets[r], offsets[r + 1]):
            key = keys[e]
            if key > cut or (key == cut and ties > 0):
                if key == cut:
                    ties -= 1
                out_cols[n] = cols[e]
                n += 1
    crow[offsets.shape[0] - 1] = n
