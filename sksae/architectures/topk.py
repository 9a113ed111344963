"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

z = TopK_k(ReLU(W_enc (x - b_dec) + b_enc)); no sparsity penalty, k sets L0.

Dead latents are revived by the AuxK loss (Gao et al. 2024, appendix A.2),
which every member of the TopK family (:class:`TopKFamily`) adds: with
``e = x - x_hat`` (detached), the ``k_aux = n_features / 2`` largest
pre-activations among the latents that have not fired for the dead window
reconstruct ``e`` without ``b_dec`` (adding it would count it twice),
``L_aux = auxk_alpha * min(n_dead / k_aux, 1) * ||e - e_hat||^2 / Var(e)``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch
from sklearn.utils._param_validation import Interval

from .._accel.losses import sum_squares
from .._accel.select import dead_latent_picks, select_topk, selection_pre_activation, topk
from .._accel.sparse import Pattern, gather_pre, use_sparse
from ._base import Architecture, EncodeOutput, SparseCodes, decode


class TopKFamily(Architecture):
    """Base of the architectures that select a fixed number of latents (TopK, BatchTopK, ...).

    Subclasses implement :meth:`select` (the support of a batch, from its
    pre-activations) and :meth:`dense_codes`; this class gives them the
    sparse training path, the AuxK loss and the learning-rate scaling law.
    """

    hyperparameters = {
        "k": [Interval(Integral, 1, None, closed="left")],
        "auxk_alpha": [Interval(Real, 0, None, closed="left")],
    }
    uses_dead_latents = True
    saelens_architecture = "jumprelu"

    def check(self):
        if self.hparams["k"] > self.n_components:
            raise ValueError(
                f"k={self.hparams['k']} must be at most n_components={self.n_components}: "
                "a TopK autoencoder cannot keep more latents than it has.")

    def default_learning_rate(self):
        """``2e-4 / sqrt(n_components / 2**14)`` (Gao et al. 2024's scaling law)."""
        return 2e-4 / math.sqrt(self.n_components / 2**14)

    @property
    def k_aux(self):
        """Latents of the AuxK reconstruction: ``n_features / 2`` (at most ``n_components``)."""
        return max(1, min(self.n_features // 2, self.n_components))

    def select(self, pre_BF):
        """The training support of a batch: (B, k) indices or a :class:`Pattern`."""
        raise NotImplementedError

    def dense_codes(self, pre_BF):
        """Training codes as a (B, F) tensor, from pre-activations with a graph."""
        raise NotImplementedError

    def encode_training(self, p, x_BD, ws=None):
        """The training codes: sparse kernels where :func:`use_sparse` says so, else dense.

        On the sparse path the dense product runs without an autograd graph
        (:func:`sksae._accel.select.selection_pre_activation`) and the
        gradients flow from the selected entries only
        (:func:`sksae._accel.sparse.gather_pre`); ``x - b_dec`` is computed
        once, for all of them and for the losses.
        """
        if not use_sparse(self.n_components, self.hparams["k"], self.kernels, x_BD.device):
            pre = self.pre_activation(p, x_BD)
            return EncodeOutput(self.dense_codes(pre), pre)
        with torch.no_grad():
            centred = x_BD - p["b_dec"]
            pre = (selection_pre_activation(p, x_BD, ws, centred) if ws is not None
                   else self.pre_activation(p, x_BD))
            support = self.select(pre)
        values = gather_pre(pre, support, x_BD, p, centred=centred, ws=ws)
        return EncodeOutput(SparseCodes(values.clamp_min(0), support), pre, centred=centred)

    def losses(self, inp):
        if self.hparams["auxk_alpha"] <= 0:
            return {}
        if inp.dead is None:  # no latent can be dead: the loss is exactly zero
            return {"auxk": inp.x.new_zeros(())}
        return {"auxk": self.auxk_loss(inp)}

    def auxk_loss(self, inp):
        """The AuxK loss (module docstring), through the same kernels as the codes."""
        pre_BF, x_BD, p, dead = inp.enc.pre, inp.x, inp.p, inp.dead
        idx, valid = dead_latent_picks(pre_BF.detach(), dead, self.k_aux,
                                       may_overwrite=not pre_BF.requires_grad)
        if idx is None:  # nothing dead
            return x_BD.new_zeros(())
        e = (x_BD - inp.x_hat).detach()
        if isinstance(idx, Pattern) and idx.indices.numel() == 0:
            e_hat = torch.zeros_like(e)  # no pick reconstructs anything: a constant term
        else:
            vals = gather_pre(pre_BF, idx, x_BD, p, centred=inp.enc.centred, ws=inp.ws)
            if valid is not None:
                vals = torch.where(valid, vals, 0)
            e_hat = decode(SparseCodes(vals.clamp_min(0), idx), p["W_dec"],
                           kernels=self.kernels, ws=inp.ws).to(e.dtype)
        total_var = inp.total_variance(e)
        scale = (dead.sum().to(e.dtype) / self.k_aux).clamp(max=1.0)
        return self.hparams["auxk_alpha"] * scale * sum_squares(e_hat, e) / total_var


class TopK(TopKFamily):
    """TopK activation: keep the ``k`` largest positive pre-activations of each row."""

    name = "topk"
    saelens_architecture = "topk"
    sparsify_activation = "topk"

    def select(self, pre_BF):
        return select_topk(pre_BF, self.hparams["k"])

    def dense_codes(self, pre_BF):
        # the top-k before the ReLU selects the same support (the ReLU is monotone)
        values, indices = topk(pre_BF, self.hparams["k"])
        return SparseCodes(values.clamp_min(0), indices)

    def encode(self, p, x_BD, training=False, ws=None):
        if training:
            return self.encode_training(p, x_BD, ws)
        pre = self.pre_activation(p, x_BD)
        return self.dense_codes(pre).to_dense(pre.shape[-1])

    def to_saelens(self, model):
        return {"b_enc": model.encoder_bias_}, {"k": int(model.k)}

    @classmethod
    def from_saelens(cls, cfg, tensors, expect, shift_F):
        activation = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
        arch = cfg.get("architecture", "standard")
        if not (arch == "topk" or (arch == "standard" and activation == "topk")):
            return None
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if k is None:
            raise ValueError("a TopK SAE without k.")
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"a TopK SAE needs a positive integer k, got {k!r}.")
        b_enc = expect("b_enc", shift_F.shape) + shift_F
        return {"encoder_bias_": b_enc}, {"k": k}
