"""The compiled sparse passes (sksae._accel._sparse_nb) against torch's primitives.

The end-to-end equality of the sparse and dense training steps runs on both
implementations in tests/test_kernels.py; here each pass is checked alone:
the same sums as torch, the same bits whatever the split of the latents
between threads, and that a CPU training step really runs them.
"""

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from sksae._accel import sparse as _kernels
from sksae import SparseAutoencoder
from sksae._accel import _sparse_nb as nb
from sksae._accel import compiled as _compiled


def _pattern(n_rows=30, n_components=70, max_k=6, seed=0):
    """A ragged CSR pattern (an empty row, duplicate-free rows) and its parts."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_k + 1, (n_rows,), generator=g)
    counts[3] = 0
    idx = torch.cat([torch.randperm(n_components, generator=g)[:c] for c in counts.tolist()])
    crow = torch.zeros(n_rows + 1, dtype=torch.long)
    crow[1:] = counts.cumsum(0)
    return _kernels.Pattern(idx, crow, n_components)


def _transposed(pat):
    N, F = pat.indices.shape[0], pat.n_components
    crow_T, rows, order = np.empty(F + 1, np.int64), np.empty(N, np.int64), np.empty(N, np.int64)
    nb.transpose(pat.indices.numpy(), pat.crow.numpy(), F, crow_T, rows, order)
    return crow_T, rows, order


def test_transpose_is_the_stable_sort():
    pat = _pattern()
    crow_T, rows, order = _transposed(pat)
    ref_order = _kernels._stable_argsort(pat.indices, pat.n_components)
    np.testing.assert_array_equal(order, ref_order.numpy())
    np.testing.assert_array_equal(rows, pat.rows()[ref_order].numpy())
    counts = np.bincount(pat.indices.numpy(), minlength=pat.n_components)
    np.testing.assert_array_equal(np.diff(crow_T), counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("splits", [[0, 70], [0, 1, 33, 34, 70], [0, 10, 20, 70]])
def test_passes_match_torch_and_ignore_the_split(dtype, splits):
    """Every pass equals its torch reference; splits into latent ranges change no bit."""
    pat = _pattern()
    B, F, D = pat.n_rows, pat.n_components, 9
    g = torch.Generator().manual_seed(1)
    A, G = (torch.randn(B, D, generator=g, dtype=dtype) for _ in range(2))
    W = torch.randn(F, D, generator=g, dtype=dtype)
    bias = torch.randn(F, generator=g, dtype=dtype)
    values = torch.randn(pat.indices.shape[0], generator=g, dtype=dtype).clamp_min(0)
    crow_T, rows, order = _transposed(pat)
    S = torch.zeros(B, F, dtype=dtype)
    S[pat.rows(), pat.indices] = values
    entries = (pat.rows(), pat.indices)

    def run(kernel, *args):
        for a, b in zip(splits[:-1], splits[1:]):
            kernel(crow_T, rows, order, *args, a, b)

    dots = np.empty(values.shape[0], dtype=values.numpy().dtype)
    run(nb.dots, A.numpy(), W.numpy(), bias.numpy(), True, dots)
    assert_close(torch.from_numpy(dots), (A @ W.T + bias)[entries])

    g_values = np.empty_like(dots)
    g_W = np.full((F, D), np.nan, dtype=dots.dtype)  # stale contents are overwritten
    row_sq = np.full(F, np.nan, dtype=dots.dtype)
    run(nb.decode_backward, values.numpy(), G.numpy(), W.numpy(), g_values, g_W, row_sq, True)
    assert_close(torch.from_numpy(g_values), (G @ W.T)[entries])
    radial = (values * torch.from_numpy(g_values)).new_zeros(F).index_add_(
        0, pat.indices, values * torch.from_numpy(g_values))
    assert_close(torch.from_numpy(g_W), S.T @ G - radial[:, None] * W)
    assert_close(torch.from_numpy(row_sq), torch.from_numpy(g_W).pow(2).sum(1))

    g_enc = np.full((F, D), np.nan, dtype=dots.dtype)
    g_b = np.full(F, np.nan, dtype=dots.dtype)
    run(nb.gather_backward, values.numpy(), A.numpy(), g_enc, g_b, row_sq)
    assert_close(torch.from_numpy(g_enc), S.T @ A)
    assert_close(torch.from_numpy(g_b), S.sum(0))
    assert_close(torch.from_numpy(row_sq), torch.from_numpy(g_enc).pow(2).sum(1))

    unit = W.numpy().copy()
    unit[5] = 0  # a zero row stays zero (divided by eps)
    run_rows = [(a, b) for a, b in zip(splits[:-1], splits[1:])]
    for a, b in run_rows:
        nb.unit_rows(unit, unit.dtype.type(1e-12), a, b)
    expected = W.clone()
    expected[5] = 0
    expected /= torch.linalg.vector_norm(expected, dim=1, keepdim=True).clamp_min(1e-12)
    assert_close(torch.from_numpy(unit), expected)

    # the same bits with one range
    whole = np.empty_like(g_W)
    nb.decode_backward(crow_T, rows, order, values.numpy(), G.numpy(), W.numpy(),
                       np.empty_like(dots), whole, np.empty_like(row_sq), True, 0, F)
    np.testing.assert_array_equal(whole, g_W)


def test_a_training_step_runs_the_compiled_passes(monkeypatch):
    """A CPU TopK fit on the sparse path calls every compiled pass, and its model is
    the one trained on torch's primitives (same random_state) up to rounding: Adam's
    normalised steps amplify rounding in near-zero gradients, so the check is on the
    fit's quality and on the atoms' mean change, not on every bit."""
    calls = []
    real = _compiled.kernel

    def spy(name, required=False):
        found = real(name, required)
        if found is not None:
            calls.append(name)
        return found

    for module in (_compiled, _kernels):  # the sparse passes import `kernel` by name
        monkeypatch.setattr(module, "kernel", spy)
    X = np.random.RandomState(0).randn(256, 24).astype(np.float32)
    kw = dict(n_components=1024, k=4, batch_size=64, max_iter=2, random_state=0,
              device="cpu", precision="bfloat16")
    # the compiled passes are the CPU step's; "dots" serves the bf16 selection, forced
    # here: precision="auto" picks it only on CPUs with AVX512-BF16 or AMX
    compiled = SparseAutoencoder(**kw).fit(X)
    assert {"transpose", "dots", "decode_backward", "gather_backward", "unit_rows"} <= set(calls)
    monkeypatch.setattr(_compiled, "_USE_NUMBA", False)
    plain = SparseAutoencoder(**kw).fit(X)
    assert compiled.score(X) == pytest.approx(plain.score(X), rel=1e-3)
    # a quarter of one Adam step (lr = 8e-4 at 1024 latents): rounding, not a different fit
    assert np.abs(compiled.components_ - plain.components_).mean() < 2e-4


def test_clipping_reads_the_noted_norms_only_while_they_hold():
    """The norms the compiled passes note are used for the gradients as produced, and
    ignored once a gradient is changed in place (e.g. another decode's gradient added)."""
    from sksae._accel.adam import total_norm
    from sksae._accel.workspace import StepWorkspace

    gen = torch.Generator().manual_seed(0)
    g = torch.randn(6, 4, generator=gen)
    ws = StepWorkspace()
    ws.note_norm(g, g.pow(2).sum(1) * 4)  # outside noting_norms(): not noted
    assert ws.known_norm(g) is None
    with ws.noting_norms():
        ws.note_norm(g, g.pow(2).sum(1) * 4)  # a deliberately wrong note: 2x the norm
    assert_close(ws.known_norm(g), 2 * torch.linalg.vector_norm(g))
    b = torch.randn(4, generator=gen)
    expected = torch.linalg.vector_norm(torch.stack([2 * g.norm(), b.norm()]))
    assert_close(total_norm([g, b], ws), expected)  # the note is used
    g.add_(1.0)
    assert ws.known_norm(g) is None  # a new version: not known any more
    assert_close(total_norm([g, b], ws), torch.cat([g.flatten(), b]).norm())
    assert ws.known_norm(g.clone()) is None  # another storage


def test_noted_norms_of_a_gradient_in_parts_are_not_read():
    """A parameter whose gradient came in two noted parts (a decoder in two sparse decodes)
    has no known norm: autograd's sum is a new tensor that may sit in a freed part's memory.
    A note is read only for the parameter it was made for."""
    from sksae._accel.workspace import StepWorkspace

    gen = torch.Generator().manual_seed(0)
    W_dec, W_enc = torch.zeros(6, 4), torch.zeros(6, 4)
    first, second, other = (torch.randn(6, 4, generator=gen) for _ in range(3))
    ws = StepWorkspace()
    with ws.noting_norms():
        ws.note_norm(first, first.pow(2).sum(1), owner=W_dec)
        ws.note_norm(other, other.pow(2).sum(1), owner=W_enc)
    assert_close(ws.known_norm(first, W_dec), first.norm())
    assert ws.known_norm(first, W_enc) is None  # noted for another parameter
    assert_close(ws.known_norm(other, W_enc), other.norm())
    with ws.noting_norms():
        ws.note_norm(first, first.pow(2).sum(1), owner=W_dec)
        ws.note_norm(second, second.pow(2).sum(1), owner=W_dec)
    assert ws.known_norm(first, W_dec) is None
    assert ws.known_norm(second, W_dec) is None
