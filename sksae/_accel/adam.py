"""Adam on torch's fused CPU kernel, without ``torch.optim``'s import cost.

The first ``torch.optim.Adam`` of a process imports ``torch._dynamo`` (its
methods are wrapped to be skipped by the compiler), which takes about a
second on a CPU, paid again by every worker process of a ``GridSearchCV``. :class:`FusedAdam` calls the same kernel
(``torch._fused_adam_``) with the same arguments as ``torch.optim.Adam(...,
fused=True)``, so it gives the same bits, and it reads and writes the same
``state_dict`` format, so a training state moves between it and
``torch.optim.Adam`` (e.g. a model fitted on the CPU resumed on a GPU).
"""

from __future__ import annotations

import functools
import math

import torch

from .._base import TrainingDivergedError
from .threads import even_bounds, parallel, run_ranges, serial_threads

__all__ = ["FusedAdam", "clip_and_step", "fused_cpu_kernel", "make_adam", "total_norm"]

_DEFAULTS = {
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.0,
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": True,
}


@functools.cache
def fused_cpu_kernel():
    """Whether this torch has the fused Adam kernel for CPU tensors (torch >= 2.4; probed once)."""
    if not hasattr(torch, "_fused_adam_"):
        return False
    try:
        p, g = torch.zeros(1), torch.zeros(1)
        torch._fused_adam_([p], [g], [torch.zeros(1)], [torch.zeros(1)], [],
                           [torch.zeros(())], amsgrad=False, lr=0.0, beta1=0.9, beta2=0.999,
                           weight_decay=0.0, eps=1e-8, maximize=False)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


