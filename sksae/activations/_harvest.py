"""Harvesting: run a torch model over input batches and store the named submodules' outputs."""

from __future__ import annotations

import difflib
from collections.abc import Mapping

import numpy as np
import torch

from ._store import ActivationStore, StoreWriter, _read_manifest, to_storage

__all__ = ["harvest"]


class _Stop(Exception):
    """Raised by the last hook to end a forward pass whose remaining layers are not needed."""


def _module_table(model, layers):
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        hints = {name: difflib.get_close_matches(name, list(modules), n=3) for name in missing}
        raise ValueError("model has no submodule " + "; ".join(
            f"{name!r}" + (f" (did you mean {', '.join(map(repr, h))}?)" if h else "")
            for name, h in hints.items()) + ". Names come from model.named_modules().")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("TorchScript modules do not support forward hooks "
                        "(register_forward_hook); harvest from the Python nn.Module.")
    return {name: modules[name] for name in layers}


def _first_tensor(output, name):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]  # e.g. a transformer block's (hidden_states, attention, ...)
    raise TypeError(f"submodule {name!r} returned {type(output).__name__}, not a tensor or a "
                    "tuple whose first element is a tensor.")


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _call(model, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _batch_mask(mask, batch):
    """The boolean (positions) mask of a batch, or None."""
    if mask is None:
        return None
    if mask == "auto":
        if isinstance(batch, Mapping) and "attention_mask" in batch:
            return batch["attention_mask"].bool()
        return None
    if mask == "attention_mask":
        if not (isinstance(batch, Mapping) and "attention_mask" in batch):
            raise ValueError("mask='attention_mask' needs batches that are dicts with an "
                             "'attention_mask' entry.")
        return batch["attention_mask"].bool()
    m = mask(batch)
    if not isinstance(m, torch.Tensor):
        m = torch.as_tensor(np.asarray(m))
    return m.bool()


def _rows(output, keep, name):
    """(positions, features) rows of a hooked output, masked positions dropped."""
    if keep is None:
        return output.reshape(-1, output.shape[-1]) if output.ndim <= 3 else \
            output.reshape(output.shape[0] * output.shape[1], -1)
    keep = keep.to(output.device)
    if output.ndim == 2 and keep.ndim == 2 and keep.shape[1] == 1:
        keep = keep[:, 0]
    if tuple(output.shape[:keep.ndim]) != tuple(keep.shape):
        raise ValueError(f"the mask has shape {tuple(keep.shape)}, but {name!r}'s output has "
                         f"shape {tuple(output.shape)}: the mask must cover its leading "
                         "(batch, position) dimensions.")
    return output[keep].reshape(int(keep.sum()), -1)


def _describe_mask(mask):
    if mask is None or isinstance(mask, str):
        return mask
    return f"callable {getattr(mask, '__qualname__', type(mask).__name__)}"


def harvest(model, batches, layers, path, *, mask="auto", dtype="float16", shard_rows=65536,
            max_rows=None, device=None, stop_early=True, source=None, resume=True,
            overwrite=False, progress=True):
    """Run ``model`` over ``batches`` and store the outputs of named submodules on disk.

    Each batch is passed to the model (a dict as keyword arguments, a tuple
    or list as positional ones, a tensor as the one argument) under
    :func:`torch.inference_mode`, with the model in eval mode (its mode is
    put back afterwards). Forward hooks on the ``layers`` take their outputs
    (the first element of a tuple output, as a transformer block returns):
    every position becomes a row, masked positions are dropped, and the rows
    are converted to ``dtype`` on the model's device and written to a store
    (:func:`open_store`) in shards of whole batches: each shard's files
    (with their block digests) renamed into place, its line appended to the
    shard records, and then the manifest renamed into place.

    An interrupted harvest (Ctrl-C, an error, a lost machine) keeps its
    completed shards: calling ``harvest`` again with the same arguments skips
    the input batches they cover (without running the model on them) and
    continues, giving the same store as an uninterrupted run when
    ``batches`` yields the same batches in the same order.

    Parameters
    ----------
    model : torch.nn.Module
        Any module (TorchScript modules do not support hooks).
    batches : iterable
        Input batches: tensors, tuples or lists of tensors, or dicts of
        tensors (a tokenizer's output, a ``DataLoader``'s batches). Tensors are
        moved to ``device``.
    layers : str or list of str
        Names from ``model.named_modules()``. With a list, the store holds
        one array per layer, row-aligned.
    path : path-like
        The store folder.
    mask : "auto", "attention_mask", callable or None, default="auto"
        Which positions to keep. ``"auto"``: the batch's ``attention_mask``
        when the batch is a dict that has one (padding is dropped), else
        every position. A callable takes the batch (on ``device``) and returns
        a boolean tensor over its leading (batch, position) dimensions, e.g.
        ``lambda b: b["attention_mask"].bool() & (torch.arange(b["input_ids"].shape[1]) > 0)``
        to drop padding and the first (BOS) token. None keeps every position.
    dtype : {"float16", "bfloat16", "float32"}, default="float16"
        Storage dtype.
    shard_rows : int, default=65536
        Rows after which a shard is written (shards end at a batch boundary,
        so they hold ``shard_rows`` rows or a little more).
    max_rows : int, default=None
        Stop after this many rows.
    device : str or torch.device, default=None
        Where the inputs go; None means the device of the model's first
        parameter (the CPU for a model without parameters).
    stop_early : bool, default=True
        End each forward pass once every hooked layer has run (the later
        layers' work is skipped). Set False for a model that needs to run
        whole (a hooked module that runs more than once per forward pass is
        then refused).
    source : dict, default=None
        Description of the inputs, kept in the manifest (e.g. the data set and
        tokenizer). It must match when resuming.
    resume : bool, default=True
        Continue an interrupted harvest at ``path``.
    overwrite : bool, default=False
        Replace a store already at ``path``.
    progress : bool, default=True
        Show a progress bar (tqdm).

    Returns
    -------
    store : ActivationStore or dict of ActivationStore
        The store opened on the layer, or ``{layer: store}`` when ``layers``
        is a list.

    Raises
    ------
    StoreError
        (a ValueError) When the unfinished store to resume is damaged: a
        listed shard file is missing or of the wrong size, or the shard
        records fail their digest. (The shards' contents are checked when
        they are read, as in any store.)

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from sksae.activations import harvest
    >>> model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16))
    >>> tokens = torch.randint(0, 50, (10, 8), generator=torch.Generator().manual_seed(0))
    >>> store = harvest(model, tokens.split(4), "0", os.path.join(tempfile.mkdtemp(), "acts"),
    ...                 progress=False)
    >>> store.shape
    (80, 16)
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"layers must name one or more distinct submodules; got {layers!r}.")
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype must be 'float16', 'bfloat16' or 'float32'; got {dtype!r}.")
    if int(shard_rows) < 1:
        raise ValueError(f"shard_rows must be >= 1; got {shard_rows}.")
    if max_rows is not None and int(max_rows) < 1:
        raise ValueError(f"max_rows must be >= 1 or None; got {max_rows}.")
    if not (mask is None or mask in ("auto", "attention_mask") or callable(mask)):
        raise ValueError(f"mask must be 'auto', 'attention_mask', a callable or None; "
                         f"got {mask!r}.")
    modules = _module_table(model, names)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)

    captured, counts = {}, {}

    def hook_for(name):
        def hook(module, args, output):
            counts[name] = counts.get(name, 0) + 1
            if counts[name] > 1:
                raise RuntimeError(f"submodule {name!r} ran more than once in one forward "
                                   "pass; hook a module that runs once.")
            captured[name] = _first_tensor(output, name)
            if stop_early and len(captured) == len(names):
                raise _Stop
        return hook

    # the features of each layer, from a dry run on the first batch
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("batches is empty: there is nothing to harvest.") from None

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    modes = [(m, m.training) for m in model.modules()]  # put back module by module
    model.eval()
    try:
        def forward(batch):
            captured.clear()
            counts.clear()
            batch = _to_device(batch, device)
            with torch.inference_mode():
                try:
                    _call(model, batch)
                except _Stop:
                    pass
            absent = [n for n in names if n not in captured]
            if absent:
                raise RuntimeError(f"submodules {absent} did not run in the forward pass.")
            keep = _batch_mask(mask, batch)
            out = {n: _rows(captured[n], keep, n) for n in names}
            return out, _positions(captured[names[0]], keep)

        rows = forward(first)
        spec = {n: int(r.shape[1]) for n, r in rows[0].items()}
        description = {"model": type(model).__qualname__, "mask": _describe_mask(mask),
                       "shard_rows": int(shard_rows), "max_rows": max_rows,
                       "user": source if source is not None else {}}
        writer = StoreWriter(path, spec, dtype, description, resume=resume,
                             overwrite=overwrite)
        done = writer.n_batches
        kept = len(writer.manifest["shards"])  # from an interrupted run
        total = None
        try:
            total = len(batches)
        except TypeError:
            pass
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, desc="harvest", unit="batch", dynamic_ncols=True)
        try:
            n_rows = writer.n_rows
            buffers = {n: [] for n in names}
            where = []  # (sequence, position) of the buffered rows
            sequences = 0
            buffered, batches_in_buffer = 0, 0
            finished = writer.manifest["complete"]

            def flush():
                nonlocal buffered, batches_in_buffer
                if batches_in_buffer == 0:
                    return
                if buffered:
                    # the batches' blocks written one after the other: joined, every
                    # layer's shard would be held twice
                    writer.write_shard({n: list(buffers[n]) for n in names},
                                       batches_in_buffer, positions=list(where))
                    for n in names:
                        buffers[n].clear()
                    where.clear()
                    buffered, batches_in_buffer = 0, 0

            index = 0
            for batch in _chain(first, it):
                if finished:
                    break
                index += 1
                n_seq = _n_sequences(batch)
                if index <= done:  # covered by a completed shard
                    sequences += n_seq
                    if bar is not None:
                        bar.update(1)
                    continue
                out, pos = rows if index == 1 else forward(batch)
                count = next(iter(out.values())).shape[0]
                if max_rows is not None:
                    count = min(count, int(max_rows) - n_rows - buffered)
                for n in names:
                    buffers[n].append(to_storage(out[n][:count], dtype))
                pos = pos[:count].cpu().numpy()
                pos[:, 0] += sequences
                where.append(pos)
                sequences += n_seq
                buffered += count
                batches_in_buffer += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(rows=n_rows + buffered)
                if buffered >= shard_rows:
                    n_rows += buffered
                    flush()
                if max_rows is not None and n_rows + buffered >= int(max_rows):
                    break
            if not finished:
                flush()
                # batches after the last shard that gave no rows (all masked) still count
                writer.close(batches_in_buffer)
        finally:
            if bar is not None:
                bar.close()
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    manifest = _read_manifest(path)  # once, not once per layer

    def opened(name):
        store = ActivationStore(path, name, _manifest=manifest)  # verify="lazy"
        # the shards written here were digested as they were written; those kept from an
        # interrupted run were not checked by resuming, and are as they are read
        store._verified.update(range(kept, store.n_shards))
        return store

    if isinstance(layers, str):
        return opened(layers)
    return {n: opened(n) for n in names}


def _positions(output, keep):
    """(sequence in the batch, position) of each row, in the order of :func:`_rows`."""
    if output.ndim == 2:
        n = output.shape[0]
        grid = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)], 1)
        return grid if keep is None else grid[keep.reshape(-1).cpu()]
    b, t = output.shape[:2]
    grid = torch.stack(torch.meshgrid(torch.arange(b), torch.arange(t), indexing="ij"), -1)
    return grid.reshape(-1, 2) if keep is None else grid[keep.cpu()]


def _n_sequences(batch):
    """The leading dimension of a batch (its first tensor's)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, Mapping) else batch
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.shape[0]
    return 0


def _chain(first, rest):
    yield first
    yield from rest
