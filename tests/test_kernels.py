"""Sparse kernels (sksae._accel.sparse) against plain dense autograd."""

import contextlib

import pytest
import torch
from torch.testing import assert_close

from sksae import SparseAutoencoder
from sksae._accel import sparse as _kernels
from sksae._accel.sparse import gather_pre, sparse_decode, use_sparse
from sksae._accel.workspace import StepWorkspace
from sksae._sae_trainer import SAETrainer, init_parameters
from sksae.architectures import REGISTRY, EncodeOutput, LossInputs, Schedule, SparseCodes, decode
from sksae._accel import compiled as _compiled

from _patterns import dense_codes, ragged_pattern

TOPK_FAMILY = sorted(name for name, cls in REGISTRY.items() if cls.uses_dead_latents)
# coefficients at 1 from the first step, no final decay (as partial_fit's)
NO_WARMUP = Schedule(total_steps=None, steps_per_epoch=1)
DTYPES = [torch.float64, torch.float32]


@pytest.fixture(autouse=True, params=["compiled", "torch"])
def sparse_passes(request, monkeypatch):
    """Every test on both CPU implementations of the sparse passes.

    "compiled": the numba kernels of sksae._accel._sparse_nb (the numba extra, which
    the test environment installs); "torch": torch's primitives, as without it.
    """
    monkeypatch.setattr(_compiled, "_USE_NUMBA", request.param == "compiled")
    return request.param


def _tol(dtype, scale=1.0):
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-10 * scale}
    return {"rtol": 1e-4, "atol": 1e-5 * scale}


def _params(n_features, n_components, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"W_enc": (n_components, n_features), "b_enc": (n_components,),
              "W_dec": (n_components, n_features), "b_dec": (n_features,)}
    return {k: torch.randn(*s, generator=g, dtype=dtype).to(device).requires_grad_(True)
            for k, s in shapes.items()}


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_decode_matchesdense_codes(device, dtype):
    B, D, F, k = 24, 7, 50, 5
    g = torch.Generator().manual_seed(1)
    W = torch.randn(F, D, generator=g, dtype=dtype).to(device).requires_grad_(True)
    b = torch.randn(D, generator=g, dtype=dtype).to(device).requires_grad_(True)
    idx = torch.stack([torch.randperm(F, generator=g)[:k] for _ in range(B)]).to(device)
    vals = torch.randn(B, k, generator=g, dtype=dtype).to(device).requires_grad_(True)
    grad_out = torch.randn(B, D, generator=g, dtype=dtype).to(device)

    sparse = sparse_decode(vals, idx, W, b)
    dense = vals.new_zeros(B, F).scatter(1, idx, vals) @ W + b
    assert_close(sparse, dense, **_tol(dtype))
    gs = torch.autograd.grad(sparse, (vals, W, b), grad_out)
    gd = torch.autograd.grad(dense, (vals, W, b), grad_out)
    for a, c in zip(gs, gd):
        assert_close(a, c, **_tol(dtype, 10))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ragged_pattern_decode_and_gather(device, dtype):
    """Variable counts per row (BatchTopK), an empty row included."""
    B, D, F = 16, 6, 40
    pat = ragged_pattern(B, F, 8, device)
    p = _params(D, F, dtype, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, dtype=dtype, generator=g).to(device)
    pre = torch.addmm(p["b_enc"], x - p["b_dec"], p["W_enc"].T)

    def loss(pre_used):
        vals = gather_pre(pre_used, pat, x, p).clamp_min(0)
        if pre_used.requires_grad:  # dense reference
            x_hat = dense_codes(vals, pat) @ p["W_dec"] + p["b_dec"]
        else:
            x_hat = sparse_decode(vals, pat, p["W_dec"], p["b_dec"])
        return x_hat, (x_hat - x).pow(2).sum()

    xs, ls = loss(pre.detach())
    xd, ld = loss(pre)
    assert_close(xs, xd, **_tol(dtype, 10))
    gs = torch.autograd.grad(ls, list(p.values()))
    gd = torch.autograd.grad(ld, list(p.values()))
    for a, c in zip(gs, gd):
        assert_close(a, c, **_tol(dtype, 100))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_pre_gradients(device, dtype):
    """Sparse encoder backward equals autograd through the dense product, x included."""
    B, D, F, k = 20, 9, 64, 4
    p = _params(D, F, dtype, device, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, D, dtype=dtype, generator=g).to(device).requires_grad_(True)
    pre = torch.addmm(p["b_enc"], x - p["b_dec"], p["W_enc"].T)
    idx = torch.topk(pre.detach(), k, dim=-1).indices
    w = torch.randn(B, k, dtype=dtype, generator=g).to(device)
    sparse = gather_pre(pre.detach(), idx, x, p)
    dense = gather_pre(pre, idx, x, p)
    assert_close(sparse, dense)
    inputs = [x, *p.values()]
    gs = torch.autograd.grad((sparse * w).sum(), inputs, allow_unused=True)
    gd = torch.autograd.grad((dense * w).sum(), inputs, allow_unused=True)
    for a, c in zip(gs, gd):
        if c is None:  # W_dec plays no part
            assert a is None or not a.abs().any()
        else:
            assert_close(a, c, **_tol(dtype, 10))


