"""The CPU step's thread policy: one thread, more where measured faster, same results."""

import numpy as np
import pytest
import torch

from sksae import SparseAutoencoder, _threads
from sksae._threads import ThreadChooser, parallel, serial


def _feed(chooser, n, times):
    """Run ``chooser`` for len(times) calls; ``times[option]`` gives each call's duration."""
    picks = []
    for _ in range(times["calls"]):
        option = chooser.pick(n)
        picks.append(option)
        chooser.record(option, times[option])
    return picks


def test_chooser_measures_both_then_keeps_the_faster():
    chooser = ThreadChooser(min_explore=4, max_explore=16)
    picks = _feed(chooser, 2, {1: 1.0, 2: 5.0, "calls": 40})
    assert picks[:2] == [2, 1]
    assert chooser.choice == 1
    # the slower option is retried, less and less often while it stays slower
    trials = [i for i, p in enumerate(picks) if p == 2][1:]
    gaps = np.diff(trials)
    assert len(trials) >= 2 and gaps[-1] > gaps[0]
    assert picks.count(1) > 3 * picks.count(2)


def test_chooser_follows_a_change_of_load():
    chooser = ThreadChooser(min_explore=4, max_explore=8)
    _feed(chooser, 2, {1: 1.0, 2: 5.0, "calls": 30})
    assert chooser.choice == 1
    # the machine becomes quiet: two threads are now faster, and get picked
    picks = _feed(chooser, 2, {1: 1.0, 2: 0.4, "calls": 30})
    assert chooser.choice == 2
    assert picks[-10:].count(2) >= 8


def test_parallel_restores_one_thread_inside_serial_and_is_inert_outside():
    n = torch.get_num_threads()
    x = torch.zeros(3)
    torch.set_num_threads(2)
    try:
        with parallel(x, "test site outside"):
            assert torch.get_num_threads() == 2
        assert ("test site outside", (3,), x.dtype) not in _threads._choosers
        with serial(x):
            assert torch.get_num_threads() == 1
            for _ in range(3):
                with parallel(x, "test site"):
                    assert torch.get_num_threads() in (1, 2)
                assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        assert _threads._choosers[("test site", (3,), x.dtype)].seconds.keys() == {1, 2}
    finally:
        torch.set_num_threads(n)


def test_a_probe_measures_the_option_not_in_use():
    """With a probe, the other option is timed on the probe (scaled by its fraction)
    and the block itself always runs on the running choice."""
    import time

    n = torch.get_num_threads()
    x = torch.zeros(5)
    probes, blocks = [], []

    def probe():
        probes.append(torch.get_num_threads())
        time.sleep(0.02)  # one thread looks slow: 0.02 s for a quarter of the work

    torch.set_num_threads(2)
    try:
        with serial(x):
            for _ in range(12):
                with parallel(x, "probed site", probe, 0.25):
                    blocks.append(torch.get_num_threads())
        chooser = _threads._choosers[("probed site", (5,), x.dtype)]
    finally:
        torch.set_num_threads(n)
    assert blocks == [2] * 12  # never the slow option
    assert probes and set(probes) == {1}
    assert len(probes) < 4  # the first measurement and the trials only
    assert chooser.seconds[1] >= 0.08  # the probe's time divided by its fraction
    assert chooser.choice == 2


def test_row_probe_covers_a_share_of_the_rows():
    seen = []
    probe, fraction = _threads.row_probe(seen.append, 100, share=8)
    probe()
    assert seen == [12] and fraction == 0.12
    probe, fraction = _threads.row_probe(seen.append, 3, share=8)
    probe()
    assert seen[-1] == 1 and fraction == 1 / 3


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_thread_count_does_not_change_the_fit(architecture):
    # with two threads the chooser may route any call either way; the bits must not move
    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, 24)).astype(np.float32)
    params = dict(n_components=512, k=4, architecture=architecture, batch_size=64,
                  max_iter=2, random_state=0, device="cpu")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = SparseAutoencoder(**params).fit(X)
        torch.set_num_threads(2)
        two = SparseAutoencoder(**params).fit(X)
    finally:
        torch.set_num_threads(n)
    np.testing.assert_array_equal(one.components_, two.components_)
    np.testing.assert_array_equal(one.encoder_weights_, two.encoder_weights_)


@pytest.mark.parametrize("algorithm", ["lasso_lars", "omp"])
def test_thread_count_does_not_change_dictionary_learning(algorithm):
    from sksae import DictionaryLearnerGPU

    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 16))
    params = dict(n_components=24, alpha=0.5, batch_size=32, max_iter=2, random_state=0,
                  transform_algorithm=algorithm, transform_n_nonzero_coefs=3, device="cpu")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = DictionaryLearnerGPU(**params).fit(X)
        codes_one = one.transform(X)
        torch.set_num_threads(2)
        two = DictionaryLearnerGPU(**params).fit(X)
        codes_two = two.transform(X)
    finally:
        torch.set_num_threads(n)
    np.testing.assert_array_equal(one.components_, two.components_)
    np.testing.assert_array_equal(codes_one, codes_two)
