"""Every registered SAE architecture: training, per-row inference, units, resampling.

Architecture-specific checks: JumpReLU's straight-through gradients against a
hand-computed case, BatchTopK's training and inference L0, and the shrinkage of
ReLU+L1 against TopK, JumpReLU and Gated on toy data.
"""

import pickle

import numpy as np
import pytest
import torch

from sksae import SparseAutoencoder
from sksae._sae_trainer import SAETrainer, init_parameters
from sksae.architectures import REGISTRY, LossInputs, Schedule, available, get
from sksae.architectures.jumprelu import THRESHOLD_SPEED
from sksae.datasets import make_sparse_superposition
from sksae.metrics import relative_reconstruction_bias

ARCHS = available()  # entry points of installed packages included
# small settings giving every architecture a few active latents per row
SMALL = dict(n_components=32, k=3, alpha=1.0, l0_coefficient=1.0, batch_size=128,
             precision="float32",
             max_iter=8, random_state=0)


@pytest.fixture(scope="module")
def toy():
    X = make_sparse_superposition(n_samples=1200, n_features=16, n_components=24,
                                  avg_active=3, random_state=0)
    return X[:1000], X[1000:]


@pytest.fixture(scope="module")
def fitted(toy):
    X, _ = toy
    return {name: SparseAutoencoder(architecture=name, **SMALL).fit(X) for name in ARCHS}


def test_registry_lists_every_architecture():
    assert set(REGISTRY) == {"relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"}


@pytest.mark.parametrize("name", ARCHS)
def test_loss_decreases(fitted, name):
    sae = fitted[name]
    mse = sae.history_["step"]["mse"]
    assert np.all(np.isfinite(sae.loss_curve_))
    assert mse[-5:].mean() < 0.85 * mse[:5].mean()
    assert sae.loss_curve_[-5:].mean() < sae.loss_curve_[:5].mean()


@pytest.mark.parametrize("name", ARCHS)
def test_decoder_rows_unit_norm(fitted, name):
    norms = np.linalg.norm(fitted[name].components_, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ARCHS)