class FusedAdam:
    """Adam (Kingma & Ba 2015) over a list of tensors, one fused pass per step.

    The part of the ``torch.optim.Optimizer`` interface the SAE trainer uses:
    ``param_groups`` (one group; its ``"lr"`` may be changed between steps),
    ``defaults``, ``state`` (per tensor: ``step``, ``exp_avg``,
    ``exp_avg_sq``), :meth:`step`, :meth:`zero_grad`, :meth:`state_dict`
    and :meth:`load_state_dict`.

    Parameters
    ----------
    params : list of Tensor
        Leaf tensors of one dtype on the CPU.
    lr : float
    betas : tuple of float, default=(0.9, 0.999)
    eps : float, default=1e-8
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        self.defaults = {"lr": lr, **_DEFAULTS, "betas": tuple(betas), "eps": eps}
        self.param_groups = [{**self.defaults, "params": list(params)}]
        self.state = {}

    @torch.no_grad()
    def step(self, grad_scale=None):
        """One Adam update of every tensor that has a gradient.

        Parameters
        ----------
        grad_scale : float, optional
            Divide the gradients by this first, in the same pass (the kernel's
            loss-scale input, which also stores the divided gradients back):
            gradient clipping by ``1 / grad_scale`` without a pass of its own.

        Notes
        -----
        Inside a training step on the CPU (a :func:`sksae._accel.threads.serial`
        block) the tensors, laid end to end, are updated in element ranges on
        sksae's threads (:func:`sksae._accel.threads.run_ranges`) while torch stays
        on one thread; the update is elementwise, so the split changes no bit.
        """
        group = self.param_groups[0]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        self._add_state(params)
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        tensors = [params, [p.grad for p in params], [s["exp_avg"] for s in states],
                   [s["exp_avg_sq"] for s in states]]
        scale = (None if grad_scale is None else
                 torch.tensor(float(grad_scale), dtype=torch.float32))

        def update(a, b):  # elements a:b of the tensors laid end to end
            chunks = [[] for _ in tensors]
            taken = []
            start = 0
            for i, p in enumerate(params):
                lo, hi = max(a - start, 0), min(b - start, p.numel())
                if lo < hi:
                    for chunk, ts in zip(chunks, tensors):
                        chunk.append(ts[i].view(-1)[lo:hi])
                    taken.append(steps[i])
                start += p.numel()
            torch._fused_adam_(
                *chunks, [], taken, amsgrad=False, lr=float(group["lr"]), beta1=beta1,
                beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=False, grad_scale=scale)

        total = sum(p.numel() for p in params)
        if serial_threads() is None or not all(
                t.is_contiguous() for ts in tensors for t in ts):
            return update(0, total)
        # inside a training step: element ranges on sksae's threads (the update
        # is elementwise, so the bits do not depend on the split)
        run_ranges(update, even_bounds(total, min_size=1 << 15))

    def init_state(self):
        """Create the moments of every tensor now instead of at its first update.

        The first update otherwise pays the page faults of the new moments
        (and of the first gradients); a trainer calls this while it sets up.
        The updates are the same.
        """
        self._add_state(self.param_groups[0]["params"])

    def _add_state(self, params):
        for p in params:
            if p not in self.state:
                # zeros are written, not mapped lazily: the pages are touched here
                self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }

    def zero_grad(self, set_to_none=True):
        """Drop (or zero) the gradients of the optimised tensors."""
        for p in self.param_groups[0]["params"]:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def state_dict(self):
        """The state in ``torch.optim.Optimizer.state_dict``'s format (tensors by reference)."""
        group = self.param_groups[0]
        index = {id(p): i for i, p in enumerate(group["params"])}
        return {
            "state": {index[id(p)]: dict(s) for p, s in self.state.items()},
            "param_groups": [{**{k: v for k, v in group.items() if k != "params"},
                              "params": list(range(len(group["params"])))}],
        }

    def load_state_dict(self, state_dict):
        """Load a state from :meth:`state_dict` or from a ``torch.optim.Adam``."""
        (saved,) = state_dict["param_groups"]
        params = self.param_groups[0]["params"]
        if len(saved["params"]) != len(params):
            raise ValueError("The state has another number of parameters than this optimizer.")
        position = {i: j for j, i in enumerate(saved["params"])}
        self.param_groups[0].update({k: v for k, v in saved.items() if k != "params"})
        self.state = {}
        for i, moments in state_dict["state"].items():
            p = params[position[i]]
            self.state[p] = {
                "step": torch.as_tensor(moments["step"], dtype=torch.float32).to(p.device).clone(),
                "exp_avg": moments["exp_avg"].to(p.device, p.dtype).clone(),
                "exp_avg_sq": moments["exp_avg_sq"].to(p.device, p.dtype).clone(),
            }


def make_adam(params, lr, device, capturable=False):
    """Adam (0.9, 0.999), fused (one pass over each tensor) where this torch has the kernel.

    torch has fused Adam for CUDA since 2.0 and for the CPU since 2.4;
    elsewhere the multi-tensor implementation gives the same updates up to
    rounding. On the CPU :class:`FusedAdam` calls the fused kernel.
    ``capturable=True`` (for a CUDA graph) keeps the step counts and the
    learning rate in device tensors, which the recorded kernels read at each
    replay.
    """
    if capturable:
        lr = torch.tensor(float(lr), dtype=torch.float32, device=device)
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True, capturable=True)
    if device.type == "cpu" and fused_cpu_kernel():
        return FusedAdam(params, lr=lr, betas=(0.9, 0.999))
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)
        except RuntimeError:  # no fused kernel for this device in this torch
            pass
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))


def total_norm(grads, ws=None, params=None):
    """The 2-norm of all gradients together, using the norms ``ws`` noted where it has them.

    ``params``: the parameters whose gradients these are (a noted norm is used only for
    the gradient of the parameter it was noted for).
    """
    params = [None] * len(grads) if params is None else params
    known = [None if ws is None else ws.known_norm(g, p) for g, p in zip(grads, params)]
    if any(n is not None for n in known):
        return torch.linalg.vector_norm(torch.stack([
            torch.linalg.vector_norm(g) if n is None else n.to(g.dtype)
            for g, n in zip(grads, known)]))
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if get_total_norm is not None:
        return get_total_norm(grads, foreach=True)
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g).to(grads[0].dtype) for g in grads]))


