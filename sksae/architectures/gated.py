"""Gated sparse autoencoder (Rajamanoharan et al. 2024, "Improving dictionary learning
with gated sparse autoencoders").

A gate decides which latents fire, a magnitude path how much, with shared weights:

- pi_gate = W_gate (x - b_dec) + b_gate  (W_gate is ``W_enc``, b_gate is ``b_enc``);
- pi_mag = exp(r_mag) * (W_gate (x - b_dec)) + b_mag;
- f = H(pi_gate > 0) * ReLU(pi_mag).

The L1 penalty (weight ``alpha``, decoder-norm weighted) acts on ReLU(pi_gate), not
on the codes, so magnitudes are not shrunk; an auxiliary loss reconstructs ``x``
from ReLU(pi_gate) through a frozen copy of the decoder (W_dec and b_dec detached)
so that the gate still learns what to reconstruct.
"""

from __future__ import annotations

from numbers import Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval

from ._base import Architecture, EncodeOutput, PenaltyWarmup


def _mag_scale(p):
    """exp(r_mag): trained as a log, fitted as the value itself."""
    return p["mag_scale"] if "mag_scale" in p else p["r_mag"].exp()


class Gated(PenaltyWarmup, Architecture):
    """Gated activation: a gate with an L1 penalty, unshrunk magnitudes."""

    name = "gated"
    hyperparameters = {"alpha": [Interval(Real, 0, None, closed="left")]}
    decoder_in_losses = True
    saelens_architecture = "gated"
    public_names = {"mag_scale": "mag_scale_", "b_mag": "mag_bias_"}
    input_scaled = ("b_enc", "b_dec", "b_mag")

    def extra_parameters(self, params):
        zeros = torch.zeros_like(params["b_enc"])
        return {"r_mag": zeros, "b_mag": zeros.clone()}

    def encode(self, p, x_BD, training=False, ws=None):
        proj = (x_BD - p["b_dec"]) @ p["W_enc"].T
        gate = proj + p["b_enc"]
        # the scale in the parameters' dtype: under bf16 products it would round by up to 0.4%
        mag = _mag_scale(p) * proj + p["b_mag"]
        f = (gate > 0).to(proj.dtype) * torch.relu(mag)
        return EncodeOutput(f, gate) if training else f

    def losses(self, inp):
        p, x_BD = inp.p, inp.x
        gate_act = torch.relu(inp.enc.pre)
        l1 = inp.row_mean((gate_act * p["W_dec"].norm(dim=-1)).sum(-1))
        x_aux = gate_act @ p["W_dec"].detach() + p["b_dec"].detach()
        aux = inp.row_mean((x_aux.to(x_BD.dtype) - x_BD).pow(2).sum(-1))
        return {"l1": inp.coef["sparsity"] * self.hparams["alpha"] * l1, "gate_aux": aux}

    def fold_scale(self, p, scale):
        out = super().fold_scale(p, scale)
        if "r_mag" in p:
            out["mag_scale"] = p["r_mag"].exp()
        return out

    def to_saelens(self, model):
        return {"b_gate": model.encoder_bias_,
                "r_mag": np.log(model.mag_scale_.astype(np.float64)),
                "b_mag": model.mag_bias_}, {}

    @classmethod
    def from_saelens(cls, cfg, tensors, expect, shift_F):
        if cfg.get("architecture") != "gated":
            return None
        shape = shift_F.shape
        b_gate = expect("b_gate", shape)
        expect("r_mag", shape)
        b_mag = expect("b_mag", shape)
        mag_scale = expect("mag_scale", shape)  # exp(r_mag), added by the reader
        return {"encoder_bias_": b_gate + shift_F, "mag_scale_": mag_scale,
                "mag_bias_": b_mag + mag_scale * shift_F}, {}
