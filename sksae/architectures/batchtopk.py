"""BatchTopK sparse autoencoder (Bussmann, Leask & Nanda 2024, "BatchTopK sparse autoencoders").

Training keeps the ``k * B`` largest entries of ReLU(pre) over the whole batch of
``B`` rows, so L0 is ``k`` on average but varies between rows. Inference must not
depend on the other rows of a call: it uses a single threshold ``theta``, an
exponential moving average of the smallest kept activation of each training
batch, and ``z_i = a_i * 1[a_i > theta]`` (a JumpReLU with a shared threshold).
Dead latents are revived by the AuxK loss the trainer adds for ``auxk = True``.
"""

from __future__ import annotations

import numpy as np
import torch

from .._accel.sparse import Pattern, use_sparse
from .._accel.threads import even_bounds, parallel, run_ranges
from ._base import Architecture, EncodeOutput, SparseCodes
from .topk import _BITS


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
    On the CPU with the numba extra the selection is compiled
    (:func:`_compiled_batch_topk`); otherwise one ``torch.topk`` over the
    flattened batch.
    """
    compiled = _compiled_batch_topk(pre_BF, min(k * pre_BF.shape[0], pre_BF.numel()))
    if compiled is not None:
        return compiled
    B, F = pre_BF.shape
    flat = pre_BF.reshape(-1)
    with parallel(pre_BF, "batch top-k"):
        chosen = torch.topk(flat, min(k * B, flat.numel()), sorted=False).indices
    chosen = torch.sort(chosen).values  # row-major order: rows ascending
    rows = torch.div(chosen, F, rounding_mode="floor")
    crow = torch.zeros(B + 1, dtype=torch.long, device=pre_BF.device)
    torch.cumsum(torch.bincount(rows, minlength=B), 0, out=crow[1:])
    return Pattern(chosen - rows * F, crow, F)


def _compiled_batch_topk(pre_BF, K):
    """The ``K`` largest entries of a CPU bf16 or float32 batch as a pattern, or None.

    ``torch.topk`` over the flattened (B, F) batch keeps a partial order of all
    its entries: about 1 s for 4096 x 24576 and 48 ms for 1024 x 3072 on two
    cores, 15-25x the per-row TopK selection. The compiled kernels of
    :mod:`sksae._accel._topk_nb` instead bucket the keys (a float's bits, ordered as
    integers) by their high 16 bits: a histogram of a strided sample gives a
    bucket that about ``2 K`` entries reach, one pass per row range counts and
    one collects those candidates, and an exact histogram of the candidates
    finds the cut. Among equal values the earlier entries (row-major order)
    are kept. None (the torch path) off the CPU, without numba, for other
    dtypes, or when ties leave more than ``max(8 K + F, 65536)`` candidates.
    """
    from .._accel.compiled import kernel

    if pre_BF.device.type != "cpu" or pre_BF.dtype not in _BITS or K <= 0:
        return None
    names = ("batch_sample_buckets", "batch_count", "batch_fill", "batch_select")
    kernels = [kernel(name) for name in names]
    if any(k is None for k in kernels):
        return None
    sample, count, fill, select = kernels
    int_dtype, magnitude = _BITS[pre_BF.dtype]
    shift = 16 if int_dtype == torch.int32 else 0  # bucket by the high 16 bits
    bits = pre_BF.contiguous().view(int_dtype).numpy()
    B, F = bits.shape
    counts = np.empty(B, np.int64)
    with parallel(pre_BF, "compiled batch top-k", own=True):
        bounds = even_bounds(B)
        # one histogram per row range (integer counts: their sum does not depend on the split)
        hists = {}

        def sample_rows(a, b):
            hists[a] = sample(bits, magnitude, shift, 8, a, b)

        run_ranges(sample_rows, bounds)
        hist = sum(hists.values())
        # the bucket that twice the sample's expected share of K reaches: a margin
        # for sampling noise (fewer than K candidates is retried below)
        reached = np.cumsum(hist[::-1])
        want = 2 * K * reached[-1] / (B * F) + 64
        bucket = max(0, len(hist) - 1 - int(np.searchsorted(reached, want)))
        run_ranges(lambda a, b: count(bits, magnitude, shift, bucket, counts, a, b), bounds)
        if counts.sum() < K:  # the sample overshot: every entry is a candidate
            bucket = 0
            counts[:] = F
        total = int(counts.sum())
        if total > max(8 * K + F, 1 << 16):  # massive ties: too many candidates to hold
            return None
        offsets = np.zeros(B + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        keys, cols = np.empty(total, np.int64), np.empty(total, np.int64)
        run_ranges(lambda a, b: fill(bits, magnitude, shift, bucket, offsets, keys, cols, a, b),
                   bounds)
    chosen, crow = np.empty(K, np.int64), np.empty(B + 1, np.int64)
    select(keys, cols, offsets, K, shift, chosen, crow)
    return Pattern(torch.from_numpy(chosen), torch.from_numpy(crow), F)


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
