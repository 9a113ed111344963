"""sksae._accel.adam.FusedAdam: torch's fused CPU Adam kernel without torch.optim."""

import subprocess
import sys

import pytest
import torch

from sksae._accel.adam import FusedAdam, fused_cpu_kernel

pytestmark = pytest.mark.skipif(not fused_cpu_kernel(),
                                reason="this torch has no fused CPU Adam kernel (torch < 2.4)")


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)
            for shape in [(7, 5), (5,), (3, 2)]]


def _run(opt, params, steps, seed=1, lrs=None):
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = (lrs or [1e-2])[i % len(lrs or [1e-2])]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_bits_as_torch_fused_adam(dtype):
    ours, ref = _params(dtype), _params(dtype)
    _run(FusedAdam(ours, lr=1e-2), ours, 12, lrs=[1e-2, 3e-3, 0.0])
    _run(torch.optim.Adam(ref, lr=1e-2, fused=True), ref, 12, lrs=[1e-2, 3e-3, 0.0])
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_scale_is_clipping_in_the_same_pass(dtype):
    """step(grad_scale=s) updates as if the gradients were first multiplied by 1/s,
    and leaves them divided (as clip_grad_norm_ would have)."""
    folded, clipped = _params(dtype), _params(dtype)
    opt_f, opt_c = FusedAdam(folded, lr=1e-2), FusedAdam(clipped, lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=g, dtype=dtype) for p in folded]
        scale = 2.5 + step
        for p, grad in zip(folded, grads):
            p.grad = grad.clone()
        for p, grad in zip(clipped, grads):
            p.grad = grad * (1 / scale)
        opt_f.step(grad_scale=scale)
        opt_c.step()
        for a, b in zip(folded, clipped):
            torch.testing.assert_close(a.grad, b.grad)
            torch.testing.assert_close(a, b)
    assert not torch.equal(folded[0], _params(dtype)[0])  # it did update


@pytest.mark.parametrize("direction", ["torch to ours", "ours to torch"])
def test_state_moves_between_implementations(direction):
    first, second, ref = _params(torch.float32), _params(torch.float32), _params(torch.float32)
    make_first, make_second = ((lambda p: torch.optim.Adam(p, lr=1e-2, fused=True)),
                               (lambda p: FusedAdam(p, lr=1e-2)))
    if direction == "ours to torch":
        make_first, make_second = make_second, make_first
    opt = make_first(first)
    _run(opt, first, 5)
    with torch.no_grad():
        for p, q in zip(second, first):
            p.copy_(q)
    resumed = make_second(second)
    resumed.load_state_dict(opt.state_dict())
    _run(resumed, second, 4, seed=2)
    # reference: one implementation throughout
    opt_ref = torch.optim.Adam(ref, lr=1e-2, fused=True)
    _run(opt_ref, ref, 5)
    _run(opt_ref, ref, 4, seed=2)
    for a, b in zip(second, ref):
        assert torch.equal(a, b)


def test_zero_grad_and_parameters_without_gradient():
    params = _params(torch.float32)
    opt = FusedAdam(params, lr=0.1)
    params[0].grad = torch.ones_like(params[0])
    before = [p.detach().clone() for p in params]
    opt.step()  # only the tensor with a gradient moves
    assert not torch.equal(params[0], before[0])
    assert torch.equal(params[1], before[1]) and params[1] not in opt.state
    opt.zero_grad(set_to_none=False)
    assert torch.equal(params[0].grad, torch.zeros_like(params[0]))
    opt.zero_grad()
    assert params[0].grad is None


def test_load_rejects_another_number_of_parameters():
    opt = FusedAdam(_params(torch.float32), lr=0.1)
    other = FusedAdam(_params(torch.float32)[:2], lr=0.1)
    with pytest.raises(ValueError, match="number of parameters"):
        opt.load_state_dict(other.state_dict())


