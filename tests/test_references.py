"""The SAE trainer against independent computations written from the published formulas.

- each architecture's loss terms (RESEARCH.md section 4), computed in numpy from
  the parameters and a fixed batch, against the terms of one training step;
- BatchTopK's inference threshold: the moving average of the smallest kept
  activation, replayed in numpy over several batches;
- the learning-rate schedule (warm-up, final decay) and the penalty
  coefficients' warm-up, step by step against their formulas, and the
  resolved ``learning_rate="auto"`` and ``dead_window="auto"``;
- every per-step value of ``history_`` recomputed in numpy from the batches
  and the parameters each step started from, and the per-epoch means;
- ``normalize=False`` and ``init="random"``.
"""

import math

import numpy as np
import pytest
import torch

from sksae import SparseAutoencoder
from sksae._base import make_generator
from sksae._sae_trainer import SAETrainer, init_parameters
from sksae.architectures import Schedule
from sksae.datasets import make_sparse_superposition

N_FEATURES, N_COMPONENTS, N_ROWS = 12, 40, 64


def _np(t):
    return t.detach().to(torch.float64).numpy()


def _setup(name, seed, **hparams):
    """A float64 architecture, random parameters (non-trivial biases) and a batch."""
    hp = dict(k=3, alpha=0.7, l0_coefficient=0.9, bandwidth=0.05, threshold_init=0.3,
              threshold_momentum=0.999, auxk_alpha=1 / 32)
    hp.update(hparams)
    arch = SparseAutoencoder(architecture=name, **hp)._architecture(N_COMPONENTS, N_FEATURES)
    arch.kernels = "dense"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * N_ROWS, N_FEATURES, generator=g, dtype=torch.float64)
    params = init_parameters(x, N_COMPONENTS, "random", g, torch.float64, "cpu")
    params.update(arch.extra_parameters(params))
    params["b_enc"] = 0.3 * torch.randn(N_COMPONENTS, generator=g, dtype=torch.float64)
    for extra in ("r_mag", "b_mag"):
        if extra in params:
            params[extra] = 0.2 * torch.randn(N_COMPONENTS, generator=g, dtype=torch.float64)
    buffers = arch.extra_buffers(params)
    return arch, params, buffers, x


def _trainer(arch, params, buffers, schedule, dead_window=10**9):
    """A trainer whose step leaves the parameters unchanged (lr 0) and never clips."""
    trainer = SAETrainer(arch, {k: v.clone() for k, v in params.items()}, buffers, lr=0.0,
                         schedule=schedule, warmup_steps=1, dead_window=dead_window,
                         precision="float32")
    trainer.clip_norm = float("inf")
    return trainer


def _pre(P, x):
    return (x - P["b_dec"]) @ P["W_enc"].T + P["b_enc"]


def _decoder_norms(P):
    return np.linalg.norm(P["W_dec"], axis=1)


# a fit of 100 steps: the penalty warms up over ceil(0.05 * 100) = 5 steps, so the
# first step's coefficient is 1/5
WARMING = Schedule(total_steps=100, steps_per_epoch=10)


# ------------------------------------------------------------------ loss terms
def test_relu_l1_term_is_the_decoder_norm_weighted_l1():
    arch, params, buffers, x = _setup("relu", seed=0)
    with torch.no_grad():  # decoder rows of other norms: the weighting is visible
        params["W_dec"] *= torch.linspace(0.5, 2.0, N_COMPONENTS, dtype=torch.float64)[:, None]
    trainer = _trainer(arch, params, buffers, WARMING)
    trainer.params["W_dec"].data.copy_(params["W_dec"])
    x = x[:N_ROWS]
    out = trainer.step(x)
    P, X = {k: _np(v) for k, v in params.items()}, _np(x)
    z = np.maximum(_pre(P, X), 0)
    l1 = (z * _decoder_norms(P)).sum(1).mean()  # alpha * sum_i z_i ||W_dec,i||, row mean
    mse = ((X - (z @ P["W_dec"] + P["b_dec"])) ** 2).sum(1).mean()
    assert l1 > 1 and (z > 0).mean() > 0.2
    assert float(out.terms["l1"]) == pytest.approx(0.2 * 0.7 * l1, rel=1e-14)
    assert float(out.mse) == pytest.approx(mse, rel=1e-14)
    assert float(out.loss) == pytest.approx(mse + 0.2 * 0.7 * l1, rel=1e-14)
    assert float(out.l0) == pytest.approx((z > 0).sum(1).mean(), rel=1e-14)


