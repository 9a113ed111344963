"""BatchTopK sparse autoencoder (Bussmann, Leask & Nanda 2024, "BatchTopK sparse autoencoders").

Training keeps the ``k * B`` largest entries of ReLU(pre) over the whole batch of
``B`` rows, so L0 is ``k`` on average but varies between rows. Inference must not
depend on the other rows of a call: it uses a single threshold ``theta``, an
exponential moving average of the smallest kept activation of each training
batch, and ``z_i = a_i * 1[a_i > theta]`` (a JumpReLU with a shared threshold).
Dead latents are revived by the AuxK loss the trainer adds for ``auxk = True``.
"""

from __future__ import annotations

import torch

from .._kernels import Pattern, use_sparse
from .._threads import parallel
from ._base import Architecture, EncodeOutput, SparseCodes


def batch_topk_codes(pre_BF, k):
    """Dense codes keeping the ``k * B`` largest entries of ReLU(pre) over the batch."""
    flat = torch.relu(pre_BF).flatten()
    values, indices = torch.topk(flat, min(k * pre_BF.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre_BF)


def batch_topk_pattern(pre_BF, k):
    """The ``k * B`` largest entries of ``pre`` over the batch, as a row-ordered pattern.

    Selecting before the ReLU keeps the same support as :func:`batch_topk_codes`
    wherever at least ``k * B`` entries are positive; otherwise the extra
    entries are non-positive and their codes are 0 after the ReLU either way.
    """
    B, F = pre_BF.shape
    flat = pre_BF.reshape(-1)
    with parallel(pre_BF, "batch top-k"):
        chosen = torch.topk(flat, min(k * B, flat.numel()), sorted=False).indices
    chosen = torch.sort(chosen).values  # row-major order: rows ascending
    rows = torch.div(chosen, F, rounding_mode="floor")
    crow = torch.zeros(B + 1, dtype=torch.long, device=pre_BF.device)
    torch.cumsum(torch.bincount(rows, minlength=B), 0, out=crow[1:])
    return Pattern(chosen - rows * F, crow, F)


class BatchTopK(Architecture):
    """BatchTopK activation: ``k`` active latents per row on average over a batch."""

    name = "batchtopk"
    auxk = True
    public_names = {"threshold": "threshold_"}
    input_scaled = ("b_enc", "b_dec", "threshold")

    def extra_buffers(self, params):
        # threshold < 0 means "not yet estimated" (inference is then a plain ReLU)
        like = params["b_dec"].new_ones(())
        return {"threshold": -like, "threshold_updates": 0 * like}

    def encode(self, p, x_BD, training=False):
        k = self.hparams["k"]
        if training and use_sparse(self.n_components, k, self.kernels, x_BD.device):
            # the k * B kept entries: a pattern with a variable count per row
            return self.encode_selected(p, x_BD, lambda pre: batch_topk_pattern(pre, k))
        pre = self.pre_activation(p, x_BD)
        if training:
            return EncodeOutput(batch_topk_codes(pre, k), pre)
        a = torch.relu(pre)
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
        smallest = torch.where(codes > 0, codes, torch.inf).min().to(p["threshold"].dtype)
        n = p["threshold_updates"]
        beta = torch.clamp(n / (n + 10), max=self.hparams["threshold_momentum"])
        ok = torch.isfinite(smallest)  # a batch with no positive activation says nothing
        new = beta * p["threshold"] + (1 - beta) * smallest
        p["threshold"].copy_(torch.where(ok, new, p["threshold"]))
        p["threshold_updates"].add_(ok.to(n.dtype))
