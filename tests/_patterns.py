"""Sparse patterns for the kernel tests (tests/test_kernels.py, tests/test_triton.py)."""

import torch

from sksae._accel.sparse import Pattern


def ragged_pattern(n_rows, n_components, max_k, device, seed=0):
    """A CSR pattern with 0..max_k distinct latents per row, the first row empty."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_k + 1, (n_rows,), generator=g)
    counts[0] = 0
    rows = [torch.randperm(n_components, generator=g)[:c] for c in counts.tolist()]
    crow = torch.zeros(n_rows + 1, dtype=torch.long)
    crow[1:] = counts.cumsum(0)
    return Pattern(torch.cat(rows).to(device), crow.to(device), n_components)


def dense_codes(values_N, pat):
    """The (B, F) matrix with ``values`` on the pattern."""
    out = values_N.new_zeros(pat.n_rows, pat.n_components)
    return out.index_put((pat.rows(), pat.indices), values_N)
