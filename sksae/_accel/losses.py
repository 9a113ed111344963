"""Loss primitives with fewer passes over memory than their plain torch spelling."""

from __future__ import annotations

import torch

__all__ = ["sum_squares"]


class _SumSquares(torch.autograd.Function):
    """``||a - b||^2`` (a scalar): a difference and a dot forward, one product backward.

    The same value and gradients as ``(a - b).pow(2).sum()`` in three passes
    over (B, D) instead of seven.
    """

    @staticmethod
    def forward(ctx, a, b):
        d = (a - b).reshape(-1)
        ctx.save_for_backward(d)
        ctx.shape = a.shape
        return torch.dot(d, d)

    @staticmethod
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        g = (d * (2 * grad)).view(ctx.shape)
        need = ctx.needs_input_grad
        return (g if need[0] else None), (-g if need[1] else None)


def sum_squares(a, b):
    """``||a - b||^2`` summed over every entry, outside any autocast region."""
    with torch.autocast(a.device.type, enabled=False):
        return _SumSquares.apply(a, b)
