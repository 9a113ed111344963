"""Minibatches of an input that is not in memory: buffered reads, block shuffle, checks.

:class:`StreamSource` is :class:`sksae._engine.BatchSource`'s counterpart for
:class:`sksae._data.Rows`. It reads a buffer of rows at a time, in a
background thread (:func:`sksae._accel.prefetch.read_ahead`) while the current
buffer trains, and cuts it into batches; each batch is converted from the
storage dtype on the device and checked for NaN/inf there.

Shuffles:

- ``"rows"``: a permutation of every row per epoch, drawn exactly as
  ``BatchSource`` draws it (the same batches as training on the array in
  memory), read by gathering rows (random reads: meant for inputs in memory
  or in the page cache).
- ``"blocks"``: the rows are cut into contiguous blocks of
  ``buffer_rows // 16`` rows; each epoch takes the blocks in a random order,
  16 at a time into a buffer, and shuffles the rows inside the buffer. Reads
  stay sequential, within a block; a batch mixes rows of up to 16 places of
  the input.
- ``"none"``: the rows in order.
"""

from __future__ import annotations

import math

import torch

from ._accel.device import host_read_interval, is_accelerator
from ._accel.prefetch import read_ahead
from ._engine import rows_in_step

__all__ = ["StreamSource", "BLOCKS_PER_BUFFER", "default_buffer_rows"]

BLOCKS_PER_BUFFER = 16
#: buffers read ahead by the background thread (0: none; benchmarks/bench_out_of_core.py)
READ_AHEAD_DEPTH = 2
_BUFFER_BYTES = 128 * 2**20


