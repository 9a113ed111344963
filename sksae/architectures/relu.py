"""ReLU sparse autoencoder with an L1 penalty.

loss = ||x - x_hat||^2 + alpha * sum_i z_i ||W_dec,i|| (the decoder-norm-weighted
L1 of Anthropic's April 2024 update; with the unit-norm decoder rows sksae keeps
it equals the plain L1 of Bricken et al. 2023, "Towards monosemanticity").
The coefficient is warmed up linearly over the first 5% of the steps.
"""

from __future__ import annotations

from numbers import Real

import torch
from sklearn.utils._param_validation import Interval

from ._base import Architecture, EncodeOutput, PenaltyWarmup


class ReLU(PenaltyWarmup, Architecture):
    """ReLU activation with a (decoder-norm weighted) L1 sparsity penalty."""

    name = "relu"
    hyperparameters = {"alpha": [Interval(Real, 0, None, closed="left")]}
    decoder_in_losses = True
    saelens_architecture = "standard"

    def encode(self, p, x_BD, training=False, ws=None):
        pre = self.pre_activation(p, x_BD)
        z = torch.relu(pre)
        return EncodeOutput(z, pre) if training else z

    def losses(self, inp):
        l1 = inp.row_mean((inp.enc.codes * inp.p["W_dec"].norm(dim=-1)).sum(-1))
        return {"l1": inp.coef["sparsity"] * self.hparams["alpha"] * l1}

    def to_saelens(self, model):
        return {"b_enc": model.encoder_bias_}, {}

    @classmethod
    def from_saelens(cls, cfg, tensors, expect, shift_F):
        activation = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
        if cfg.get("architecture", "standard") != "standard" or activation != "relu":
            return None
        return {"encoder_bias_": expect("b_enc", shift_F.shape) + shift_F}, {}
