"""The model in the loop: splice an SAE's reconstruction into a model, and measure the loss.

:func:`splice` replaces the output of a named submodule of any
``torch.nn.Module`` by the reconstruction of a fitted sparse autoencoder (or
any fitted dictionary with ``transform``), at the positions of a mask, for as
long as the ``with`` block runs. :func:`loss_recovered` runs a model over
batches clean, spliced and ablated (zero and mean ablation) and returns the
downstream losses, the fraction of the loss the SAE recovers and the KL
divergence of the spliced outputs to the clean ones (SAELens, saprmarks'
dictionary_learning and SAEBench's "core" evaluation report these).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

import numpy as np
import torch
from sklearn.utils import Bunch

from .._base import final_step, n_latents
from ._harvest import _call, _module_table, _to_device

__all__ = ["splice", "Splice", "loss_recovered"]


def _is_torch_sae(sae):
    """An sksae SparseAutoencoder (encode and decode as torch ops on any device)."""
    return hasattr(sae, "_inference_params") and hasattr(sae, "components_")


class _Reconstruction:
    """``encode``/``decode`` of a fitted estimator as functions of (rows, features) tensors.

    A :class:`~sksae.SparseAutoencoder` runs as torch operations on the
    activations' device and dtype (its fitted numpy arrays are converted
    once per device and dtype); any other fitted estimator with
    ``transform`` (and ``inverse_transform`` or ``components_``) runs on
    host numpy copies.
    """

    def __init__(self, sae, dtype=None):
        if not hasattr(sae, "transform"):
            raise TypeError(f"sae must be a fitted estimator with transform; got "
                            f"{type(sae).__name__}.")
        self.sae = sae
        self.dtype = dtype
        self._params = {}

    def _torch_params(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._params:
            self._params[key] = self.sae._inference_params(device, dtype)
        return self._params[key]

    def encode(self, x):
        """Codes of the rows ``x`` (a 2-D tensor), on its device."""
        dtype = self.dtype or x.dtype
        if _is_torch_sae(self.sae):
            arch, p = self._torch_params(x.device, dtype)
            return arch.encode(p, x.to(dtype))
        codes = self.sae.transform(x.detach().to("cpu", torch.float32).numpy())
        if hasattr(codes, "toarray"):
            codes = codes.toarray()
        return torch.as_tensor(np.asarray(codes, dtype=np.float32)).to(x.device, dtype)

    def reconstruct(self, x):
        """``decode(encode(x))``, ``chunk_rows`` rows at a time.

        The codes of a whole batch of a language model at once are
        (tokens, n_components): 128 GB for 32k tokens of 1M latents.
        """
        from .._base import inference_chunk_rows  # looked up at the call (tests lower it)

        step = inference_chunk_rows(n_latents(self.sae), 4)
        if len(x) <= step:
            return self.decode(self.encode(x))
        return torch.cat([self.decode(self.encode(x[i:i + step]))
                          for i in range(0, len(x), step)])

    def decode(self, codes):
        """Reconstruction of ``codes`` (a 2-D tensor), on its device."""
        if _is_torch_sae(self.sae):
            _, p = self._torch_params(codes.device, codes.dtype)
            return codes @ p["W_dec"] + p["b_dec"]
        z = codes.detach().to("cpu", torch.float32).numpy()
        if hasattr(self.sae, "inverse_transform"):
            out = self.sae.inverse_transform(z)
        else:
            out = z @ np.asarray(final_step(self.sae).components_, dtype=np.float32)
        return torch.as_tensor(np.asarray(out, dtype=np.float32)).to(codes.device, codes.dtype)


def _replace_first(output, new, name):
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return type(output)((new, *output[1:]))
    raise TypeError(f"submodule {name!r} returned {type(output).__name__}, not a tensor or a "
                    "tuple whose first element is a tensor.")


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def _position_mask(mask, x, name):
    """The boolean mask over the leading dimensions of ``x`` (or None for all positions)."""
    if mask is None:
        return None
    m = mask(x) if callable(mask) else mask
    m = torch.as_tensor(m).to(x.device).bool()
    if x.ndim == 2 and m.ndim == 2 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim >= x.ndim or tuple(x.shape[:m.ndim]) != tuple(m.shape):
        raise ValueError(f"the mask has shape {tuple(m.shape)}, but {name!r}'s output has "
                         f"shape {tuple(x.shape)}: the mask must cover its leading "
                         "(batch, position) dimensions.")
    return m


class Splice:
    """The handle :func:`splice` yields: what the last forward pass spliced.

    Attributes
    ----------
    layer : str
        The spliced submodule.
    mask : bool Tensor, callable or None
        The positions to splice (settable between forward passes, e.g. per
        batch); see :func:`splice`.
    codes : Tensor of shape (n_positions, n_components) or None
        The SAE's codes of the spliced positions in the last forward pass, on
        the model's device (the rows of the masked positions, in row-major
        order); None before the first pass.
    error : Tensor of shape (n_positions, n_features) or None
        ``x - x_hat`` at those positions in the last pass.
    n_calls : int
        Forward passes of the submodule spliced so far.
    """

    def __init__(self, layer, mask):
        self.layer = layer
        self.mask = mask
        self.codes = None
        self.error = None
        self.n_calls = 0


@contextmanager
def _replaced(model, layer, replace, mask=None):
    """Replace ``layer``'s output ``x`` by ``replace(rows, handle)`` at the masked positions.

    ``replace`` gets the (n, features) rows of the masked positions and
    returns their replacement; the other positions keep their exact values.
    """
    module = _module_table(model, [layer])[layer]
    handle = Splice(layer, mask)

    def hook(mod, args, output):
        x = _first(output)
        keep = _position_mask(handle.mask, x, layer)
        rows = x[keep] if keep is not None else x.reshape(-1, x.shape[-1])
        new_rows = replace(rows, handle).to(x.dtype)
        if keep is not None:
            new = x.clone()
            new[keep] = new_rows.reshape(-1, *x.shape[keep.ndim:])
        else:
            new = new_rows.reshape(x.shape)
        handle.n_calls += 1
        return _replace_first(output, new, layer)

    h = module.register_forward_hook(hook)
    try:
        yield handle
    finally:
        h.remove()


def splice(model, layer, sae, *, mask=None, error_term=False, edit=None, dtype=None):
    """Replace a submodule's output by an SAE's reconstruction while the ``with`` block runs.

    A forward hook on ``model``'s submodule ``layer`` encodes its output
    ``x`` with ``sae`` and returns the reconstruction ``x_hat`` instead, at
    the positions that ``mask`` keeps; every other position keeps its value
    exactly. A tuple output (as transformer blocks return) has its first
    element replaced and the others kept. The hook is removed on exit, also
    after an error.

    The codes of a forward pass are kept dense on the model's device (the
    handle's ``codes``, what ``edit`` receives): (tokens, n_components),
    4 GB for 1,024 tokens of 1M float32 latents. Size the batches to them;
    :func:`loss_recovered`, which keeps no codes, encodes and decodes a
    chunk of rows at a time.

    Parameters
    ----------
    model : torch.nn.Module
        Any module (TorchScript modules do not support hooks).
    layer : str
        A name from ``model.named_modules()``.
    sae : fitted estimator
        A :class:`~sksae.SparseAutoencoder` runs as torch operations on the
        output's device, in ``dtype`` (the codes live there, and gradients
        flow through the reconstruction). Any other fitted estimator with
        ``transform`` (:class:`~sksae.DictionaryLearnerGPU`, scikit-learn's
        ``MiniBatchDictionaryLearning``, a Pipeline) is applied to host
        float32 copies, and its reconstruction is
        ``inverse_transform(codes)`` or ``codes @ components_``.
    mask : bool Tensor, callable or None, default=None
        The positions to splice: a boolean tensor over the output's leading
        (batch, position) dimensions, or a function of the output tensor
        returning one. None splices every position. The yielded
        :class:`Splice`'s ``mask`` can be set between forward passes.
    error_term : bool, default=False
        Add the SAE's error ``x - x_hat`` back, as a constant (the "SAE error
        node" of circuit analysis, Marks et al. 2024, "Sparse feature
        circuits"): the output equals ``x`` (up to rounding), while gradients
        flow through the codes, and an ``edit`` of the codes changes the
        output by exactly the edit's decoded difference.
    edit : callable, default=None
        ``edit(codes) -> codes``, applied before decoding: ablate or steer
        latents (``codes[:, i] = 0``), with or without the error term.
    dtype : torch.dtype, default=None
        The dtype of the SAE's computation; None uses the output's dtype, so
        the codes are on the model's device and in its dtype (pass
        ``torch.float32`` to encode a half-precision model's activations in
        float32; the reconstruction is cast back).

    Yields
    ------
    handle : Splice
        With the last pass's ``codes`` and ``error``.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sksae import SparseAutoencoder
    >>> from sksae.activations import splice
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(),
    ...                             torch.nn.Linear(8, 2))
    >>> X = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
    >>> sae = SparseAutoencoder(n_components=16, k=4, max_iter=1, random_state=0).fit(X)
    >>> with splice(model, "0", sae) as handle:
    ...     out = model(torch.as_tensor(X[:5]))
    >>> out.shape, handle.codes.shape
    (torch.Size([5, 2]), torch.Size([5, 16]))
    """
    coder = _Reconstruction(sae, dtype)

    def replace(rows, handle):
        codes = coder.encode(rows)
        x_hat = coder.decode(codes)
        error = rows.to(x_hat.dtype) - x_hat
        if edit is not None:
            codes = edit(codes.clone())
            x_hat = coder.decode(codes)
        handle.codes, handle.error = codes, error
        return x_hat + error.detach() if error_term else x_hat

    return _replaced(model, layer, replace, mask)


# ------------------------------------------------------------------ loss recovered


def _batch_mask(mask, batch):
    """The positions of ``batch`` to splice (mask="auto": its attention_mask, if any)."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "auto":
            raise ValueError(f"mask must be 'auto', a callable, a tensor or None; got {mask!r}.")
        if isinstance(batch, Mapping) and "attention_mask" in batch:
            return batch["attention_mask"].bool()
        return None
    if callable(mask):
        return torch.as_tensor(mask(batch)).bool()
    return torch.as_tensor(mask).bool()


