"""The Triton kernels of sksae._accel.fused against torch's eager results.

Without a GPU they run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before Triton's first import); with one, compiled on CUDA. The
interpreter is slow per operation, so the shapes are small, ragged ones included.
"""

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

pytest.importorskip("triton")

from sksae import SparseAutoencoder
from sksae._accel import fused
from sksae._accel.select import dead_latent_picks, select_topk, topk
from sksae._accel.sparse import _transpose, as_pattern, gather_pre, sparse_decode
from sksae._accel.workspace import StepWorkspace
from sksae._sae_trainer import SAETrainer, init_parameters
from sksae.architectures import REGISTRY, Schedule

from _patterns import dense_codes, ragged_pattern

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOPK_FAMILY = sorted(name for name, cls in REGISTRY.items() if cls.uses_dead_latents)


@pytest.fixture
def kernels():
    """The launchers, forced on (on the CPU: interpreted)."""
    with fused.forced():
        K = fused.kernels_for(torch.zeros(1, device=DEVICE))
        assert K is not None, "the Triton kernels do not run here"
        yield K


def _same_selection(pre, got, k):
    """``got`` holds k distinct columns whose values are the row's k largest (ties either way)."""
    want = torch.topk(pre.float(), k, dim=-1).values.sort(-1).values
    have = pre.float().gather(1, got).sort(-1).values
    assert_close(have, want, rtol=0, atol=0)
    assert all(len(set(row.tolist())) == k for row in got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, F, k", [(3, 37, 5), (2, 8, 8), (2, 1100, 19), (1, 5, 1)])
def test_radix_topk_selects_the_topk_set(kernels, dtype, B, F, k):
    g = torch.Generator().manual_seed(F + k)
    pre = torch.randn(B, F, generator=g).to(DEVICE, dtype)
    idx, valid = kernels.radix_topk(pre, k)
    assert valid.all()
    _same_selection(pre, idx, k)
    assert (idx.diff(dim=-1) > 0).all()  # ascending columns


def test_radix_topk_ties_signs_and_infinities(kernels):
    """Among equal entries the earlier columns are kept; -0.0, inf and -inf order as floats."""
    pre = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5, 2.0],
                        [-0.0, 0.0, -1.0, float("-inf"), -2.0, -0.5],
                        [float("inf"), -3.0, 1e-30, -1e-30, 3.0, float("-inf")]], device=DEVICE)
    idx, _ = kernels.radix_topk(pre, 3)
    assert idx.tolist()[0] == [1, 2, 3]
    assert set(idx.tolist()[1]) == {0, 1, 5}
    assert idx.tolist()[2] == [0, 2, 4]


def test_radix_topk_over_dead_columns_only(kernels):
    """AuxK's picks: only the listed columns compete, their count read on the device."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(4, 60, generator=g).to(DEVICE)
    for n_dead, k in [(7, 5), (3, 5), (0, 2)]:
        dead = torch.zeros(60, dtype=torch.bool, device=DEVICE)
        dead[torch.randperm(60, generator=g)[:n_dead].to(DEVICE)] = True
        idx, valid = kernels.radix_topk(pre, k, fused.dead_columns(dead))
        assert (valid.sum(1) == min(n_dead, k)).all()
        picked = idx[valid].reshape(4, -1)
        assert dead[picked].all()
        if n_dead:
            masked = pre.masked_fill(~dead, float("-inf"))
            _same_selection(masked, picked, min(n_dead, k))


def test_selections_run_through_the_kernel(kernels):
    """select_topk, topk (values with their graph) and AuxK's picks take the radix selection."""
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(3, 40, generator=g).to(DEVICE).requires_grad_(True)
    assert_close(select_topk(pre.detach(), 4), kernels.radix_topk(pre.detach(), 4)[0])
    values, indices = topk(pre, 4)
    assert_close(values, pre.detach().gather(1, indices))
    values.sum().backward()
    assert pre.grad.sum() == 12 and set(pre.grad.unique().tolist()) == {0.0, 1.0}
    dead = torch.arange(40, device=DEVICE) % 3 == 0
    idx, valid = dead_latent_picks(pre.detach(), dead, 6)
    assert valid.all() and dead[idx].all()
    _same_selection(pre.detach().masked_fill(~dead, float("-inf")), idx, 6)


