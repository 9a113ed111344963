"""Device-or-host placement of the sequential parts of DictionaryLearnerGPU's step.

On the CPU there is one option and :func:`run_faster` runs it. The choice on an
accelerator is exercised here by treating the CPU as one (``is_accelerator``
patched): the host copies are then plain copies, and both options must give
the same result.
"""

import types

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from sksae._accel import placement as _placement
from sksae._online import update_dictionary
from sksae._accel.placement import Chooser, run_faster


def _feed(chooser, times):
    """Run ``chooser`` for times["calls"] calls; ``times[option]`` gives each call's duration."""
    picks = []
    for _ in range(times["calls"]):
        option = chooser.pick("a", "b")
        picks.append(option)
        chooser.record(option, times[option])
    return picks


def test_chooser_measures_both_then_keeps_the_faster():
    chooser = Chooser(min_explore=4, max_explore=16)
    picks = _feed(chooser, {"a": 5.0, "b": 1.0, "calls": 40})
    assert picks[:2] == ["a", "b"]
    assert chooser.choice == "b"
    # the slower option is retried, less and less often while it stays slower
    trials = [i for i, p in enumerate(picks) if p == "a"][1:]
    gaps = np.diff(trials)
    assert len(trials) >= 2 and gaps[-1] > gaps[0]
    assert picks.count("b") > 3 * picks.count("a")


def test_chooser_follows_a_change_of_load():
    chooser = Chooser(min_explore=4, max_explore=8)
    _feed(chooser, {"a": 5.0, "b": 1.0, "calls": 30})
    assert chooser.choice == "b"
    picks = _feed(chooser, {"a": 0.4, "b": 1.0, "calls": 30})
    assert chooser.choice == "a"
    assert picks[-10:].count("a") >= 8


def test_cpu_runs_the_device_function_unmeasured():
    x = torch.zeros(4, 3)
    calls = []
    out = run_faster("test cpu site", x, lambda: calls.append("device") or 1,
                     lambda: calls.append("host") or 2)
    assert out == 1 and calls == ["device"]
    assert not any(key[0] == "test cpu site" for key in _placement._choosers)


class FakeClock:
    """``time.perf_counter`` of the placement module: advanced only by the options run."""

    def __init__(self):
        self.now = 0.0

    def read(self):
        return self.now

    def option(self, seconds, calls, label):
        def run():
            self.now += seconds
            calls.append(label)
            return "same"
        return run


def test_accelerator_calls_go_where_measured_faster(monkeypatch):
    monkeypatch.setattr(_placement, "is_accelerator", lambda device: True)
    clock = FakeClock()
    monkeypatch.setattr(_placement, "time", types.SimpleNamespace(perf_counter=clock.read))
    x = torch.zeros(200, 3)
    calls = []
    slow, fast = clock.option(0.004, calls, "device"), clock.option(0.001, calls, "host")
    outs = [run_faster("test site", x, slow, fast) for _ in range(40)]
    assert set(outs) == {"same"}
    # both measured first, then the faster; the slower one is retried after 8 calls of
    # the faster, then after 16 (Chooser's min_explore, doubled when the trial confirms)
    trials = [i for i, c in enumerate(calls) if c == "device"]
    assert trials == [0, 9, 26]
    chooser = _placement._choosers[("test site", (256, 3), x.dtype, "cpu")]
    assert chooser.choice == "host" and chooser.seconds == pytest.approx(
        {"device": 0.004, "host": 0.001}, rel=1e-12)
    # rows are bucketed: 200 and 256 rows share the measurements
    assert ("test site", (256, 3), x.dtype, "cpu") in _placement._choosers


def test_settled_choice_runs_without_synchronising(monkeypatch):
    """Once the choice has settled, only the calls that feed a trial wait for the device."""
    monkeypatch.setattr(_placement, "is_accelerator", lambda device: True)
    syncs = []
    monkeypatch.setattr(_placement, "synchronize", lambda device: syncs.append(device))
    clock = FakeClock()
    monkeypatch.setattr(_placement, "time", types.SimpleNamespace(perf_counter=clock.read))
    x = torch.zeros(16, 3)
    calls = []
    slow, fast = clock.option(0.003, calls, "device"), clock.option(0.0001, calls, "host")
    for _ in range(200):
        run_faster("test sync site", x, slow, fast)
    chooser = _placement._choosers[("test sync site", (16, 3), x.dtype, "cpu")]
    assert chooser.choice == "host"
    # trials of "device" after 8, 16, 32 and 64 calls of "host" (the next after 128)
    assert [i for i, c in enumerate(calls) if c == "device"] == [0, 9, 26, 59, 124]
    # timed: the first two calls, each trial (4) and the call just before it (4), where
    # timing every call would be 200; each timed call synchronises before and after
    assert len(syncs) == 2 * (2 + 4 + 4)


