"""Each data-parallel rank reads exactly its part of every global batch (no process group needed)."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

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


def test_nccl_ranks_take_their_own_gpu_before_the_group_exists(monkeypatch):
    # NCCL's object collectives run on the current CUDA device: left at cuda:0, every rank
    # of a machine would share one GPU (checked here without one: CUDA's calls recorded)
    import torch.distributed as dist

    from sksae.distributed import _launch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert _launch.init_from_environment(backend="nccl")
    assert calls == [("set_device", 1), ("init", "nccl")]
    calls.clear()
    assert _launch.init_from_environment()  # the default with GPUs: NCCL for CUDA tensors
    assert calls == [("set_device", 1), ("init", "cpu:gloo,cuda:nccl")]
    calls.clear()
    assert _launch.init_from_environment(backend="gloo")  # gloo: the CPU, no GPU chosen
    assert calls == [("init", "gloo")]


class _ThreadGroup(Group):
    """Ranks as threads: all_gather and min_ meet at a barrier (the collectives' results)."""

    def __init__(self, rank, world, slots, barrier):
        self.group, self.rank, self.world_size = None, rank, world
        self.slots, self.barrier = slots, barrier

    def all_gather(self, t):
        self.slots[self.rank] = t
        self.barrier.wait()
        out = torch.cat(list(self.slots))
        self.barrier.wait()
        return out


@pytest.mark.parametrize("rows, world, k", [(7, 3, 3), (9, 2, 4), (2, 3, 5), (5, 2, 8), (33, 2, 1)])
def test_batch_topk_keeps_exactly_k_per_row_across_ranks_however_many_tie(rows, world, k):
    # bf16 products tie often at the global cut: every rank keeping all its entries equal to
    # it trained data-parallel BatchTopK at an L0 above k; the ranks keep exactly k * B,
    # earlier entries of the global batch first, as one process's compiled selection does
    _check_global_keep(rows, world, k, 4, seed=rows * world + k)


@given(rows=st.integers(1, 12), world=st.integers(1, 4), k=st.integers(1, 8),
       levels=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_batch_topk_across_ranks_is_a_stable_top_k_of_the_global_batch(rows, world, k,
                                                                       levels, seed):
    # any split of any batch over the ranks (parts empty included), any number of ties
    _check_global_keep(rows, world, k, levels, seed)


def _check_global_keep(rows, world, k, levels, seed):
    """Each rank's ``_global_keep`` on its part, as threads: together a stable top-k * B."""
    import threading

    from sksae import SparseAutoencoder
    from sksae.distributed import BatchInfo

    F = 8
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randint(0, levels, (rows, F), generator=gen).to(torch.bfloat16)  # ties
    K = min(k * rows, rows * F)
    order = torch.sort(-pre.float().reshape(-1), stable=True).indices[:K]
    expected = torch.zeros(rows * F, dtype=torch.bool)
    expected[order] = True
    slots, barrier = [None] * world, threading.Barrier(world)
    got, errors = [None] * world, []

    def rank(r):
        try:
            g = _ThreadGroup(r, world, slots, barrier)
            arch = SparseAutoencoder(architecture="batchtopk", k=k)._architecture(F, 4)
            arch.batch = BatchInfo(rows, g)
            lo, hi = g.part(rows)
            got[r] = arch._global_keep(pre[lo:hi])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    keep = torch.cat(got).reshape(-1)
    assert int(keep.sum()) == K
    assert torch.equal(keep, expected)


@pytest.mark.parametrize("seen, message", [
    ([("a", "cuda", 0), ("a", "cuda", 1), ("b", "cuda", 0)], None),
    ([("a", "cpu", None), ("a", "cpu", None)], None),
    ([("a", "cuda", 0), ("a", "cuda", 0)], "ranks 0 and 1 \\(host a\\) both train on cuda:0"),
    ([("a", "cuda", 0), ("a", "cpu", None)], "different kinds of device \\(cpu, cuda\\)"),
])
def test_ranks_must_train_on_one_kind_of_device_each_gpu_its_own(seen, message, monkeypatch):
    # every rank given device="cuda:0" would fail inside NCCL ("Duplicate GPU detected")
    from sksae.distributed._group import check_devices

    g = fake_group(0, len(seen))
    monkeypatch.setattr(g, "gather_object", lambda value: seen, raising=False)
    if message is None:
        check_devices(g, "cpu")
    else:
        with pytest.raises(ValueError, match=message):
            check_devices(g, "cpu")