def test_gated_terms_gate_l1_and_frozen_decoder_reconstruction():
    arch, params, buffers, x = _setup("gated", seed=1)
    trainer = _trainer(arch, params, buffers, WARMING)
    x = x[:N_ROWS]
    out = trainer.step(x)
    P, X = {k: _np(v) for k, v in params.items()}, _np(x)
    proj = (X - P["b_dec"]) @ P["W_enc"].T
    gate = proj + P["b_enc"]                                  # pi_gate
    mag = np.exp(P["r_mag"]) * proj + P["b_mag"]              # pi_mag, W_mag = e^r_mag W_gate
    f = (gate > 0) * np.maximum(mag, 0)
    gate_act = np.maximum(gate, 0)
    l1 = (gate_act * _decoder_norms(P)).sum(1).mean()
    aux = ((gate_act @ P["W_dec"] + P["b_dec"] - X) ** 2).sum(1).mean()
    mse = ((X - (f @ P["W_dec"] + P["b_dec"])) ** 2).sum(1).mean()
    assert float(out.terms["l1"]) == pytest.approx(0.2 * 0.7 * l1, rel=1e-14)
    assert float(out.terms["gate_aux"]) == pytest.approx(aux, rel=1e-14)
    assert float(out.mse) == pytest.approx(mse, rel=1e-14)
    assert float(out.l0) == pytest.approx((f > 0).sum(1).mean(), rel=1e-14)
    # the gate and the magnitudes disagree on some entries: both paths are exercised
    assert ((gate > 0) & (mag <= 0)).any() and (gate > 0).any()
    # the auxiliary loss trains the gate only: no gradient reaches the decoder through it
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    enc = arch.encode(p, x, training=True)
    from sksae.architectures import LossInputs

    terms = arch.losses(LossInputs(p, x, enc, None, {"sparsity": 1.0}, None, None))
    g_dec, g_bdec = torch.autograd.grad(terms["gate_aux"], [p["W_dec"], p["b_dec"]],
                                        allow_unused=True)
    assert (g_dec is None or not g_dec.any()) and g_bdec is not None  # b_dec: via the gate


def test_jumprelu_l0_penalty_counts_activations_above_threshold():
    arch, params, buffers, x = _setup("jumprelu", seed=2)
    trainer = _trainer(arch, params, buffers, WARMING)
    x = x[:N_ROWS]
    out = trainer.step(x)
    P, X = {k: _np(v) for k, v in params.items()}, _np(x)
    theta = np.exp(10.0 * P["log_threshold"])  # THRESHOLD_SPEED * log_threshold
    np.testing.assert_allclose(theta, 0.3, rtol=1e-14)
    a = np.maximum(_pre(P, X), 0)
    active = a > theta
    z = a * active
    l0 = active.sum(1).mean()  # sum_i H(a_i - theta_i), row mean
    mse = ((X - (z @ P["W_dec"] + P["b_dec"])) ** 2).sum(1).mean()
    assert 1 < l0 < N_COMPONENTS - 1
    assert float(out.terms["l0_penalty"]) == pytest.approx(0.2 * 0.9 * l0, rel=1e-14)
    assert float(out.mse) == pytest.approx(mse, rel=1e-14)
    assert float(out.l0) == pytest.approx(l0, rel=1e-14)


