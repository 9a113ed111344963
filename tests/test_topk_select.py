"""The training step's top-k selection: the compiled kernel against torch.topk."""

import numpy as np
import pytest
import torch

from sksae._accel import compiled as _compiled
from sksae._accel import select as _select
from sksae._accel.select import select_topk


def _values(x, idx):
    return x.gather(1, idx).float().sort(-1).values


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape, k", [((64, 3072), 32), ((7, 80), 5), ((3, 33), 1),
                                      ((5, 64), 4)])
def test_selects_the_k_largest_values(dtype, shape, k):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3 - 2)
    x = x.to(dtype)
    idx = select_topk(x, k)
    assert _compiled.kernel("topk") is not None  # the compiled kernel ran
    assert idx.shape == (shape[0], k) and idx.dtype == torch.int64
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # distinct entries
    assert torch.equal(_values(x, idx), _values(x, torch.topk(x, k).indices))


def test_ties_keep_the_lower_indices_and_negatives_order_right():
    x = torch.zeros(3, 64)
    x[0, 10:20] = 1.0           # 10 tied maxima, k = 4: the first four
    x[1] = -torch.arange(64.0)  # all negative but the first: the four least negative
    x[2] = -1.0
    x[2, ::8] = 5.0             # the sample sees only large values: the full-row fallback
    idx = select_topk(x, 4).sort(-1).values
    assert idx[0].tolist() == [10, 11, 12, 13]
    assert idx[1].tolist() == [0, 1, 2, 3]
    assert idx[2].tolist() == [0, 8, 16, 24]
    big = torch.full((2, 4096), -3.0, dtype=torch.bfloat16)
    big[:, ::8] = 2.0           # 512 sampled maxima, k = 32: the lowest 32 of them
    assert select_topk(big, 32).sort(-1).values[0].tolist() == list(range(0, 256, 8))


def test_thread_split_does_not_change_the_selection():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-20, 20, (257, 1024), generator=g).to(torch.bfloat16)  # many ties
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = select_topk(x, 16)
        torch.set_num_threads(3)
        three = select_topk(x, 16)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, three)


def test_large_shares_of_a_row_go_to_torch_topk(monkeypatch):
    from sksae._accel._topk_nb import topk_rows

    calls = []
    monkeypatch.setattr(_select, "kernel", lambda name: calls.append(name) or topk_rows)
    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(select_topk(x, 7), torch.topk(x, 7, sorted=False).indices)
    assert calls == []  # 16 k > F: not even asked for
    select_topk(x, 6)
    assert calls == ["topk"]


def test_without_numba_it_is_torch_topk(monkeypatch):
    monkeypatch.setattr(_compiled, "_USE_NUMBA", False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 50, generator=g)
    assert torch.equal(select_topk(x, 6), torch.topk(x, 6, sorted=False).indices)
    x64 = torch.randn(9, 50, dtype=torch.float64, generator=g)  # never goes compiled
    monkeypatch.setattr(_compiled, "_USE_NUMBA", True)
    assert torch.equal(select_topk(x64, 6), torch.topk(x64, 6, sorted=False).indices)


def test_sae_fits_the_same_with_and_without_the_kernel(monkeypatch):
    """Same random_state, compiled or torch selection: the same model up to ties
    (continuous data has none)."""
    from sksae import SparseAutoencoder

    X = np.random.RandomState(0).randn(600, 24).astype(np.float32)
    kw = dict(n_components=640, k=6, batch_size=200, max_iter=2, random_state=0,
              device="cpu", precision="float32")
    compiled = SparseAutoencoder(**kw).fit(X)
    monkeypatch.setattr(_compiled, "_USE_NUMBA", False)
    plain = SparseAutoencoder(**kw).fit(X)
    np.testing.assert_allclose(compiled.components_, plain.components_, rtol=1e-5, atol=1e-6)


# -- BatchTopK: the k B largest entries of the whole batch ---------------------------
def _torch_batch_pattern(x, k):
    """The reference: batch_topk_pattern on torch.topk (compiled kernels off)."""
    old = _compiled._USE_NUMBA
    _compiled._USE_NUMBA = False
    try:
        return _select.batch_topk_pattern(x, _kept(x, k))
    finally:
        _compiled._USE_NUMBA = old


def _kept(x, k):
    """Entries BatchTopK keeps: k per row of the batch (at most all)."""
    B, F = x.shape
    return min(k * B, B * F)


