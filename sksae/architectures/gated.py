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

import torch

from ._base import Architecture, EncodeOutput


def _mag_scale(p):
    """exp(r_mag): trained as a log, fitted as the value itself."""
    return p["mag_scale"] if "mag_scale" in p else p["r_mag"].exp()


class Gated(Architecture):
    """Gated activation: a gate with an L1 penalty, unshrunk magnitudes."""

    name = "gated"
    penalty = True
    decoder_in_losses = True
    public_names = {"mag_scale": "mag_scale_", "b_mag": "mag_bias_"}
    input_scaled = ("b_enc", "b_dec", "b_mag")

    def extra_parameters(self, params):
        zeros = torch.zeros_like(params["b_enc"])
        return {"r_mag": zeros, "b_mag": zeros.clone()}

    def encode(self, p, x_BD, training=False):
        proj = (x_BD - p["b_dec"]) @ p["W_enc"].T
        gate = proj + p["b_enc"]
        mag = _mag_scale(p).to(proj.dtype) * proj + p["b_mag"]
        f = (gate > 0).to(proj.dtype) * torch.relu(mag)
        return EncodeOutput(f, gate) if training else f

    def losses(self, p, x_BD, enc, x_hat_BD, coef):
        gate_act = torch.relu(enc.pre)
        l1 = (gate_act * p["W_dec"].norm(dim=-1)).sum(-1).mean()
        x_aux = gate_act @ p["W_dec"].detach() + p["b_dec"].detach()
        aux = (x_aux.to(x_BD.dtype) - x_BD).pow(2).sum(-1).mean()
        return {"l1": coef * self.hparams["alpha"] * l1, "gate_aux": aux}

    def fold_scale(self, p, scale):
        out = super().fold_scale(p, scale)
        if "r_mag" in p:
            out["mag_scale"] = p["r_mag"].exp()
        return out