@pytest.mark.parametrize("n_dead", [3, 15])
@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_auxk_loss_reconstructs_the_residual_from_dead_latents(name, n_dead):
    arch, params, buffers, x = _setup(name, seed=3, auxk_alpha=0.25)
    trainer = _trainer(arch, params, buffers, WARMING, dead_window=1000)
    dead = torch.zeros(N_COMPONENTS, dtype=torch.bool)
    dead[torch.randperm(N_COMPONENTS, generator=torch.Generator().manual_seed(4))[:n_dead]] = 1
    trainer.rows_since_fired.copy_(torch.where(dead, 1000.0, 0.0))
    trainer._dead_bound.forget()
    x = x[:N_ROWS]
    out = trainer.step(x)
    P, X, D = {k: _np(v) for k, v in params.items()}, _np(x), dead.numpy()
    pre = _pre(P, X)
    k = 3
    z = np.zeros_like(pre)
    if name == "topk":
        top = np.argsort(-pre, axis=1)[:, :k]
        np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    else:  # the k * B largest entries of ReLU(pre) over the batch
        a = np.maximum(pre, 0).ravel()
        keep = np.argsort(-a)[: k * N_ROWS]
        z.ravel()[keep] = a[keep]
    e = X - (z @ P["W_dec"] + P["b_dec"])
    # Gao et al.: the k_aux = n_features / 2 largest pre-activations among the dead
    # latents, decoded without b_dec, against e, normalised by e's variance
    k_aux = N_FEATURES // 2
    masked = np.where(D, pre, -np.inf)
    pick = np.argsort(-masked, axis=1)[:, : min(k_aux, n_dead)]
    z_aux = np.zeros_like(pre)
    np.put_along_axis(z_aux, pick, np.maximum(np.take_along_axis(pre, pick, 1), 0), 1)
    e_hat = z_aux @ P["W_dec"]
    want = 0.25 * min(n_dead / k_aux, 1.0) * ((e - e_hat) ** 2).sum() / (
        (e - e.mean(0)) ** 2).sum()
    assert 0.01 < want < 1
    assert float(out.terms["auxk"]) == pytest.approx(want, rel=1e-14)
    assert float(out.mse) == pytest.approx((e ** 2).sum(1).mean(), rel=1e-14)
    assert float(out.loss) == pytest.approx((e ** 2).sum(1).mean() + want, rel=1e-14)


def test_batchtopk_threshold_is_the_moving_average_of_the_smallest_kept_activation():
    momentum = 0.3  # reached after 5 updates (5 / 15 > 0.3): both regimes are replayed
    arch, params, buffers, x = _setup("batchtopk", seed=5, threshold_momentum=momentum)
    trainer = _trainer(arch, params, buffers, Schedule(None, 8))
    P = {k: _np(v) for k, v in params.items()}
    threshold, n = -1.0, 0
    smallest_seen = []
    for b in range(8):
        batch = x[32 * b: 32 * (b + 1)]
        trainer.step(batch)
        a = np.maximum(_pre(P, _np(batch)), 0).ravel()
        kept = np.sort(a)[-3 * 32:]  # the k * B largest
        smallest = kept[kept > 0].min()
        beta = min(momentum, n / (n + 10))
        threshold = beta * threshold + (1 - beta) * smallest
        n += 1
        smallest_seen.append(smallest)
        assert float(trainer.buffers["threshold"]) == pytest.approx(threshold, rel=1e-14)
        assert float(trainer.buffers["threshold_updates"]) == n
    assert np.ptp(smallest_seen) > 0.05  # the batches differ: the average is not trivial


# ------------------------------------------------------------------ schedules
def _lr_formula(step, lr, total, warmup):
    """Linear warm-up over ``warmup`` steps, linear decay to 0 over the last 20%."""
    factor = min(1.0, (step + 1) / warmup)
    if total is not None and step >= 0.8 * total:
        factor *= max(0.0, (total - step) / (0.2 * total))
    return lr * factor


@pytest.mark.parametrize("total", [None, 60, 20000])
def test_learning_rate_schedule_step_by_step(total):
    arch, params, buffers, _ = _setup("relu", seed=6)
    warmup = 7 if total != 20000 else 1000
    trainer = SAETrainer(arch, params, buffers, lr=3e-3, schedule=Schedule(total, 10),
                         warmup_steps=warmup, dead_window=100, precision="float32")
    steps = range(total or 50)
    got = np.array([trainer.lr_at(s) for s in steps])
    want = np.array([_lr_formula(s, 3e-3, total, warmup) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
    assert got[warmup - 1] == 3e-3 and got[warmup - 2] < 3e-3


@pytest.mark.parametrize("name", ["relu", "gated", "jumprelu"])
@pytest.mark.parametrize("total, per_epoch, warmup", [(100, 10, 5), (1001, 50, 51),
                                                      (None, 13, 13)])
def test_penalty_coefficient_warms_up_linearly(name, total, per_epoch, warmup):
    arch = _setup(name, seed=0)[0]
    schedule = Schedule(total, per_epoch)
    assert schedule.warmup_steps == warmup  # ceil(5% of a fit), or a partial_fit's epoch
    for step in range(warmup + 5):
        assert arch.coefficients(step, schedule) == {
            "sparsity": pytest.approx(min(1.0, (step + 1) / warmup), rel=1e-15)}


@pytest.mark.parametrize("name", ["topk", "batchtopk", "matryoshka"])
def test_topk_family_has_no_penalty_coefficient(name):
    arch = _setup(name, seed=0)[0]
    assert arch.coefficients(0, WARMING) == {}


def test_fit_records_the_schedule_and_the_auto_settings():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1000, 8)).astype(np.float32)
    # 1000 rows in batches of 64: 16 steps an epoch, 5 epochs = 80 steps, warm-up
    # ceil(0.05 * 80) = 4 steps, decay over the last 16
    sae = SparseAutoencoder(n_components=48, k=4, batch_size=64, max_iter=5,
                            random_state=0, precision="float32").fit(X)
    lr = 2e-4 / math.sqrt(48 / 2**14)  # Gao et al.'s scaling law
    want = [_lr_formula(s, lr, 80, 4) for s in range(80)]
    np.testing.assert_allclose(sae.history_["step"]["lr"], want, rtol=1e-12)
    assert sae._train_state["dead_window"] == 1000  # "auto": min(10M, n_samples)
    relu = SparseAutoencoder(architecture="relu", n_components=16, batch_size=500,
                             max_iter=20, random_state=0, precision="float32").fit(X)
    want = [_lr_formula(s, 1e-3, 40, 2) for s in range(40)]
    np.testing.assert_allclose(relu.history_["step"]["lr"], want, rtol=1e-12)
    # partial_fit: warm-up over the first call's steps, no final decay
    part = SparseAutoencoder(n_components=48, k=4, batch_size=100, random_state=0,
                             learning_rate=0.01, dead_window=77, precision="float32")
    part.partial_fit(X).partial_fit(X)
    want = [0.01 * min(1.0, (s + 1) / 10) for s in range(20)]
    np.testing.assert_allclose(part.history_["step"]["lr"], want, rtol=1e-12)
    assert part._train_state["dead_window"] == 77