def _flat(pattern):
    return (pattern.rows() * pattern.n_components + pattern.indices).numpy()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape, k", [((256, 3072), 8), ((64, 1024), 8), ((9, 40), 3),
                                      ((5, 16), 16)])
def test_batch_selection_is_the_batch_top_k(dtype, shape, k):
    """The compiled BatchTopK selection keeps the k B largest values of the batch,
    as a row-ordered pattern with the counts of each row."""
    from sksae._accel.select import _compiled_batch_topk, batch_topk_pattern

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3 - 1)
    x = x.to(dtype)
    K = min(k * shape[0], x.numel())
    assert _compiled_batch_topk(x, K) is not None  # the compiled path applies here
    pattern = batch_topk_pattern(x, _kept(x, k))
    ref = _torch_batch_pattern(x, k)
    assert pattern.indices.shape == (K,) and pattern.crow[-1] == K
    flat = _flat(pattern)
    assert (np.diff(flat) > 0).all()  # row-major order, distinct entries
    assert torch.equal(x.reshape(-1)[flat].float().sort().values,
                       x.reshape(-1)[_flat(ref)].float().sort().values)
    if dtype == torch.float32:  # no ties among float32 Gaussians: the same entries
        assert set(flat) == set(_flat(ref))


def test_batch_selection_keeps_the_first_of_equal_values():
    from sksae._accel.select import batch_topk_pattern

    x = torch.zeros(4, 50, dtype=torch.bfloat16)
    x[2, 7] = x[3, 1] = 3.0
    x[:, 10] = 1.0  # 4 equal values, 2 of which are kept
    pattern = batch_topk_pattern(x, _kept(x, 1))  # k B = 4 entries
    assert sorted(_flat(pattern)) == [10, 50 + 10, 2 * 50 + 7, 3 * 50 + 1]
    assert pattern.crow.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n_rows, compiled", [(64, True), (128, False)])
def test_batch_selection_when_the_sample_misleads(n_rows, compiled):
    """Only the columns the kernel samples are large: the sample's bucket leaves fewer
    than k B candidates, so every entry becomes one; where that is too many to hold
    (over max(8 k B + F, 65536)) the torch path answers. The same values either way."""
    from sksae._accel.select import _compiled_batch_topk, batch_topk_pattern

    B, F, k = n_rows, 1024, 8
    g = torch.Generator().manual_seed(2)
    x = torch.rand(B, F, generator=g) - 2  # all negative
    for r in range(B):  # the kernel samples columns r % 8, r % 8 + 8, ...
        x[r, r % 8::8] = 10 + torch.rand(F // 8, generator=g)
    assert (_compiled_batch_topk(x, k * B) is not None) == compiled
    pattern = batch_topk_pattern(x, _kept(x, k))
    assert torch.equal(x.reshape(-1)[_flat(pattern)].sort().values,
                       x.reshape(-1).topk(k * B).values.sort().values)


def test_batchtopk_fit_compiled_or_not(monkeypatch):
    """Same random_state, compiled or torch BatchTopK selection: the same model (no ties
    among float32 pre-activations)."""
    from sksae import SparseAutoencoder

    X = np.random.RandomState(0).randn(512, 32).astype(np.float32)
    kw = dict(n_components=1024, k=4, architecture="batchtopk", batch_size=128, max_iter=2,
              random_state=0, precision="float32")
    compiled = SparseAutoencoder(**kw).fit(X)
    monkeypatch.setattr(_compiled, "_USE_NUMBA", False)
    plain = SparseAutoencoder(**kw).fit(X)
    assert compiled.score(X) == pytest.approx(plain.score(X), rel=1e-3)
    np.testing.assert_allclose(compiled.threshold_, plain.threshold_, rtol=1e-3)


def test_flat_pattern_counts_rows_on_the_device():
    """The row offsets of a batch selection, counted without bincount (no host read on a
    GPU), are each row's count of chosen entries, empty rows included."""
    from sksae._accel.select import _flat_pattern

    B, F = 7, 13
    chosen = torch.tensor([0, 5, 12, 13 * 2 + 1, 13 * 2 + 4, 13 * 5, 13 * 6 + 12])
    pattern = _flat_pattern(chosen, B, F)
    assert pattern.crow.tolist() == [0, 3, 3, 5, 5, 5, 6, 7]
    assert pattern.indices.tolist() == [0, 5, 12, 1, 4, 0, 12]
    assert torch.equal(pattern.flat(), chosen)
