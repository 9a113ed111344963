"""Checkpoints of a fit in progress: one safetensors file, replaced atomically.

A checkpoint holds everything that resumes a ``fit`` where it stood: the
trainer's parameters, optimizer moments and counters, the normalisation, the
random states, the data position (the source's generator at the start of the
epoch and now, and the steps run) and the metrics so far. It is one
``checkpoint.safetensors`` file: the tensors, and the rest as JSON in the
file's metadata, so that one rename replaces the whole state (never a new
tensor file beside an old description). Nothing is unpickled on reading.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["CHECKPOINT_FILE", "Checkpointer", "parse_every", "read_checkpoint",
           "write_checkpoint"]

CHECKPOINT_FILE = "checkpoint.safetensors"
_FORMAT = "sksae-checkpoint-1"


def parse_every(value):
    """``("steps", n)`` or ``("seconds", s)`` from ``checkpoint_every``.

    An int counts steps; a string ``"90s"``, ``"15min"`` or ``"2h"`` is a
    wall-clock interval.
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
        return "steps", int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(s|min|h)\s*", value)
        if m and float(m.group(1)) > 0:
            factor = {"s": 1, "min": 60, "h": 3600}[m.group(2)]
            return "seconds", float(m.group(1)) * factor
    raise ValueError(f"checkpoint_every must be a positive number of steps or a duration "
                     f"such as '90s', '15min' or '2h'; got {value!r}.")


def _flatten(obj, tensors, prefix="t"):
    """A JSON-able skeleton of ``obj``, its tensors and arrays moved into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__array__": key}
    if isinstance(obj, dict):  # keys keep their type (the optimizer's are ints)
        return {"__dict__": [[_flatten(k, tensors), _flatten(v, tensors)]
                             for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"a checkpoint cannot hold {type(obj).__name__}.")


def _unflatten(obj, tensors):
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__array__" in obj:
            return tensors[obj["__array__"]].numpy()
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    return obj


def write_checkpoint(folder, state):
    """Write ``state`` (nested dicts, lists, tuples, tensors, arrays, numbers) to ``folder``.

    The folder is created if need be; its checkpoint file is replaced
    atomically (a crash or Ctrl-C leaves the previous one).
    """
    from safetensors.torch import save

    from ._io import _write_files

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    skeleton = _flatten(state, tensors)
    data = save(tensors, metadata={"format": _FORMAT, "state": json.dumps(skeleton)})
    _write_files(folder, {CHECKPOINT_FILE: data})


def read_checkpoint(folder):
    """The state of ``folder``'s checkpoint, or None when it has none.

    Raises
    ------
    ValueError
        When the file is not a checkpoint sksae wrote.
    """
    from safetensors import safe_open

    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError("not an sksae checkpoint")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        return _unflatten(json.loads(meta["state"]), tensors)
    except Exception as exc:
        raise ValueError(f"{path} is not a checkpoint sksae can read ({exc}); move it away "
                         "or choose another checkpoint_dir.") from None


#: data-parallel training with a wall-clock interval: steps between two askings of rank 0's clock
CLOCK_STEPS = 50


class Checkpointer:
    """When to write a checkpoint, and the writing (on the main process only).

    Parameters
    ----------
    folder : path
    every : int or str
        :func:`parse_every`'s argument.
    state : callable
        ``state(loop_state) -> dict``: the checkpoint's content at that moment.
    write : bool, default=True
        False on the ranks that do not write (they still take part in the
        decisions, which are the same on every rank for steps; for a
        wall-clock interval rank 0's clock decides and the others follow it).
    group : sksae.distributed.Group or None
    device : torch.device or str, default="cpu"
        Where the group's collectives take tensors.
    """

    def __init__(self, folder, every, state, write=True, group=None, device="cpu"):
        self.folder = Path(folder)
        self.kind, self.every = parse_every(every)
        self.state = state
        self.write_files = write
        self.group = group
        self.device = device
        self.last = time.monotonic()

    def due(self, n_steps):
        """Whether to write after ``n_steps`` steps of the call.

        With a group and a wall-clock interval, rank 0's clock is asked every
        :data:`CLOCK_STEPS` steps only: each asking is a broadcast read on the
        host, which waits for the GPU's queued work.
        """
        if self.kind == "steps":
            return n_steps % self.every == 0
        if self.group is not None and n_steps % CLOCK_STEPS:
            return False
        due = time.monotonic() - self.last >= self.every
        if self.group is not None:  # rank 0's clock decides, for every rank alike
            flag = torch.tensor([float(due)], device=self.device)
            due = bool(self.group.broadcast_(flag)[0])
        return due

    def write(self, loop_state):
        """Write the checkpoint of ``loop_state`` (:class:`sksae._engine.LoopState`)."""
        if self.write_files:
            write_checkpoint(self.folder, self.state(loop_state))
        self.last = time.monotonic()
