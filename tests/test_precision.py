"""``precision``: bf16 products with float32 parameters, values and gradients."""

import numpy as np
import pytest
import torch
from sklearn.utils._param_validation import InvalidParameterError
from torch.testing import assert_close

from sksae import SparseAutoencoder
from sksae._accel.device import native_bf16
from sksae._accel.sparse import Pattern, gather_pre
from sksae._accel.workspace import StepWorkspace
from sksae._sae_trainer import SAETrainer, init_parameters, product_dtype
from sksae.architectures import REGISTRY, Schedule

TOPK_FAMILY = sorted(name for name, cls in REGISTRY.items() if cls.uses_dead_latents)


def test_product_dtype_rules(device):
    assert product_dtype("float32", device, torch.float32) is None
    assert product_dtype("bfloat16", device, torch.float32) is torch.bfloat16
    assert product_dtype("bfloat16", device, torch.float64) is None  # float64 asks for precision
    auto = product_dtype("auto", device, torch.float32)
    assert auto is (torch.bfloat16 if native_bf16(device) else None)
    with pytest.raises(ValueError, match="precision must be"):
        product_dtype("float16", device, torch.float32)


@pytest.mark.parametrize("avx512_bf16, amx", [(False, False), (True, False), (False, True)])
def test_auto_follows_the_cpu_features(monkeypatch, avx512_bf16, amx):
    """"auto" is bf16 exactly on CPUs with AVX512-BF16 or AMX: the probes injected, so
    that both outcomes are checked on any CPU."""
    from sksae._accel import device as _device

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16,
                        raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    native = avx512_bf16 or amx
    assert _device._cpu_native_bf16.__wrapped__() is native
    monkeypatch.setattr(_device, "_cpu_native_bf16", lambda: native)
    assert product_dtype("auto", "cpu", torch.float32) is (torch.bfloat16 if native else None)
    assert product_dtype("auto", "cpu", torch.float64) is None


def test_precision_is_validated():
    X = np.random.RandomState(0).randn(40, 6)
    with pytest.raises(InvalidParameterError, match="precision"):
        SparseAutoencoder(n_components=8, k=2, precision="half").fit(X)


def _setup(n_features, n_components, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_features, generator=g).to(device)
    W = torch.randn(n_components, n_features, generator=g).to(device)
    W /= W.norm(dim=-1, keepdim=True)
    p = {"W_enc": W.clone(), "b_enc": 0.1 * torch.randn(n_components, generator=g).to(device),
         "W_dec": W.clone(), "b_dec": 0.1 * torch.randn(n_features, generator=g).to(device)}
    return x, {k: v.requires_grad_(True) for k, v in p.items()}


@pytest.mark.parametrize("pattern", [False, True])
def test_low_precision_pre_gives_full_precision_values_and_gradients(pattern, device):
    """gather_pre on a bf16 ``pre`` equals the float32 dense path on the same entries."""
    x, p = _setup(24, 96, 16, device)
    exact = torch.addmm(p["b_enc"], x - p["b_dec"], p["W_enc"].T)
    with torch.no_grad():
        low = torch.addmm(p["b_enc"].bfloat16(), (x - p["b_dec"]).bfloat16(),
                          p["W_enc"].bfloat16().T)
    idx = torch.topk(low.float(), 5, dim=-1).indices
    support = (Pattern(idx.reshape(-1), torch.arange(0, 17 * 5, 5, device=device), 96)
               if pattern else idx)
    values = gather_pre(low, support, x, p)
    assert values.dtype == torch.float32
    ref = exact.gather(1, idx)
    assert_close(values.reshape(ref.shape), ref.detach(), rtol=1e-5, atol=1e-5)

    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(device)
    grads = torch.autograd.grad((values.reshape(ref.shape) * weights).sum(), list(p.values()),
                                allow_unused=True)
    ref_grads = torch.autograd.grad((ref * weights).sum(), list(p.values()), allow_unused=True)
    for name, g, r in zip(p, grads, ref_grads):
        if r is None:
            assert g is None or not g.any(), name
        else:
            assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", TOPK_FAMILY)