def test_transform_row_does_not_depend_on_other_rows(fitted, toy, name):
    sae = fitted[name]
    _, X_test = toy
    full = sae.transform(X_test)
    assert (full > 0).sum(1).mean() > 0.5  # not trivially all zero
    rows = [0, 7, 123]
    for i in rows:
        np.testing.assert_allclose(sae.transform(X_test[i : i + 1])[0], full[i],
                                   rtol=1e-5, atol=1e-6)
    # the same rows among very different company (here: scaled-up rows)
    mixed = np.vstack([X_test[rows], 10 * X_test[:50]])
    np.testing.assert_allclose(sae.transform(mixed)[: len(rows)], full[rows],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved(toy, name, dtype):
    X = toy[0][:300].astype(dtype)
    sae = SparseAutoencoder(architecture=name, **{**SMALL, "max_iter": 1}).fit(X)
    assert sae.transform(X).dtype == dtype
    assert sae.inverse_transform(sae.transform(X)).dtype == dtype
    for attr in ("components_", "encoder_bias_", "threshold_", "mag_scale_", "mag_bias_"):
        if hasattr(sae, attr):
            assert getattr(sae, attr).dtype == dtype, attr


@pytest.mark.parametrize("name", ARCHS)
def test_pickle_round_trip(fitted, toy, name):
    sae = fitted[name]
    clone = pickle.loads(pickle.dumps(sae))
    np.testing.assert_array_equal(clone.transform(toy[1]), sae.transform(toy[1]))


@pytest.mark.parametrize("name", ARCHS)
def test_inference_matches_training_units(fitted, toy, name):
    """The folded fitted attributes reproduce the trained encoder on ``scale * x``."""
    sae = fitted[name]
    X = toy[1][:64]
    arch = sae._architecture(sae.n_components_, sae.n_features_in_)
    p = {k: v.detach() for k, v in sae._train_state["trainer"]["params"].items()}
    p.update(sae._train_state["trainer"]["buffers"])
    s = sae.input_scale_
    codes = arch.encode(p, torch.as_tensor(X) * s)
    np.testing.assert_allclose(sae.transform(X), codes.numpy() / s, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------- JumpReLU
def _identity_params(theta, dtype=torch.float64):
    F = theta.shape[0]
    return {
        "W_enc": torch.eye(F, dtype=dtype),
        "b_enc": torch.zeros(F, dtype=dtype),
        "W_dec": torch.eye(F, dtype=dtype),
        "b_dec": torch.zeros(F, dtype=dtype),
        "log_threshold": (theta.log() / THRESHOLD_SPEED).requires_grad_(True),
    }


def test_jumprelu_straight_through_gradients_by_hand():
    eps, lam = 0.1, 3.0
    arch = get("jumprelu")({"bandwidth": eps, "l0_coefficient": lam, "threshold_init": 0.5},
                           4, 4)
    theta = torch.full((4,), 0.5, dtype=torch.float64)
    # (a - theta) / eps = [-2, 0.2, 0.2 (row 2: -0.6), 4]
    x = torch.tensor([[0.3, 0.52, 0.52, 0.9],
                      [0.3, 0.52, 0.44, 0.9]], dtype=torch.float64)
    p = _identity_params(theta)
    x.requires_grad_(True)
    enc = arch.encode(p, x, training=True)
    np.testing.assert_allclose(enc.codes.detach(), [[0, 0.52, 0.52, 0.9], [0, 0.52, 0, 0.9]])
    enc.codes.sum().backward()
    # d z / d a = H(a - theta); d z / d theta = -(theta / eps) K((a - theta) / eps),
    # summed over rows, times d theta / d log_threshold = THRESHOLD_SPEED * theta
    np.testing.assert_allclose(x.grad, [[0, 1, 1, 1], [0, 1, 0, 1]])
    K = torch.tensor([0.0, 2.0, 1.0, 0.0], dtype=torch.float64)  # rows where |u| < 1/2
    np.testing.assert_allclose(p["log_threshold"].grad, -(0.5 / eps) * K * 0.5 * THRESHOLD_SPEED)

    # L0 penalty: lam * mean_rows sum_i H(a_i - theta_i); d/d theta = -(1/eps) K, none to a
    p = _identity_params(theta)
    x = x.detach().requires_grad_(True)
    enc = arch.encode(p, x, training=True)
    loss = arch.losses(LossInputs(p, x, enc, None, {"sparsity": 1.0}, None, None))["l0_penalty"]
    assert loss.item() == pytest.approx(lam * (3 + 2) / 2)
    grad_x, grad_t = torch.autograd.grad(loss, [x, p["log_threshold"]])
    np.testing.assert_allclose(grad_x, 0)
    np.testing.assert_allclose(grad_t, lam * (-(1 / eps) * K / 2) * 0.5 * THRESHOLD_SPEED)


def test_jumprelu_gate_and_window_use_the_unrounded_threshold_under_bf16_products():
    # under bf16 products (autocast on CUDA) the pre-activations are bf16 while the
    # thresholds are float32: rounding them to bf16 (step 0.03 near 5) would shut the gate
    # of 5.0 > 4.99 and move 5.0625 out of 5.04's window (half-width 0.025)
    from sksae.architectures.jumprelu import _theta

    eps = 0.05
    arch = get("jumprelu")({"bandwidth": eps, "l0_coefficient": 1.0, "threshold_init": 1.0},
                           2, 2)
    theta = torch.tensor([5.04, 4.99])
    p = _identity_params(theta.double(), dtype=torch.bfloat16)
    p["log_threshold"] = (theta.log() / THRESHOLD_SPEED).requires_grad_(True)  # float32
    x = torch.tensor([[5.0625, 5.0]], dtype=torch.bfloat16)  # exact in bf16
    enc = arch.encode(p, x, training=True)
    t, a = _theta(p).detach().double(), x.double()
    np.testing.assert_array_equal(enc.codes.detach().double(), a * (a > t))
    assert enc.codes[0, 1] == 5.0
    np.testing.assert_array_equal(arch.encode(p, x).double(), a * (a > t))  # inference too
    enc.codes.float().sum().backward()
    inside = ((a - t).abs() / eps < 0.5).double()
    assert inside.all()
    expected = -(t / eps) * inside * THRESHOLD_SPEED * t
    np.testing.assert_allclose(p["log_threshold"].grad, expected[0].float(), rtol=1e-2)


def test_gated_magnitude_scale_is_not_rounded_under_bf16_products():
    # bf16 projections (CUDA's autocast) times the float32 scale exp(r_mag): the scale
    # rounded to bf16 first trained magnitudes up to 0.4% off the exported mag_scale_
    arch = get("gated")({"alpha": 1.0}, 2, 2)
    eye = torch.eye(2, dtype=torch.bfloat16)
    scale = torch.tensor([1.003, 0.9971])  # not bf16 values
    p = {"W_enc": eye, "W_dec": eye, "b_dec": torch.zeros(2, dtype=torch.bfloat16),
         "b_enc": torch.zeros(2), "r_mag": scale.log(), "b_mag": torch.zeros(2)}
    x = torch.tensor([[2.0, 3.0]], dtype=torch.bfloat16)
    codes = arch.encode(p, x)
    np.testing.assert_allclose(codes.double(), (x.double() * scale.double()), rtol=1e-6)


def test_jumprelu_threshold_is_exported_in_user_units(toy):
    X = toy[0]
    sae = SparseAutoencoder(architecture="jumprelu", **SMALL).fit(X)
    sae2 = SparseAutoencoder(architecture="jumprelu", **SMALL).fit(3.0 * X)
    np.testing.assert_allclose(sae2.threshold_, 3.0 * sae.threshold_, rtol=1e-4)
    np.testing.assert_allclose(sae2.transform(3 * X), 3 * sae.transform(X), rtol=1e-3,
                               atol=1e-4)
    assert sae.threshold_.shape == (SMALL["n_components"],)
    # thresholds were learned (threshold_init=0.5 in normalised units)
    assert not np.allclose(sae.threshold_ * sae.input_scale_, 0.5)


# -------------------------------------------------------------------- BatchTopK
def test_batch_topk_codes_keep_k_times_batch():
    pre = torch.randn(10, 50, generator=torch.Generator().manual_seed(0))
    arch = SparseAutoencoder(architecture="batchtopk", k=4)._architecture(50, 8)
    codes = arch.dense_codes(pre)
    assert int((codes > 0).sum()) == 40
    assert len(set((codes > 0).sum(1).tolist())) > 1  # varies per row
    kept = codes[codes > 0]
    assert kept.min() >= torch.relu(pre)[codes == 0].max()


def test_batchtopk_l0_training_exact_inference_close():
    X = make_sparse_superposition(n_samples=5000, n_features=32, n_components=64,
                                  random_state=0)
    X, X_test = X[:4000], X[4000:]
    k = 5
    sae = SparseAutoencoder(n_components=128, architecture="batchtopk", k=k,
                            batch_size=256, max_iter=10, random_state=0,
                            precision="float32").fit(X)
    np.testing.assert_allclose(sae.history_["step"]["l0"], k)  # every training batch
    assert sae.threshold_.shape == () and sae.threshold_ > 0
    l0_test = (sae.transform(X_test) > 0).sum(1).mean()
    assert abs(l0_test - k) < 0.15 * k, l0_test


# -------------------------------------------------------------------- resampling
@pytest.mark.parametrize("name", ARCHS)
def test_resample_dead_latent(name):
    torch.manual_seed(0)
    F, D, dead = 8, 6, 3
    hp = dict(k=2, alpha=1.0, l0_coefficient=1.0, bandwidth=0.05, threshold_init=0.5,
              threshold_momentum=0.999, auxk_alpha=1 / 32)
    arch = SparseAutoencoder(architecture=name, **hp)._architecture(F, D)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, D, generator=gen)
    params = init_parameters(x, F, "random", gen, torch.float32, "cpu")
    params.update(arch.extra_parameters(params))
    buffers = arch.extra_buffers(params)
    # a fit of 10 steps: penalty warm-up ceil(0.05 * 10) = 1 step, coefficient 1 from the start
    schedule = Schedule(total_steps=10, steps_per_epoch=10)
    trainer = SAETrainer(arch, params, buffers, lr=1e-2, schedule=schedule, warmup_steps=1,
                         dead_window=10**9)
    trainer.step(x)  # Adam state everywhere
    extra = [n for n, v in arch.extra_parameters(trainer.params).items() if v.ndim]
    with torch.no_grad():
        for n in extra:
            trainer.params[n][dead] += 1.0  # moved away from its initial value
    before = {n: v.detach().clone() for n, v in trainer.params.items()}
    trainer.rows_since_fired.zero_()
    trainer.rows_since_fired[dead] = 10**9

    # all rows but one sit on b_dec: reconstructed exactly by zero codes, so the
    # only row with non-zero error must be the one drawn
    b_dec = trainer.params["b_dec"].detach()
    target = b_dec + torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0, 1.0])
    xs = torch.vstack([b_dec.expand(20, D), target])
    assert trainer.resample_dead_latents(xs, gen) == 1

    P = trainer.params
    u = (target - b_dec) / (target - b_dec).norm()
    alive = torch.arange(F) != dead
    np.testing.assert_allclose(P["W_dec"][dead].detach(), u, atol=1e-6)
    enc_norm = before["W_enc"][alive].norm(dim=-1).mean()
    np.testing.assert_allclose(P["W_enc"][dead].detach(), 0.2 * enc_norm * u, atol=1e-6)
    assert P["b_enc"][dead].item() == 0
    init = arch.extra_parameters(P)
    for n in extra:
        np.testing.assert_allclose(P[n][dead].detach(), init[n][dead], atol=1e-6)
    for n, v in P.items():  # alive latents untouched
        if v.ndim and v.shape[0] == F:
            np.testing.assert_array_equal(v[alive].detach(), before[n][alive])
    for n in ["W_dec", "W_enc", "b_enc", *extra]:
        state = trainer.optimizer.state[P[n]]
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.all(state[moment][dead] == 0)
            assert torch.any(state[moment][alive] != 0)
    assert trainer.rows_since_fired[dead] == 0
    assert trainer.resample_dead_latents(xs, gen) == 0  # nothing dead any more


