"""Matryoshka BatchTopK sparse autoencoder (Bussmann, Nabeshima, Karvonen & Nanda 2025,
"Learning Multi-Level Features with Matryoshka Sparse Autoencoders").

The dictionary is read as nested prefixes ``m_1 < m_2 < ... < m_n = F``, and each
prefix alone must reconstruct the input:
``loss = sum_i ||x - (z[:m_i] W_dec[:m_i] + b_dec)||^2`` (each term per row, as the
reconstruction loss), with the codes ``z`` selected by BatchTopK over the whole
dictionary. Early latents must then carry the general features on their own,
so a general feature is not absorbed into more specific later ones (the
"feature absorption" of a plain SAE, where a latent for "starts with S" stops
firing on "short" because a "short" latent already covers it). Inference is
BatchTopK's: one learned threshold, rows encoded independently.

The prefix sizes are ``architecture_params={"prefix_sizes": [m_1, ..., m_{n-1}]}``
(increasing, below ``n_components``; the whole dictionary is the last prefix);
by default ``n_components // 8``, ``// 4`` and ``// 2``.
"""

from __future__ import annotations

import numpy as np
import torch

from .._accel.sparse import Pattern
from ._base import SparseCodes, decode
from .batchtopk import BatchTopK


def _prefix(codes, m):
    """The codes of latents ``< m`` only (the others zeroed), in the same layout."""
    if isinstance(codes, SparseCodes):
        return SparseCodes(codes.values * (_latents(codes) < m).to(codes.values.dtype),
                           codes.indices)
    keep = torch.arange(codes.shape[1], device=codes.device) < m
    return codes * keep.to(codes.dtype)


def _latents(codes):
    """The latent of each entry of sparse codes, in the layout of ``codes.values``."""
    indices = codes.indices
    return indices.indices if isinstance(indices, Pattern) else indices


class MatryoshkaBatchTopK(BatchTopK):
    """BatchTopK codes trained so that every prefix of the dictionary reconstructs the input."""

    name = "matryoshka"
    hyperparameters = {**BatchTopK.hyperparameters, "prefix_sizes": ["array-like", None]}
    defaults = {"prefix_sizes": None}

    @property
    def prefix_sizes(self):
        """The inner prefix sizes, increasing and below ``n_components``."""
        sizes = self.hparams["prefix_sizes"]
        if sizes is None:
            sizes = sorted({self.n_components // d for d in (8, 4, 2)} - {0})
        return [int(m) for m in sizes]

    def check(self):
        super().check()
        given = self.hparams["prefix_sizes"]
        sizes = np.asarray(self.prefix_sizes if given is None else given)
        ok = sizes.size == 0 or (
            sizes.ndim == 1 and np.issubdtype(sizes.dtype, np.integer)
            and bool(np.all(sizes >= 1)) and bool(np.all(np.diff(sizes) > 0))
            and bool(np.all(sizes < self.n_components)))
        if not ok:
            raise ValueError(
                f"prefix_sizes must be increasing integers in [1, n_components="
                f"{self.n_components}), got {self.hparams['prefix_sizes']!r}.")

    def losses(self, inp):
        terms = super().losses(inp)  # AuxK
        n_rows = inp.x.shape[0]
        for m in self.prefix_sizes:
            x_hat = decode(_prefix(inp.enc.codes, m), inp.p["W_dec"], inp.p["b_dec"],
                           kernels=self.kernels, ws=inp.ws).to(inp.x.dtype)
            terms[f"mse_{m}"] = (x_hat - inp.x).pow(2).sum() / n_rows
        return terms
