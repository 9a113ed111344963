"""Small helpers shared by the batched coders: row reductions that are fast on CPU.

torch's CPU ``argmax``/``argmin`` over the last dimension run about 5-10x slower
than numpy's vectorised ones on this kind of (rows, atoms) block, and they sit
in the inner loop of every greedy step, so on CPU the reductions go through
numpy views of the same memory (no copy). Other devices use torch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["argmax_abs", "argmin_rows", "panel_weighted_rows", "top_indices"]

# Bytes of Gram columns per panel for weighted sums of Gram rows: a panel stays
# in a core's L2 cache (streaming the whole Gram matrix from L3 was ~3x slower).
_PANEL_BYTES = 512 * 2**10


def argmax_abs(c):
    """Per row, the first index of the largest ``|c|`` (numpy's ``argmax(abs(c))``)."""
    if c.device.type != "cpu":
        return c.abs().argmax(dim=1)
    a = c.numpy()
    hi, lo = a.argmax(axis=1), a.argmin(axis=1)
    rows = np.arange(a.shape[0])
    top, bottom = a[rows, hi], -a[rows, lo]
    # Ties between the largest and the most negative entry keep the first index.
    pick = np.where(top > bottom, hi, np.where(bottom > top, lo, np.minimum(hi, lo)))
    return torch.from_numpy(pick)


def argmin_rows(c):
    """Per row, the smallest value and its first index (``c.min(dim=1)``)."""
    if c.device.type != "cpu":
        return c.min(dim=1)
    a = c.numpy()
    i = a.argmin(axis=1)
    return torch.from_numpy(a[np.arange(a.shape[0]), i]), torch.from_numpy(i)


def top_indices(score, k):
    """Per row, the indices of the ``k`` largest scores, in no particular order."""
    if score.device.type != "cpu" or k >= score.shape[1]:
        return score.topk(k, dim=1).indices
    # A partition is O(K) per row; torch's CPU topk sorts and is ~10x slower.
    part = (-score).numpy().argpartition(k - 1, axis=1)[:, :k]
    return torch.from_numpy(part)


def panel_weighted_rows(idx, weights, G):
    """``sum_s weights[:, s] G[idx[:, s], :]`` per row, (rows, K).

    One ``embedding_bag`` per column panel of ``G`` sized to stay in cache.
    """
    n, K = idx.shape[0], G.shape[1]
    if idx.shape[1] == 0:
        return G.new_zeros(n, K)
    width = max(16, _PANEL_BYTES // (G.shape[0] * G.element_size()))
    if width >= K:
        return F.embedding_bag(idx, G, per_sample_weights=weights, mode="sum")
    out = G.new_empty(n, K)
    for lo in range(0, K, width):
        out[:, lo:lo + width] = F.embedding_bag(idx, G[:, lo:lo + width].contiguous(),
                                                per_sample_weights=weights, mode="sum")
    return out