def test_duplicate_padding_indices(device):
    """Padding entries (repeated index, value 0) add nothing, gradients included."""
    B, D, F = 6, 5, 30
    g = torch.Generator().manual_seed(0)
    W = torch.randn(F, D, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    idx = torch.tensor([[3, 7, 0, 0]] * B, device=device)
    vals = torch.randn(B, 4, generator=g, dtype=torch.float64).to(device)
    vals[:, 2:] = 0
    vals.requires_grad_(True)
    out = sparse_decode(vals, idx, W)
    ref = sparse_decode(vals[:, :2], idx[:, :2], W)
    assert_close(out, ref)
    gw = torch.autograd.grad(out.sum(), W)[0]
    gw_ref = torch.autograd.grad(ref.sum(), W)[0]
    assert_close(gw, gw_ref)


def test_use_sparse_rule():
    assert use_sparse(32768, 32)
    assert not use_sparse(32768, 32768 // 4)
    assert not use_sparse(_kernels.SPARSE_MIN_COMPONENTS - 1, 1)
    # accelerators take the dense path in "auto" (launch-bound steps; measured on an H100)
    assert use_sparse(32768, 32, device=torch.device("cpu"))
    assert not use_sparse(32768, 32, device=torch.device("cuda"))
    assert use_sparse(32768, 32, "sparse", device=torch.device("cuda"))
    assert use_sparse(8, 8, "sparse")
    assert not use_sparse(10**6, 1, "dense")
    with pytest.raises(ValueError, match="kernels"):
        use_sparse(10, 1, "fast")


def test_decode_dispatch(device):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 3, dtype=torch.float64, generator=g).to(device)
    idx = torch.tensor([[1, 5], [2, 39]], device=device)
    codes = SparseCodes(torch.rand(2, 2, dtype=torch.float64, generator=g).to(device), idx)
    ref = codes.to_dense(40) @ W
    for kernels in ("auto", "sparse", "dense"):
        assert_close(decode(codes, W, kernels=kernels), ref)
        assert_close(decode(codes, W, W[0], kernels=kernels), ref + W[0])


def _trainer(name, kernels, device, dtype, n_dead):
    D, F, B = 12, 64, 32
    # every hyperparameter the architecture declares (Matryoshka: its default prefixes)
    arch = SparseAutoencoder(architecture=name, k=4, alpha=1e-3, threshold_momentum=0.9,
                             bandwidth=0.05, auxk_alpha=1 / 32)._architecture(F, D)
    arch.kernels = kernels
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, D, generator=g, dtype=torch.float64)
    params = init_parameters(x, F, "random", g, dtype, device)
    params.update({k: v.to(device, dtype) for k, v in arch.extra_parameters(params).items()})
    buffers = {k: v.to(device, dtype) for k, v in arch.extra_buffers(params).items()}
    trainer = SAETrainer(arch, params, buffers, lr=0.0, schedule=NO_WARMUP, warmup_steps=1,
                         dead_window=10, precision="float32")
    trainer.rows_since_fired[:n_dead] = 100  # latents 0..n_dead-1 count as dead
    return trainer, x[:B].to(device, dtype)


