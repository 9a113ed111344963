"""Training under faults (issue 19): divergence is detected, failures leave no trace.

A non-finite loss, gradient norm or parameter stops ``fit``/``partial_fit`` with
:class:`sksae.TrainingDivergedError`, and any exception (``KeyboardInterrupt``
included) leaves the estimator exactly as before the call: public attributes,
private training state and random state, compared bit for bit.
"""

import copy
import doctest
import pickle

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

import sksae
from sksae import DictionaryLearnerGPU, SparseAutoencoder, TrainingDivergedError


@pytest.fixture(scope="module")
def X():
    return np.random.RandomState(0).randn(400, 8)


def sae(**kw):
    params = dict(n_components=16, k=2, max_iter=2, batch_size=64, device="cpu",
                  precision="float32", random_state=0)
    return SparseAutoencoder(**{**params, **kw})


def dl(**kw):
    params = dict(n_components=6, alpha=0.1, max_iter=2, batch_size=64, device="cpu",
                  random_state=0)
    return DictionaryLearnerGPU(**{**params, **kw})


class Raise:
    """A callback that raises ``exc`` at its ``after``-th call."""

    def __init__(self, after, exc=KeyboardInterrupt):
        self.after, self.exc, self.calls = after, exc, 0

    def __call__(self, env):
        self.calls += 1
        if self.calls >= self.after:
            raise self.exc("raised by the test's callback")


# -- exact comparison of an estimator's state ------------------------------------------
def state(est):
    """A deep copy of everything an estimator holds (RandomStates as their states).

    Constructor parameters (a callback, ...) are kept as their identity.
    """
    def freeze(k, v):
        if isinstance(v, np.random.RandomState):
            return ("RandomState", v.get_state())
        if not (k.startswith("_") or k.endswith("_")):
            return ("parameter", id(v))
        return copy.deepcopy(v)

    return {k: freeze(k, v) for k, v in vars(est).items()}