# ------------------------------------------------------------------ history_
def _record_steps(monkeypatch):
    """Wrap SAETrainer.step: each step's batch and the parameters it started from."""
    seen = []
    real = SAETrainer.step

    def step(self, x, *n_rows):
        seen.append((x.detach().clone(),
                     {k: _np(v) for k, v in {**self.params, **self.buffers}.items()}))
        return real(self, x, *n_rows)

    monkeypatch.setattr(SAETrainer, "step", step)
    return seen


@pytest.mark.parametrize("name", ["topk", "relu"])
def test_history_recomputed_from_the_batches(name, monkeypatch):
    X = make_sparse_superposition(700, N_FEATURES, 24, avg_active=3, random_state=0)
    seen = _record_steps(monkeypatch)
    dead_window, k, alpha = 150, 2, 0.5
    sae = SparseAutoencoder(architecture=name, n_components=N_COMPONENTS, k=k, alpha=alpha,
                            auxk_alpha=0.0, batch_size=100, max_iter=3,
                            dead_window=dead_window, random_state=0,
                            precision="float32").fit(X)
    hist = sae.history_["step"]
    n_steps = 21  # 7 steps an epoch
    assert len(seen) == sae.n_steps_ == n_steps
    warmup = math.ceil(0.05 * n_steps)
    rows_since = np.zeros(N_COMPONENTS)
    want = {key: [] for key in ("loss", "mse", "fvu", "l0", "dead_fraction", "grad_norm")}
    for step, (x, P) in enumerate(seen):
        X_b = _np(x)
        pre = _pre(P, X_b)
        if name == "topk":
            z = np.zeros_like(pre)
            top = np.argsort(-pre, axis=1)[:, :k]
            np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
        else:
            z = np.maximum(pre, 0)
        r = X_b - (z @ P["W_dec"] + P["b_dec"])
        mse = (r ** 2).sum() / len(X_b)
        penalty = 0.0
        if name == "relu":
            coef = min(1.0, (step + 1) / warmup)
            penalty = coef * alpha * (z * _decoder_norms(P)).sum(1).mean()
            assert hist["l1"][step] == pytest.approx(penalty, rel=2e-6)
        rows_since += len(X_b)
        rows_since[(z > 0).any(0)] = 0
        # the gradient of the loss, the decoder's projected on its rows' tangent planes
        t = {n: torch.tensor(P[n], requires_grad=True)
             for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        xt = torch.tensor(X_b)
        pre_t = (xt - t["b_dec"]) @ t["W_enc"].T + t["b_enc"]
        z_t = torch.relu(pre_t) * torch.tensor(z > 0)
        loss_t = (xt - (z_t @ t["W_dec"] + t["b_dec"])).pow(2).sum() / len(X_b)
        if name == "relu":
            loss_t = loss_t + coef * alpha * (z_t * t["W_dec"].norm(dim=-1)).sum(-1).mean()
        grads = dict(zip(t, torch.autograd.grad(loss_t, list(t.values()))))
        W = t["W_dec"].detach()
        grads["W_dec"] -= (grads["W_dec"] * W).sum(-1, keepdim=True) * W
        want["grad_norm"].append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values())))
        want["loss"].append(mse + penalty)
        want["mse"].append(mse)
        want["fvu"].append((r ** 2).sum() / ((X_b - X_b.mean(0)) ** 2).sum())
        want["l0"].append((z > 0).sum(1).mean())
        want["dead_fraction"].append((rows_since >= dead_window).mean())
    for key, values in want.items():
        np.testing.assert_allclose(hist[key], values, rtol=2e-6, err_msg=key)
    if name == "topk":  # latents died, and some fired again
        assert 0 < max(want["dead_fraction"]) < 1
        assert np.diff(want["dead_fraction"]).min() < 0
    # the per-epoch history: means of the steps of each epoch
    for key in want:
        np.testing.assert_allclose(sae.history_["epoch"][key],
                                   np.reshape(hist[key], (3, 7)).mean(1), rtol=1e-12)
    np.testing.assert_array_equal(hist["epoch"], np.repeat([0, 1, 2], 7))
    np.testing.assert_array_equal(sae.loss_curve_, hist["loss"])