def _logits_of(output):
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    return _first(output)


def _causal_lm_terms(output, batch):
    """Per-token cross-entropy of next-token prediction, and the positions it counts.

    Labels: the batch's ``labels`` (-100 ignored) or its ``input_ids`` (a
    tensor batch is the ids), shifted by one; with an ``attention_mask``,
    padded targets are ignored.
    """
    logits = _logits_of(output)
    if isinstance(batch, Mapping):
        labels = batch.get("labels", batch.get("input_ids"))
        attention = batch.get("attention_mask")
    else:
        labels = batch[0] if isinstance(batch, (tuple, list)) else batch
        attention = None
    if labels is None:
        raise ValueError("loss='causal_lm' needs batches with input_ids or labels (or tensors "
                         "of token ids).")
    labels = labels.to(logits.device).long().clone()
    if attention is not None:
        labels[~attention.to(labels.device).bool()] = -100
    target = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
        ignore_index=-100, reduction="none")
    return ce[target.reshape(-1) != -100]


def _kl_positions(logits, batch):
    """Boolean mask over ``logits``' leading dimensions: attended positions, or all."""
    lead = logits.shape[:-1]
    if isinstance(batch, Mapping) and "attention_mask" in batch \
            and tuple(batch["attention_mask"].shape) == tuple(lead):
        return batch["attention_mask"].to(logits.device).bool()
    return torch.ones(lead, dtype=torch.bool, device=logits.device)