def test_selection_rule_keeps_the_faster(monkeypatch):
    """Outside forced(): each shape is timed once and the faster selection kept."""
    monkeypatch.setattr(fused, "_SELECTION_TIMINGS", {})
    monkeypatch.setattr(fused, "kernels_for", lambda *t: fused._launchers)
    pre = torch.randn(4, 50)
    # the kernel is timed first (3 s), torch.topk second (1 s): torch.topk is kept
    monkeypatch.setattr(fused, "time_call", _fake_timer([3.0, 1.0]))
    assert fused.selection_kernels(pre, 5) is None
    assert fused.selection_kernels(pre, 5) is None  # cached: not timed again
    monkeypatch.setattr(fused, "time_call", _fake_timer([1.0, 3.0]))
    assert fused.selection_kernels(pre, 6) is fused._launchers  # another shape: the kernel
    assert sorted(fused._SELECTION_TIMINGS.values()) == [False, True]
    assert fused.selection_kernels(pre.double(), 5) is None  # float64: no radix keys


def _fake_timer(times):
    times = list(times)

    def time_call(fn, device):
        return times.pop(0)  # raises once more timings are asked for than expected
    return time_call


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                        (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("D", [37, 5])
def test_passes_equal_eager(kernels, dtype, tol, D):
    """decode, dots and by_latent on a ragged pattern (an empty row, unused latents)."""
    B, F = 9, 23
    g = torch.Generator().manual_seed(D)
    pat = ragged_pattern(B, F, 6, DEVICE)
    vals = torch.randn(pat.indices.shape[0], generator=g).to(DEVICE, dtype)
    W = torch.randn(F, D, generator=g).to(DEVICE, dtype)
    A = torch.randn(B, D, generator=g).to(DEVICE, dtype)
    bias_D = torch.randn(D, generator=g).to(DEVICE, dtype)
    bias_F = torch.randn(F, generator=g).to(DEVICE, dtype)
    S = dense_codes(vals.double(), pat)
    Wd, Ad = W.double(), A.double()
    kw = {"rtol": tol, "atol": tol}

    assert_close(kernels.decode(pat, vals, W).double(), S @ Wd, **kw)
    assert_close(kernels.decode(pat, vals, W, bias_D).double(), S @ Wd + bias_D.double(), **kw)
    rows = pat.rows()
    want = (Ad[rows] * Wd[pat.indices]).sum(-1)
    assert_close(kernels.dots(pat, A, W).double(), want, **kw)
    assert_close(kernels.dots(pat, A, W, bias_F).double(), want + bias_F.double()[pat.indices],
                 **kw)

    out = torch.full((F, D), float("nan"), device=DEVICE, dtype=dtype)  # stale contents
    sums, sq = kernels.by_latent(_transpose(pat), vals, A, out, sums=True)
    ref = S.T @ Ad
    assert_close(out.double(), ref, **kw)
    assert_close(sums.double(), S.sum(0), **kw)
    assert_close(sq.double(), out.double().pow(2).sum(1), rtol=tol, atol=tol)
    dots = kernels.dots(pat, A, W)
    kernels.by_latent(_transpose(pat), vals, A, out, dots_N=dots, W_FD=W)
    radial = (ref * Wd).sum(1, keepdim=True)
    assert_close(out.double(), ref - radial * Wd, rtol=tol, atol=10 * tol)


def _params(D, F, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"W_enc": (F, D), "b_enc": (F,), "W_dec": (F, D), "b_dec": (D,)}
    return {k: torch.randn(*s, generator=g, dtype=dtype).to(DEVICE).requires_grad_(True)
            for k, s in shapes.items()}


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("ragged", [False, True])
def test_sparse_step_gradients_equal_dense_autograd(kernels, dtype, tol, ragged):
    """The sparse encode-decode through the kernels: outputs and every gradient as dense autograd."""
    B, D, F, k = 7, 6, 21, 3
    p = _params(D, F, dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, D, generator=g, dtype=dtype).to(DEVICE).requires_grad_(True)
    pre = torch.addmm(p["b_enc"], x - p["b_dec"], p["W_enc"].T)
    support = ragged_pattern(B, F, 5, DEVICE) if ragged else torch.topk(pre.detach(), k).indices

    def run(pre_used, sparse):
        vals = gather_pre(pre_used, support, x, p).clamp_min(0)
        if sparse:
            x_hat = sparse_decode(vals, support, p["W_dec"], p["b_dec"])
        else:
            codes = dense_codes(vals.reshape(-1), as_pattern(support, F))
            x_hat = codes @ p["W_dec"] + p["b_dec"]
        return x_hat, (x_hat - 0.5 * x).pow(2).sum()

    xs, ls = run(pre.detach(), True)
    xd, ld = run(pre, False)
    assert_close(xs, xd, rtol=tol, atol=tol)
    inputs = [x, *p.values()]
    for a, b in zip(torch.autograd.grad(ls, inputs), torch.autograd.grad(ld, inputs)):
        assert_close(a, b, rtol=tol, atol=10 * tol)


def test_decoder_gradient_projected_and_norms_noted(kernels):
    """With a workspace the decode's backward removes each decoder row's radial part in the
    kernel, and the written gradients' norms are noted for clipping."""
    B, D, F, k = 6, 5, 17, 3
    p = _params(D, F, torch.float64, seed=5)
    with torch.no_grad():
        p["W_dec"] /= p["W_dec"].norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, D, generator=g, dtype=torch.float64).to(DEVICE)
    idx = torch.topk(torch.randn(B, F, generator=g), k).indices.to(DEVICE)
    vals = torch.rand(B, k, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    ws = StepWorkspace()
    with ws.projecting(p["W_dec"]) as rows, ws.noting_norms():
        loss = (sparse_decode(vals, idx, p["W_dec"], p["b_dec"], ws=ws) - x).pow(2).sum()
        (g_W,) = torch.autograd.grad(loss, [p["W_dec"]])
    assert rows.projected == 1
    W = p["W_dec"].detach()
    assert (g_W * W).sum(1).abs().max() < 1e-12
    dense = vals.detach().new_zeros(B, F).scatter(1, idx, vals.detach())
    full = dense.T @ (2 * (dense @ W + p["b_dec"].detach() - x))
    assert_close(g_W, full - (full * W).sum(1, keepdim=True) * W)
    assert_close(ws.known_norm(g_W), g_W.norm())


@contextlib.contextmanager
def _sparse_kernels(name):
    cls = REGISTRY[name]
    previous, cls.kernels = cls.kernels, "sparse"
    try:
        yield
    finally:
        cls.kernels = previous


def _trainer(name, n_dead):
    """A TopK-family trainer on the sparse kernels, latents 0..n_dead-1 dead (lr 0: one step
    leaves the gradients to compare)."""
    D, F, B = 6, 40, 16
    arch = SparseAutoencoder(architecture=name, k=3, auxk_alpha=1 / 32)._architecture(F, D)
    arch.kernels = "sparse"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, D, generator=g, dtype=torch.float64)
    params = init_parameters(x, F, "random", g, torch.float32, "cpu")
    buffers = {k: v.float() for k, v in arch.extra_buffers(params).items()}
    trainer = SAETrainer(arch, params, buffers, lr=0.0, schedule=Schedule(None, 1),
                         warmup_steps=1, dead_window=10, precision="float32")
    trainer.rows_since_fired[:n_dead] = 100
    return trainer, x[:B].float()


