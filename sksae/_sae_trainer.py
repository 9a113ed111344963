"""Training of a sparse autoencoder: initialisation, the generic step, dead latents.

The recipe is the one the strong SAE libraries converged on (RESEARCH.md §5):
Adam (0.9, 0.999), linear learning-rate warm-up then a linear decay to zero over
the last 20% of steps, gradient-norm clipping at 1, decoder rows kept at unit
norm by projecting out the radial gradient and renormalising after each step,
b_dec initialised at the geometric median and W_enc = W_dec^T.

A step is ``encode -> losses -> backward -> clip -> optimizer -> constraints ->
metrics``; everything architecture-specific (codes, extra losses, their
coefficients, buffers updated after a step) comes from the
:class:`sksae.architectures.Architecture` it is given, and the speed
machinery (workspace, fused optimizer, CUDA graphs) from :mod:`sksae._accel`.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from ._accel import fused
from ._accel.adam import FusedAdam, clip_and_step, make_adam
from ._accel.device import (
    HostReading,
    autocast,
    capture_graph,
    graphs_supported,
    is_accelerator,
    native_bf16,
    side_stream,
)
from ._accel.losses import sum_squares
from ._accel.sparse import Pattern, unit_rows_
from ._accel.threads import serial
from ._accel.workspace import StepWorkspace
from .architectures import LossInputs, SparseCodes, decode
from .distributed._group import BatchInfo, variance_from_sums

__all__ = ["geometric_median", "init_parameters", "calibrate_encoder_scale", "product_dtype",
           "StepOutput", "SAETrainer", "DeadLatentBound"]


def geometric_median(x_ND, n_iter=20, eps=1e-8):
    """Weiszfeld's iterations for the geometric median of the rows of ``x``."""
    y = x_ND.mean(0)
    for _ in range(n_iter):
        w = 1.0 / (x_ND - y).norm(dim=-1).clamp_min(eps)
        y_new = (w @ x_ND) / w.sum()
        if (y_new - y).norm() <= 1e-6 * y.norm().clamp_min(eps):
            return y_new
        y = y_new
    return y


def init_parameters(x_sample_ND, n_components, init, generator, dtype, device):
    """Initial W_enc, b_enc, W_dec, b_dec from a (normalised) data sample.

    ``init="data"`` takes decoder atoms from random centred data rows (Sharkey
    et al. 2022: atoms that are sparse combinations of the true features speed up
    early recovery); ``"random"`` uses Gaussian directions; an array is used as
    given. Rows are unit-normed and the encoder is the decoder's transpose.
    """
    x = x_sample_ND.to(device="cpu", dtype=torch.float64)
    n_rows, n_features = x.shape
    b_dec = geometric_median(x)
    W = torch.randn(n_components, n_features, generator=generator, dtype=torch.float64)
    if isinstance(init, str) and init == "data":
        centred = x - b_dec
        nonzero = centred.norm(dim=-1) > 1e-8 * (1 + centred.norm(dim=-1).max())
        rows = centred[nonzero]
        if rows.shape[0]:
            take = min(n_components, rows.shape[0])
            pick = torch.randperm(rows.shape[0], generator=generator)[:take]
            W[:take] = rows[pick]
    elif not isinstance(init, str):
        W = torch.as_tensor(init, dtype=torch.float64).clone()
    W = unit_rows_(W)
    p = {
        "W_enc": W.clone(),
        "b_enc": torch.zeros(n_components, dtype=torch.float64),
        "W_dec": W,
        "b_dec": b_dec,
    }
    return {k: v.to(device=device, dtype=dtype) for k, v in p.items()}


@torch.no_grad()
def calibrate_encoder_scale(arch, params, buffers, x_sample_ND, ws=None):
    """Scale the encoder so that the initial reconstruction is least-squares optimal.

    With W_enc = W_dec^T the initial codes are projections on non-orthogonal
    atoms, whose sum overshoots (badly for large ``k``): the first steps then
    only undo it. One scalar ``c = <x - b, x_hat - b> / ||x_hat - b||^2`` over a
    sample, applied to W_enc and b_enc, starts training from the best
    reconstruction along that direction. The codes are the training step's
    (through ``ws``, the workspace of the fit's precision).
    """
    p = {**params, **buffers}
    x = x_sample_ND.to(params["W_dec"])
    codes = arch.encode(p, x, training=True, ws=ws).codes
    scale_encoder_to_fit(params, x, decode(codes, params["W_dec"], kernels=arch.kernels))


