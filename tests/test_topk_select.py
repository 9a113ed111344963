"""The training step's top-k selection: the compiled kernel against torch.topk."""

import numpy as np
import pytest
import torch

from sksae.architectures.topk import select_topk
from sksae.coders import _compiled

numba = pytest.importorskip("numba", reason="the compiled selection needs the numba extra")


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
    x = torch.randint(-20, 20, (257, 1024)).to(torch.bfloat16)  # many ties
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
    from sksae._topk_nb import topk_rows

    calls = []
    monkeypatch.setattr(_compiled, "kernel", lambda name: calls.append(name) or topk_rows)
    x = torch.randn(4, 100)
    assert torch.equal(select_topk(x, 7), torch.topk(x, 7, sorted=False).indices)
    assert calls == []  # 16 k > F: not even asked for
    select_topk(x, 6)
    assert calls == ["topk"]


def test_without_numba_it_is_torch_topk(monkeypatch):
    monkeypatch.setattr(_compiled, "_USE_NUMBA", False)
    x = torch.randn(9, 50)
    assert torch.equal(select_topk(x, 6), torch.topk(x, 6, sorted=False).indices)
    x64 = torch.randn(9, 50, dtype=torch.float64)  # float64 never goes compiled
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