def test_bf16_selection_picks_a_top_k_up_to_rounding(name):
    """On the CPU's sparse path the support is a top-k of the float32 pre-activations
    up to bf16 rounding, and the codes' values are the float32 pre-activations."""
    D, F, B, k = 32, 640, 64, 8
    arch = SparseAutoencoder(architecture=name, k=k)._architecture(F, D)
    arch.kernels = "sparse"
    x, p = _setup(D, F, B, "cpu")
    enc = arch.encode(p, x, training=True, ws=StepWorkspace(selection_dtype=torch.bfloat16))
    assert enc.pre.dtype == torch.bfloat16
    exact = torch.addmm(p["b_enc"], x - p["b_dec"], p["W_enc"].T).detach()
    dense = enc.codes.to_dense(F).detach()
    chosen = dense != 0
    # every nonzero code is the exact float32 pre-activation of its latent
    assert_close(dense[chosen], exact[chosen], rtol=1e-5, atol=1e-5)
    # nothing chosen lies below an unchosen latent by more than bf16's rounding
    slack = 2 ** -7 * exact.abs().max()
    lowest_chosen = torch.where(chosen, exact, torch.inf).min()
    if name == "topk":  # per row
        lowest_chosen = torch.where(chosen, exact, torch.inf).min(-1, keepdim=True).values
        highest_left = torch.where(chosen, -torch.inf, exact).max(-1, keepdim=True).values
        assert (highest_left.clamp_min(0) <= lowest_chosen + slack).all()
    else:  # over the batch
        highest_left = torch.where(chosen, -torch.inf, exact).max()
        assert highest_left.clamp_min(0) <= lowest_chosen + slack


def _trainer(precision, seed=0):
    D, F = 16, 768
    arch = REGISTRY["topk"]({"k": 8, "auxk_alpha": 1 / 32}, F, D)
    arch.kernels = "sparse"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, D, generator=g, dtype=torch.float64)
    params = init_parameters(x, F, "data", g, torch.float32, "cpu")
    trainer = SAETrainer(arch, params, {}, lr=1e-3,
                         schedule=Schedule(total_steps=None, steps_per_epoch=1), warmup_steps=1,
                         dead_window=64, precision=precision)
    return trainer, x.float()


def test_bf16_step_matches_float32_step_where_the_support_agrees():
    """Same losses and gradients as float32 when bf16 picks the same latents."""
    low, x = _trainer("bfloat16")
    full, _ = _trainer("float32")
    assert low.ws.selection_dtype is torch.bfloat16 and full.ws.selection_dtype is None
    p = {**low.params, **low.buffers}
    enc_low = low.arch.encode(p, x[:64], training=True, ws=low.ws)
    enc_full = full.arch.encode(p, x[:64], training=True, ws=full.ws)
    assert enc_low.pre.dtype == torch.bfloat16 and enc_full.pre.dtype == torch.float32
    same = (enc_low.codes.indices.sort(-1).values == enc_full.codes.indices.sort(-1).values).all(-1)
    assert same.float().mean() > 0.8  # ties to bf16 rounding are rare
    rows = x[:64][same]
    ml, mf = low.step(rows).as_dict(), full.step(rows).as_dict()
    for key in ("loss", "mse", "fvu", "l0"):
        assert_close(ml[key], mf[key], rtol=1e-5, atol=1e-6, msg=key)
    for key, param in low.params.items():
        assert_close(param.grad, full.params[key].grad, rtol=1e-4, atol=1e-6, msg=key)


def test_bf16_fit_is_as_good_and_reproducible():
    """precision="bfloat16" on the CPU's sparse path: float32-quality fit, same seed same model."""
    rng = np.random.RandomState(0)
    atoms = rng.randn(64, 32)
    X = ((rng.rand(3000, 64) < 0.05) * rng.rand(3000, 64)) @ atoms
    X = X.astype(np.float32)
    kw = dict(n_components=640, k=8, batch_size=256, max_iter=3, random_state=0, device="cpu")
    low = SparseAutoencoder(precision="bfloat16", **kw).fit(X)
    again = SparseAutoencoder(precision="bfloat16", **kw).fit(X)
    full = SparseAutoencoder(precision="float32", **kw).fit(X)
    np.testing.assert_array_equal(low.components_, again.components_)
    assert abs(low.score(X) - full.score(X)) < 0.02
    assert low.components_.dtype == np.float32
    # inference is float32 whatever the training precision
    codes = low.transform(X[:50])
    ref = np.maximum(
        (X[:50] - low.decoder_bias_) @ low.encoder_weights_.T + low.encoder_bias_, 0)
    kth = -np.sort(-ref, axis=1)[:, 7:8]
    np.testing.assert_allclose(codes, np.where(ref >= kth, ref, 0), rtol=1e-4, atol=1e-5)
