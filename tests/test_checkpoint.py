"""Checkpoints of a fit in progress: resume to the bit, refuse a foreign one, atomic files."""

import numpy as np
import pytest

from sksae import SparseAutoencoder
from sksae._checkpoint import CHECKPOINT_FILE, parse_every, read_checkpoint, write_checkpoint


def data(n=900, d=12, seed=0):
    rng = np.random.RandomState(seed)
    return (rng.randn(n, d) @ rng.randn(d, d)).astype(np.float32)


def interrupt_at(step, exc=KeyboardInterrupt):
    def callback(loc):
        if loc["n_steps"] == step:
            raise exc()
    return callback


PARAMS = dict(n_components=32, k=3, batch_size=16, max_iter=3, random_state=0)


@pytest.mark.parametrize("params", [
    dict(architecture="topk", resample_dead=40, dead_window=100),
    dict(architecture="batchtopk", tol=1e-9, max_no_improvement=30),
    dict(architecture="jumprelu", shuffle=False),
], ids=["topk-resample", "batchtopk-early-stopping", "jumprelu-in-order"])
def test_a_resumed_fit_equals_the_uninterrupted_one(tmp_path, params):
    X = data()
    reference = SparseAutoencoder(**PARAMS, **params).fit(X)
    interrupted = SparseAutoencoder(**PARAMS, **params, checkpoint_dir=tmp_path,
                                    checkpoint_every=25, callback=interrupt_at(117))
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(X)
    assert not hasattr(interrupted, "components_")  # the estimator is as it was
    saved = read_checkpoint(tmp_path)
    assert saved["loop"]["n_steps"] == 100 and not saved["complete"]
    resumed = SparseAutoencoder(**PARAMS, **params, checkpoint_dir=tmp_path,
                                checkpoint_every=25).fit(X)
    np.testing.assert_array_equal(resumed.components_, reference.components_)
    np.testing.assert_array_equal(resumed.encoder_weights_, reference.encoder_weights_)
    for key, values in reference.history_["step"].items():
        np.testing.assert_array_equal(resumed.history_["step"][key], values, err_msg=key)
    assert resumed.n_steps_ == reference.n_steps_
    assert read_checkpoint(tmp_path)["complete"]


def test_a_finished_checkpoint_starts_a_new_fit(tmp_path):
    X = data()
    first = SparseAutoencoder(**PARAMS, checkpoint_dir=tmp_path, checkpoint_every=30).fit(X)
    again = SparseAutoencoder(**PARAMS, checkpoint_dir=tmp_path, checkpoint_every=30).fit(X)
    assert again.n_steps_ == first.n_steps_
    np.testing.assert_array_equal(again.components_, first.components_)


def test_the_checkpoint_of_other_parameters_is_refused(tmp_path):
    X = data()
    with pytest.raises(KeyboardInterrupt):
        SparseAutoencoder(**PARAMS, checkpoint_dir=tmp_path, checkpoint_every=10,
                          callback=interrupt_at(15)).fit(X)
    other = SparseAutoencoder(**{**PARAMS, "k": 4}, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="other k"):
        other.fit(X)
    with pytest.raises(ValueError, match="other n_samples"):
        SparseAutoencoder(**PARAMS, checkpoint_dir=tmp_path).fit(X[:500])
    assert not hasattr(other, "components_")


def test_a_wall_clock_interval_writes_checkpoints(tmp_path):
    X = data()
    with pytest.raises(RuntimeError):
        SparseAutoencoder(**PARAMS, checkpoint_dir=tmp_path, checkpoint_every="0.001s",
                          callback=interrupt_at(50, RuntimeError)).fit(X)
    # written every step that came 1 ms after the previous writing: lately, not at a step count
    assert 40 <= read_checkpoint(tmp_path)["loop"]["n_steps"] <= 49


@pytest.mark.parametrize("value, expected", [
    (5, ("steps", 5)), ("90s", ("seconds", 90.0)), ("15min", ("seconds", 900.0)),
    ("2h", ("seconds", 7200.0)), ("0.5 s", ("seconds", 0.5))])
def test_parse_every(value, expected):
    assert parse_every(value) == expected


@pytest.mark.parametrize("value", [0, -3, "", "10", "5 days", "0s", True, 1.5])
def test_parse_every_refuses(value):
    with pytest.raises(ValueError, match="checkpoint_every"):
        parse_every(value)


def test_a_bad_checkpoint_every_is_refused_before_training(tmp_path):
    model = SparseAutoencoder(**PARAMS, checkpoint_dir=tmp_path, checkpoint_every="often")
    with pytest.raises(ValueError, match="checkpoint_every"):
        model.fit(data())
    assert not hasattr(model, "components_")
    assert not (tmp_path / CHECKPOINT_FILE).exists()


def test_round_trip_keeps_types(tmp_path):
    import torch

    state = {"a": torch.arange(5.0), 3: {"b": (1, 2.5, None, "x")},
             "rng": ("MT19937", np.arange(4, dtype=np.uint32), 1, 0, 0.0), "l": [True, 7]}
    write_checkpoint(tmp_path, state)
    back = read_checkpoint(tmp_path)
    assert torch.equal(back["a"], state["a"]) and back[3] == state[3]
    assert back["rng"][0] == "MT19937" and back["rng"][1].dtype == np.uint32
    assert back["l"] == [True, 7]


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a checkpoint sksae can read"):
        read_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="not a checkpoint"):
        SparseAutoencoder(**PARAMS, checkpoint_dir=tmp_path).fit(data())


def test_ranks_ask_rank_0s_clock_every_few_steps_only(tmp_path):
    # each asking is a broadcast read on the host (a wait for the GPU's queued work): asked
    # every step, a wall-clock interval synchronised every data-parallel step
    from sksae._checkpoint import CLOCK_STEPS, Checkpointer

    class Group:
        asked = 0

        def broadcast_(self, t):
            Group.asked += 1
            return t.fill_(1.0)  # rank 0's clock says: due

    ckpt = Checkpointer(tmp_path, "1h", state=None, write=False, group=Group())
    due = [ckpt.due(n) for n in range(1, 4 * CLOCK_STEPS + 1)]
    assert Group.asked == 4
    assert [n for n, d in enumerate(due, 1) if d] == [CLOCK_STEPS * i for i in (1, 2, 3, 4)]
