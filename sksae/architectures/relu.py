"""ReLU sparse autoencoder with an L1 penalty.

loss = ||x - x_hat||^2 + alpha * sum_i z_i ||W_dec,i|| (the decoder-norm-weighted
L1 of Anthropic's April 2024 update; with the unit-norm decoder rows sksae keeps
it equals the plain L1 of Bricken et al. 2023, "Towards monosemanticity").
"""

from __future__ import annotations

import torch

from ._base import Architecture, EncodeOutput


class ReLU(Architecture):
    """ReLU activation with a (decoder-norm weighted) L1 sparsity penalty."""

    name = "relu"
    penalty = True
    decoder_in_losses = True

    def encode(self, p, x_BD, training=False):
        pre = self.pre_activation(p, x_BD)
        z = torch.relu(pre)
        return EncodeOutput(z, pre) if training else z

    def losses(self, p, x_BD, enc, x_hat_BD, coef):
        l1 = (enc.codes * p["W_dec"].norm(dim=-1)).sum(-1).mean()
        return {"l1": coef * self.hparams["alpha"] * l1}