@pytest.mark.parametrize("name", TOPK_FAMILY)
@pytest.mark.parametrize("n_dead", [0, 30])
def test_training_step_through_the_kernels_equals_the_cpu_sparse_path(name, n_dead):
    """One training step of each TopK-family architecture (selection, AuxK over the dead
    latents, decode, both backwards, projection, clipping) through the Triton kernels gives
    the metrics and gradients of the CPU's sparse path."""
    if DEVICE != "cpu":
        pytest.skip("compares with the CPU's sparse path: a CPU (interpreted) check")
    plain, x = _trainer(name, n_dead)
    ours, _ = _trainer(name, n_dead)
    want = plain.step(x).as_dict()
    with fused.forced():
        got = ours.step(x).as_dict()
    assert set(got) == set(want)
    for key in want:
        assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    assert (float(got["auxk"]) > 0) == (n_dead > 0)
    for key, param in plain.params.items():
        assert_close(ours.params[key].grad, param.grad, rtol=1e-5, atol=1e-6, msg=key)


def test_fit_through_the_kernels_equals_the_cpu_sparse_path():
    """A whole TopK fit, initialisation and dead latents included, ends where the CPU's ends."""
    if DEVICE != "cpu":
        pytest.skip("compares with the CPU's sparse path: a CPU (interpreted) check")
    rng = np.random.RandomState(0)
    X = rng.randn(64, 6).astype(np.float32)
    # float32 selection: a bf16 product ties often, and torch.topk (the CPU path at this
    # shape) breaks ties differently from the radix selection
    kw = {"n_components": 24, "k": 2, "batch_size": 16, "max_iter": 2, "dead_window": 8,
          "random_state": 0, "device": "cpu", "precision": "float32"}

    def fit(force):
        with _sparse_kernels("topk"), (fused.forced() if force else contextlib.nullcontext()):
            return SparseAutoencoder(**kw).fit(X)

    plain, ours = fit(False), fit(True)
    # the sums run in other orders, and Adam turns a rounding-level gradient of a rarely used
    # latent into a step of about +-lr (5e-3 here): equal to well within one step
    moved = np.abs(plain.components_ - SparseAutoencoder(**{**kw, "max_iter": 1}).fit(X)
                   .components_).max()
    assert moved > 1e-2  # the last epoch alone moves the atoms 10x the tolerance
    assert_close(ours.components_, plain.components_, rtol=0, atol=1e-3)
    assert_close(ours.encoder_weights_, plain.encoder_weights_, rtol=0, atol=1e-3)
    assert ours.n_iter_ == plain.n_iter_ == 2