def _clip_with_norm(params, max_norm, norm):
    """Scale the gradients by ``min(1, max_norm / (norm + 1e-6))``, as torch's clipping."""
    clip = getattr(torch.nn.utils, "clip_grads_with_norm_", None)
    if clip is not None:
        clip(params, max_norm, norm, foreach=True)
        return
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))


def _folds_scale(optimizer):
    """Whether ``optimizer.step`` divides the gradients by a device scale in its own pass.

    torch's fused Adam reads ``optimizer.grad_scale`` and ``optimizer.found_inf``
    (the inputs :class:`torch.amp.GradScaler` sets) in the kernel that updates
    the parameters, for CUDA and CPU tensors alike.
    """
    return isinstance(optimizer, torch.optim.Adam) and bool(optimizer.defaults.get("fused"))


def _step_scaled(optimizer, max_norm, norm):
    """One fused Adam step with the clipping folded in, decided on the device.

    The gradients are divided by ``max(1, (norm + 1e-6) / max_norm)`` (the same
    factor as :func:`_clip_with_norm`, exactly 1 when no clipping is needed) in
    the optimizer's pass, instead of a pass of their own; a non-finite norm sets
    the kernel's ``found_inf``, which leaves the parameters, the moments and the
    step counts as they were. Nothing is read on the host, so a CUDA graph
    can record it.
    """
    norm32 = norm.detach().to(torch.float32).reshape(())
    optimizer.grad_scale = ((norm32 + 1e-6) / max_norm).clamp(min=1.0)
    optimizer.found_inf = (~torch.isfinite(norm32)).to(torch.float32)
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


def clip_and_step(optimizer, params, max_norm, ws=None, norm=None):
    """Clip the gradients' total norm at ``max_norm`` (as ``clip_grad_norm_``), then step.

    Off the CPU the clipping runs on the device without a host read: with
    torch's fused Adam the factor is the kernel's gradient scale (no pass of
    its own), and a non-finite norm skips the update on the device (the
    caller's metrics then report it). On the CPU the norm is read (free
    there), gradients that need no clipping are left as they are, and with
    :class:`FusedAdam` the factor is folded into the optimizer's pass the
    same way. ``norm``, when given, is the total norm to clip by (0-dim
    tensor), instead of the gradients' own: a model whose parameters are
    split across processes clips by the norm of all of them.

    Returns
    -------
    norm : Tensor
        The total norm of the gradients before clipping (0-dim, on their
        device; 0 when no tensor has a gradient), for the caller to check
        when it reads its metrics.

    Raises
    ------
    sksae.TrainingDivergedError
        On the CPU, when the norm is not finite: raised before the optimizer
        steps, so no parameter changes.
    """
    params = list(params)
    with_grads = [p for p in params if p.grad is not None]
    factor = None
    if with_grads:
        norm = total_norm([p.grad for p in with_grads], ws, with_grads) if norm is None else norm
        if with_grads[0].device.type != "cpu":
            if _folds_scale(optimizer):
                _step_scaled(optimizer, max_norm, norm)
                return norm
            _clip_with_norm(with_grads, max_norm, norm)
        else:
            value = float(norm)
            if not math.isfinite(value):
                raise TrainingDivergedError(
                    f"The gradient norm is {value}.", metric="grad_norm", value=value)
            if value + 1e-6 > max_norm:
                if isinstance(optimizer, FusedAdam):
                    factor = max_norm / (value + 1e-6)
                else:
                    _clip_with_norm(with_grads, max_norm, norm)
    else:
        norm = torch.zeros((), device=params[0].device)
    with parallel(params[0], own=True):  # one fused pass
        if factor is None:
            optimizer.step()
        else:
            optimizer.step(grad_scale=1.0 / factor)
    return norm
