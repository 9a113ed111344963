"""The training step recorded as a CUDA graph, and resuming across step kinds.

The recorded step (``SAETrainer.cuda_graphs``) exists on CUDA only; the tests
that record one run where CUDA is present (the GPU checks,
``benchmarks/run_gpu_checks.sh``). The state-portability tests run everywhere:
a state saved by a recorded step (capturable fused Adam, device learning rate)
must resume in an eager CPU step, and the other way round.
"""

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from sksae import SparseAutoencoder
from sksae._accel import adam as _adam
from sksae._sae_trainer import SAETrainer, init_parameters
from sksae.architectures import REGISTRY, PenaltyWarmup, Schedule

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA graphs need a CUDA device")

HPARAMS = {"k": 4, "alpha": 1e-3, "threshold_momentum": 0.9, "bandwidth": 0.05,
           "threshold_init": 0.1, "l0_coefficient": 1e-3, "auxk_alpha": 1 / 32}


class _PenaltyWarmup10(Schedule):
    """A schedule whose penalty warm-up lasts 10 steps whatever the fit's length, so that
    the coefficients still change during the recorded steps (replays from step 4 on)."""

    __slots__ = ()

    @property
    def warmup_steps(self):
        return 10


def _trainer(name, device, graphs, monkeypatch, total_steps=40):
    D, F = 16, 64
    # every hyperparameter the architecture declares (Matryoshka: its default prefixes)
    arch = SparseAutoencoder(architecture=name, **HPARAMS)._architecture(F, D)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, D, generator=g, dtype=torch.float64)
    params = init_parameters(x, F, "data", g, torch.float32, device)
    params.update({k: v.to(device) for k, v in arch.extra_parameters(params).items()})
    buffers = {k: v.to(device) for k, v in arch.extra_buffers(params).items()}
    monkeypatch.setattr(SAETrainer, "cuda_graphs", graphs)
    # penalties: a warm-up of 10 steps; 16 batches an epoch
    schedule = (_PenaltyWarmup10 if isinstance(arch, PenaltyWarmup) else Schedule)(
        total_steps, 16)
    trainer = SAETrainer(arch, params, buffers, lr=1e-3, schedule=schedule,
                         warmup_steps=5, dead_window=64)
    batches = x.to(device, torch.float32).split(32)  # 16 batches of 32 rows
    return trainer, batches


@needs_cuda
@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_sparse_step_is_recorded(name, monkeypatch):
    """The sparse (Triton) step records as a CUDA graph too: nothing in it reads the host
    (BatchTopK's ragged pattern counts its rows on the device), and it equals eager."""
    pytest.importorskip("triton")
    runs = []
    for graphs in (False, True):
        trainer, batches = _trainer(name, "cuda", graphs, monkeypatch)
        trainer.arch.kernels = "sparse"
        trainer._kernels_open = False
        runs.append((trainer, _run(trainer, batches, 12)))
    (eager, a), (recorded, b) = runs
    assert recorded.graph_error is None and recorded._graphs
    for ma, mb in zip(a, b):
        for key in ma:
            assert abs(ma[key] - mb[key]) <= 1e-3 * (1 + abs(ma[key])), key


def _run(trainer, batches, n_steps):
    history = []
    for i in range(n_steps):
        metrics = trainer.step(batches[i % len(batches)]).as_dict()
        history.append({k: float(v) for k, v in metrics.items()})
    return history


@needs_cuda
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_recorded_step_matches_eager(name, monkeypatch):
    eager, batches = _trainer(name, "cuda", False, monkeypatch)
    recorded, _ = _trainer(name, "cuda", True, monkeypatch)
    a = _run(eager, batches, 40)
    b = _run(recorded, batches, 40)
    assert recorded.graph_error is None
    assert recorded._graphs  # steps 4.. were replays
    assert [sorted(m) for m in a] == [sorted(m) for m in b]
    # the same kernels: equal up to the rounding of reordered reductions
    for ma, mb in zip(a, b):
        for key in ma:
            assert abs(ma[key] - mb[key]) <= 1e-3 * (1 + abs(ma[key])), key
    for key, value in eager.params.items():
        assert_close(recorded.params[key], value, rtol=1e-3, atol=1e-4)
    assert recorded.current_lr == eager.current_lr
    assert recorded.step_count == eager.step_count == 40


@needs_cuda
def test_recording_is_not_disturbed_by_another_thread_pinning_memory():
    """The read-ahead thread pins the next buffer while the training thread may be recording
    its step: the recording checks its own thread only (capture_error_mode="thread_local")."""
    import threading

    from sksae._accel.device import capture_graph

    stop, errors = threading.Event(), []

    def pin():
        try:
            while not stop.is_set():
                torch.empty(1 << 20, pin_memory=True)
                torch.empty(1 << 12 + len(errors), pin_memory=True)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=pin)
    thread.start()
    x = torch.randn(256, 256, device="cuda")
    try:
        for _ in range(20):
            graph, out = capture_graph(lambda: x @ x, "cuda")
            graph.replay()
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert_close(out, x @ x)