def _trainer_timing_its_kernels():
    """A TopK trainer whose first step times its kernels (the accelerator's branch, opened
    by hand on the CPU), a batch, and a copy of its parameters before any step."""
    if DEVICE != "cpu":
        pytest.skip("runs the kernels on CPU tensors: a CPU (interpreted) check")
    trainer, x = _trainer("topk", 0)
    trainer.arch.kernels = "auto"
    trainer._kernels_open = True
    return trainer, x, {k: v.detach().clone() for k, v in trainer.params.items()}


@pytest.mark.parametrize("winner", ["sparse", "dense"])
def test_auto_kernels_are_the_faster_step(monkeypatch, winner):
    """On an accelerator the trainer times the sparse and the dense step at its first batch
    and keeps the faster for the fit, without changing any state (here on the CPU, with the
    accelerator's branch opened by hand and the timings decided by the test)."""
    trainer, x, before = _trainer_timing_its_kernels()
    calls = []
    real = fused.fastest

    def decided(options, device):
        for fn in options.values():  # both steps run (and must run cleanly)
            fn()
        calls.append(sorted(options))
        return winner, {name: float(name != winner) for name in options}

    monkeypatch.setattr(fused, "fastest", decided)
    with fused.forced():
        trainer.step(x)
        trainer.step(x)
    assert calls == [["dense", "sparse"]]  # once per fit
    assert trainer.arch.kernels == winner
    assert trainer.kernel_timings[winner] == 0.0
    assert trainer.step_count == 2
    reference, _ = _trainer("topk", 0)
    reference.arch.kernels = "dense"
    reference.step(x)
    reference.step(x)
    for key, param in trainer.params.items():  # lr 0: the timing runs left no trace
        assert_close(param.detach(), before[key])
        assert_close(param.grad, reference.params[key].grad, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(fused, "fastest", real)


def test_fastest_times_each_option_and_survives_a_failing_one():
    with pytest.warns(RuntimeWarning, match="'broken' failed while being timed"):
        name, times = fused.fastest({"broken": lambda: 1 / 0, "works": lambda: None}, "cpu")
    assert name == "works" and times["broken"] == float("inf") and times["works"] >= 0


_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16",
          torch.float16: "fp16", torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}


@pytest.fixture(scope="module")
def launched():
    """Every distinct launch of the tests below, recorded from runs of the launchers."""
    if DEVICE != "cpu":
        pytest.skip("on a GPU the kernels compile and run in the tests above")
    seen = []
    previous, fused._LAUNCHES = fused._LAUNCHES, seen
    try:
        with fused.forced():
            K = fused.kernels_for(torch.zeros(1))
            g = torch.Generator().manual_seed(0)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                pre = torch.randn(3, 40, generator=g).to(dtype)
                K.radix_topk(pre, 4)
                K.radix_topk(pre, 4, fused.dead_columns(torch.arange(40) % 3 == 0))
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                pat = as_pattern(torch.topk(torch.randn(5, 30, generator=g), 3).indices, 30)
                vals = torch.randn(15, generator=g).to(dtype)
                W, A = (torch.randn(n, 7, generator=g).to(dtype) for n in (30, 5))
                K.decode(pat, vals, W, W[0])
                dots = K.dots(pat, A, W, W[:, 0])
                K.by_latent(_transpose(pat), vals, A, torch.empty(30, 7, dtype=dtype), dots, W,
                            sums=True)
                K.by_latent(_transpose(pat), vals, A, torch.empty(30, 7, dtype=dtype))
    finally:
        fused._LAUNCHES = previous
    distinct = {}
    for kernel, args, constexprs in seen:
        signature = {}
        for name, value in zip(kernel.arg_names, args):
            signature[name] = ("*" + _TYPES[value.dtype] if isinstance(value, torch.Tensor)
                               else "i64")
        constants = {name: (str(value) if not isinstance(value, (bool, int)) else value)
                     for name, value in constexprs.items()}  # ACC: a dtype, as its name
        distinct[repr((kernel.fn.__name__, signature, constants))] = (
            kernel.fn.__name__, signature, constants)
    return list(distinct.values())


