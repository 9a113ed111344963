"""The state one training step's kernels share, passed to them explicitly.

A :class:`StepWorkspace` lives for one fit (the trainer owns it) and goes, as
an argument, to every kernel that needs more than its tensors:

- reused CPU buffers for the step's large temporaries (:meth:`scratch`): a
  fresh CPU allocation of many MiB is returned to the system when freed, so
  each step would pay its page faults again;
- the previous step's gradients, lent to this step's (F, D) results
  (:meth:`lending`, :meth:`take_buffer`);
- the decoder whose sparse decodes project their own gradients onto the
  tangent space of its unit rows (:meth:`projecting`), and the count of
  decodes that did;
- the norms of the gradients the compiled backward passes noted while writing
  them (:meth:`noting_norms`, :meth:`known_norm`), for gradient clipping;
- ``selection_dtype``: the precision of the CPU product that selects the
  TopK family's active latents (None: the parameters' precision).

Nothing here is thread-local or global: two fits in two threads each have
their own workspace.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple


__all__ = ["StepWorkspace", "TangentRows"]


class TangentRows:
    """Counts the uses of one decoder in a step, and those that projected their gradient.

    The decoder's rows are kept at unit norm, so the trainer removes the
    radial part ``(g_f . w_f) w_f`` of each row's gradient. A sparse decode
    knows that part from its entries alone and projects its own contribution
    (projection is linear). Any other use of the decoder's memory (a dense
    decode, a slice of its rows, a norm in a loss) makes the count incomplete,
    and the trainer then projects the summed gradient itself.
    """

    def __init__(self, W):
        self.W = W
        self.projected = 0
        self.other_uses = 0

    @property
    def complete(self):
        """Whether every use of the decoder was a sparse decode that projected its gradient."""
        return self.projected > 0 and self.other_uses == 0

    def is_decoder(self, W):
        """Whether ``W`` is the decoder itself (its storage, offset and shape)."""
        return (W.device == self.W.device and W.shape == self.W.shape
                and W.data_ptr() == self.W.data_ptr() and W.stride() == self.W.stride())

    def shares_memory(self, W):
        """Whether ``W`` views the decoder's memory (the decoder, a slice, a transpose)."""
        return (W.device == self.W.device
                and W.untyped_storage().data_ptr() == self.W.untyped_storage().data_ptr())