def test_resample_dead_in_fit(toy):
    X = toy[0]
    # k=1 among 64 latents and a short dead window leave latents dead (no AuxK)
    kw = dict(SMALL, n_components=64, architecture="topk", k=1, auxk_alpha=0.0,
              dead_window=128, max_iter=4, max_no_improvement=None)
    sae = SparseAutoencoder(resample_dead=8, **kw).fit(X)
    resampled = sae.history_["step"]["resampled"]
    assert resampled.sum() > 0
    assert np.all(resampled[np.arange(len(resampled)) % 8 != 7] == 0)
    np.testing.assert_allclose(np.linalg.norm(sae.components_, axis=1), 1.0, atol=1e-5)
    assert "resampled" not in SparseAutoencoder(**kw).fit(X).history_["step"]


# -------------------------------------------------------------------- shrinkage
@pytest.mark.slow
def test_l1_shrinks_more_than_topk_jumprelu_gated():
    X = make_sparse_superposition(n_samples=5000, n_features=32, n_components=64,
                                  random_state=0)
    X, X_test = X[:4000], X[4000:]
    common = dict(n_components=128, batch_size=256, max_iter=8, random_state=0,
                  precision="float32")
    settings = {"relu": dict(alpha=5.0), "topk": dict(k=5), "jumprelu": dict(),
                "gated": dict()}
    bias = {}
    for name, kw in settings.items():
        sae = SparseAutoencoder(architecture=name, **common, **kw).fit(X)
        bias[name] = relative_reconstruction_bias(
            X_test, sae.inverse_transform(sae.transform(X_test)))
    assert bias["relu"] > 1.2, bias  # L1 undershoots: the best rescaling is > 1
    for name in ("topk", "jumprelu", "gated"):
        assert abs(bias[name] - 1) < 0.5 * abs(bias["relu"] - 1), (name, bias)
