"""JumpReLU sparse autoencoder (Rajamanoharan et al. 2024, "Jumping ahead").

z_i = a_i * H(a_i - theta_i) with a learned per-latent threshold theta = exp(t);
loss = ||x - x_hat||^2 + l0_coefficient * sum_i H(a_i - theta_i). H has no useful
gradient, so both use straight-through estimators with a rectangle kernel
K(u) = 1[|u| < 1/2] of width ``bandwidth`` (eps):

- d z_i / d a_i = H(a_i - theta_i);
- d z_i / d theta_i = -(theta_i / eps) K((a_i - theta_i) / eps);
- d H / d theta_i = -(1 / eps) K((a_i - theta_i) / eps), and no gradient to a.

The fitted ``threshold_`` is theta in the user's units (theta / scale).

The trained parameter is ``log_threshold = log(theta) / THRESHOLD_SPEED``: Adam
moves a parameter by about the learning rate per step whatever its gradient's
size, so log theta would need ~1/lr steps to move by a factor e (the peers train
for 10^5 steps from theta = 0.001); the factor lets scikit-learn-sized fits of a
few hundred steps learn their thresholds. The gradients above are unchanged up
to the chain rule d theta / d log_threshold = THRESHOLD_SPEED * theta.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval

from ._base import Architecture, EncodeOutput, PenaltyWarmup


def _rectangle(u):
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """z = a * H(a - theta) with the pseudo-derivatives of Rajamanoharan et al."""

    @staticmethod
    def forward(ctx, a, theta, bandwidth):
        ctx.save_for_backward(a, theta)
        ctx.bandwidth = bandwidth
        return a * (a > theta).to(a.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        a, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_a = (a > theta).to(a.dtype) * grad_out
        grad_theta = -(theta / eps) * _rectangle((a - theta) / eps) * grad_out
        return grad_a, grad_theta.sum_to_size(theta.shape), None


class StepFunction(torch.autograd.Function):
    """H(a - theta) with d/d theta = -(1/eps) K((a - theta)/eps) and d/d a = 0."""

    @staticmethod
    def forward(ctx, a, theta, bandwidth):
        ctx.save_for_backward(a, theta)
        ctx.bandwidth = bandwidth
        return (a > theta).to(a.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        a, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * _rectangle((a - theta) / eps) * grad_out
        return torch.zeros_like(a), grad_theta.sum_to_size(theta.shape), None


THRESHOLD_SPEED = 10.0


def _theta(p):
    """Thresholds: trained as a (scaled) log, fitted (user units) as the value itself."""
    if "threshold" in p:
        return p["threshold"]
    return (THRESHOLD_SPEED * p["log_threshold"]).exp()


class JumpReLU(PenaltyWarmup, Architecture):
    """JumpReLU activation with an L0 penalty trained by straight-through estimators."""

    name = "jumprelu"
    hyperparameters = {
        "l0_coefficient": [Interval(Real, 0, None, closed="left")],
        "bandwidth": [Interval(Real, 0, None, closed="neither")],
        "threshold_init": [Interval(Real, 0, None, closed="neither")],
    }
    public_names = {"threshold": "threshold_"}
    saelens_architecture = "jumprelu"

    def extra_parameters(self, params):
        t = math.log(self.hparams["threshold_init"]) / THRESHOLD_SPEED
        return {"log_threshold": torch.full_like(params["b_enc"], t)}

    def encode(self, p, x_BD, training=False, ws=None):
        pre = self.pre_activation(p, x_BD)
        # theta stays in the parameters' dtype: under bf16 products a rounded theta would move
        # the gate and quantise the (a - theta) window of its gradient (bf16's step near 5 is
        # 0.03, the window's half-width 0.025); comparisons and differences promote exactly
        theta = _theta(p)
        if not training:
            return pre * (pre > theta)
        a = torch.relu(pre)
        return EncodeOutput(JumpReLUFunction.apply(a, theta, self.hparams["bandwidth"]), pre)

    def losses(self, inp):
        a = torch.relu(inp.enc.pre)
        theta = _theta(inp.p)
        l0 = inp.row_mean(StepFunction.apply(a, theta, self.hparams["bandwidth"]).sum(-1))
        return {"l0_penalty": inp.coef["sparsity"] * self.hparams["l0_coefficient"] * l0}

    def fold_scale(self, p, scale):
        out = super().fold_scale(p, scale)
        if "log_threshold" in p:
            out["threshold"] = _theta(p) / scale
        return out

    def to_saelens(self, model):
        # SAELens: ReLU(pre) * 1[pre > t]; sksae: pre * 1[pre > t], equal for t >= 0
        return {"b_enc": model.encoder_bias_, "threshold": np.maximum(model.threshold_, 0)}, {}

    @classmethod
    def from_saelens(cls, cfg, tensors, expect, shift_F):
        if cfg.get("architecture") not in ("jumprelu", "batchtopk") or "threshold" not in tensors:
            return None
        threshold = expect("threshold", shift_F.shape)
        return {"encoder_bias_": expect("b_enc", shift_F.shape) + shift_F,
                "threshold_": np.maximum(threshold, 0)}, {}