def default_buffer_rows(rows):
    """Rows of a shuffle buffer of about 128 MiB of stored values."""
    row_bytes = rows.nbytes / max(1, rows.n_samples)
    return int(max(BLOCKS_PER_BUFFER, _BUFFER_BYTES // max(1, row_bytes)))


class StreamSource:
    """Minibatches of :class:`~sksae._data.Rows` as tensors of ``dtype`` on ``device``.

    Parameters
    ----------
    rows : Rows
    batch_size : int
    device : torch.device
    dtype : torch.dtype
    generator : torch.Generator
        CPU generator; drawn from in the calling thread only, at the start of
        each epoch (the same draws as ``BatchSource`` for ``"rows"``).
    shuffle : {"rows", "blocks", "none", "once"}
        ``"once"``: one permutation for the whole fit, as ``BatchSource``.
    buffer_rows : int or None
        Rows read at a time (the shuffle buffer); None: about 128 MiB.
    scale : float, default=1.0
    read_ahead_depth : int, default=None
        Buffers read ahead by the background thread (0: read in this thread);
        None means ``READ_AHEAD_DEPTH`` (2). Rows on an accelerator (a tensor
        there) are always read in this thread.
    group : sksae.distributed.Group or None
        Data-parallel training: the batches are this rank's parts of the
        global batches one process would train on (the same draws), and
        this rank reads those rows only (:meth:`_rank_buffers`).
    """

    def __init__(self, rows, batch_size, device, dtype, generator, shuffle="rows",
                 buffer_rows=None, scale=1.0, read_ahead_depth=None, group=None):
        self.group = group
        self.rows = rows
        self.n_samples = rows.n_samples
        self.batch_size = min(batch_size, self.n_samples)
        self.device = torch.device(device)
        self.dtype = dtype
        self.generator = generator
        self.shuffle = shuffle
        self.scale = scale
        self.depth = READ_AHEAD_DEPTH if read_ahead_depth is None else read_ahead_depth
        if rows.on_device:
            # rows on an accelerator are gathered by its kernels, queued in this thread (a
            # second thread's launches could also fall inside a CUDA graph's recording)
            self.depth = 0
        buffer_rows = default_buffer_rows(rows) if buffer_rows is None else int(buffer_rows)
        # whole batches per buffer, so that no batch straddles two reads
        self.buffer_rows = max(1, buffer_rows // self.batch_size) * self.batch_size
        self.block_rows = max(1, buffer_rows // BLOCKS_PER_BUFFER)
        self._order = None
        if shuffle == "once":
            self._order = torch.randperm(self.n_samples, generator=generator)
        self._pin = is_accelerator(self.device) and not rows.on_device

    @property
    def steps_per_epoch(self):
        return math.ceil(self.n_samples / self.batch_size)

    def rows_in_step(self, step):
        """Rows of the global batch of step ``step`` (counted from an epoch's start)."""
        return rows_in_step(self, step)

    # ---------------------------------------------------------------- buffers
    # Each takes ``skip``, the batches of the epoch already trained on (a resumed
    # epoch), and reads none of their rows: on a large store a resumption late in an
    # epoch would otherwise read (and discard) most of an epoch before training.

    def _in_order(self, skip=0):
        # the batches are cut from row 0 in steps of batch_size; buffers begin at the
        # first batch not skipped (their size, a number of whole batches, is unchanged)
        for start in range(skip * self.batch_size, self.n_samples, self.buffer_rows):
            stop = min(start + self.buffer_rows, self.n_samples)
            yield self.rows.read(start, stop), start

    def _gathered(self, order, skip=0):
        for start in range(skip * self.batch_size, self.n_samples, self.buffer_rows):
            ids = order[start:start + self.buffer_rows]
            yield self.rows.take(ids.numpy()), ids

    def _block_plan(self, seed):
        """``(spans, ids, perm, usable)`` of each buffer of the block shuffle, nothing read.

        A buffer holds the rows carried from the previous one, then the
        ``spans`` of its 16 blocks (``ids``: the input row of each of its
        rows); its batches are ``perm[:usable]`` cut into batches, and the
        rows of ``perm[usable:]`` are carried to the next buffer.
        """
        gen = torch.Generator().manual_seed(seed)
        n = self.n_samples
        n_blocks = math.ceil(n / self.block_rows)
        blocks = torch.randperm(n_blocks, generator=gen).tolist()
        carry_ids = torch.zeros(0, dtype=torch.int64)
        for g in range(0, n_blocks, BLOCKS_PER_BUFFER):
            spans = [(b * self.block_rows, min((b + 1) * self.block_rows, n))
                     for b in blocks[g:g + BLOCKS_PER_BUFFER]]
            ids = torch.cat([carry_ids, *(torch.arange(a, b) for a, b in spans)])
            perm = torch.randperm(len(ids), generator=gen)
            last = g + BLOCKS_PER_BUFFER >= n_blocks
            usable = len(ids) if last else len(ids) // self.batch_size * self.batch_size
            carry_ids = ids[perm[usable:]]
            yield spans, ids, perm, usable

    def _blocks(self, seed, skip=0):
        """Buffers of 16 blocks read in a random order, each with its row permutation.

        A buffer is read straight into one tensor (one copy from the input);
        the rows are not moved: each batch gathers its rows from the buffer
        through the permutation (as a batch of an array in memory is
        gathered), and the rows left over after the last whole batch are
        carried to the front of the next buffer.

        The buffers whose batches are all among the first ``skip`` are not
        read; the rows the last of them carries are read alone (by
        ``Rows.take``, fewer than ``batch_size``). The buffer the
        epoch resumes inside is read whole (sequential reads, and its own
        leftover rows are needed), but its skipped batches are not yielded.
        """
        d = self.rows.shape[1]
        carry, carry_ids = None, None
        for spans, ids, perm, usable in self._block_plan(seed):
            n_batches = math.ceil(usable / self.batch_size)
            if skip and n_batches <= skip:
                # all trained on: nothing read; ids holds the rows carried in as well
                skip -= n_batches
                carry_ids = ids[perm[usable:]]
                continue
            if carry_ids is not None:
                carry = self.rows.take(carry_ids.numpy()) if len(carry_ids) else None
                carry_ids = None
            data = torch.empty((len(ids), d), dtype=self.rows.raw_dtype,
                               pin_memory=self._pin)
            pos = 0 if carry is None else len(carry)
            if carry is not None:
                data[:pos] = carry
            for start, stop in spans:
                self.rows.read_into(data[pos:pos + stop - start], start, stop)
                pos += stop - start
            carry = data[perm[usable:]]
            first, skip = skip * self.batch_size, 0
            if usable > first:
                yield data, perm[first:usable], ids

    def _planned_ids(self):
        """The input rows of each buffer of the epoch, in batch order.

        The generator is drawn from here, in the calling thread; the
        buffers are planned lazily (in the read-ahead thread).
        """
        draw = self._draw()
        if self.shuffle == "none":
            return (torch.arange(start, min(start + self.buffer_rows, self.n_samples))
                    for start in range(0, self.n_samples, self.buffer_rows))
        if self.shuffle == "blocks":
            return (ids[perm[:usable]] for _, ids, perm, usable in self._block_plan(draw)
                    if usable)
        return (draw[start:start + self.buffer_rows]
                for start in range(0, self.n_samples, self.buffer_rows))

    def _rank_buffers(self, skip=0):
        """Data-parallel buffers: this rank's rows of each global batch, read alone.

        The global batches are those of one process (:meth:`_planned_ids`);
        this rank reads its part of each (sorted reads within the buffer's
        rows) and yields ``(data, None, ids, cuts)``, ``cuts`` the ends of its
        parts of the buffer's batches. The first ``skip`` global batches are
        dropped from the plan, unread.
        """
        return self._read_parts(self._after(self._planned_ids(), skip))

    def _after(self, plan, skip):
        """The planned buffers (input rows, in batch order) less their first ``skip`` batches."""
        for planned in plan:
            n_batches = math.ceil(len(planned) / self.batch_size)
            if skip >= n_batches:  # (an empty buffer, skip or not, has nothing to read)
                skip -= n_batches
                continue
            yield planned[skip * self.batch_size:]
            skip = 0

    def _read_parts(self, plan):
        for planned in plan:
            mine, cuts = [], []
            for start in range(0, len(planned), self.batch_size):
                batch = planned[start:start + self.batch_size]
                lo, hi = self.group.part(len(batch))
                mine.append(batch[lo:hi])
                cuts.append((cuts[-1] if cuts else 0) + hi - lo)
            ids = torch.cat(mine)
            data = self.rows.take(ids.numpy())
            yield (data.pin_memory() if self._pin else data), None, ids, cuts

    def _draw(self):
        """The epoch's draws from the generator: the block shuffle's seed or the row order.

        None for ``"none"``; ``"once"`` draws nothing here (its order was drawn
        at construction). The one place an epoch draws, so that one process
        and every data-parallel rank draw alike.
        """
        if self.shuffle == "blocks":
            return int(torch.randint(0, 2**62, (1,), generator=self.generator))
        if self.shuffle == "rows":
            return torch.randperm(self.n_samples, generator=self.generator)
        return self._order

    def _buffers(self, skip=0):
        """The epoch's buffers, planned here (generator draws), read by the caller's thread.

        The first ``skip`` batches are neither read nor yielded (see :meth:`_blocks`
        for the one partly skipped buffer of the block shuffle); the draws are
        those of a whole epoch.
        """
        draw = self._draw()
        if self.shuffle == "none":
            return self._in_order(skip)
        if self.shuffle == "blocks":
            return self._blocks(draw, skip)
        return self._gathered(draw, skip)

    def _pinned(self, buffers):
        for data, ids in buffers:
            yield (data.pin_memory() if self._pin else data), None, ids, None

    # ---------------------------------------------------------------- batches
    def epoch(self, skip=0):
        """Yield the batches of one epoch; NaN/inf in a batch raises, naming its row.

        The first ``skip`` batches are not yielded, and not read (a resumed
        epoch): the buffers start at the first batch yielded, except that
        the block shuffle reads whole the buffer it resumes inside. The
        generator draws are those of an uninterrupted epoch.
        """
        pending = []  # accelerators: per-batch flags, read every few batches
        interval = host_read_interval(self.device, every_step=True)

        def check_pending():
            if not pending:
                return
            found = torch.stack([p[0] for p in pending]).cpu()  # one read for the lot
            for (bad, j), (_, ids) in zip(found.tolist(), pending):
                if bad:
                    self.rows.raise_row(j, ids)
            pending.clear()

        if self.group is not None:
            buffers = self._rank_buffers(skip)
        else:
            buffers = self._buffers(skip)
            if self.shuffle != "blocks":  # blocks come as (data, perm, ids), pinned if need be
                buffers = self._pinned(buffers)
            else:
                buffers = ((data, perm, ids, None) for data, perm, ids in buffers)
        buffers = read_ahead(buffers, self.depth)
        try:
            for data, perm, ids, cuts in buffers:
                n_rows = len(data) if perm is None else len(perm)
                if perm is not None:
                    # one copy of the (pinned) buffer to the device, gathered there
                    data = data.to(self.device, non_blocking=self._pin)
                    device_perm = perm.to(self.device, non_blocking=self._pin)
                if cuts is None:
                    cuts = range(self.batch_size, n_rows + self.batch_size, self.batch_size)
                start = 0
                for stop in cuts:
                    stop = min(stop, n_rows)
                    if perm is None:
                        raw = data[start:stop]
                    else:
                        rows = perm[start:stop]
                        raw = data.index_select(0, device_perm[start:stop])
                    batch = raw.to(self.device, non_blocking=self._pin)
                    fresh = batch is not raw or perm is not None
                    if batch.dtype != self.dtype:
                        batch, fresh = batch.to(self.dtype), True
                    if self.scale != 1.0:
                        batch = batch.mul_(self.scale) if fresh else batch * self.scale
                    if perm is not None:
                        batch_ids = ids[rows]
                    elif isinstance(ids, int):
                        batch_ids = ids + start
                    else:
                        batch_ids = ids[start:start + len(raw)]
                    if interval == 1:
                        self.rows.check_finite(batch, batch_ids)
                    else:
                        bad = ~torch.isfinite(batch).all(dim=1)
                        first = bad.to(torch.int8).argmax()
                        pending.append((torch.stack([bad.any().to(first.dtype), first]),
                                        batch_ids))
                        if len(pending) >= interval:
                            check_pending()
                    yield batch
                    start = stop
            check_pending()
        finally:
            buffers.close()


def as_shuffle(shuffle, rows):
    """The resolved shuffle of an estimator's ``shuffle`` parameter for ``rows``."""
    if shuffle == "auto":
        return "blocks" if rows.blocks else "rows"
    if shuffle is False:
        return "none"
    if shuffle is True:
        return "rows"
    return shuffle
