"""Each data-parallel rank reads exactly its part of every global batch (no process group needed)."""

import numpy as np
import pytest
import torch

from sksae._data import Rows
from sksae._engine import BatchSource
from sksae._stream import StreamSource
from sksae.distributed import Group


def fake_group(rank, world):
    """A Group whose collectives are never called: the sources only ask for parts."""
    g = Group.__new__(Group)
    g.group, g.rank, g.world_size = None, rank, world
    return g


def row_ids(batch):
    return batch[:, 0].round().long().tolist()  # column 0 holds the row's index


X = np.zeros((203, 4), dtype=np.float32)
X[:, 0] = np.arange(203)


def batches(make, group, skip=0):
    source = make(torch.Generator().manual_seed(0), group)
    return [row_ids(b) for epoch in range(2) for b in source.epoch(skip if epoch == 0 else 0)]


class CountingRows(Rows):
    """Rows that record every row they read."""

    def __init__(self, X):
        super().__init__(X)
        self.read_ids = []

    def take(self, rows):
        self.read_ids.extend(np.asarray(rows).tolist())
        return super().take(rows)

    def read_into(self, out, start, stop):
        self.read_ids.extend(range(start, stop))
        return super().read_into(out, start, stop)


SOURCES = {
    "array": lambda gen, g: BatchSource(X, 16, "cpu", torch.float32, gen, group=g),
    "array-once": lambda gen, g: BatchSource(X, 16, "cpu", torch.float32, gen, shuffle="once",
                                             group=g),
    "array-none": lambda gen, g: BatchSource(X, 16, "cpu", torch.float32, gen, shuffle="none",
                                             group=g),
    **{f"stream-{s}": (lambda s: lambda gen, g: StreamSource(
        Rows(X), 16, "cpu", torch.float32, gen, shuffle=s, buffer_rows=48, group=g))(s)
       for s in ("rows", "blocks", "none", "once")},
}


@pytest.mark.parametrize("name", list(SOURCES))
@pytest.mark.parametrize("world", [2, 3])
def test_parts_make_up_the_global_batches(name, world):
    whole = batches(SOURCES[name], None)
    parts = [batches(SOURCES[name], fake_group(r, world)) for r in range(world)]
    assert all(len(p) == len(whole) for p in parts)
    for j, batch in enumerate(whole):
        got = [row for p in parts for row in p[j]]  # rank order: the global batch's order
        assert got == batch, (name, j)
        sizes = [len(p[j]) for p in parts]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("shuffle", ["rows", "blocks", "none"])
def test_a_rank_reads_only_its_rows(shuffle):
    world = 2
    for rank in range(world):
        rows = CountingRows(X)
        source = StreamSource(rows, 16, "cpu", torch.float32, torch.Generator().manual_seed(0),
                              shuffle=shuffle, buffer_rows=48, group=fake_group(rank, world),
                              read_ahead_depth=0)
        mine = [r for b in source.epoch() for r in row_ids(b)]
        assert sorted(rows.read_ids) == sorted(mine)
        assert len(mine) in (X.shape[0] // world, X.shape[0] // world + 1)


@pytest.mark.parametrize("name", list(SOURCES))
def test_a_resumed_epoch_skips_its_first_batches(name):
    whole = batches(SOURCES[name], None)
    resumed = batches(SOURCES[name], None, skip=5)
    assert resumed == whole[5:]


@pytest.mark.parametrize("mode", ["data", "latent"])
def test_distributed_training_without_a_process_group_is_refused(mode):
    from sksae import DictionaryLearnerGPU, SparseAutoencoder

    X = np.random.RandomState(0).randn(64, 4).astype(np.float32)
    sae = SparseAutoencoder(8, k=2, distributed=mode)
    with pytest.raises(ValueError, match="torchrun"):
        sae.fit(X)
    assert not hasattr(sae, "components_")
    if mode == "data":
        with pytest.raises(ValueError, match="torchrun"):
            DictionaryLearnerGPU(4, distributed=mode).fit(X)


def test_distributed_auto_outside_a_process_group_trains_in_one_process():
    from sksae import SparseAutoencoder

    X = np.random.RandomState(0).randn(200, 4).astype(np.float32)
    a = SparseAutoencoder(8, k=2, max_iter=2, random_state=0).fit(X)
    b = SparseAutoencoder(8, k=2, max_iter=2, random_state=0, distributed=False).fit(X)
    np.testing.assert_array_equal(a.components_, b.components_)


def test_group_parts_are_contiguous_and_even():
    for world in (1, 2, 3, 5):
        for n in (0, 1, 4, 7, 64, 103):
            parts = [fake_group(r, world).part(n) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1


class _RecordingGroup:
    """A one-rank Group that records its all-reduces (sums of one rank: identities)."""

    rank, world_size = 0, 1

    def __init__(self, params):
        self.params, self.log = params, []

    def sum_(self, t):
        self.log.append(("bucket", t.numel()))
        return t

    def sum_async_(self, t):
        name = next(n for n, p in self.params.items() if p.grad is t)
        # whether the encoder's backward had run yet when this reduction started
        self.log.append(("early", name, self.params["W_enc"].grad is None))
        return self

    def wait(self):
        self.log.append(("wait",))

    def broadcast_object(self, obj, src=0):
        return obj


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_large_gradients_are_reduced_while_backward_still_runs(architecture):
    """Data-parallel steps start the decoder's all-reduce before the encoder's backward has
    run (overlapping it), the encoder's as soon as it has; the bucket holds the rest; the
    steps equal those of a trainer without a group."""
    from sksae import SparseAutoencoder
    from sksae._sae_trainer import SAETrainer, init_parameters
    from sksae.architectures import Schedule

    D, F, B = 16, 1024, 64
    arch = SparseAutoencoder(architecture=architecture, k=4)._architecture(F, D)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * B, D, generator=g, dtype=torch.float64)
    trainers = []
    for with_group in (False, True):
        params = init_parameters(x, F, "data", torch.Generator().manual_seed(0),
                                 torch.float32, torch.device("cpu"))
        trainer = SAETrainer(arch, params, {}, lr=1e-3, schedule=Schedule(None, 4),
                             warmup_steps=2, dead_window=64)
        if with_group:
            trainer.early_reduce_numel = F + 1  # the (F, D) gradients only
            trainer.group = _RecordingGroup(trainer.params)
        trainers.append(trainer)
    plain, grouped = trainers
    for i in range(4):
        batch = x[i * B:(i + 1) * B].float()
        expected = plain.step(batch)
        got = grouped.step(batch, n_rows=B)
        torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-7)
    for name in plain.params:
        torch.testing.assert_close(grouped.params[name], plain.params[name], rtol=1e-5,
                                   atol=1e-6)
    log = grouped.group.log
    step = log[:next(i for i, entry in enumerate(log) if entry[0] == "bucket") + 1]  # step 1
    assert step[:2] == [("early", "W_dec", True), ("early", "W_enc", False)], step
    assert step[2:4] == [("wait",), ("wait",)]
    small = sum(p.numel() for n, p in grouped.params.items() if n not in ("W_dec", "W_enc"))
    assert step[4][0] == "bucket" and step[4][1] >= small
    assert step[4][1] < grouped.params["W_dec"].numel()  # the large gradients are not in it
