"""Training across processes: 2 gloo ranks under torchrun against one process.

Each test launches ``python -m torch.distributed.run --nproc_per_node=2`` on
tests/_distributed_worker.py (a subprocess with a timeout: a hang fails the
test) and compares what the ranks fitted with the single-process fit of the
same parameters, global batch and seed, fitted here.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _distributed_worker as worker  # noqa: E402

WORKER = Path(__file__).parent / "_distributed_worker.py"


def launch(*args, timeout=240):
    """Run the worker on 2 ranks; returns (returncode, output, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "--monitor_interval=0.2", str(WORKER), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def reference(name, out):
    model, kind = worker.make(name, False)
    return worker.fit(model, name, worker.inputs(kind, out)).components_


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    path = tmp_path_factory.mktemp("distributed")
    from sksae.activations import save_store

    save_store(worker.data(), path / "store", dtype="float32", shard_rows=500)
    return path


def test_data_parallel_and_latent_sharded_equal_one_process(out):
    """Every architecture, a store read by parts, latent sharding and dictionary learning."""
    names = list(worker.CASES)
    code, log, _ = launch("equal", out, ",".join(names))
    assert code == 0, log[-3000:]
    for name in names:
        ranks = [np.load(out / f"{name}_rank{r}.npy") for r in (0, 1)]
        np.testing.assert_array_equal(ranks[0], ranks[1], err_msg=name)  # the same model
        expected = reference(name, out)
        torch.testing.assert_close(torch.from_numpy(ranks[0]), torch.from_numpy(expected),
                                   atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        # it trained: far from where a shorter fit stands
        assert not np.allclose(expected, reference_start(name), atol=1e-2)


def test_data_parallel_keeps_k_when_bf16_values_tie_and_ranks_agree(out):
    """bf16 selection products tie at the global cut: the ranks still keep exactly k * B.
    With random_state=None the ranks draw rank 0's batches and rows: one model, no hang
    (dictionary learning's dead-atom rows are broadcasts that every rank must ask alike);
    a rank whose dictionary sweep rounds differently still ends with rank 0's dictionary."""
    code, log, _ = launch("equal", out, ",".join([*worker.TIES, *worker.ALIKE]))
    assert code == 0, log[-3000:]
    for name in worker.ALIKE:
        ranks = [np.load(out / f"{name}_rank{r}.npy") for r in (0, 1)]
        np.testing.assert_array_equal(ranks[0], ranks[1], err_msg=name)
    for name in worker.TIES:
        ranks = [np.load(out / f"{name}_rank{r}.npy") for r in (0, 1)]
        np.testing.assert_array_equal(ranks[0], ranks[1], err_msg=name)
        model, kind = worker.make(name, False)
        one = model.fit(worker.inputs(kind, out))
        assert np.all(one.history_["step"]["l0"] == 8)  # one process: k, exactly
        np.testing.assert_array_equal(np.load(out / f"{name}_rank0_l0.npy"), 8, err_msg=name)


def reference_start(name):
    model, kind = worker.make(name, False)
    return model.set_params(max_iter=0).fit(worker.inputs(kind, None)
                                            if kind != "store" else worker.data()).components_


def test_killed_run_resumes_from_its_checkpoint(out):
    """A rank SIGKILLed after the second checkpoint; relaunched, the run ends as uninterrupted."""
    code, log, _ = launch("killed", out)
    assert code != 0, log[-3000:]
    assert (out / "ckpt" / "checkpoint.safetensors").is_file()
    assert not (out / "resumed_rank0.npy").exists()
    # the same checkpoint resumed by one process (a copy: a finished fit marks it done)
    shutil.copytree(out / "ckpt", out / "ckpt-one")
    model, kind = worker.make("topk", False)
    one = model.set_params(checkpoint_dir=out / "ckpt-one").fit(worker.inputs(kind, out))
    code, log, _ = launch("resumed", out)
    assert code == 0, log[-3000:]
    got = np.load(out / "resumed_rank0.npy")
    np.testing.assert_array_equal(got, np.load(out / "resumed_rank1.npy"))
    expected = torch.from_numpy(reference("topk", out))
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(one.components_), expected, atol=1e-4,
                               rtol=1e-4)


def test_a_failing_rank_stops_every_rank(out):
    code, log, seconds = launch("failing", out, timeout=120)
    assert code != 0
    assert "rank 1 failed on purpose" in log
    assert seconds < 110


def test_the_cli_under_torchrun_trains_data_parallel_and_rank_0_writes(out, capsys):
    from sksae import load
    from sksae.__main__ import main as cli

    np.save(out / "acts.npy", worker.data())
    code, log, _ = launch("cli", out)
    assert code == 0, log[-3000:]
    assert log.count("Saved to") == 1 and "data-parallel on 2 processes" in log
    args = ["fit", str(out / "acts.npy"), "-o", str(out / "one-model"), "--n-components", "32",
            "--k", "4", "--batch-size", "32", "--max-iter", "2", "--random-state", "0", "-q",
            "--precision", "float32"]
    assert cli(args) == 0
    torch.testing.assert_close(torch.from_numpy(load(out / "cli-model").components_),
                               torch.from_numpy(load(out / "one-model").components_),
                               atol=1e-4, rtol=1e-4)


def test_ranks_wait_for_rank_0_writing_longer_than_the_groups_timeout(out):
    """Rank 0's saving (and --holdout evaluation) may outlast the group's collective timeout:
    the other ranks wait for it at the end without failing (a gloo group of its own)."""
    np.save(out / "acts.npy", worker.data())
    code, log, seconds = launch("cli_slow", out)
    assert code == 0, log[-3000:]
    assert log.count("Saved to") == 1 and seconds > 15