class StepWorkspace:
    """Buffers and bookkeeping shared by the kernels of one fit's training steps.

    Parameters
    ----------
    selection_dtype : torch.dtype or None, default=None
        Precision of the CPU product that selects active latents.
    """

    def __init__(self, selection_dtype=None):
        self.selection_dtype = selection_dtype
        self._scratch = {}
        self._free = {}
        self.tangent = None
        self.norms, self.noted_parts = None, {}

    # -- reused buffers --------------------------------------------------------
    def scratch(self, name, shape, like, dtype=None, init=None):
        """A CPU tensor of ``shape`` reused by every step, or None off the CPU.

        Accelerators' caching allocators already reuse memory (and autocast
        outputs need not match ``like``'s dtype), so callers allocate afresh
        there. ``init(buffer)``, when given, fills the parts that no step
        overwrites, once, when the buffer is created.
        """
        if like.device.type != "cpu":
            return None
        dtype = like.dtype if dtype is None else dtype
        buf = self._scratch.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._scratch[name] = like.new_empty(shape, dtype=dtype)
            if init is not None:
                init(buf)
        return buf

    @contextlib.contextmanager
    def lending(self, tensors):
        """Inside the block, :meth:`take_buffer` hands out ``tensors`` (None entries skipped).

        An entry is a tensor, lent to any result of its shape, dtype and
        device, or an ``(owner, tensor)`` pair, lent only to a result that
        names ``owner`` (the previous gradient of a parameter goes to the
        kernel computing that parameter's gradient, whatever other results of
        its shape the step makes). The workspace must hold the only other
        reference to a lent tensor
        (pass an iterable that keeps none, e.g. a generator), so that autograd
        adopts it as a new ``.grad`` without a copy. What is not taken is
        dropped at the end. Only CPU tensors are lent: accelerators' caching
        allocators already reuse memory, and a lent tensor would stay alive
        next to the new gradients.
        """
        self._free = {}
        for t in tensors:
            owner, t = t if isinstance(t, tuple) else (None, t)
            if t is not None and not t.requires_grad and t.device.type == "cpu":
                key = _key(t) if owner is None else _key(t) + (owner.data_ptr(),)
                self._free.setdefault(key, []).append(t)
        tensors = t = owner = None  # no reference left here: autograd adopts what is taken
        try:
            yield self
        finally:
            self._free = {}

    def take_buffer(self, shape, like, owner=None):
        """A tensor for a large result: a lent one of that shape, dtype and device, else fresh.

        ``owner``: the parameter whose gradient the result is (or is part of);
        a tensor lent for it is taken first.
        """
        key = (tuple(shape), like.dtype, like.device)
        for k in ((key + (owner.data_ptr(),),) if owner is not None else ()) + (key,):
            free = self._free.get(k)
            if free:
                return free.pop()
        return like.new_empty(shape)

    # -- decoder projection ------------------------------------------------------
    @contextlib.contextmanager
    def projecting(self, W):
        """Inside the block, sparse decodes with ``W`` give gradients orthogonal to its rows.

        Yields the block's :class:`TangentRows`.
        """
        prev, self.tangent = self.tangent, TangentRows(W)
        try:
            yield self.tangent
        finally:
            self.tangent = prev

    def tangent_for(self, W):
        """The active :class:`TangentRows` when ``W`` is its decoder, else None."""
        tangent = self.tangent
        return tangent if tangent is not None and tangent.is_decoder(W) else None

    def note_other_use(self, W):
        """Record a use of ``W`` that does not project its gradient (see :class:`TangentRows`)."""
        if self.tangent is not None and self.tangent.shares_memory(W):
            self.tangent.other_uses += 1

    # -- gradient norms ----------------------------------------------------------
    @contextlib.contextmanager
    def noting_norms(self):
        """Inside the block, the compiled backward passes note their gradients' norms."""
        self.norms, self.noted_parts = {}, {}
        try:
            yield self.norms
        finally:
            pass  # kept for the clipping that follows the block

    def note_norm(self, t, row_sq, owner=None):
        """Note ``t``'s norm from its rows' squared norms (``t``: part of ``owner``'s gradient)."""
        if self.norms is not None:
            key = None if owner is None else owner.data_ptr()
            self.norms[t.data_ptr()] = _Note(key, tuple(t.shape), t.dtype, t._version,
                                             row_sq.sum().sqrt())
            self.noted_parts[key] = self.noted_parts.get(key, 0) + 1

    def known_norm(self, t, owner=None):
        """The noted 2-norm of ``t``, or None when ``t`` is not that tensor as noted.

        A gradient that autograd adopted as is keeps its memory, shape and
        version; one that was accumulated into has another version. A
        parameter whose gradient had several noted parts (a decoder used by
        two sparse decodes, say) has no known norm: their sum is a new tensor,
        which may have taken the memory of a part already freed. With
        ``owner``, only a note made for that parameter's gradient is used.
        """
        noted = self.norms.get(t.data_ptr()) if self.norms else None
        if noted is None or (noted.shape, noted.dtype, noted.version) != (
                tuple(t.shape), t.dtype, t._version):
            return None
        if owner is not None and noted.owner != owner.data_ptr():
            return None
        if self.noted_parts.get(noted.owner, 0) != 1:
            return None
        return noted.norm


class _Note(NamedTuple):
    """A gradient's noted norm, and what identifies the gradient it was noted for."""

    owner: object  # the parameter's data_ptr, or None
    shape: tuple
    dtype: object
    version: int
    norm: object


def _key(t):
    return tuple(t.shape), t.dtype, t.device