@pytest.mark.parametrize("name", TOPK_FAMILY)
@pytest.mark.parametrize("n_dead", [0, 5, 50])  # none, few (index_select), many (masked)
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_family_sparse_equalsdense_codes(name, n_dead, dtype, device):
    """Same metrics and gradients (after projection and clipping) on both paths."""
    sparse, x = _trainer(name, "sparse", device, dtype, n_dead)
    dense, _ = _trainer(name, "dense", device, dtype, n_dead)
    # the sparse path really runs: pre carries no graph
    p = {**sparse.params, **sparse.buffers}
    assert not sparse.arch.encode(p, x, training=True).pre.requires_grad
    assert dense.arch.encode(p, x, training=True).pre.requires_grad
    ms, md = sparse.step(x).as_dict(), dense.step(x).as_dict()
    assert set(ms) == set(md)
    for key in ms:
        assert_close(ms[key], md[key], **_tol(dtype), msg=key)
    if n_dead:
        assert float(ms["auxk"]) > 0
    for key, param in sparse.params.items():
        assert_close(param.grad, dense.params[key].grad, **_tol(dtype, 10), msg=key)
    for key, buf in sparse.buffers.items():  # e.g. BatchTopK's threshold estimate
        assert_close(buf, dense.buffers[key], **_tol(dtype), msg=key)


# dead latents: all picked (<= k_aux), some picked among few (index_select), many (masked)
@pytest.mark.parametrize("n_dead", [5, 20, 50])
@pytest.mark.parametrize("kernels", ["sparse", "dense"])
def test_auxk_loss_matches_its_definition(n_dead, kernels, device):
    """AuxK (dropping the negative picks) equals the loss written out densely, with gradients."""
    trainer, x = _trainer("topk", kernels, device, torch.float64, n_dead)
    p = trainer.params
    with torch.no_grad():  # dead latents fire rarely: many of their picks are negative
        p["b_enc"][:n_dead] -= 1.5
    x_hat = (x.mean(0) + 0.1 * x).detach()
    with torch.no_grad():
        pre = torch.addmm(p["b_enc"], x - p["b_dec"], p["W_enc"].T)
    if kernels == "dense":
        pre = torch.addmm(p["b_enc"], x - p["b_dec"], p["W_enc"].T)
    arch = trainer.arch
    dead = trainer.rows_since_fired >= trainer.dead_window
    inp = LossInputs({**p, **trainer.buffers}, x, EncodeOutput(None, pre), x_hat, trainer.coef,
                     dead, trainer.ws)
    loss = arch.auxk_loss(inp)
    got = torch.autograd.grad(loss, list(p.values()), allow_unused=True)

    ref_pre = torch.addmm(p["b_enc"], x - p["b_dec"], p["W_enc"].T)
    picked, idx = torch.topk(ref_pre.masked_fill(~dead, float("-inf")),
                             min(arch.k_aux, n_dead), dim=-1)
    assert (picked < 0).any() and (picked > 0).any()  # both kinds of picks occur
    codes = torch.zeros_like(ref_pre).scatter(1, idx, torch.relu(picked))
    e = x - x_hat
    total_var = (e - e.mean(0)).pow(2).sum()
    scale = min(n_dead / arch.k_aux, 1.0)
    ref = arch.hparams["auxk_alpha"] * scale * (codes @ p["W_dec"] - e).pow(2).sum() / total_var
    want = torch.autograd.grad(ref, list(p.values()), allow_unused=True)
    assert_close(loss, ref, **_tol(torch.float64))
    for name, g, w in zip(p, got, want):
        assert_close(g if g is not None else torch.zeros_like(p[name]),
                     w if w is not None else torch.zeros_like(p[name]),
                     **_tol(torch.float64), msg=name)


def test_workspace_hands_out_each_lent_tensor_once():
    ws = StepWorkspace()
    a, b = torch.zeros(3, 4), torch.zeros(3, 4)
    graph = torch.zeros(3, 4, requires_grad=True)  # never lent (autograd would not adopt it)
    lent = (a, b, graph)

    def fresh(t, shape, dtype):  # a new tensor, none of those lent
        return t.shape == shape and t.dtype == dtype and all(t is not u for u in lent)

    with ws.lending([a, None, graph, b, torch.zeros(2)]):
        assert fresh(ws.take_buffer((5, 4), a), (5, 4), torch.float32)  # another shape
        assert fresh(ws.take_buffer((3, 4), a.double()), (3, 4), torch.float64)  # another dtype
        got = [ws.take_buffer((3, 4), a) for _ in range(2)]
        assert (got[0] is a and got[1] is b) or (got[0] is b and got[1] is a)
        assert fresh(ws.take_buffer((3, 4), a), (3, 4), torch.float32)  # each lent once
    with ws.lending([a]):
        pass
    assert fresh(ws.take_buffer((3, 4), a), (3, 4), torch.float32)  # forgets what it was lent
    assert _kernels._buffer(None, (3, 4), a) is not a  # no workspace: fresh
    owner, other = torch.zeros(3, 4), torch.zeros(3, 4)
    with ws.lending([(owner, a), b]):
        assert ws.take_buffer((3, 4), a, owner=other) is b  # not lent for `other`
        assert fresh(ws.take_buffer((3, 4), a), (3, 4), torch.float32)  # `a` is owner's
        assert ws.take_buffer((3, 4), a, owner=owner) is a


