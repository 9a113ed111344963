"""Latent-sharded training of a TopK sparse autoencoder (dictionaries too wide for one device).

Each rank of a :class:`~sksae.distributed.Group` holds a contiguous slice of
the latents (``group.part(n_components)``): its rows of ``W_enc``, ``b_enc``
and ``W_dec`` and their Adam moments and dead-latent counters; ``b_dec`` is
replicated. The sharding is **1-D**: every rank steps on the same full batch
(no data parallelism is combined with it; a 2-D mesh of data x latent
parallelism is not implemented).

One step, on every rank:

1. the encoder product of the batch with the local rows, ``(B, F_local)``;
2. each row's ``k`` largest local pre-activations as candidates (values and
   global latent ids), all-gathered; every rank merges them into the same
   global top ``k`` of each row (:func:`merge_candidates`) and keeps the
   winners it owns;
3. the partial reconstruction ``codes_local @ W_dec_local`` (``b_dec`` added
   by rank 0 only), summed across ranks by an all-reduce whose backward
   passes the gradient on unchanged (:class:`_SumAcrossRanks`): every rank
   computes the same loss from the same ``x_hat``, and its backward gives
   each rank the gradient of its own rows. Where the unsharded trainer's
   rule (:func:`~sksae._accel.sparse.use_sparse`, at this rank's width)
   picks the sparse kernels, the winners are a ragged pattern and the decode
   and the gradients of ``W_enc``, ``b_enc`` and ``W_dec`` touch the picked
   latents only, as there; otherwise dense codes with zeros elsewhere;
4. the AuxK loss of :mod:`sksae.architectures.topk`, its dead-latent picks
   merged the same way and its partial reconstructions summed;
5. ``b_dec``'s gradient summed across ranks (its encoder-path parts are
   per rank, its decoder-path part is rank 0's only), the decoder gradient's
   radial part removed row by row, clipping by the global norm, Adam on the
   local tensors, unit-norm decoder rows.

The metrics of a step are the global model's, the same on every rank. The
recipe (warm-up and final decay of the learning rate, clipping at 1, Adam
(0.9, 0.999)) is :class:`sksae._sae_trainer.SAETrainer`'s, and with the same
initial tensors the sharded model follows the unsharded one up to rounding.
"""

from __future__ import annotations

import torch

from .._accel.adam import clip_and_step, make_adam
from .._accel.device import autocast
from .._accel.select import pre_activation, select_topk
from .._accel.sparse import Pattern, gather_pre, row_offsets, unit_rows_, use_sparse
from .._accel.workspace import StepWorkspace
from .._sae_trainer import (DeadLatentBound, SAETrainer, StepOutput, _fired_counts,
                            _total_variance, product_dtype, scale_encoder_to_fit)
from ..architectures._base import SparseCodes, decode

__all__ = ["LatentShardedTrainer", "local_candidates", "merge_candidates"]

_SHARDED_PARAMS = ("W_enc", "b_enc", "W_dec")


def local_candidates(pre_BF, k, start):
    """Each row's ``k`` largest entries of a slice of pre-activations, padded to ``k``.

    Parameters
    ----------
    pre_BF : Tensor of shape (B, F_local)
        Pre-activations of the latents ``start:start + F_local`` (masked ones
        at ``-inf``).
    k : int
    start : int
        Global id of the slice's first latent.

    Returns
    -------
    values : Tensor of shape (B, k)
        The candidates' values; ``-inf`` in the padding when ``F_local < k``.
    ids : Tensor of shape (B, k), int64
        Their global latent ids (``-1`` in the padding).
    """
    B, F_local = pre_BF.shape
    take = min(k, F_local)
    idx = select_topk(pre_BF, take)  # the unsharded step's selection (compiled on the CPU)
    values = pre_BF.gather(1, idx)
    ids = idx + start
    if take < k:  # every rank sends the same shape
        values = torch.cat([values, values.new_full((B, k - take), float("-inf"))], 1)
        ids = torch.cat([ids, ids.new_full((B, k - take), -1)], 1)
    return values, ids