@torch.no_grad()
def scale_encoder_to_fit(params, x, recon):
    """Scale W_enc and b_enc by ``c = <x - b_dec, recon> / ||recon||^2`` (when finite and > 0).

    ``recon`` is the reconstruction of ``x`` without ``b_dec``.
    """
    denom = recon.pow(2).sum()
    if denom > 0:
        c = ((x - params["b_dec"]) * recon).sum() / denom
        if torch.isfinite(c) and c > 0:
            params["W_enc"].mul_(c)
            params["b_enc"].mul_(c)


def _total_variance(x_BD, centred=None):
    """``sum ||x_b - mean(x)||^2`` over the batch (the FVU's denominator, at least 1e-12).

    From ``centred = x - c`` for any fixed ``c`` (the encoder's ``x - b_dec``,
    already computed on the sparse path) it is ``sum ||centred_b||^2 -
    B ||mean(centred)||^2``: two reads of ``centred`` instead of four passes
    over ``x``. The shift by ``b_dec`` (near the data's median) keeps the
    difference well conditioned; it is taken in float64.
    """
    if centred is None:
        return (x_BD - x_BD.mean(0)).pow(2).sum().clamp_min(1e-12)
    flat = centred.reshape(-1)
    # the sums in the data's precision, their combination in float64
    return variance_from_sums(torch.dot(flat, flat), centred.sum(0),
                              centred.shape[0]).to(x_BD.dtype)


def _fired_counts(codes, n_components):
    """How many rows of the batch each latent fired on."""
    if isinstance(codes, SparseCodes):
        counts = codes.values.new_zeros(n_components, dtype=torch.float32)
        indices = codes.indices
        indices = indices.indices if isinstance(indices, Pattern) else indices.flatten()
        return counts.index_add_(0, indices, (codes.values > 0).flatten().to(torch.float32))
    return (codes > 0).sum(0).to(torch.float32)


def _l0(codes):
    if isinstance(codes, SparseCodes):
        return (codes.values > 0).to(torch.float32).sum() / codes.n_rows
    return (codes > 0).to(torch.float32).sum(-1).mean()


def product_dtype(precision, device, dtype):
    """Low precision for the products of a training step on ``device``, or None.

    ``"float32"`` (or float64 parameters): None, every product in the
    parameters' dtype. ``"bfloat16"``: ``torch.bfloat16``. ``"auto"``: bf16
    where the device multiplies it natively (:func:`sksae._accel.device.native_bf16`).
    """
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision must be 'auto', 'float32' or 'bfloat16', got {precision!r}.")
    if precision == "float32" or dtype != torch.float32:
        return None
    if precision == "bfloat16" or native_bf16(device):
        return torch.bfloat16
    return None


