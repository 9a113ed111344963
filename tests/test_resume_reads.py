"""A resumed epoch reads only what it yields, and yields what an uninterrupted epoch would.

``StreamSource.epoch(skip)`` resumes an epoch from a checkpoint. Reading the
skipped batches and discarding them would cost up to a whole epoch of I/O on
a large store; these tests count the rows read.

Bounds checked (``rows read`` counts every row ``read_into`` and ``take``
copy, repeats included):

- ``"rows"``, ``"once"``, ``"none"`` and every data-parallel rank: the rows
  read are exactly the rows yielded.
- ``"blocks"``: the rows read are the rows yielded plus the rows of the
  skipped batches of the one buffer the resumed epoch starts inside (read
  whole, sequentially), so fewer than one buffer's rows more; the rows
  carried from the last skipped buffer are read by ``take`` and are among
  the rows yielded.
"""

import math

import numpy as np
import pytest
import torch

from sksae._data import Rows
from sksae._stream import StreamSource
from sksae.distributed import Group

N = 203  # 12 batches of 16 and a short one of 11


def fake_group(rank, world):
    """A Group whose collectives are never called: the sources only ask for parts."""
    g = Group.__new__(Group)
    g.group, g.rank, g.world_size = None, rank, world
    return g


class CountingRows(Rows):
    """Rows that record every row they read, and how (``take`` or ``read_into``)."""

    def __init__(self, X):
        super().__init__(X)
        self.read_ids = []
        self.taken_ids = []

    def read(self, start, stop):
        self.read_ids.extend(range(start, stop))
        return super().read(start, stop)

    def take(self, rows):
        rows = np.asarray(rows).tolist()
        self.read_ids.extend(rows)
        self.taken_ids.extend(rows)
        return super().take(rows)

    def read_into(self, out, start, stop):
        self.read_ids.extend(range(start, stop))
        return super().read_into(out, start, stop)


def data(n=N):
    X = np.random.RandomState(0).randn(n, 4).astype(np.float32)
    X[:, 0] = np.arange(n)  # column 0 holds the row's index
    return X


def row_ids(batch):
    return batch[:, 0].round().long().tolist()


# (batch_size, buffer_rows): 16/48 buffers hold 3 whole batches; with 10/48 the
# block shuffle's buffers (16 blocks of 3 rows) leave rows carried to the next one
CONFIGS = [(16, 48), (10, 48)]
SHUFFLES = ["rows", "once", "none", "blocks"]


def source(shuffle, batch_size, buffer_rows, group=None, rows=None):
    rows = CountingRows(data()) if rows is None else rows
    return StreamSource(rows, batch_size, "cpu", torch.float32,
                        torch.Generator().manual_seed(0), shuffle=shuffle,
                        buffer_rows=buffer_rows, read_ahead_depth=0, group=group)


def buffer_batches(src):
    """The batches of each buffer of ``src``'s next epoch (planned without reading)."""
    state = src.generator.get_state()
    counts = [math.ceil(len(ids) / src.batch_size) for ids in src._planned_ids()]
    src.generator.set_state(state)
    return counts


def skips(shuffle, batch_size, buffer_rows):
    """0, inside the first buffer, its end, inside and at the end of later ones, the last."""
    counts = buffer_batches(source(shuffle, batch_size, buffer_rows))
    ends = np.cumsum(counts).tolist()
    steps = ends[-1]
    assert steps == math.ceil(N / batch_size)
    values = {0, 1, ends[0], ends[0] + 1, ends[1], ends[1] + 2, steps - 2, steps - 1, steps}
    return sorted(v for v in values if 0 <= v <= steps)


def epochs(src, skip):
    """Batches (row ids and values) of a resumed epoch and of the epoch after it."""
    first = [b.clone() for b in src.epoch(skip)]
    read = list(src.rows.read_ids)
    taken = list(src.rows.taken_ids)
    second = [b.clone() for b in src.epoch()]
    return first, second, read, taken


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("shuffle", SHUFFLES)
@pytest.mark.parametrize("batch_size,buffer_rows", CONFIGS)
def test_a_resumed_epoch_yields_the_same_batches_and_reads_only_those(
        shuffle, batch_size, buffer_rows):
    whole, whole_next, _, _ = epochs(source(shuffle, batch_size, buffer_rows), 0)
    assert sorted(r for b in whole for r in row_ids(b)) == list(range(N))
    assert len(whole[-1]) == N % batch_size  # a short last batch
    counts = buffer_batches(source(shuffle, batch_size, buffer_rows))
    ends = np.cumsum(counts).tolist()
    for skip in skips(shuffle, batch_size, buffer_rows):
        first, second, read, taken = epochs(source(shuffle, batch_size, buffer_rows), skip)
        same(first, whole[skip:])
        same(second, whole_next)  # the resumed epoch drew as an uninterrupted one
        yielded = [r for b in first for r in row_ids(b)]
        if shuffle != "blocks":
            assert sorted(read) == sorted(yielded), skip
            continue
        # every row read once at most; the extra rows are those of the skipped batches
        # of the buffer the epoch resumes inside (read whole): less than one buffer
        assert len(set(read)) == len(read), skip
        assert set(yielded) <= set(read), skip
        done = max(e for e in [0, *ends] if e <= skip)  # batches of whole skipped buffers
        inside = [c for e, c in zip(ends, counts) if e > skip][:1]
        assert len(read) - len(yielded) == (skip - done) * batch_size, skip
        assert not inside or (skip - done) < inside[0], skip
        # the rows carried from the skipped buffers are read by take (fewer than a
        # batch), and trained on in the buffers read (perhaps in a skipped batch there)
        assert set(taken) <= {r for b in whole[done:] for r in row_ids(b)}, skip
        assert len(taken) < batch_size, skip
        if skip == 0:
            assert not taken


def test_the_block_shuffle_takes_the_rows_carried_from_skipped_buffers():
    src = source("blocks", 10, 48)
    counts = buffer_batches(src)
    first, _, read, taken = epochs(src, sum(counts[:2]))  # resumed at the 3rd buffer
    assert taken  # 10/48 carries rows: those of the 2nd buffer come by take
    assert len(read) == sum(len(b) for b in first)


@pytest.mark.parametrize("shuffle", SHUFFLES)
@pytest.mark.parametrize("batch_size,buffer_rows", CONFIGS)
def test_a_resumed_rank_reads_only_its_part_of_the_remaining_batches(
        shuffle, batch_size, buffer_rows):
    world = 2
    whole = [epochs(source(shuffle, batch_size, buffer_rows, fake_group(r, world)), 0)
             for r in range(world)]
    for skip in skips(shuffle, batch_size, buffer_rows):
        for rank in range(world):
            first, second, read, _ = epochs(
                source(shuffle, batch_size, buffer_rows, fake_group(rank, world)), skip)
            same(first, whole[rank][0][skip:])
            same(second, whole[rank][1])
            yielded = [r for b in first for r in row_ids(b)]
            assert sorted(read) == sorted(yielded), (skip, rank)


@pytest.mark.parametrize("shuffle", SHUFFLES)
def test_a_resumed_epoch_read_ahead_in_a_thread_is_the_same(shuffle):
    def run(skip, depth):
        src = source(shuffle, 10, 48)
        src.depth = depth
        return epochs(src, skip)

    whole, whole_next, _, _ = run(0, 0)
    for skip in skips(shuffle, 10, 48):
        first, second, _, _ = run(skip, 2)
        same(first, whole[skip:])
        same(second, whole_next)