@pytest.mark.parametrize("mkl", [True, False])
def test_scatter_into_a_stale_buffer(monkeypatch, mkl):
    """S^T Y is exact whatever the reused buffer held (NaN included), with MKL or without."""
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: mkl)
    pat = ragged_pattern(9, 40, 5, "cpu")
    g = torch.Generator().manual_seed(3)
    Y = torch.randn(9, 6, generator=g)
    w = torch.randn(pat.indices.shape[0], generator=g)
    S = torch.zeros(9, 40)
    S.view(-1)[pat.flat()] = w
    ws = StepWorkspace()
    stale = torch.full((40, 6), float("nan"))
    with ws.lending([stale]):
        out = _kernels._scatter_rows(pat, Y, w, ws=ws)
    assert (out.data_ptr() == stale.data_ptr()) == mkl
    assert_close(out, S.T @ Y)


@pytest.mark.parametrize("name", TOPK_FAMILY)
def test_sparse_steps_reuse_gradient_buffers(name):
    """From the second CPU step on, the (F, D) gradients are the previous step's
    storage, and they still equal the dense path's gradients."""
    sparse, x = _trainer(name, "sparse", "cpu", torch.float64, 5)
    dense, _ = _trainer(name, "dense", "cpu", torch.float64, 5)
    for t in (sparse, dense):
        t.lr = 1e-3
    sparse.step(x)
    dense.step(x)
    # each lent gradient goes to its own parameter's kernels (Matryoshka's prefix
    # decodes make a second decoder result, which must not take the encoder's)
    ptrs = {k: sparse.params[k].grad.data_ptr() for k in ("W_enc", "W_dec")}
    x2 = x.flip(0) * 1.5
    sparse.step(x2)
    dense.step(x2)
    assert {k: sparse.params[k].grad.data_ptr() for k in ptrs} == ptrs
    for key, param in sparse.params.items():
        assert_close(param.grad, dense.params[key].grad, **_tol(torch.float64, 10), msg=key)


def _wide_trainer(kernels, n_dead):
    """F=512, D=80, k=4: with kernels="auto" the codes decode sparsely and AuxK's
    40 picks per row (over 1/16 of the latents) densely."""
    D, F = 80, 512
    arch = REGISTRY["topk"]({"k": 4, "auxk_alpha": 1 / 32}, F, D)
    arch.kernels = kernels
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, D, generator=g, dtype=torch.float64)
    params = init_parameters(x, F, "random", g, torch.float64, "cpu")
    trainer = SAETrainer(arch, params, {}, lr=0.0, schedule=NO_WARMUP, warmup_steps=1,
                         dead_window=10, precision="float32")
    trainer.rows_since_fired[:n_dead] = 100
    return trainer, x[:32]


@pytest.mark.parametrize("kernels, n_dead, complete", [
    ("sparse", 0, True), ("sparse", 300, True), ("auto", 0, True), ("auto", 300, False),
    ("dense", 300, False)])
def test_decoder_gradient_is_tangent_whichever_decodes_project(monkeypatch, kernels, n_dead,
                                                               complete):
    """Sparse decodes project their own decoder gradients; a dense decode of the same
    decoder makes the trainer project the sum. Either way: the dense path's gradient,
    orthogonal to every (unit) decoder row."""
    seen = []
    real = StepWorkspace.projecting

    @contextlib.contextmanager
    def spy(self, W):
        with real(self, W) as rows:
            seen.append(rows)
            yield rows

    monkeypatch.setattr(StepWorkspace, "projecting", spy)
    trainer, x = _wide_trainer(kernels, n_dead)
    reference, _ = _wide_trainer("dense", n_dead)
    trainer.step(x)
    (rows,) = seen
    assert rows.complete == complete
    assert rows.projected == (0 if kernels == "dense" else 1 + (kernels == "sparse" and n_dead > 0))
    reference.step(x)
    for key, param in trainer.params.items():
        assert_close(param.grad, reference.params[key].grad, **_tol(torch.float64, 10), msg=key)
    W = trainer.params["W_dec"].detach()
    radial = (trainer.params["W_dec"].grad * W).sum(-1)
    assert radial.abs().max() < 1e-12