def _kl(clean_logits, logits, keep):
    """KL(clean || spliced) of the softmax over the last dimension, at the kept positions."""
    p = torch.log_softmax(clean_logits[keep].double(), -1)
    q = torch.log_softmax(logits[keep].double(), -1)
    return (p.exp() * (p - q)).sum(-1)


class _Stop(Exception):
    pass


def _layer_mean(model, layer, batches, mask, device):
    """Mean of ``layer``'s output over the masked positions of all batches (float64)."""
    module = _module_table(model, [layer])[layer]
    total, count = None, 0
    current = {}

    def hook(mod, args, output):
        current["x"] = _first(output)
        raise _Stop

    h = module.register_forward_hook(hook)
    try:
        for batch in batches:
            batch = _to_device(batch, device)
            try:
                _call(model, batch)
            except _Stop:
                pass
            x = current.pop("x")
            keep = _position_mask(_batch_mask(mask, batch), x, layer)
            rows = x[keep] if keep is not None else x.reshape(-1, x.shape[-1])
            s = rows.double().sum(0)
            total = s if total is None else total + s
            count += rows.shape[0]
    finally:
        h.remove()
    if not count:
        raise ValueError("mask keeps no position of the batches: nothing to average.")
    return total / count


def loss_recovered(model, layer, sae, batches, *, loss="causal_lm", against_clean=False,
                   mask="auto", logits=None, ablations=("zero", "mean"), mean=None,
                   dtype=None, device=None):
    r"""Downstream loss with an SAE spliced in, against the clean and ablated model.

    For every batch the model runs clean, with ``layer``'s output replaced
    by the SAE's reconstruction (:func:`splice`), and with it ablated: set
    to zero, and to its mean over the masked positions of all batches (or
    ``mean``). With :math:`L` the mean loss of each run,

    .. math::

        \text{loss recovered} = \frac{L_\text{zero} - L_\text{SAE}}
                                     {L_\text{zero} - L_\text{clean}},

    1 when splicing loses nothing, 0 when it is as bad as zero ablation
    (SAELens, dictionary_learning, SAEBench's ``ce_loss_score``);
    ``loss_recovered_mean`` uses the mean ablation instead, a stricter
    baseline. When the model's outputs are logits, also the KL divergence of
    each run's next-token distribution to the clean one, averaged over
    positions, and SAEBench's ``kl_div_score``
    :math:`(KL_\text{zero} - KL_\text{SAE}) / KL_\text{zero}`.

    Every run is under :func:`torch.inference_mode` with the model in eval
    mode (its modes are put back afterwards).

    Parameters
    ----------
    model : torch.nn.Module
        Any module; a dict batch is passed as keyword arguments, a tuple or
        list as positional ones, a tensor as the one argument.
    layer : str
        The submodule to splice (``model.named_modules()``).
    sae : fitted estimator
        See :func:`splice`.
    batches : iterable
        Input batches (iterated twice when the mean is computed here; a
        one-shot iterator is first turned into a list).
    loss : "causal_lm" or callable, default="causal_lm"
        ``"causal_lm"``: next-token cross-entropy from the output's logits
        (``output.logits``, or the output tensor) and the batch's ``labels``
        or ``input_ids`` (a tensor batch is the ids), padding ignored; the
        loss is the mean over all predicted tokens of all batches. A callable
        ``loss(output, batch)`` (or ``loss(clean_output, output)`` with
        ``against_clean``) returns a tensor: its values of all batches are
        pooled and averaged (return one value per token or per sequence for
        an exact mean; a scalar counts once per batch).
    against_clean : bool, default=False
        Call ``loss(clean_output, output)``: a divergence from the clean
        model's output, e.g. one minus the cosine of sentence embeddings
        (the clean loss is then ``loss(clean_output, clean_output)``, usually 0).
    mask : "auto", callable, bool Tensor or None, default="auto"
        Positions to splice and ablate. ``"auto"``: a dict batch's
        ``attention_mask`` when it has one, else every position. A callable
        takes the batch (on ``device``) and returns a boolean tensor over the
        layer output's leading (batch, position) dimensions.
    logits : callable, default=None
        ``logits(output) -> Tensor (..., n_classes)`` for the KL divergences.
        None: with ``loss="causal_lm"`` the output's logits, else no KL.
    ablations : tuple of {"zero", "mean"}, default=("zero", "mean")
        The baselines to run.
    mean : array-like of shape (n_features,), default=None
        The activation used by mean ablation; None computes it over the
        masked positions of ``batches`` (one more pass, up to ``layer`` only).
    dtype : torch.dtype, default=None
        The SAE's compute dtype (see :func:`splice`).
    device : str or torch.device, default=None
        Where the batches go; None: the device of the model's first parameter.

    Returns
    -------
    result : sklearn.utils.Bunch
        ``loss_clean``, ``loss_spliced``, ``loss_zero_ablated`` and
        ``loss_mean_ablated`` (mean losses); ``loss_recovered`` and
        ``loss_recovered_mean`` (the score against zero and mean ablation);
        with logits ``kl_spliced``, ``kl_zero_ablated``, ``kl_mean_ablated``
        and ``kl_score``; ``n_loss_terms`` (the values averaged per run) and
        ``n_batches``. Entries of an ablation not run are absent.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sksae import SparseAutoencoder
    >>> from sksae.activations import loss_recovered
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> lm = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Linear(8, 8),
    ...                          torch.nn.Linear(8, 20))
    >>> tokens = torch.randint(0, 20, (16, 10))
    >>> X = lm[:2](tokens).reshape(-1, 8).detach().numpy()
    >>> sae = SparseAutoencoder(n_components=32, k=6, max_iter=20, random_state=0).fit(X)
    >>> result = loss_recovered(lm, "1", sae, tokens.split(8))
    >>> sorted(result)[:4]
    ['kl_mean_ablated', 'kl_score', 'kl_spliced', 'kl_zero_ablated']
    """
    unknown = set(ablations) - {"zero", "mean"}
    if unknown:
        raise ValueError(f"ablations must be among 'zero' and 'mean'; got {sorted(unknown)}.")
    if not (loss == "causal_lm" or callable(loss)):
        raise ValueError(f"loss must be 'causal_lm' or a callable; got {loss!r}.")
    if loss == "causal_lm" and against_clean:
        raise ValueError("against_clean applies to a callable loss.")
    if logits is None and loss == "causal_lm":
        logits = _logits_of
    if iter(batches) is batches:
        batches = list(batches)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    coder = _Reconstruction(sae, dtype)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    runs = ["spliced", *(f"{a}_ablated" for a in ablations)]
    losses = {name: [] for name in ["clean", *runs]}
    kls = {name: [] for name in runs}
    n_batches = 0
    try:
        with torch.inference_mode():
            if "mean" in ablations:
                mean_row = (_layer_mean(model, layer, batches, mask, device) if mean is None
                            else torch.as_tensor(np.asarray(mean, dtype=np.float64)))

            def terms(output, batch, clean_output):
                if loss == "causal_lm":
                    return _causal_lm_terms(output, batch)
                got = loss(clean_output, output) if against_clean else loss(output, batch)
                return torch.as_tensor(got).detach().double().reshape(-1)

            replacements = {
                "spliced": lambda rows, h: coder.reconstruct(rows),
                "zero_ablated": lambda rows, h: torch.zeros_like(rows),
                "mean_ablated": lambda rows, h: mean_row.to(rows.device, rows.dtype).expand_as(
                    rows),
            }
            for batch in batches:
                batch = _to_device(batch, device)
                keep = _batch_mask(mask, batch)
                clean = _call(model, batch)
                losses["clean"].append(terms(clean, batch, clean).double().cpu())
                clean_logits = logits(clean) if logits is not None else None
                for name in runs:
                    with _replaced(model, layer, replacements[name], keep):
                        out = _call(model, batch)
                    losses[name].append(terms(out, batch, clean).double().cpu())
                    if clean_logits is not None:
                        new = logits(out)
                        kls[name].append(_kl(clean_logits, new,
                                             _kl_positions(clean_logits, batch)).cpu())
                n_batches += 1
    finally:
        for m, training in modes:
            m.training = training
    if not n_batches:
        raise ValueError("batches is empty: there is nothing to evaluate.")
    result = Bunch()
    for name, values in losses.items():
        result[f"loss_{name}"] = float(torch.cat(values).mean())
    result.n_loss_terms = int(sum(v.numel() for v in losses["clean"]))
    result.n_batches = n_batches

    def score(baseline):
        gap = result[f"loss_{baseline}"] - result.loss_clean
        return (result[f"loss_{baseline}"] - result.loss_spliced) / gap if gap else float("nan")

    if "zero" in ablations:
        result.loss_recovered = score("zero_ablated")
    if "mean" in ablations:
        result.loss_recovered_mean = score("mean_ablated")
    if logits is not None:
        for name, values in kls.items():
            result[f"kl_{name}"] = float(torch.cat(values).mean())
        if "zero" in ablations:
            kz = result.kl_zero_ablated
            result.kl_score = (kz - result.kl_spliced) / kz if kz else float("nan")
    return result