@needs_cuda
def test_recorded_step_runs_odd_batches_eagerly(monkeypatch):
    trainer, batches = _trainer("topk", "cuda", True, monkeypatch)
    _run(trainer, batches, 6)
    assert trainer._graphs
    short = batches[0][:7]
    metrics = trainer.step(short)  # another shape: the eager step
    assert np.isfinite(float(metrics.loss))
    assert all(g["x"].shape[0] == 32 for g in trainer._graphs.values())
    assert trainer.step_count == 7


@needs_cuda
def test_fit_on_cuda_resumes_on_cpu():
    X = np.random.RandomState(0).randn(600, 12).astype(np.float32)
    sae = SparseAutoencoder(24, k=3, batch_size=50, max_iter=2, device="cuda",
                            random_state=0, precision="float32").fit(X)
    sae.set_params(device="cpu").partial_fit(X)
    assert np.isfinite(sae.components_).all()
    assert sae.n_steps_ > 24


def _state_from_recorded_step(trainer):
    """What a recorded step's trainer saves: capturable fused Adam, a tensor learning rate."""
    state = trainer.state_dict()
    for group in state["optimizer"]["param_groups"]:
        group.update(capturable=True, fused=True, lr=torch.tensor(float(group["lr"])))
    return state


def test_state_of_a_recorded_step_resumes_eagerly(monkeypatch):
    first, batches = _trainer("topk", "cpu", False, monkeypatch, total_steps=None)
    _run(first, batches, 5)
    state = _state_from_recorded_step(first)
    second, _ = _trainer("topk", "cpu", False, monkeypatch, total_steps=None)
    second.load_state_dict(state)
    group = second.optimizer.param_groups[0]
    assert not group["capturable"] and isinstance(group["lr"], float)
    assert group["fused"] == second.optimizer.defaults["fused"]
    _run(second, batches[5:], 3)  # eager steps from the loaded moments
    _run(first, batches[5:], 3)
    for key, value in first.params.items():
        assert_close(second.params[key], value)


def test_schedules_fill_device_scalars_in_place(monkeypatch):
    trainer, _ = _trainer("relu", "cpu", False, monkeypatch, total_steps=100)
    lr_tensor, coef = torch.zeros(()), torch.zeros(())
    trainer.optimizer.param_groups[0]["lr"] = lr_tensor
    trainer.coef["sparsity"] = coef
    trainer._set_schedules(2)
    assert trainer.optimizer.param_groups[0]["lr"] is lr_tensor
    assert trainer.coef["sparsity"] is coef
    assert float(lr_tensor) == pytest.approx(trainer.lr_at(2)) == trainer.current_lr
    expected = trainer.arch.coefficients(2, trainer.schedule)["sparsity"]
    assert float(coef) == pytest.approx(expected) == pytest.approx(0.3)