def assert_same(a, b, path="estimator"):
    """``a`` and ``b`` equal bit for bit (NaNs at the same places), recursively."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, sorted(a), sorted(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(
            a.nan_to_num(), b.nan_to_num()), path
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(a, b, err_msg=path)
    else:
        assert type(a) is type(b) and (a == b or a is b or (a != a and b != b)), (path, a, b)


def assert_unchanged(before, est):
    assert_same(before, state(est))


# -- divergence ----------------------------------------------------------------------
def test_error_class():
    assert issubclass(TrainingDivergedError, FloatingPointError)
    assert issubclass(TrainingDivergedError, ArithmeticError)
    assert issubclass(TrainingDivergedError, ValueError)
    assert sksae.TrainingDivergedError is TrainingDivergedError
    exc = pickle.loads(pickle.dumps(TrainingDivergedError("m", step=3, metric="loss",
                                                          value=float("nan"))))
    assert (str(exc), exc.step, exc.metric, np.isnan(exc.value)) == ("m", 3, "loss", True)
    from sksae import _base

    result = doctest.testmod(_base, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_sae_huge_learning_rate_raises_and_stays_unfitted(X):
    model = sae(learning_rate=1e30)
    before = state(model)
    with pytest.raises(TrainingDivergedError,
                       match=r"diverged at step \d+ of this call .*Lower learning_rate") as info:
        model.fit(X)
    assert info.value.metric in ("loss", "grad_norm") and info.value.step >= 1
    assert_unchanged(before, model)
    with pytest.raises(NotFittedError, match="is not fitted yet"):
        check_is_fitted(model)


def test_sae_infinite_gradient_norm_raises_not_zero_division(X):
    # float32 squares of 1e30 overflow: an infinite gradient norm at the first step
    model = sae(normalize=False)
    with pytest.raises(TrainingDivergedError,
                       match=r"diverged at step 1 of this call \(epoch 1\).*set normalize=True"):
        model.fit(X * 1e30)
    with pytest.raises(NotFittedError, match="is not fitted yet"):
        check_is_fitted(model)


@pytest.mark.parametrize("normalize", [True, False])
def test_sae_diverging_partial_fit_leaves_good_model_unchanged(X, normalize):
    model = sae(normalize=normalize).fit(X)
    reference = copy.deepcopy(model)
    before = state(model)
    with pytest.raises(TrainingDivergedError, match="diverged at step 1 of this call"):
        model.partial_fit(X * 1e30)
    assert_unchanged(before, model)
    with pytest.raises(TrainingDivergedError, match=r"diverged at step \d+ of this call"):
        model.fit(X * 1e30) if not normalize else model.set_params(
            learning_rate=1e30).fit(X)
    model.set_params(learning_rate="auto")
    assert_unchanged(before, model)
    # and it trains on as if nothing had happened
    np.testing.assert_array_equal(model.partial_fit(X).components_,
                                  reference.partial_fit(X).components_)


def test_sae_finite_fit_records_gradient_norm(X):
    model = sae().fit(X)
    norms = model.history_["step"]["grad_norm"]
    assert norms.shape == (model.n_steps_,) and np.isfinite(norms).all() and (norms > 0).all()
    assert "grad_norm" in model.history_["epoch"]


def test_dl_float32_overflow_raises_and_stays_unfitted(X):
    model = dl()
    before = state(model)
    with pytest.raises(TrainingDivergedError,
                       match=r"DictionaryLearnerGPU (diverged at step 1 of this call|could "
                             r"not initialise: the initial dictionary is not finite).*Scale X"):
        model.fit((X * 1e18).astype(np.float32))
    assert_unchanged(before, model)
    with pytest.raises(NotFittedError, match="is not fitted yet"):
        check_is_fitted(model)


def test_dl_diverging_calls_leave_good_model_unchanged(X):
    model = dl().fit(X)
    reference = copy.deepcopy(model)
    before = state(model)
    with pytest.raises(TrainingDivergedError, match="diverged at step 1 of this call"):
        model.partial_fit(X * 1e300)
    assert_unchanged(before, model)
    with pytest.raises(TrainingDivergedError, match="diverged at step|could not initialise"):
        model.fit((X * 1e18).astype(np.float32))
    assert_unchanged(before, model)
    np.testing.assert_array_equal(model.partial_fit(X[:64]).components_,
                                  reference.partial_fit(X[:64]).components_)


# -- interruptions ---------------------------------------------------------------------
@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_sae_interrupted_call_on_fitted_model_changes_nothing(X, exc, method):
    model = sae().fit(X)
    before = state(model)
    model.set_params(callback=Raise(3, exc))
    with pytest.raises(exc, match="raised by the test's callback"):
        getattr(model, method)(X)
    model.set_params(callback=None)
    before["callback"] = ("parameter", id(None))
    assert_unchanged(before, model)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_interrupted_first_call_leaves_estimator_unfitted(X, exc, method):
    for model in (sae(callback=Raise(3, exc)), dl(callback=Raise(3, exc))):
        if isinstance(model, DictionaryLearnerGPU) and method == "partial_fit":
            continue  # one step and no callback: see test_dl_interrupted_partial_fit...
        before = state(model)
        with pytest.raises(exc, match="raised by the test's callback"):
            getattr(model, method)(X)
        assert_unchanged(before, model)
        with pytest.raises(NotFittedError, match="is not fitted yet"):
            check_is_fitted(model)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_dl_interrupted_fit_on_fitted_model_changes_nothing(X, exc):
    model = dl().fit(X)
    before = state(model)
    model.set_params(callback=Raise(2, exc))
    with pytest.raises(exc, match="raised by the test's callback"):
        model.fit(X[::-1].copy())
    model.set_params(callback=None)
    before["callback"] = ("parameter", id(None))
    assert_unchanged(before, model)


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_dl_interrupted_partial_fit_changes_nothing(X, monkeypatch, exc, first):
    """Interrupted after the statistics and the dictionary moved and the RNG drew."""
    import sksae._dict_learning as module

    model = dl(random_state=np.random.RandomState(0))
    if not first:
        model.fit(X)
    before = state(model)
    update = module.update_dictionary

    def interrupted(D, A, B, Xb, random_state, **kw):
        update(D, A, B, Xb, random_state, **kw)
        random_state.random_sample(3)
        raise exc("interrupted in the dictionary update")

    monkeypatch.setattr(module, "update_dictionary", interrupted)
    with pytest.raises(exc, match="interrupted in the dictionary update"):
        model.partial_fit(X[:64])
    assert_unchanged(before, model)
    if first:
        with pytest.raises(NotFittedError, match="is not fitted yet"):
            check_is_fitted(model)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, ValueError])
@pytest.mark.parametrize("make", [sae, dl])
def test_refit_with_other_width_interrupted_keeps_old_width(X, exc, make):
    model = make().fit(X)
    before = state(model)
    model.set_params(callback=Raise(2, exc))
    with pytest.raises(exc, match="raised by the test's callback"):
        model.fit(X[:, :5])
    model.set_params(callback=None)
    before["callback"] = ("parameter", id(None))
    assert_unchanged(before, model)
    assert model.n_features_in_ == 8 and model.components_.shape[1] == 8
    model.transform(X[:3])


@pytest.mark.parametrize("optimizer", ["FusedAdam", "torch.optim.Adam"])
def test_failed_partial_fit_does_not_move_training_state(X, monkeypatch, optimizer):
    """fit; partial_fit raising mid-way; partial_fit == fit; partial_fit, bit for bit.

    ``torch.optim.Adam`` keeps the moments it loads when their device and dtype
    fit, then updates them in place: the trainer must give it copies.
    """
    if optimizer == "torch.optim.Adam":
        import sksae._accel.adam

        monkeypatch.setattr(sksae._accel.adam, "fused_cpu_kernel", lambda: False)
    clean = sae().fit(X)
    faulty = sae().fit(X)
    faulty.set_params(callback=Raise(4, RuntimeError))
    with pytest.raises(RuntimeError, match="raised by the test's callback"):
        faulty.partial_fit(X)
    faulty.set_params(callback=None)
    clean.partial_fit(X)
    faulty.partial_fit(X)
    for name in ("components_", "encoder_weights_", "encoder_bias_", "decoder_bias_",
                 "loss_curve_"):
        np.testing.assert_array_equal(getattr(faulty, name), getattr(clean, name))
    assert_same(clean._train_state, faulty._train_state)
    assert faulty.n_steps_ == clean.n_steps_


def test_failed_warm_start_fit_does_not_move_training_state(X):
    clean = sae(warm_start=True).fit(X)
    faulty = sae(warm_start=True).fit(X)
    faulty.set_params(callback=Raise(5, RuntimeError))
    with pytest.raises(RuntimeError, match="raised by the test's callback"):
        faulty.fit(X)
    faulty.set_params(callback=None)
    np.testing.assert_array_equal(faulty.fit(X).components_, clean.fit(X).components_)


@pytest.mark.parametrize("make", [sae, dl])
def test_failed_fit_rewinds_a_random_state_instance(X, make):
    rng = np.random.RandomState(7)
    model = make(random_state=rng, callback=Raise(2))
    with pytest.raises(KeyboardInterrupt, match="raised by the test's callback"):
        model.fit(X)
    np.testing.assert_array_equal(rng.get_state()[1], np.random.RandomState(7).get_state()[1])
    model.set_params(callback=None)
    np.testing.assert_array_equal(
        model.fit(X).components_,
        make(random_state=np.random.RandomState(7)).fit(X).components_)


# -- the pieces ------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_clip_and_step_refuses_non_finite_norm_before_stepping(fused):
    from sksae._accel.adam import FusedAdam, clip_and_step, fused_cpu_kernel

    if fused and not fused_cpu_kernel():
        pytest.skip("no fused CPU Adam in this torch")
    p = torch.ones(4, 3, requires_grad=True)
    q = torch.zeros(3, requires_grad=True)
    opt = FusedAdam([p, q], lr=0.1) if fused else torch.optim.Adam([p, q], lr=0.1)
    p.grad = torch.ones(4, 3)
    q.grad = torch.tensor([1.0, float("inf"), 0.0])
    with pytest.raises(TrainingDivergedError, match="gradient norm is inf") as info:
        clip_and_step(opt, [p, q], 1.0)
    assert info.value.metric == "grad_norm"
    assert torch.equal(p.detach(), torch.ones(4, 3)) and torch.equal(q.detach(), torch.zeros(3))
    assert not opt.state or all(float(s["step"]) == 0 for s in opt.state.values())
    q.grad = torch.tensor([3.0, 4.0, 0.0])
    norm = clip_and_step(opt, [p, q], 1.0)
    assert float(norm) == pytest.approx(np.sqrt(12 + 25))


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("grad_size", [0.01, 10.0])
def test_device_clipping_is_the_fused_adam_scale(grad_size, capturable, device):
    """Off the CPU, clipping is fused Adam's gradient scale: the same steps as clip-then-step."""
    from sksae._accel import adam

    g = torch.Generator().manual_seed(0)
    grads = [(torch.randn(50, 8, generator=g) * grad_size).to(device),
             (torch.randn(8, generator=g) * grad_size).to(device)]
    start = [torch.randn(50, 8, generator=g).to(device), torch.randn(8, generator=g).to(device)]
    clipped, scaled = ([t.clone().requires_grad_() for t in start] for _ in range(2))
    lr = (lambda: torch.tensor(0.01, device=device)) if capturable else (lambda: 0.01)
    opts = [torch.optim.Adam(ps, lr=lr(), fused=True, capturable=capturable)
            for ps in (clipped, scaled)]
    assert adam._folds_scale(opts[1])
    for _ in range(3):
        for ps in (clipped, scaled):
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
        norm = adam.total_norm([p.grad for p in clipped])
        adam._clip_with_norm(clipped, 1.0, norm)
        opts[0].step()
        if device == "cpu":
            adam._step_scaled(opts[1], 1.0, adam.total_norm([p.grad for p in scaled]))
        else:
            returned = adam.clip_and_step(opts[1], scaled, 1.0)
            torch.testing.assert_close(returned, norm)
    for a, b in zip(clipped, scaled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not hasattr(opts[1], "grad_scale") and not hasattr(opts[1], "found_inf")


def test_device_clipping_skips_the_step_of_a_non_finite_norm(device):
    """A non-finite norm leaves parameters, moments and step counts as they were."""
    from sksae._accel import adam

    ps = [torch.ones(4, 3, device=device, requires_grad=True),
          torch.zeros(3, device=device, requires_grad=True)]
    opt = torch.optim.Adam(ps, lr=0.1, fused=True)
    for p in ps:
        p.grad = torch.ones_like(p)
    adam._step_scaled(opt, 1.0, adam.total_norm([p.grad for p in ps]))
    before = [p.detach().clone() for p in ps]
    moments = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(ps)}
    ps[1].grad = torch.tensor([1.0, float("nan"), 0.0], device=device)
    ps[0].grad = torch.ones_like(ps[0])
    adam._step_scaled(opt, 1.0, adam.total_norm([p.grad for p in ps]))
    for i, p in enumerate(ps):
        assert torch.equal(p.detach(), before[i])
        for k, v in moments[i].items():
            assert torch.equal(opt.state[p][k], v), k