def test_a_cpu_fit_does_not_import_torch_dynamo():
    code = ("import sys, numpy as np\n"
            "from sksae import SparseAutoencoder\n"
            "X = np.random.RandomState(0).randn(200, 8).astype(np.float32)\n"
            "SparseAutoencoder(16, k=2, max_iter=2, device='cpu', random_state=0).fit(X)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_the_trainer_folds_clipping_into_the_update():
    """A CPU step whose gradient norm exceeds clip_norm: FusedAdam divides the gradients
    in its own pass, and the step equals clipping first with torch.optim.Adam."""
    from sksae._sae_trainer import SAETrainer, init_parameters
    from sksae.architectures import REGISTRY, Schedule

    def trainer(fold):
        g = torch.Generator().manual_seed(0)
        x = 30 * torch.randn(64, 12, generator=g)  # large inputs: a gradient norm >> 1
        params = init_parameters(x, 48, "random", g, torch.float32, "cpu")
        arch = REGISTRY["topk"]({"k": 4, "auxk_alpha": 0.0}, 48, 12)
        t = SAETrainer(arch, params, {}, lr=1e-3, schedule=Schedule(None, 1),
                       warmup_steps=1, dead_window=10, precision="float32")
        if not fold:
            t.optimizer = torch.optim.Adam(list(t.params.values()), lr=1e-3, fused=True)
        return t, x

    (folded, x), (plain, _) = trainer(True), trainer(False)
    assert isinstance(folded.optimizer, FusedAdam)
    folded.step(x)
    plain.step(x)
    grads = [p.grad for p in folded.params.values()]
    assert float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))) == \
        pytest.approx(folded.clip_norm, rel=1e-4)
    for key, p in folded.params.items():
        torch.testing.assert_close(p, plain.params[key])
        torch.testing.assert_close(p.grad, plain.params[key].grad)


def test_state_created_up_front_gives_the_same_updates():
    eager, lazy = _params(torch.float32), _params(torch.float32)
    opt = FusedAdam(eager, lr=1e-2)
    opt.init_state()
    assert len(opt.state) == 3 and all(int(s["step"]) == 0 for s in opt.state.values())
    moments = [opt.state[p]["exp_avg"] for p in eager]
    _run(opt, eager, 5)
    _run(FusedAdam(lazy, lr=1e-2), lazy, 5)
    for a, b in zip(eager, lazy):
        assert torch.equal(a, b)
    # updated in place: the moments created up front are the ones in use
    assert all(m is opt.state[p]["exp_avg"] for m, p in zip(moments, eager))
    # the moments of a tensor never updated stay zero and load into torch.optim.Adam
    extra = torch.zeros(4, requires_grad=True)
    opt2 = FusedAdam([*eager, extra], lr=1e-2)
    opt2.init_state()
    ref = torch.optim.Adam([*eager, extra], lr=1e-2)
    ref.load_state_dict(opt2.state_dict())
    assert int(ref.state[extra]["step"]) == 0


def test_the_cpu_trainer_sets_up_adam_state_and_gradient_buffers():
    from sksae._sae_trainer import SAETrainer, init_parameters
    from sksae.architectures import REGISTRY, Schedule

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=g)
    params = init_parameters(x, 48, "random", g, torch.float32, "cpu")
    arch = REGISTRY["topk"]({"k": 4, "auxk_alpha": 0.0}, 48, 12)
    arch.kernels = "sparse"  # the kernels that write into lent buffers
    t = SAETrainer(arch, params, {}, lr=1e-3, schedule=Schedule(None, 1),
                   warmup_steps=1, dead_window=10, precision="float32")
    assert set(t.optimizer.state) == set(t.params.values())
    # addresses only: a reference held here would make autograd copy a lent buffer
    lent = {k: p.grad.data_ptr() for k, p in t.params.items() if p.dim() == 2}
    assert lent.keys() == {"W_enc", "W_dec"}
    t.step(x)
    # the first step's (F, D) gradients were written into the buffers made at set-up
    assert {k: t.params[k].grad.data_ptr() for k in lent} == lent