def test_clipping_without_the_torch_2_6_helpers(monkeypatch):
    """torch 2.2-2.5 have no get_total_norm / clip_grads_with_norm_: same clipping."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 3, dtype=torch.float64, generator=g) * 3,
             torch.randn(7, dtype=torch.float64, generator=g)]
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    expected_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    for p, g in zip(params, grads):
        p.grad = g.clone()
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)
    monkeypatch.delattr(torch.nn.utils, "clip_grads_with_norm_", raising=False)
    norm = _adam.total_norm([p.grad for p in params])
    assert_close(norm, expected_norm)
    _adam._clip_with_norm(params, 1.0, norm)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
    assert clipped == pytest.approx(1.0, rel=1e-5)
    for p, g in zip(params, grads):
        assert_close(p.grad, g * (1.0 / (expected_norm + 1e-6)))


@pytest.mark.parametrize("graphs", [False, True])
def test_auxk_skipped_only_while_no_latent_can_be_dead(graphs, device, monkeypatch):
    """The host-side bound skips AuxK exactly when its loss would be zero, same training."""
    if graphs and device != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    trainer, batches = _trainer("topk", device, graphs, monkeypatch, total_steps=None)
    always, _ = _trainer("topk", device, graphs, monkeypatch, total_steps=None)
    always._dead_may_exist = lambda n_rows: True
    decide = trainer._dead_may_exist
    decisions = []

    def checked(n_rows):
        dead = bool((trainer.rows_since_fired >= trainer.dead_window).any())
        work = decide(n_rows)
        assert work or not dead  # skipped only when nothing is dead
        decisions.append(work)
        return work

    trainer._dead_may_exist = checked
    a, b = _run(trainer, batches, 40), _run(always, batches, 40)
    # dead_window=64 with 32-row batches: the first steps cannot have dead latents
    assert decisions[:2] == [False, False] and True in decisions
    for ma, mb in zip(a, b):
        assert ma == mb if not graphs else ma.keys() == mb.keys()
    for key, value in always.params.items():
        if graphs:  # the recorded steps may order reductions apart
            assert_close(trainer.params[key], value, rtol=1e-3, atol=1e-4)
        else:
            assert torch.equal(trainer.params[key], value), key


def test_auxk_bound_is_read_again_after_loading_a_state(monkeypatch):
    trainer, batches = _trainer("topk", "cpu", False, monkeypatch, total_steps=None)
    _run(trainer, batches, 1)
    assert trainer._dead_bound.largest == 0 and trainer._dead_bound.rows_since == 32
    state = trainer.state_dict()
    state["rows_since_fired"].fill_(1000.0)  # every latent dead
    trainer.load_state_dict(state)
    assert trainer._dead_may_exist(32)


class _SlowReading:
    """A HostReading whose copy lands after ``delay`` queries (as on a busy GPU)."""

    delay = 2
    waits = 0

    def __init__(self, t):
        self._value, self._queries = float(t), 0

    def value(self, wait=False):
        self._queries += 1
        if wait and self._queries <= self.delay:
            type(self).waits += 1
            return self._value
        return self._value if self._queries > self.delay else None


def test_dead_bound_is_exact_with_readings_that_land_late(monkeypatch):
    from sksae import _sae_trainer

    monkeypatch.setattr(_sae_trainer, "HostReading", _SlowReading)
    counts = torch.zeros(8, dtype=torch.float64)
    bound = _sae_trainer.DeadLatentBound(counts, dead_window=100, reread_steps=5)
    answers = []
    for step in range(14):
        answers.append(bound.may_be_dead(step, 10))
        assert answers[-1] == bool((counts >= 100).any())  # exact at every step here
        counts.add_(10)  # nothing fires: every count grows by the batch's 10 rows
        bound.advance(10)
    assert answers == [False] * 10 + [True] * 4


def test_dead_bound_rereads_while_latents_are_dead():
    from sksae._sae_trainer import DeadLatentBound

    counts = torch.tensor([500.0, 0.0], dtype=torch.float64)
    bound = DeadLatentBound(counts, dead_window=100, reread_steps=3)
    assert bound.may_be_dead(0, 1) and bound.reread_at == 3
    counts.zero_()  # the dead latent fired (resampled, say)
    assert bound.may_be_dead(1, 1) and bound.may_be_dead(2, 1)  # not read before step 3
    assert not bound.may_be_dead(3, 1)


def test_dead_bound_reads_ahead_and_waits_only_at_the_start(monkeypatch):
    """Readings go out ahead of the bound running out: after the first, none is waited for."""
    from sksae import _sae_trainer

    readings = []

    class CountedReading(_SlowReading):
        waits = 0

        def __init__(self, t):
            super().__init__(t)
            readings.append(self._value)

    monkeypatch.setattr(_sae_trainer, "HostReading", CountedReading)
    counts = torch.zeros(4, dtype=torch.float64)
    bound = _sae_trainer.DeadLatentBound(counts, dead_window=1000, reread_steps=5,
                                         lookahead_steps=4)
    for step in range(200):
        assert not bound.may_be_dead(step, 10)
        counts.add_(10).clamp_(max=500)  # latents fire often enough: counts stay at 500 or less
        bound.advance(10)
    assert CountedReading.waits == 1 and len(readings) > 3


def test_a_synchronous_dead_bound_reads_only_when_the_bound_runs_out(monkeypatch):
    # data-parallel and latent-sharded ranks wait for each reading (a collective in the
    # sharded trainer): reading ahead gained nothing and read every step while the largest
    # count was within the lookahead of the window
    from sksae import _sae_trainer

    reads = []
    real = _sae_trainer.HostReading
    monkeypatch.setattr(_sae_trainer, "HostReading", lambda t: reads.append(1) or real(t))
    counts = torch.zeros(4, dtype=torch.float64)
    bound = _sae_trainer.DeadLatentBound(counts, dead_window=1000, reread_steps=5,
                                         synchronous=True)
    for step in range(300):
        assert not bound.may_be_dead(step, 10)
        counts.add_(10).clamp_(max=950)  # latents fire just often enough: 50 rows from dead
        bound.advance(10)
    # at step 0 (largest 0), at step 100 when those 1000 rows of slack are spent (largest
    # 950), then whenever 50 rows are: every 5th step. Reading 32 steps ahead read at every
    # step from step 68 on
    assert len(reads) == 1 + 1 + 39