_COMPILE = """
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sksae._accel import _triton_kernels as K
arch = int(sys.argv[1])
for name, signature, constants in json.load(sys.stdin):
    dtypes = {"fp32": tl.float32, "fp64": tl.float64}
    constants = {k: dtypes[v] if isinstance(v, str) else v for k, v in constants.items()}
    full = {**signature, **{k: "constexpr" for k in constants}}
    out = triton.compile(ASTSource(fn=getattr(K, name), signature=full, constexprs=constants),
                         target=GPUTarget("cuda", arch, 32))
    assert out.asm["cubin"], name
    print("compiled", name)
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_cuda(launched, arch):
    """What the tests launch in the interpreter also compiles to a cubin for an A100 (sm_80)
    and an H100 (sm_90): Triton's compiler needs no GPU, and it rejects what the
    interpreter lets pass (a global that is not constexpr, say). In a fresh process, as
    the kernels of this one are the interpreter's."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE, str(arch)], input=json.dumps(launched),
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = run.stdout.split()
    assert compiled.count("compiled") == len(launched)
    assert set(compiled) - {"compiled"} == {"radix_topk_kernel", "decode_kernel", "dots_kernel",
                                            "by_latent_kernel"}


_VALUES = [float("-inf"), -2.0, -0.5, -0.0, 0.0, 0.25, 1.0, 3.0, float("inf")]


@settings(max_examples=15)
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_radix_topk_is_the_stable_topk(kernels, data, dtype):
    """Random rows full of ties, zeros of both signs and infinities: the kernel takes exactly
    the k largest, the earlier column first among equals (a stable sort's first k), over
    all columns or over a random set of columns."""
    B = data.draw(st.integers(1, 3))
    F = data.draw(st.integers(1, 40))
    k = data.draw(st.integers(1, F))
    rows = data.draw(st.lists(st.lists(st.sampled_from(_VALUES), min_size=F, max_size=F),
                              min_size=B, max_size=B))
    pre = torch.tensor(rows).to(DEVICE, dtype)
    values = pre.float().cpu().numpy()

    def stable_top(row, columns):
        order = sorted(columns, key=lambda j: (-row[j], j))  # larger first, then earlier
        return sorted(order[:k])

    idx, valid = kernels.radix_topk(pre, k)
    assert valid.all()
    assert idx.tolist() == [stable_top(values[b], range(F)) for b in range(B)]

    dead = torch.tensor(data.draw(st.lists(st.booleans(), min_size=F, max_size=F)),
                        device=DEVICE)
    idx, valid = kernels.radix_topk(pre, k, fused.dead_columns(dead))
    columns = dead.nonzero().flatten().tolist()
    for b in range(B):
        want = stable_top(values[b], columns)
        assert idx[b][valid[b]].tolist() == want
        assert valid[b].sum() == min(k, len(columns))


def test_decoder_gradient_with_constant_values(kernels):
    """Values that need no gradient (and no projection): the decoder's gradient alone."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(20, 5, generator=g).to(DEVICE).requires_grad_(True)
    idx = torch.topk(torch.randn(4, 20, generator=g), 3).indices.to(DEVICE)
    v = torch.rand(4, 3, generator=g).to(DEVICE)
    (got,) = torch.autograd.grad(sparse_decode(v, idx, W).pow(2).sum(), [W])
    S = torch.zeros(4, 20, device=DEVICE).scatter(1, idx, v)
    (want,) = torch.autograd.grad((S @ W).pow(2).sum(), [W])
    assert_close(got, want)


def test_an_interrupted_kernel_timing_changes_nothing(monkeypatch):
    """Ctrl-C (or an error) while the first batch times the two steps: the architecture's
    kernels are back at "auto", no parameter or optimizer state moved, and no step counted."""
    trainer, x, before = _trainer_timing_its_kernels()

    def interrupted(options, device):
        options["sparse"]()
        raise KeyboardInterrupt

    monkeypatch.setattr(fused, "fastest", interrupted)
    with fused.forced(), pytest.raises(KeyboardInterrupt):
        trainer.step(x)
    assert trainer.arch.kernels == "auto"
    assert trainer.step_count == 0
    for state in trainer.optimizer.state.values():  # Adam as constructed: no step taken
        assert float(state["step"]) == 0
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    for key, param in trainer.params.items():
        assert torch.equal(param.detach(), before[key])