def test_loop_checks_metrics_when_it_reads_them():
    from sksae._engine import BatchSource, run_minibatch_loop

    Xs = np.zeros((40, 2), dtype=np.float32)
    gen = torch.Generator().manual_seed(0)
    seen = []

    def step(batch, i, total):
        seen.append(i)
        return {"loss": torch.tensor(float("nan") if i == 5 else 1.0),
                "grad_norm": torch.tensor(float("inf") if i == 6 else 1.0)}

    source = BatchSource(Xs, 4, torch.device("cpu"), torch.float32, gen)
    with pytest.raises(TrainingDivergedError,
                       match=r"fit diverged at step 6 of this call \(epoch 1\): the loss is "
                             r"nan\. Try this\.") as info:
        run_minibatch_loop(step, source, max_epochs=2, sync_every=4,
                           finite=("loss", "grad_norm"), divergence_hint="Try this.")
    assert (info.value.step, info.value.metric) == (6, "loss")
    assert seen == list(range(8))  # read after 4 steps: no read in between
    seen.clear()
    with pytest.raises(TrainingDivergedError, match=r"step 4 .*parameters are no longer finite"):
        run_minibatch_loop(lambda b, i, t: {"loss": 1.0}, source, max_epochs=1,
                           sync_every=4, state_finite=lambda: False)