def merge_candidates(values_BC, ids_BC, k):
    """The global top ``k`` of each row from every rank's candidates.

    Parameters
    ----------
    values_BC, ids_BC : Tensor of shape (B, C)
        Every rank's :func:`local_candidates` side by side, in rank order.
    k : int

    Returns
    -------
    values, ids : Tensor of shape (B, k)
        The winners (``-inf`` values mark picks that are only padding or
        masked latents). Ties are broken by ``torch.topk`` over the candidates
        in rank order: every rank merges the same candidates, hence picks the
        same winners, and the winning set is the one ``torch.topk`` of the
        whole row would give up to ties.
    """
    values, pos = torch.topk(values_BC, k, dim=-1, sorted=False)
    return values, ids_BC.gather(1, pos)


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce by sum forward; the gradient passed on unchanged backward.

    Every rank computes the same loss from the summed tensor, so the gradient
    reaching each rank's partial term is the gradient of the sum itself.
    """

    @staticmethod
    def forward(ctx, t, group):
        return group.sum_(t.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class LatentShardedTrainer:
    """:class:`~sksae._sae_trainer.SAETrainer`'s TopK recipe with the latents split across ranks.

    Parameters
    ----------
    arch : Architecture
        A ``"topk"`` architecture of the full width (``arch.n_components``
        latents in all).
    params : dict of Tensor
        The FULL initial ``W_enc`` (F, D), ``b_enc`` (F,), ``W_dec`` (F, D),
        ``b_dec`` (D,), the same on every rank (normalised units). This rank
        keeps its slice ``group.part(F)`` of the first three.
    buffers : dict of Tensor
        Replicated buffers (TopK has none).
    lr : float
    schedule : Schedule
    warmup_steps : int
    dead_window : int
    precision : {"auto", "float32", "bfloat16"}
        bf16 autocast of the products on CUDA, as the unsharded trainer.
    group : Group
        The ranks the latents are split over; each steps on the same full
        batch.

    Attributes
    ----------
    params : dict of Tensor
        This rank's slices (and the replicated ``b_dec``); :meth:`full_params`
        gathers the whole model.
    start, stop : int
        This rank's latents.
    rows_since_fired : Tensor of shape (stop - start,)
    step_count : int
    current_lr : float

    Notes
    -----
    The sharding is 1-D: it is not combined with data parallelism. Resampling
    dead latents is not supported (AuxK revives them). Every rank must call
    every method in the same order (each runs collectives).
    """

    decay_fraction = SAETrainer.decay_fraction
    clip_norm = SAETrainer.clip_norm

    def __init__(self, arch, params, buffers, *, lr, schedule, warmup_steps, dead_window,
                 precision="auto", group=None):
        if arch.name != "topk":
            raise ValueError(
                f"latent sharding supports architecture='topk' only, got {arch.name!r}.")
        if group is None:
            raise ValueError("latent-sharded training needs a process group (group=None).")
        n_components = arch.n_components
        if n_components < group.world_size:
            raise ValueError(
                f"latent sharding gives each of the {group.world_size} ranks at least one "
                f"latent: n_components={n_components} is too few.")
        self.arch = arch
        self.group = group
        self.start, self.stop = group.part(n_components)
        sl = slice(self.start, self.stop)
        self.params = {
            k: (v[sl] if k in _SHARDED_PARAMS else v).detach().clone().requires_grad_(True)
            for k, v in params.items()}
        extra = sorted(set(self.params) - {*_SHARDED_PARAMS, "b_dec"})
        if extra:
            raise ValueError(f"latent sharding does not know the parameters {extra}.")
        self.buffers = buffers
        SAETrainer._set_recipe(self, lr, schedule, warmup_steps, dead_window)
        self.device = device = params["W_dec"].device
        self.use_autocast = product_dtype(precision, device, params["W_dec"].dtype) is not None
        self.optimizer = make_adam(list(self.params.values()), lr, device)
        self.ws = StepWorkspace()
        self.rows_since_fired = torch.zeros(self.stop - self.start, dtype=torch.float64,
                                            device=device)
        # whether AuxK may have dead latents, without a collective and a host read per step
        self._dead_bound = DeadLatentBound(
            self.rows_since_fired, dead_window, SAETrainer.dead_reread_steps,
            synchronous=True,
            largest=lambda: group.max_(self.rows_since_fired.max().reshape(1)))
        self.step_count = 0
        self.current_lr = self.lr_at(0)
        self.coef = dict(arch.coefficients(0, schedule))

    # -- schedules: SAETrainer's, on this rank's optimizer ------------------------
    lr_at = SAETrainer.lr_at
    _set_schedules = SAETrainer._set_schedules

    # -- the sharded forward ------------------------------------------------
    def _merged_picks(self, pre_BF, k, sparse=False):
        """This rank's winners of each row's global top ``k``.

        One all-gather of every rank's candidates (values and ids together in
        float64, exact for both), then the same merge on every rank. Returns
        a (B, F_local) mask, or with ``sparse`` a :class:`Pattern` of the
        winners' local ids (a varying number per row).
        """
        values, ids = local_candidates(pre_BF, k, self.start)
        packed = torch.cat([values.double(), ids.double()], 1)
        gathered = self.group.all_gather(packed)  # (world * B, 2k), rank-major
        B, F_local = pre_BF.shape
        gathered = gathered.view(self.group.world_size, B, 2 * k)
        all_values = gathered[..., :k].permute(1, 0, 2).reshape(B, -1)
        all_ids = gathered[..., k:].permute(1, 0, 2).reshape(B, -1).long()
        win_values, win_ids = merge_candidates(all_values, all_ids, k)
        mine = (win_ids >= self.start) & (win_ids < self.stop) & (win_values > float("-inf"))
        if sparse:
            rows = torch.arange(B, device=pre_BF.device).unsqueeze(1).expand(B, k)[mine]
            return Pattern((win_ids - self.start)[mine], row_offsets(rows, B), F_local)
        # picks of other ranks land in an extra column, dropped
        local = torch.where(mine, win_ids - self.start, F_local)
        mask = torch.zeros(B, F_local + 1, dtype=torch.bool, device=pre_BF.device)
        return mask.scatter_(1, local, True)[:, :F_local]

    def _local_codes(self, pre, x_BD, picks, centred):
        """This rank's codes at ``picks``: a Pattern (sparse kernels) or a dense mask."""
        if isinstance(picks, Pattern):
            values = gather_pre(pre, picks, x_BD, self.params, centred=centred)
            return SparseCodes(values.clamp_min(0), picks)
        return torch.where(picks, pre.clamp_min(0), 0)

    def _pre_activation(self, x_BD):
        p = self.params
        return self.arch.pre_activation(p, x_BD)

    def _reconstruct(self, codes_BF, x_BD, with_bias):
        """The global reconstruction from this rank's codes (partials summed across ranks)."""
        kernels = "sparse" if isinstance(codes_BF, SparseCodes) else "dense"
        partial = decode(codes_BF, self.params["W_dec"], kernels=kernels).to(x_BD.dtype)
        if with_bias and self.group.rank == 0:  # b_dec counted once in the sum
            partial = partial + self.params["b_dec"]
        return _SumAcrossRanks.apply(partial, self.group)

    # -- one step -------------------------------------------------------------
    def step(self, x_BD, n_rows=None):
        """One optimizer step on the full normalised batch ``x_BD`` (the same on every rank).

        Parameters
        ----------
        x_BD : Tensor of shape (B, D)
        n_rows : int, optional
            Rows of the batch (``B``; accepted for the unsharded trainer's
            interface).

        Returns
        -------
        StepOutput
            The global model's metrics, the same on every rank.
        """
        if n_rows is not None and int(n_rows) != x_BD.shape[0]:
            raise ValueError(
                f"latent-sharded training steps on the full batch on every rank: n_rows="
                f"{n_rows} but the batch has {x_BD.shape[0]} rows.")
        self._set_schedules(self.step_count)
        out = self._update(x_BD)
        self.step_count += 1
        return out

    def _update(self, x_BD):
        p = self.params
        arch, group = self.arch, self.group
        n_rows = x_BD.shape[0]
        k = arch.hparams["k"]
        alpha = arch.hparams["auxk_alpha"]
        dead, n_dead_value = None, 0.0
        if alpha > 0 and self._dead_bound.may_be_dead(self.step_count, n_rows):
            dead = self.rows_since_fired >= self.dead_window
            # n_dead is needed before the forward (whether AuxK runs, its scale)
            n_dead_value = float(group.sum_(dead.sum().to(torch.float64).reshape(1)))
        # the unsharded trainer's rule at this rank's width: the sparse kernels take the
        # decode and the gradients over the picked latents only (the product stays dense)
        sparse = use_sparse(self.stop - self.start, k, arch.kernels, self.device)
        with autocast(self.device, self.use_autocast):
            if sparse:  # no graph: into a buffer reused by every step (CPU), as unsharded
                with torch.no_grad():
                    centred = x_BD - p["b_dec"]
                    pre = pre_activation(p, x_BD, self.ws, centred)
            else:
                pre, centred = self._pre_activation(x_BD), None
            with torch.no_grad():
                picks = self._merged_picks(pre.detach(), k, sparse)
            codes = self._local_codes(pre, x_BD, picks, centred)
            x_hat = self._reconstruct(codes, x_BD, with_bias=True)
            terms = {}
            if alpha > 0:
                terms["auxk"] = (self._auxk(pre, x_BD, x_hat, dead, n_dead_value, centred)
                                 if n_dead_value > 0 else x_BD.new_zeros(()))
        sq_err = (x_hat - x_BD).pow(2).sum()
        mse = sq_err / n_rows
        loss = mse + sum(t.to(mse.dtype) for t in terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            self._reduce_bias_grad()
            self._project_decoder_grad()
            grad_norm = self._clip_and_step()
            unit_rows_(p["W_dec"].detach())
            fired = _fired_counts(codes, self.stop - self.start)
            self.rows_since_fired.add_(n_rows).masked_fill_(fired > 0, 0)
            self._dead_bound.advance(n_rows)
            counts = torch.stack([
                fired.sum().to(torch.float64),
                (self.rows_since_fired >= self.dead_window).sum().to(torch.float64)])
            group.sum_(counts)
            total_var = _total_variance(x_BD)
            return StepOutput(
                loss=loss.detach(), mse=mse.detach(), fvu=sq_err.detach() / total_var,
                l0=(counts[0] / n_rows).to(torch.float32),
                dead_fraction=(counts[1] / arch.n_components).to(torch.float32),
                grad_norm=grad_norm,
                terms={name: v.detach() for name, v in terms.items()})

    def _auxk(self, pre, x_BD, x_hat, dead, n_dead, centred=None):
        """The AuxK loss of :meth:`sksae.architectures.topk.TopKFamily.auxk_loss`, sharded.

        The ``k_aux`` largest pre-activations among the dead latents of each
        row, picked over every rank's dead latents; a pick whose
        pre-activation is negative reconstructs nothing (the ReLU), as there.
        ``centred`` (``x - b_dec``) is given on the sparse path.
        """
        k_aux = self.arch.k_aux
        with torch.no_grad():
            masked = pre.detach().masked_fill(~dead, float("-inf"))
            picks = self._merged_picks(masked, k_aux, sparse=centred is not None)
        e = (x_BD - x_hat).detach()
        aux_codes = self._local_codes(pre, x_BD, picks, centred)
        e_hat = self._reconstruct(aux_codes, x_BD, with_bias=False)
        total_var = _total_variance(e)
        scale = min(n_dead / k_aux, 1.0)
        return self.arch.hparams["auxk_alpha"] * scale * (e_hat - e).pow(2).sum() / total_var

    def _reduce_bias_grad(self):
        """Sum ``b_dec``'s gradient: each rank holds the part through its own latents."""
        g = self.params["b_dec"].grad
        if g is None:
            g = self.params["b_dec"].grad = torch.zeros_like(self.params["b_dec"])
        self.group.sum_(g)

    def _project_decoder_grad(self):
        """Remove the gradient component along each (unit) decoder row (row-local)."""
        W, g = self.params["W_dec"].detach(), self.params["W_dec"].grad
        if g is not None:
            g.addcmul_((g * W).sum(-1, keepdim=True), W, value=-1)

    def _clip_and_step(self):
        """Clip by the global gradient norm (``b_dec`` counted once), then Adam on the slices."""
        sharded = [self.params[k].grad for k in _SHARDED_PARAMS
                   if self.params[k].grad is not None]
        # each slice's norm in its dtype (one pass, as the unsharded clipping), squared and
        # summed in float64 across the slices and the ranks
        sq = torch.zeros(1, dtype=torch.float64, device=self.device)
        if sharded:
            sq += torch.stack(torch._foreach_norm(sharded)).double().square().sum()
        sq = self.group.sum_(sq)[0]
        sq = sq + self.params["b_dec"].grad.double().pow(2).sum()
        norm = sq.sqrt().to(self.params["W_dec"].dtype)
        return clip_and_step(self.optimizer, self.params.values(), self.clip_norm, norm=norm)

    # -- calibration, export, state ------------------------------------------
    @torch.no_grad()
    def calibrate_encoder_scale(self, x_sample_ND):
        """:func:`sksae._sae_trainer.calibrate_encoder_scale` with the global reconstruction.

        ``x_sample_ND`` must be the same sample on every rank.
        """
        p = self.params
        x = x_sample_ND.to(p["W_dec"])
        pre = self._pre_activation(x)
        codes = self._local_codes(pre, x, self._merged_picks(pre, self.arch.hparams["k"]), None)
        scale_encoder_to_fit(p, x, self._reconstruct(codes, x, with_bias=False))

    def resample_dead_latents(self, x_ND, generator=None):
        """Not supported with latent sharding (the AuxK loss revives dead latents)."""
        raise NotImplementedError(
            "resample_dead_latents is not supported with latent-sharded training "
            "(distributed='latent'); use resample_dead=None: TopK's AuxK loss revives "
            "dead latents.")

    @torch.no_grad()
    def full_params(self):
        """The whole model on every rank: {name: full tensor}, ``b_dec`` and buffers included.

        Returns detached copies (``W_enc``, ``b_enc``, ``W_dec`` gathered from
        every rank's slice in latent order).
        """
        group = self.group
        n_components = self.arch.n_components
        sizes = [b - a for a, b in (group.part(n_components, r)
                                    for r in range(group.world_size))]
        largest = max(sizes)
        out = {}
        for name, t in self.params.items():
            t = t.detach()
            if name not in _SHARDED_PARAMS:
                out[name] = t.clone()
                continue
            # padded to the largest slice: all_gather_into_tensor needs equal shapes
            pad = t.new_zeros((largest, *t.shape[1:]))
            pad[:t.shape[0]] = t
            gathered = group.all_gather(pad)
            out[name] = torch.cat([gathered[r * largest:r * largest + n]
                                   for r, n in enumerate(sizes)])
        out.update({k: v.detach().clone() for k, v in self.buffers.items()})
        return out

    def state_dict(self):
        """This rank's slice of the training state, as CPU tensors (one checkpoint per rank)."""
        return {**SAETrainer.state_dict(self),
                "shard": (self.start, self.stop, self.group.world_size)}

    def load_state_dict(self, state):
        """Resume from this rank's :meth:`state_dict` (copied; left unchanged).

        Raises
        ------
        ValueError
            When the state was saved by another slice of the latents.
        """
        shard = state.get("shard")
        if shard is not None and tuple(shard) != (self.start, self.stop,
                                                  self.group.world_size):
            raise ValueError(
                f"this checkpoint holds latents {shard[0]}:{shard[1]} of {shard[2]} ranks; "
                f"this rank trains latents {self.start}:{self.stop} of "
                f"{self.group.world_size}. Resume with the same number of ranks.")
        with torch.no_grad():
            for k, v in state["params"].items():
                self.params[k].copy_(v)
            for k, v in state["buffers"].items():
                self.buffers[k].copy_(v)
        saved = state["optimizer"]
        # the optimizer keeps tensors it is given where they fit: copies keep the state intact
        saved = {**saved, "state": {
            i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in m.items()}
            for i, m in saved["state"].items()}}
        defaults = self.optimizer.defaults
        self.optimizer.load_state_dict(saved)
        for g in self.optimizer.param_groups:  # this optimizer's settings, but the lr
            g.update({k: v for k, v in defaults.items() if k != "lr"})
        self.rows_since_fired.copy_(state["rows_since_fired"])
        self._dead_bound.forget()
        self.step_count = state["step_count"]
        self.current_lr = self.lr_at(self.step_count)