# ------------------------------------------------------------------ normalize, init
def test_normalize_false_trains_on_the_raw_units():
    X = make_sparse_superposition(800, N_FEATURES, 24, random_state=1).astype(np.float32)
    kw = dict(n_components=N_COMPONENTS, k=3, batch_size=100, max_iter=2, random_state=0,
              precision="float32")
    normalised = SparseAutoencoder(**kw).fit(X)
    s = normalised.input_scale_
    assert abs(s - 1) > 0.5  # the data is far from E||x||^2 = n_features
    # what normalize=True trains on, given as raw data
    raw = SparseAutoencoder(normalize=False, **kw).fit((X * np.float32(s)))
    assert raw.input_scale_ == 1.0
    np.testing.assert_allclose(raw.history_["step"]["mse"], normalised.history_["step"]["mse"],
                               rtol=5e-6)  # observed: 1.7e-7
    np.testing.assert_allclose(raw.components_, normalised.components_, rtol=0, atol=2e-6)
    np.testing.assert_allclose(raw.decoder_bias_, s * normalised.decoder_bias_, rtol=0,
                               atol=1e-6)
    np.testing.assert_allclose(raw.transform(X[:50] * np.float32(s)),
                               s * normalised.transform(X[:50]), rtol=0, atol=5e-6)
    # on X itself the losses are in X's units: the first step's (same initial atoms and
    # rows) is 1 / s^2 of the normalised one
    plain = SparseAutoencoder(normalize=False, **kw).fit(X)
    assert plain.input_scale_ == 1.0
    ratio = plain.history_["step"]["mse"][0] / normalised.history_["step"]["mse"][0]
    assert ratio == pytest.approx(1 / s**2, rel=1e-5)


def test_init_random_gives_unit_gaussian_directions():
    X = make_sparse_superposition(500, N_FEATURES, 24, random_state=2)
    kw = dict(n_components=N_COMPONENTS, k=3, max_iter=0, random_state=0,
              precision="float32")
    sae = SparseAutoencoder(init="random", **kw).fit(X)
    # the recipe: a generator seeded from random_state, Gaussian rows, unit-normed
    g = make_generator(np.random.RandomState(0))
    W = torch.randn(N_COMPONENTS, N_FEATURES, generator=g, dtype=torch.float64).numpy()
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    np.testing.assert_allclose(sae.components_, W, rtol=0, atol=1e-6)
    # the encoder starts as the decoder's transpose, rescaled by one calibration factor
    ratio = sae.encoder_weights_ / sae.components_
    np.testing.assert_allclose(ratio, ratio[0, 0], rtol=1e-6)
    # "data" atoms are directions of centred training rows, random ones are not
    centred = X - sae.decoder_bias_
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    data = SparseAutoencoder(init="data", **kw).fit(X)
    assert np.abs(centred @ data.components_.T).max(0).min() > 1 - 1e-5
    assert np.abs(centred @ sae.components_.T).max(0).max() < 0.99
    # and it trains
    trained = SparseAutoencoder(init="random", **{**kw, "max_iter": 5, "batch_size": 50}).fit(X)
    assert trained.history_["epoch"]["mse"][-1] < 0.7 * trained.history_["epoch"]["mse"][0]