def test_dictionary_sweep_on_host_copies_equals_in_place(monkeypatch):
    monkeypatch.setattr(_placement, "is_accelerator", lambda device: True)
    _placement._choosers.clear()
    rng = np.random.RandomState(0)
    X = torch.as_tensor(rng.randn(50, 6))
    code = torch.as_tensor(rng.randn(50, 10) * (rng.rand(50, 10) < 0.4))
    code[:, 3] = 0  # atom 3 unused: resampled from X
    A, B = code.T @ code / 50, X.T @ code / 50
    D0 = torch.as_tensor(rng.randn(10, 6))
    results = []
    for _ in range(2):  # the first call runs "device" (in place), the second "host"
        D = D0.clone()
        n_dead = update_dictionary(D, A, B, X, np.random.RandomState(1), block=4)
        results.append(D)
        assert n_dead == 1
    assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)
    key = next(k for k in _placement._choosers if k[0] == "dictionary update")
    assert _placement._choosers[key].seconds.keys() == {"device", "host"}


def test_coder_on_host_copies_equals_in_place(monkeypatch):
    from sksae.coders import encode

    monkeypatch.setattr(_placement, "is_accelerator", lambda device: True)
    _placement._choosers.clear()
    rng = np.random.RandomState(0)
    D = torch.as_tensor(rng.randn(12, 8))
    D /= D.norm(dim=1, keepdim=True)
    X = torch.as_tensor(rng.randn(30, 8))
    for algorithm, kw in [("lasso_lars", {"alpha": 0.1}), ("lasso_cd", {"alpha": 0.1}),
                          ("omp", {"n_nonzero_coefs": 3}), ("lars", {"n_nonzero_coefs": 3})]:
        first, ok1 = encode(X, D, algorithm, **kw)   # measured "device" first
        second, ok2 = encode(X, D, algorithm, **kw)  # then "host"
        assert ok1 == ok2
        assert_close(first, second, rtol=1e-12, atol=1e-12)
        key = next(k for k in _placement._choosers if k[0] == f"sparse coding ({algorithm})")
        assert _placement._choosers[key].seconds.keys() == {"device", "host"}


def test_dictionary_sweep_numpy_views_equal_tensors(monkeypatch):
    # The one sweep runs on numpy views on the CPU and on the tensors on an
    # accelerator (here: the CPU treated as one); both give the same atoms,
    # resampled and clipped (positive) ones included.
    rng = np.random.RandomState(0)
    X = torch.as_tensor(rng.randn(60, 7))
    code = torch.as_tensor(np.abs(rng.randn(60, 11)) * (rng.rand(60, 11) < 0.5))
    code[:, 5] = 0  # atom 5 unused: resampled from X
    A, B = code.T @ code / 60, X.T @ code / 60
    D0 = torch.as_tensor(rng.randn(11, 7))
    for positive in (False, True):
        results = []
        for accelerator in (False, True):
            monkeypatch.setattr(_placement, "is_accelerator", lambda device: accelerator)
            assert isinstance(_placement.array_views(D0)[0], torch.Tensor) is accelerator
            D = D0.clone()
            assert update_dictionary(D, A, B, X, np.random.RandomState(1), positive=positive,
                                     block=4) == 1
            results.append(D)
        assert not torch.equal(results[0], D0)
        assert (torch.linalg.vector_norm(results[0], dim=1) <= 1 + 1e-12).all()
        if positive:
            assert (results[0] >= 0).all()
        assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)


def test_row_block_splits_rows_on_the_cpu_only(monkeypatch):
    x = torch.zeros(5000, 3)
    assert _placement.row_block(x, 8 * 1024) == 512
    assert _placement.row_block(x, 8 * 2**20) == 256  # at least min_rows
    monkeypatch.setattr(_placement, "is_accelerator", lambda device: True)
    assert _placement.row_block(x, 8 * 1024) == 5000
