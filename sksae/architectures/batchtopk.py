"""BatchTopK sparse autoencoder (Bussmann, Leask & Nanda 2024, "BatchTopK sparse autoencoders").

Training keeps the ``k * B`` largest entries of ReLU(pre) over the whole batch of
``B`` rows, so L0 is ``k`` on average but varies between rows. Inference must not
depend on the other rows of a call: it uses a single threshold ``theta``, an
exponential moving average of the smallest kept activation of each training
batch, and ``z_i = a_i * 1[a_i > theta]`` (a JumpReLU with a shared threshold).
Dead latents are revived by the TopK family's AuxK loss.
"""

from __future__ import annotations

from numbers import Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval

from .._accel.select import batch_topk_pattern, pattern_of
from ._base import SparseCodes
from .topk import TopKFamily


class BatchTopK(TopKFamily):
    """BatchTopK activation: ``k`` active latents per row on average over a batch."""

    name = "batchtopk"
    hyperparameters = {
        **TopKFamily.hyperparameters,
        "threshold_momentum": [Interval(Real, 0, 1, closed="left")],
    }
    public_names = {"threshold": "threshold_"}
    input_scaled = ("b_enc", "b_dec", "threshold")

    def extra_buffers(self, params):
        # threshold < 0 means "not yet estimated" (inference is then a plain ReLU)
        like = params["b_dec"].new_ones(())
        return {"threshold": -like, "threshold_updates": 0 * like}

    def kept(self, n_rows):
        """Entries kept in a batch of ``n_rows`` rows: ``k * n_rows`` (at most all)."""
        return min(self.hparams["k"] * n_rows, n_rows * self.n_components)

    def select(self, pre_BF):
        # before the ReLU: the same support wherever k * B entries are positive,
        # otherwise the extra entries are non-positive and their codes 0 either way
        if self._group() is not None:
            return pattern_of(self._global_keep(pre_BF))
        return batch_topk_pattern(pre_BF, self.kept(pre_BF.shape[0]))

    def dense_codes(self, pre_BF):
        if self._group() is not None:
            return torch.relu(pre_BF) * self._global_keep(pre_BF)
        flat = torch.relu(pre_BF).flatten()
        values, indices = torch.topk(flat, self.kept(pre_BF.shape[0]), sorted=False)
        return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre_BF)

    def _group(self):
        return None if self.batch is None else self.batch.group

    def _global_keep(self, pre_BF):
        """This rank's entries of the ``k * B`` largest of the global batch (data-parallel).

        Each rank's part holds at most ``k * B`` of the global batch's
        largest entries: every rank gathers the others' ``k * B`` largest and
        takes the cut of the union. Each keeps its entries above the cut, and
        of the entries equal to it as many as the ``k * B`` leave, earlier
        ones first in the global batch's row-major order (ranks hold
        consecutive rows): exactly ``k * B`` entries, however many tie (bf16
        products tie often at the cut), as one process keeps. Returns a
        (B, F) mask; no host synchronisation.
        """
        group = self._group()
        m = self.kept(self.batch.n_rows)
        pre = pre_BF.detach()
        flat = pre.reshape(-1)
        local = torch.topk(flat, min(m, flat.numel()), sorted=False).values
        if local.numel() < m:
            local = torch.cat([local, local.new_full((m - local.numel(),), -torch.inf)])
        cut = torch.topk(group.all_gather(local), m, sorted=False).values.min()
        above, tie = pre > cut, pre == cut
        counts = group.all_gather(torch.stack([above.sum(), tie.sum()]).reshape(1, 2))
        ties_before = counts[:group.rank, 1].sum()
        quota = (m - counts[:, 0].sum() - ties_before).clamp(0, counts[group.rank, 1])
        if pre.shape[0] == 0:
            return above
        # rows whose ties are all kept, then the one row where the quota runs out
        row_ties = tie.sum(1)
        ends = row_ties.cumsum(0)
        whole = ends <= quota
        keep = above | (tie & whole[:, None])
        j = (~whole).to(torch.int8).argmax().reshape(1)  # that row (row 0 when none)
        left = quota - (ends - row_ties).index_select(0, j)
        row_tie = tie.index_select(0, j) & ~whole.index_select(0, j)[:, None]
        part = row_tie & (row_tie.cumsum(1) <= left[:, None])
        return keep.index_copy_(0, j, keep.index_select(0, j) | part)

    def encode(self, p, x_BD, training=False, ws=None):
        if training:
            return self.encode_training(p, x_BD, ws)
        a = torch.relu(self.pre_activation(p, x_BD))
        return a * (a > p["threshold"].to(a.dtype))

    def after_step(self, p, enc):
        """Moving average of the smallest kept positive activation of each batch.

        The momentum after ``n`` updates is ``min(threshold_momentum, n / (n + 10))``:
        roughly an average over the last 10% of the steps so far (the first
        batches, taken while the encoder still moves fast, are forgotten), then
        the EMA of the peers once ``n`` reaches ``10 / (1 / momentum - 1)``.
        Written without host synchronisation.
        """
        codes = enc.codes
        codes = (codes.values if isinstance(codes, SparseCodes) else codes).detach()
        if codes.numel() == 0:  # a rank's empty part of a short last batch
            smallest = p["threshold"].new_full((), torch.inf)
        else:
            smallest = torch.where(codes > 0, codes, torch.inf).min().to(p["threshold"].dtype)
        if self._group() is not None:
            smallest = self._group().min_(smallest.reshape(1)).reshape(())
        n = p["threshold_updates"]
        beta = torch.clamp(n / (n + 10), max=self.hparams["threshold_momentum"])
        ok = torch.isfinite(smallest)  # a batch with no positive activation says nothing
        new = beta * p["threshold"] + (1 - beta) * smallest
        p["threshold"].copy_(torch.where(ok, new, p["threshold"]))
        p["threshold_updates"].add_(ok.to(n.dtype))

    @classmethod
    def fitted_shapes(cls, n_components):
        return {"threshold_": [(n_components,), ()]}

    def to_saelens(self, model):
        """Exported for inference as a JumpReLU with the learned shared threshold.

        ReLU(pre) * 1[pre > t] equals sksae's rule for t >= 0; an unestimated
        threshold (< 0) means "keep every positive activation", i.e. t = 0.
        """
        d_sae = model.components_.shape[0]
        threshold = np.broadcast_to(np.maximum(model.threshold_, 0), (d_sae,))
        return {"b_enc": model.encoder_bias_, "threshold": threshold}, {}