def host_copy(obj):
    """``obj`` with every tensor in it (nested dicts, lists, tuples) copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu").clone()
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class StepOutput(NamedTuple):
    """Scalar tensors of one training step (normalised units).

    Attributes
    ----------
    loss, mse, fvu, l0, dead_fraction : Tensor
        The total loss, the mean squared error per row, the fraction of
        variance unexplained, the mean number of active latents and the
        fraction of latents dead at this step.
    grad_norm : Tensor
        The total norm of the gradients before clipping (the training loop
        checks it and the loss for finiteness when it reads the metrics).
    terms : dict of Tensor
        The architecture's loss terms.
    """

    loss: torch.Tensor
    mse: torch.Tensor
    fvu: torch.Tensor
    l0: torch.Tensor
    dead_fraction: torch.Tensor
    grad_norm: torch.Tensor
    terms: dict

    def as_dict(self):
        """Every metric by name (the architecture's terms after the shared ones)."""
        return {"loss": self.loss, "mse": self.mse, "fvu": self.fvu, "l0": self.l0,
                "dead_fraction": self.dead_fraction, "grad_norm": self.grad_norm,
                **self.terms}


class DeadLatentBound:
    """When no latent can be dead: a host-side bound on the largest ``rows_since_fired``.

    A latent's count grows by at most a batch's rows a step. After one reading
    of the largest count ``m``, no latent can be dead while ``m`` plus the
    rows trained since stays under ``dead_window``. The counts are read again
    ahead of the bound running out (within ``lookahead_steps`` batches of it)
    and, while latents are dead, every ``reread_steps`` steps. On CUDA a
    reading is copied without waiting (:class:`sksae._base.HostReading`): it
    lands a few steps later and is still a valid bound then, so the host does
    not stall the GPU's queue for it. Only when the bound runs out before a
    reading has landed (a latent within ``lookahead_steps`` batches of the
    window, or a window of a few batches) does the host wait for one: the
    AuxK step it would otherwise run costs more than the wait
    (``benchmarks/results/gpu_step.txt``).

    Parameters
    ----------
    counts : Tensor of shape (n_components,)
        The trainer's ``rows_since_fired``, read when needed.
    dead_window : int
    reread_steps : int
    lookahead_steps : int
        How early to read again: about how many steps the host may run ahead
        of the GPU (the training loop reads its metrics every 32 steps).
    synchronous : bool, default=False
        Wait for each reading: data-parallel ranks must take the same
        decisions at the same steps (their losses then run collectives). A
        reading is then current when taken, and ``lookahead_steps`` is 0: the
        counts are read when the bound runs out, not ahead of it.
    largest : callable, default=None
        Returns the largest count as a one-element tensor; by default
        ``counts.max()``. Latent-sharded ranks hold a slice of the counts each
        and pass the all-reduced maximum (a collective: with ``synchronous``,
        every rank reads at the same steps).
    """

    def __init__(self, counts, dead_window, reread_steps, lookahead_steps=32,
                 synchronous=False, largest=None):
        self.synchronous = synchronous
        # a synchronous reading is current when taken: reading ahead would only read the
        # counts every step while the largest is within the lookahead of the window
        lookahead_steps = 0 if synchronous else lookahead_steps
        self._read_largest = counts.max if largest is None else largest
        self.dead_window = dead_window
        self.reread_steps = reread_steps
        self.lookahead_steps = lookahead_steps
        self.forget()

    def forget(self):
        """The counts were set from outside the steps: read them again."""
        self.largest = None  # at the last reading; None: unknown
        self.rows_since = 0  # rows trained since that reading
        self.reread_at = 0
        self._reading = None
        self._rows_since_reading = 0

    def advance(self, n_rows):
        """A step trained on ``n_rows`` rows."""
        self.rows_since += n_rows
        self._rows_since_reading += n_rows

    def may_be_dead(self, step, n_rows):
        """Whether some latent may be dead at step ``step`` (of ``n_rows`` rows)."""
        self._collect(step)
        ahead = self.lookahead_steps * n_rows
        if self._reading is None and step >= self.reread_at and (
                self.largest is None or self.largest + self.rows_since + ahead >= self.dead_window):
            self._read(step)
        for _ in range(2):  # the pending reading, then a fresh one if that was too old
            if not self._unbounded() or step < self.reread_at:
                break
            if self._reading is None:
                self._read(step)
            self._collect(step, wait=True)
        return self._unbounded()

    def _unbounded(self):
        return self.largest is None or self.largest + self.rows_since >= self.dead_window

    def _read(self, step):
        self._reading = HostReading(self._read_largest())
        self._rows_since_reading = 0
        self._collect(step)  # at once off the GPU

    def _collect(self, step, wait=False):
        if self._reading is None:
            return
        largest = self._reading.value(wait=wait or self.synchronous)
        if largest is None:
            return
        self.largest, self.rows_since = largest, self._rows_since_reading
        self.reread_at = step + self.reread_steps if largest >= self.dead_window else 0
        self._reading = None


class SAETrainer:
    """Owns the parameters in training units, Adam, schedules and dead-latent stats.

    Parameters
    ----------
    arch : Architecture
    params : dict of Tensor
        Trainable tensors in normalised units (made leaf ``requires_grad``).
    buffers : dict of Tensor
    lr : float
    schedule : Schedule
        The fit's length (``total_steps`` None for ``partial_fit``: no final decay).
    warmup_steps : int
        Steps of the learning-rate warm-up.
    dead_window : int
        Rows without firing after which a latent counts as dead.
    precision : {"auto", "float32", "bfloat16"}
        Precision of the step's products (:func:`product_dtype`): bf16
        autocast on CUDA; on the CPU, the bf16 product that selects the
        sparse kernels' active latents.
    group : sksae.distributed.Group or None
        Data-parallel training: each rank steps on its part of every global
        batch, and one all-reduce per step sums the gradients, the fired
        counts and the metrics' sums (see :meth:`_reduce`); every rank then
        takes the same optimizer step. None: one process.

    Notes
    -----
    On devices that support it the step is recorded once as a CUDA graph and
    replayed (``cuda_graphs``): at small batches an eager step is
    launch-bound. The first ``graph_warmup_steps`` steps run eagerly (on a
    side stream), then the next full-size batch is recorded; batches of
    another size (an epoch's last) run eagerly. The learning rate and the
    architecture's coefficients enter the graph as device scalars refreshed
    before each replay. A step that cannot be recorded runs eagerly from then
    on, and ``graph_error`` says why.

    For architectures that read dead latents (``uses_dead_latents``) the
    trainer keeps a host-side bound (:class:`DeadLatentBound`): while no
    latent can be dead their losses are given ``dead=None`` and skip that
    work. Recorded steps are kept per case.
    """

    decay_fraction = 0.2
    #: while latents are dead, steps between host reads of whether any still are
    dead_reread_steps = 100
    clip_norm = 1.0
    #: record and replay the step as a CUDA graph where the device supports it
    cuda_graphs = True
    graph_warmup_steps = 3

    def __init__(self, arch, params, buffers, *, lr, schedule, warmup_steps, dead_window,
                 precision="auto", group=None):
        self.arch = arch
        self.group = group
        self.params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        self.buffers = buffers
        self._set_recipe(lr, schedule, warmup_steps, dead_window)
        device = params["W_dec"].device
        self.device = device
        self.product_dtype = product_dtype(precision, device, params["W_dec"].dtype)
        self.use_autocast = self.product_dtype is not None
        self.ws = StepWorkspace(selection_dtype=self.product_dtype)
        self.graph_error = None
        # collectives inside a recorded step are not worth their constraints here
        self.graphs = self.cuda_graphs and graphs_supported(device) and group is None
        self.optimizer = None
        if self.graphs:
            try:
                self.optimizer = make_adam(list(self.params.values()), lr, device,
                                           capturable=True)
            except (RuntimeError, ValueError, TypeError) as exc:  # e.g. an older torch
                self.graphs, self.graph_error = False, f"{type(exc).__name__}: {exc}"
        if self.optimizer is None:
            self.optimizer = make_adam(list(self.params.values()), lr, device)
        self.rows_since_fired = torch.zeros(arch.n_components, dtype=torch.float64,
                                            device=device)
        self.step_count = 0
        self.current_lr = self.lr_at(0)
        # the coefficients a recorded step reads: device scalars filled in place
        self.coef = {name: (torch.tensor(value, device=device) if self.graphs else value)
                     for name, value in arch.coefficients(0, schedule).items()}
        self._graphs = {}  # recorded steps, by whether the losses read dead latents
        self._eager_steps = {}
        # "auto" kernels of the TopK family on an accelerator: timed at the first step
        self._kernels_open = (arch.kernels == "auto" and is_accelerator(device)
                              and hasattr(arch, "encode_training"))
        self.kernel_timings = None
        self._dead_bound = DeadLatentBound(self.rows_since_fired, dead_window,
                                           self.dead_reread_steps,
                                           synchronous=group is not None)
        if isinstance(self.optimizer, FusedAdam):
            # set-up pays the page faults of Adam's moments and of the first
            # step's (F, D) results (lent from these gradients), not the first step
            self.optimizer.init_state()
            for p in self.params.values():
                if p.grad is None and p.dim() == 2:
                    p.grad = torch.zeros_like(p)

    def calibrate_encoder_scale(self, x_sample_ND):
        """:func:`calibrate_encoder_scale` of the parameters, with this fit's training codes."""
        calibrate_encoder_scale(self.arch, self.params, self.buffers, x_sample_ND, self.ws)

    # -- schedules ----------------------------------------------------------
    def _set_recipe(self, lr, schedule, warmup_steps, dead_window):
        """The learning rate, the fit's length, the warm-up and the dead window."""
        self.lr = lr
        self.schedule = schedule
        self.total_steps = schedule.total_steps
        self.warmup_steps = max(1, warmup_steps)
        self.dead_window = dead_window

    def lr_at(self, step):
        """The learning rate of step ``step``: warm-up, then the final decay of a ``fit``."""
        factor = min(1.0, (step + 1) / self.warmup_steps)
        if self.total_steps:
            decay_start = (1 - self.decay_fraction) * self.total_steps
            if step >= decay_start:
                factor *= max(0.0, (self.total_steps - step) / (self.total_steps - decay_start))
        return self.lr * factor

    def _set_schedules(self, step):
        """Learning rate and coefficients of step ``step`` (device scalars filled in place)."""
        self.current_lr = lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        for name, value in self.arch.coefficients(step, self.schedule).items():
            if isinstance(self.coef.get(name), torch.Tensor):
                self.coef[name].fill_(value)
            else:
                self.coef[name] = value

    # -- one step -------------------------------------------------------------
    def step(self, x_BD, n_rows=None):
        """One optimizer step on a normalised batch; returns a :class:`StepOutput`.

        With a process group ``x_BD`` is this rank's part of a global batch of
        ``n_rows`` rows (required then), and the metrics are the global batch's.

        On the CPU the step runs on one intra-op thread
        (:func:`sksae._accel.threads.serial`): its heavy operations run on the
        fit's threads (:func:`sksae._accel.threads.parallel`). Where CUDA graphs are supported it is a replay of
        a recorded step (see the class notes).
        """
        if self._kernels_open:
            self._choose_kernels(x_BD)
        if self.graphs:
            return self._graph_step(x_BD)
        if self.group is None:
            n_rows = x_BD.shape[0]
        elif n_rows is None:
            raise ValueError("a data-parallel step needs the global batch's n_rows.")
        with serial(x_BD):
            return self._step(x_BD, self._dead_may_exist(n_rows), n_rows)

    def _choose_kernels(self, x_BD):
        """Resolve the TopK family's "auto" kernels on an accelerator by timing both steps.

        Once per fit, on its first batch: the forward and backward pass of
        the reconstruction (no optimizer step, no state changed) with the
        sparse kernels (the Triton ones of :mod:`sksae._accel.fused`) and with
        the dense products; the faster is the fit's (``kernel_timings`` keeps
        the seconds). Without Triton "auto" stays the dense step. In
        data-parallel training rank 0's choice is every rank's.
        """
        self._kernels_open = False
        arch = self.arch
        if fused.kernels_for(x_BD) is None:
            return
        params = list(self.params.values())

        def reconstruction(mode):
            def run():
                arch.kernels = mode
                p = {**self.params, **self.buffers}
                with autocast(self.device, self.use_autocast):
                    enc = arch.encode(p, x_BD, training=True, ws=self.ws)
                    x_hat = decode(enc.codes, p["W_dec"], p["b_dec"], kernels=mode, ws=self.ws)
                    loss = sum_squares(x_hat.to(x_BD.dtype), x_BD)
                torch.autograd.grad(loss, params)
            return run

        try:
            choice, self.kernel_timings = fused.fastest(
                {mode: reconstruction(mode) for mode in ("sparse", "dense")}, self.device)
        finally:
            arch.kernels = "auto"
        if self.group is not None:
            choice = self.group.broadcast_object(choice)
        arch.kernels = choice

    def _dead_may_exist(self, n_rows):
        """Whether a latent may be dead at this step (only asked for architectures that care)."""
        return self.arch.uses_dead_latents and \
            self._dead_bound.may_be_dead(self.step_count, n_rows)

    def _step(self, x_BD, dead_may_exist, n_rows=None):
        self._set_schedules(self.step_count)
        out = self._update(x_BD, dead_may_exist=dead_may_exist, n_rows=n_rows)
        self._advance(x_BD, n_rows)
        return out

    def _advance(self, x_BD, n_rows=None):
        self.step_count += 1
        self._dead_bound.advance(x_BD.shape[0] if n_rows is None else n_rows)

    def _graph_step(self, x_BD):
        variant = self._dead_may_exist(x_BD.shape[0])
        g = self._graphs.get(variant)
        if g is None and self._eager_steps.get(variant, 0) >= self.graph_warmup_steps \
                and self.graph_error is None:
            g = self._record(x_BD, variant)
        if g is not None and x_BD.shape == g["x"].shape:
            self._set_schedules(self.step_count)
            g["x"].copy_(x_BD)
            g["graph"].replay()
            self._advance(x_BD)
            # the graph's outputs are overwritten by the next replay: one copy of all
            values = dict(zip(g["names"], g["metrics"].clone().unbind()))
            return StepOutput(*(values.pop(k) for k in StepOutput._fields[:-1]), terms=values)
        with side_stream(self.device):
            self._eager_steps[variant] = self._eager_steps.get(variant, 0) + 1
            return self._step(x_BD, variant)

    def _record(self, x_BD, variant):
        """Record :meth:`_update` on a static copy of ``x`` as a CUDA graph (None on failure).

        Each variant (whether the losses read dead latents) is recorded apart,
        on its own memory, the second only when latents die.
        """
        x = x_BD.clone()
        names = []

        def update():
            metrics = self._update(x, cache_casts=False, dead_may_exist=variant).as_dict()
            names.extend(metrics)
            return torch.stack([v.reshape(()).to(torch.float64) for v in metrics.values()])

        self.optimizer.zero_grad(set_to_none=True)  # gradients live in the graph's memory
        try:
            graph, vector = capture_graph(update, self.device)
        except Exception as exc:  # e.g. an operation that synchronises with the host
            self.graph_error = f"{type(exc).__name__}: {exc}"
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self._graphs[variant] = {"graph": graph, "x": x, "metrics": vector, "names": names}
        return self._graphs[variant]

    def _update(self, x_BD, cache_casts=True, dead_may_exist=True, n_rows=None):
        """Losses, gradients, the optimizer step and the statistics, for one batch.

        With a process group ``x_BD`` is this rank's part of a global batch of
        ``n_rows`` rows: the losses are this rank's shares of the global
        batch's (shares sum to it), and :meth:`_reduce` sums the gradients,
        fired counts and metrics across ranks before the optimizer step.
        """
        p = {**self.params, **self.buffers}
        ws = self.ws
        group = self.group
        n_rows = x_BD.shape[0] if group is None else n_rows
        batch = BatchInfo(n_rows, group)
        self.arch.batch = batch
        dead = self.rows_since_fired >= self.dead_window if dead_may_exist else None
        # the sparse decodes project their own gradients unless the losses read W_dec
        projecting = (ws.projecting(p["W_dec"]) if not self.arch.decoder_in_losses
                      else contextlib.nullcontext())
        with projecting as tangent:
            with autocast(self.device, self.use_autocast, cache=cache_casts):
                enc = self.arch.encode(p, x_BD, training=True, ws=ws)
                x_hat = decode(enc.codes, p["W_dec"], p["b_dec"], kernels=self.arch.kernels,
                               ws=ws).to(x_BD.dtype)
                terms = self.arch.losses(
                    LossInputs(p, x_BD, enc, x_hat, self.coef, dead, ws, batch))
            sq_err = sum_squares(x_hat, x_BD)
            mse = sq_err / n_rows
            loss = mse + sum(t.to(mse.dtype) for t in terms.values())
            # last step's gradients become this step's (F, D) results, each its own
            with ws.lending((p, p.grad) for p in self.params.values()), ws.noting_norms():
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
        if tangent is None or not tangent.complete:
            self._project_decoder_grad()
        with torch.no_grad():
            fired = _fired_counts(enc.codes, self.arch.n_components)
            if group is None:
                total_var = _total_variance(x_BD, enc.centred)
                l0 = _l0(enc.codes)
            else:
                # total variance from sums about b_dec (the same on every rank)
                centred = enc.centred if enc.centred is not None else x_BD - p["b_dec"]
                c = centred.double()
                sums = [c.pow(2).sum(), c.sum(0), sq_err, loss, *terms.values(), fired.sum()]
                sums = self._reduce(fired, sums)
                sq_all, col, sq_err, loss, *term_values, n_active = sums
                total_var = variance_from_sums(sq_all, col, n_rows).to(x_BD.dtype)
                sq_err, loss = sq_err.to(x_BD.dtype), loss.to(x_BD.dtype)
                mse = sq_err / n_rows
                terms = dict(zip(terms, (v.to(x_BD.dtype) for v in term_values)))
                l0 = (n_active / n_rows).to(torch.float32)
        grad_norm = clip_and_step(self.optimizer, self.params.values(), self.clip_norm, ws)
        with torch.no_grad():
            unit_rows_(self.params["W_dec"])
            self.arch.after_step(p, enc)
            self.rows_since_fired.add_(n_rows).masked_fill_(fired > 0, 0)
            return StepOutput(
                loss=loss.detach(), mse=mse.detach(), fvu=sq_err.detach() / total_var,
                l0=l0,
                dead_fraction=(self.rows_since_fired >= self.dead_window)
                .to(torch.float32).mean(),
                grad_norm=grad_norm.detach(),
                terms={k: v.detach() for k, v in terms.items()})

    def _reduce(self, fired, sums):
        """Sum the gradients, ``fired`` (in place) and ``sums`` across ranks in one all-reduce.

        Returns the summed ``sums`` (float64, the shapes given). Every rank
        then holds the gradient of the global batch's loss, since each
        rank's loss is its share of it. The metrics' sums travel in the
        gradients' bucket when those are float64, else in a second, small
        all-reduce that keeps them float64.
        """
        grads = [q.grad for q in self.params.values() if q.grad is not None]
        flat_sums = torch.cat([s.detach().double().reshape(-1) for s in sums])
        dtype = grads[0].dtype if grads else fired.dtype
        parts = [*grads, fired]
        in_bucket = dtype == torch.float64
        if in_bucket:
            parts.append(flat_sums)
        bucket = self.group.sum_(torch.cat([t.to(dtype).reshape(-1) for t in parts]))
        if not in_bucket:
            self.group.sum_(flat_sums)
        for t, summed in zip(parts, bucket.split([t.numel() for t in parts])):
            t.copy_(summed.view_as(t))
        return [v.view(s.shape) for s, v in zip(sums, flat_sums.split([s.numel() for s in sums]))]

    @torch.no_grad()
    def resample_dead_latents(self, x_ND, generator=None):
        """Re-initialise the dead latents from badly reconstructed inputs (Bricken et al. 2023).

        Inputs of ``x`` (normalised units) are drawn with probability proportional
        to their squared reconstruction error ||x - x_hat||^2; for a dead latent
        drawing ``x``, the decoder row becomes ``u = (x - b_dec) / ||x - b_dec||``,
        the encoder row ``0.2 * mean alive encoder row norm * u``, the encoder
        bias 0, and every other per-latent parameter its initial value
        (``arch.extra_parameters``); the Adam moments of those rows are zeroed
        and their dead counters restarted. Works for every architecture.

        Returns the number of latents resampled.
        """
        dead = self.rows_since_fired >= self.dead_window
        idx = dead.nonzero().flatten()
        n_dead = idx.numel()
        if n_dead == 0:
            return 0
        p = {**self.params, **self.buffers}
        errors = []
        for chunk in x_ND.split(4096):
            codes = self.arch.encode(p, chunk)
            x_hat = decode(codes, p["W_dec"], p["b_dec"])
            errors.append((chunk - x_hat).pow(2).sum(-1))
        weights = torch.cat(errors).to("cpu", torch.float64)
        if not bool(weights.sum() > 0):
            weights = torch.ones_like(weights)
        rows = torch.multinomial(weights, n_dead, replacement=n_dead > weights.numel(),
                                 generator=generator).to(x_ND.device)
        u = x_ND[rows] - p["b_dec"]
        u = unit_rows_(u.contiguous()).to(self.params["W_dec"].dtype)
        W_enc = self.params["W_enc"]
        enc_norm = W_enc[~dead].norm(dim=-1).mean() if bool((~dead).any()) else 1.0
        self.params["W_dec"][idx] = u
        W_enc[idx] = 0.2 * enc_norm * u
        self.params["b_enc"][idx] = 0
        touched = ["W_dec", "W_enc", "b_enc"]
        n_components = self.arch.n_components
        for name, init in self.arch.extra_parameters(self.params).items():
            if name in self.params and init.ndim and init.shape[0] == n_components:
                self.params[name][idx] = init[idx].to(self.params[name].dtype)
                touched.append(name)
        for name in touched:
            state = self.optimizer.state.get(self.params[name], {})
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment in state:
                    state[moment][idx] = 0
        self.rows_since_fired[idx] = 0
        return n_dead

    def _project_decoder_grad(self):
        """Remove the gradient component along each (unit) decoder row."""
        W, g = self.params["W_dec"], self.params["W_dec"].grad
        if g is not None:
            # g -= (g . w) w row by row: a product (into a reused buffer on the CPU)
            # and a row sum, as fast as linalg.vecdot and without its fresh (F, D) temporary
            W = W.detach()
            out = self.ws.scratch("decoder grad product", W.shape, W)
            dots = torch.mul(g, W, out=out).sum(-1, keepdim=True)
            g.addcmul_(dots, W, value=-1)

    # -- state ------------------------------------------------------------------
    def state_dict(self):
        """Everything needed to resume, as CPU tensors (device-free)."""
        return {
            "params": host_copy(self.params),
            "buffers": host_copy(self.buffers),
            "optimizer": host_copy(self.optimizer.state_dict()),
            "rows_since_fired": host_copy(self.rows_since_fired),
            "step_count": self.step_count,
        }

    def load_state_dict(self, state):
        """Resume from :meth:`state_dict`'s output, which is copied and left unchanged."""
        with torch.no_grad():
            for k, v in state["params"].items():
                self.params[k].copy_(v)
            for k, v in state["buffers"].items():
                self.buffers[k].copy_(v)
        defaults = self.optimizer.defaults
        saved = state["optimizer"]
        if not isinstance(self.optimizer, FusedAdam):
            # torch.optim.Adam keeps the tensors it is given where their device and
            # dtype fit (and a non-fused step count as it is), then updates them in
            # place: it gets copies, so that the caller's state stays as it was
            saved = {**saved, "state": {
                i: {k: v.clone() if isinstance(v, torch.Tensor) and (
                    k == "step" or v.device == self.device) else v for k, v in moments.items()}
                for i, moments in saved["state"].items()}}
        self.optimizer.load_state_dict(saved)
        for group in self.optimizer.param_groups:
            # a state saved by another kind of step (fused or not, recorded on a GPU
            # or eager on the CPU) runs with the implementation chosen here: every
            # setting but the learning rate is this optimizer's own
            group.update({k: v for k, v in defaults.items() if k != "lr"})
            lr = float(group["lr"])
            group["lr"] = (torch.tensor(lr, dtype=torch.float32, device=self.device)
                           if isinstance(defaults["lr"], torch.Tensor) else lr)
        if defaults.get("fused") or defaults.get("capturable"):
            for param, moments in self.optimizer.state.items():  # their kernels read it there
                if isinstance(moments.get("step"), torch.Tensor):
                    moments["step"] = moments["step"].to(param.device, torch.float32)
        self.rows_since_fired.copy_(state["rows_since_fired"])
        self._dead_bound.forget()
        self.step_count = state["step_count"]
