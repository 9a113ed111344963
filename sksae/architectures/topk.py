"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

z = TopK_k(ReLU(W_enc (x - b_dec) + b_enc)); no sparsity penalty, k sets L0.
Dead latents are revived by the AuxK loss the trainer adds for ``auxk = True``.
"""

from __future__ import annotations

import torch

from .._kernels import use_sparse
from .._threads import parallel, row_probe
from ._base import Architecture, EncodeOutput, SparseCodes


def _topk(pre_BF, k):
    probe = row_probe(lambda m: torch.topk(pre_BF[:m], k, dim=-1, sorted=False),
                      pre_BF.shape[0])
    with parallel(pre_BF, "top-k", *probe):
        return torch.topk(pre_BF, k, dim=-1, sorted=False)


def topk_codes(pre_BF, k):
    """Top-k of ReLU(pre) per row as :class:`SparseCodes`.

    Taking the top-k before the ReLU selects the same support (the ReLU is
    monotone) and touches a (B, k) tensor instead of (B, F).
    """
    values, indices = _topk(pre_BF, k)
    return SparseCodes(values.clamp_min(0), indices)


class TopK(Architecture):
    """TopK activation: keep the ``k`` largest positive pre-activations of each row."""

    name = "topk"
    auxk = True

    def encode(self, p, x_BD, training=False):
        k = self.hparams["k"]
        if training and use_sparse(self.n_components, k, self.kernels, x_BD.device):
            return self.encode_selected(p, x_BD, lambda pre: _topk(pre, k).indices)
        pre = self.pre_activation(p, x_BD)
        codes = topk_codes(pre, k)
        if training:
            return EncodeOutput(codes, pre)
        return codes.to_dense(pre.shape[-1])
