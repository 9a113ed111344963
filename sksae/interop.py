"""Exchange sparse autoencoders with SAELens and EleutherAI sparsify.

- :func:`to_saelens` writes a fitted :class:`~sksae.SparseAutoencoder` as a
  SAELens 6 folder (``cfg.json`` + ``sae_weights.safetensors``) that
  ``sae_lens.SAE.load_from_disk`` reads, for every architecture;
- :func:`from_saelens` reads such a folder (standard, topk, jumprelu, gated);
- :func:`to_sparsify` writes a TopK SAE as a sparsify folder (``cfg.json`` +
  ``sae.safetensors``) that ``sparsify.SparseCoder.load_from_disk`` reads;
- :func:`from_sparsify` reads such a folder.

The supported versions of the peers (tested round trips through their own
loaders, ``tests/test_interop_peers.py``) are those of the ``peers`` extra
(``pip install "sksae[peers]"``), stated in the user guide.

An imported SAE is a fitted :class:`~sksae.SparseAutoencoder`: ``transform``
gives the peer library's ``encode``, ``inverse_transform`` its ``decode``,
and it can be used as the first step of a scikit-learn Pipeline (wrap it in
:class:`sklearn.frozen.FrozenEstimator` so that ``Pipeline.fit`` does not
retrain it).

The conventions, checked against both libraries' inference code:

- SAELens: ``z = f((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc)``,
  ``x_hat = z @ W_dec + b_dec`` with ``W_enc`` of shape ``[d_in, d_sae]`` and
  ``W_dec`` ``[d_sae, d_in]``; ``f`` is ReLU (``"standard"``),
  TopK-then-ReLU (``"topk"``, ``k``), ``ReLU(pre) * 1[pre > threshold]``
  (``"jumprelu"``), or the gated encoder (``b_gate``, ``r_mag``, ``b_mag``).
- sparsify: ``z = TopK(ReLU(encoder(x - b_dec)))`` with ``encoder.weight`` of
  shape ``[d_sae, d_in]``, ``x_hat = z @ W_dec + b_dec``.

sksae's fitted arrays are already in the user's units (the input
normalisation is folded into them), so an export is a transpose and a
renaming. Loading uses safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import architectures
from ._io import MALFORMED, _write_files, read_json_bounded

__all__ = ["to_saelens", "from_saelens", "to_sparsify", "from_sparsify"]

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
_MAX_CFG_BYTES = 2**20


# --------------------------------------------------------------------- helpers
_MAX_CFG_DEPTH = 32


def _read_json(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        cfg = read_json_bounded(path, _MAX_CFG_BYTES, _MAX_CFG_DEPTH)
    except ValueError as exc:
        raise ValueError(f"{path.parent}: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} does not hold a JSON object.")
    return cfg


def _float_dtype(dtype):
    """``dtype`` as a numpy float32 or float64 dtype; anything else is refused."""
    try:  # np.dtype(None) is float64: None is refused, not read as a default
        dt = None if dtype is None or isinstance(dtype, bool) else np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}.")
    return np.dtype(dt.name)  # native byte order ('>f4' is float32 too)


def _read_tensors(path, dtype):
    """Tensors of a safetensors file as numpy arrays of ``dtype`` (bf16 included).

    Only floating-point tensors are read: an integer or boolean tensor is
    refused, not cast.
    """
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        tensors = load_file(str(path), device="cpu")
    except MemoryError:
        raise
    except Exception as exc:  # the parser's own errors: the file is not safetensors
        raise ValueError(f"{path} is not a readable safetensors file "
                         f"({type(exc).__name__}: {exc}).") from None
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {name!r} has dtype {tensor.dtype}; SAE weights "
                             "are floating point.")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow gives inf, refused later
        out = {k: v.to(torch.float64).numpy().astype(dtype) for k, v in tensors.items()}
        if "r_mag" in out:  # exp in float64: exp(log(s)) rounds back to s
            out["mag_scale"] = np.exp(tensors["r_mag"].to(torch.float64).numpy()).astype(dtype)
    return out


def _refusing(source, call):
    """``call()``, a malformed value that no explicit check anticipated refused as ValueError."""
    try:
        return call()
    except MALFORMED as exc:
        raise ValueError(f"{source}: malformed contents ({type(exc).__name__}: "
                         f"{exc}).") from exc


def _expect(tensors, name, shape, source):
    if name not in tensors:
        raise ValueError(f"{source} has no tensor {name!r} (found {sorted(tensors)}).")
    arr = tensors[name]
    if arr.shape != tuple(shape):
        raise ValueError(f"{source}: {name} has shape {list(arr.shape)}; expected "
                         f"{list(shape)}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{source}: {name} contains NaN or infinite values.")
    return arr


def _positive_int(cfg, key, source):
    value = cfg.get(key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{source}: {key}={value!r} is not a positive integer.")
    return value


def _fitted_sae(architecture, W_enc_FD, b_enc_F, W_dec_FD, b_dec_D, extra=None, *,
                device="auto", source="", **hparams):
    """A fitted SparseAutoencoder holding the given weights (user units).

    ``hparams``: estimator parameters the folder sets (``k``); the others keep
    their defaults, with ``k`` capped at the number of latents for
    architectures that do not read it.
    """
    from ._sae import SparseAutoencoder

    n_components, n_features = W_dec_FD.shape
    hparams = {"k": min(32, n_components), **hparams}
    sae = SparseAutoencoder(n_components=n_components, architecture=architecture,
                            device=device, **hparams)
    try:
        sae._validate_params()
        sae._architecture(n_components, n_features)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source}: {exc}") from None
    arrays = {"components_": np.ascontiguousarray(W_dec_FD),
              "encoder_weights_": np.ascontiguousarray(W_enc_FD),
              "encoder_bias_": b_enc_F, "decoder_bias_": b_dec_D, **(extra or {})}
    for attr, value in arrays.items():
        # sums of finite weights (folded biases, rescaled rows) can still overflow
        if not np.isfinite(value).all():
            raise ValueError(f"{source}: {attr} holds NaN or infinite values (after "
                             "folding the biases and scales into the weights).")
        setattr(sae, attr, value)
    sae.n_components_ = n_components
    sae.n_features_in_ = n_features
    sae.input_scale_ = 1.0
    sae.n_iter_ = 0
    sae.n_steps_ = 0
    sae.loss_curve_ = np.zeros(0)
    sae.history_ = {"step": {}, "epoch": {}}
    return sae


# ---------------------------------------------------------------------- SAELens
#: the SAELens config layout a folder follows: ``load_from_disk`` reads a folder
#: whose ``metadata.sae_lens_version`` is below 6.0 (or absent) as a pre-6 one
_SAELENS_LAYOUT_VERSION = "6.0.0"


def _export_setup(model, dtype, caller):
    """``(architecture, dtype, cast)`` for an export of the fitted ``model``."""
    from sklearn.utils.validation import check_is_fitted

    from ._sae import SparseAutoencoder

    if not isinstance(model, SparseAutoencoder):
        raise TypeError(f"{caller} exports a SparseAutoencoder, not {type(model).__name__}.")
    check_is_fitted(model)
    dtype = _float_dtype(model.components_.dtype if dtype is None else dtype)
    d_sae, d_in = model.components_.shape

    def cast(a):
        return np.ascontiguousarray(np.asarray(a, dtype=dtype))

    return model._architecture(d_sae, d_in), dtype, cast


def _metadata_string(name, value):
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}.")
    return value


def to_saelens(model, path, *, dtype=None, model_name="unknown", hook_name="unknown",
               context_size=None, prepend_bos=True):
    """Export a fitted SparseAutoencoder as a SAELens folder.

    Writes ``cfg.json`` and ``sae_weights.safetensors`` in the layout of
    SAELens 6 (``SAE.save_model``), which ``sae_lens.SAE.load_from_disk``
    reads: tensors ``W_enc`` ``[d_in, d_sae]``, ``W_dec`` ``[d_sae, d_in]``,
    ``b_enc`` ``[d_sae]``, ``b_dec`` ``[d_in]``, and ``threshold``
    ``[d_sae]`` for JumpReLU. The mapping of architectures:

    ========================  ==========================================
    sksae ``architecture``    SAELens ``architecture``
    ========================  ==========================================
    ``"relu"``                ``"standard"``
    ``"topk"``                ``"topk"`` (``k``)
    ``"jumprelu"``            ``"jumprelu"``
    ``"batchtopk"``           ``"jumprelu"`` (the shared inference
                              threshold copied to every latent, as
                              SAELens saves its BatchTopK SAEs for
                              inference)
    ``"gated"``               ``"gated"`` (``b_gate``, ``r_mag``, ``b_mag``)
    ``"matryoshka"``          ``"jumprelu"`` (as ``"batchtopk"``)
    ========================  ==========================================

    Each architecture gives its own mapping (``Architecture.to_saelens``);
    one without a SAELens equivalent is refused.

    Every mapping is exact: SAELens's ``encode`` gives ``model.transform``
    and its ``decode`` gives ``model.inverse_transform``. ``cfg.json`` sets
    ``apply_b_dec_to_input=True``, ``normalize_activations="none"`` (sksae's
    normalisation is already folded into the weights) and
    ``reshape_activations="none"``; its ``metadata`` holds the language-model
    fields SAELens reads when it hooks the SAE into a model (``model_name``,
    ``hook_name``, ``context_size``, ``prepend_bos``), ``sae_lens_version``
    ``"6.0.0"`` (the config layout, not a SAELens release that wrote it),
    and ``sksae_version`` and ``sksae_architecture``. Supported SAELens
    versions: see the user guide's section on saving and sharing.

    Parameters
    ----------
    model : SparseAutoencoder
        A fitted autoencoder.
    path : str or path-like
        Folder to write (created if needed).
    dtype : {"float32", "float64"} or None, default=None
        Dtype of the saved tensors; None keeps the model's; any
        other dtype is refused (ValueError).
    model_name : str, default="unknown"
        The language model whose activations the SAE was fitted on (the
        TransformerLens name, e.g. ``"gpt2"``); "unknown" when it was fitted
        on other data.
    hook_name : str, default="unknown"
        The hook point the activations were read at (e.g.
        ``"blocks.8.hook_resid_pre"``), where ``HookedSAETransformer``
        attaches the SAE.
    context_size : int or None, default=None
        Tokens per sequence of the training activations; None leaves it
        unset (SAELens's ``ActivationsStore.from_sae`` then needs its own
        ``context_size`` argument).
    prepend_bos : bool, default=True
        Whether the sequences started with a BOS token (SAELens's default).

    Returns
    -------
    path : pathlib.Path
        The folder.

    Raises
    ------
    TypeError
        ``model`` is not a SparseAutoencoder.
    ValueError
        The architecture has no SAELens equivalent; ``dtype`` is not float32
        or float64; ``model_name`` or ``hook_name`` is not a non-empty
        string, ``context_size`` not None or a positive integer, or
        ``prepend_bos`` not a bool.

    See Also
    --------
    from_saelens : The inverse.
    to_sparsify : Export a TopK SAE for EleutherAI sparsify.
    sksae.save : sksae's own format, for every estimator and all metadata.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> from sksae import SparseAutoencoder
    >>> from sksae.interop import from_saelens, to_saelens
    >>> X = np.random.RandomState(0).randn(64, 8).astype(np.float32)
    >>> sae = SparseAutoencoder(n_components=16, k=4, max_iter=1, device="cpu",
    ...                         random_state=0).fit(X)
    >>> folder = to_saelens(sae, tempfile.mkdtemp(), model_name="gpt2",
    ...                     hook_name="blocks.8.hook_resid_pre", context_size=128)
    >>> sorted(p.name for p in folder.iterdir())
    ['cfg.json', 'sae_weights.safetensors']
    >>> np.allclose(from_saelens(folder).transform(X), sae.transform(X))
    True
    """
    from safetensors.numpy import save as to_bytes

    import sksae

    arch, dtype, cast = _export_setup(model, dtype, "to_saelens")
    d_sae, d_in = model.components_.shape
    saelens_arch = arch.saelens_architecture
    if saelens_arch is None:
        raise ValueError(f"architecture {arch.name!r} has no SAELens equivalent.")
    metadata = {"sae_lens_version": _SAELENS_LAYOUT_VERSION,
                "sae_lens_training_version": None,  # not trained by SAELens
                "model_name": _metadata_string("model_name", model_name),
                "hook_name": _metadata_string("hook_name", hook_name)}
    if context_size is not None:
        if isinstance(context_size, (bool, np.bool_)) or not isinstance(
                context_size, (int, np.integer)) or context_size < 1:
            raise ValueError(f"context_size must be None or a positive integer, got "
                             f"{context_size!r}.")
    if not isinstance(prepend_bos, (bool, np.bool_)):
        raise ValueError(f"prepend_bos must be a bool, got {prepend_bos!r}.")
    metadata.update(context_size=None if context_size is None else int(context_size),
                    prepend_bos=bool(prepend_bos), sksae_version=sksae.__version__,
                    sksae_architecture=arch.name)

    own, cfg_extra = arch.to_saelens(model)
    tensors = {"W_enc": cast(model.encoder_weights_.T), "W_dec": cast(model.components_),
               "b_dec": cast(model.decoder_bias_), **{k: cast(v) for k, v in own.items()}}
    cfg = {
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": dtype.name,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **cfg_extra,
        "metadata": metadata,
        "architecture": saelens_arch,
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    # each file written to a new temporary (no planted link followed), then renamed
    _write_files(folder, {SAELENS_WEIGHTS: to_bytes(tensors),
                          SAELENS_CFG: json.dumps(cfg, indent=2).encode()})
    return folder


def from_saelens(path, *, device="auto", dtype="float32"):
    """Import a SAELens SAE folder as a fitted SparseAutoencoder.

    Reads ``cfg.json`` and ``sae_weights.safetensors`` (bf16, fp16, fp32 or
    fp64 weights). Supported SAELens architectures: ``"standard"`` (ReLU),
    ``"topk"``, ``"jumprelu"`` (also a ``"batchtopk"`` folder saved with its
    inference ``threshold``) and ``"gated"``; the older layout with
    ``activation_fn_str="topk"`` and ``activation_fn_kwargs={"k": ...}`` too.
    ``apply_b_dec_to_input=False`` is folded into the encoder bias
    (``b_enc + b_dec @ W_enc``) and a fine-tuning ``scaling_factor`` into the
    decoder rows, so ``transform`` still equals SAELens's ``encode`` and
    ``inverse_transform`` its ``decode``. Folders with a run-time input
    normalisation (``normalize_activations`` other than ``"none"``) are
    refused: their encode depends on a statistic that is not in the folder.

    SAELens's decoder rows need not have unit norm; ``components_`` keeps
    them as saved.

    Parameters
    ----------
    path : str or path-like
        The SAELens folder.
    device : str, default="auto"
        ``device`` parameter of the returned estimator.
    dtype : {"float32", "float64"}, default="float32"
        Dtype of the fitted arrays.

    Returns
    -------
    sae : SparseAutoencoder
        A fitted estimator (``n_iter_ = 0``, empty ``history_``,
        ``input_scale_ = 1.0``).

    Raises
    ------
    FileNotFoundError
        ``cfg.json`` or ``sae_weights.safetensors`` is missing.
    ValueError
        ``dtype`` is not float32 or float64; ``cfg.json`` is not a JSON
        object, is larger than 1 MiB or nests more than 32 levels deep; the
        weights file is not safetensors or holds a non-floating-point tensor;
        a tensor is missing, has the wrong shape or holds NaN or infinite
        values (also after the conversion to ``dtype`` and the folding of
        biases and scales); the configuration is unsupported or its
        hyperparameters are invalid (e.g. ``k`` larger than ``d_sae``). No
        other exception type escapes for a malformed folder.

    See Also
    --------
    to_saelens : The inverse.
    from_sparsify : Import an EleutherAI sparsify SAE.
    """
    folder = Path(path)
    source = f"SAELens folder {str(folder)!r}"
    dtype = _float_dtype(dtype)
    return _refusing(source, lambda: _from_saelens(folder, source, device, dtype))


def _from_saelens(folder, source, device, dtype):
    cfg = _read_json(folder / SAELENS_CFG)
    d_in = _positive_int(cfg, "d_in", source)
    d_sae = _positive_int(cfg, "d_sae", source)
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise ValueError(f"{source} uses normalize_activations={norm!r}, which rescales "
                         "inputs at run time with a statistic not stored in the folder; "
                         "fold it into the weights with SAELens first.")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise ValueError(f"{source} uses rescale_acts_by_decoder_norm, not supported.")
    arch = cfg.get("architecture", "standard")
    activation = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    tensors = _read_tensors(folder / SAELENS_WEIGHTS, dtype)

    W_enc_DF = _expect(tensors, "W_enc", (d_in, d_sae), source)
    W_dec_FD = _expect(tensors, "W_dec", (d_sae, d_in), source)
    b_dec_D = _expect(tensors, "b_dec", (d_in,), source)
    if "scaling_factor" in tensors:
        scale = _expect(tensors, "scaling_factor", (d_sae,), source)
        W_dec_FD = W_dec_FD * scale[:, None]
    shift_F = b_dec_D @ W_enc_DF  # folds apply_b_dec_to_input=False into the biases
    shift_F = np.zeros_like(shift_F) if cfg.get("apply_b_dec_to_input", True) else shift_F

    def expect(name, shape):
        return _expect(tensors, name, shape, source)

    for ours in architectures.available():
        try:
            found = architectures.get(ours).from_saelens(cfg, tensors, expect, shift_F)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
        if found is not None:
            break
    else:
        raise ValueError(f"{source}: architecture {arch!r} with activation {activation!r} is "
                         f"not supported (no registered architecture reads it).")
    extra, hparams = found
    extra = dict(extra)
    b_enc_F = extra.pop("encoder_bias_")
    return _fitted_sae(ours, np.ascontiguousarray(W_enc_DF.T), b_enc_F, W_dec_FD, b_dec_D,
                       extra, device=device, source=source, **hparams)


# --------------------------------------------------------------------- sparsify
def to_sparsify(model, path, *, dtype=None):
    """Export a fitted TopK SparseAutoencoder as an EleutherAI sparsify folder.

    Writes ``cfg.json`` (``activation="topk"``, ``k``, ``num_latents``,
    ``d_in``...) and ``sae.safetensors`` (``encoder.weight`` ``[d_sae, d_in]``,
    ``encoder.bias`` ``[d_sae]``, ``W_dec`` ``[d_sae, d_in]``, ``b_dec``
    ``[d_in]``), the layout of sparsify's ``SparseCoder.save_to_disk``, which
    ``SparseCoder.load_from_disk`` reads. sparsify encodes with
    ``TopK(ReLU(encoder(x - b_dec)))``, exactly sksae's
    ``architecture="topk"``, so its ``encode`` then ``decode`` give
    ``model.transform`` and ``model.inverse_transform``.

    Only architectures whose inference rule sparsify has can be exported
    (their ``Architecture.sparsify_activation``; ``"topk"`` for TopK).
    BatchTopK and Matryoshka are refused: at inference they keep the
    activations above a learned threshold, a variable number per row, which
    sparsify's fixed-``k`` encoder cannot reproduce (export them with
    :func:`to_saelens`, as a JumpReLU). Supported sparsify versions: see the
    user guide's section on saving and sharing.

    Parameters
    ----------
    model : SparseAutoencoder
        A fitted autoencoder with ``architecture="topk"``.
    path : str or path-like
        Folder to write (created if needed).
    dtype : {"float32", "float64"} or None, default=None
        Dtype of the saved tensors (sparsify loads the SAE in this dtype);
        None keeps the model's; any other dtype is refused (ValueError).

    Returns
    -------
    path : pathlib.Path
        The folder.

    Raises
    ------
    TypeError
        ``model`` is not a SparseAutoencoder.
    ValueError
        The architecture has no sparsify equivalent, or ``dtype`` is not
        float32 or float64.

    See Also
    --------
    from_sparsify : The inverse.
    to_saelens : Export any architecture for SAELens.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> from sksae import SparseAutoencoder
    >>> from sksae.interop import from_sparsify, to_sparsify
    >>> X = np.random.RandomState(0).randn(64, 8).astype(np.float32)
    >>> sae = SparseAutoencoder(n_components=16, k=4, max_iter=1, device="cpu",
    ...                         random_state=0).fit(X)
    >>> folder = to_sparsify(sae, tempfile.mkdtemp())
    >>> sorted(p.name for p in folder.iterdir())
    ['cfg.json', 'sae.safetensors']
    >>> np.allclose(from_sparsify(folder).transform(X), sae.transform(X))
    True
    """
    from safetensors.numpy import save as to_bytes

    arch, dtype, cast = _export_setup(model, dtype, "to_sparsify")
    if arch.sparsify_activation is None:
        raise ValueError(f"architecture {arch.name!r} has no sparsify equivalent (sparsify "
                         "encodes with a fixed number of latents per row: architecture="
                         "'topk'); use to_saelens.")
    d_sae, d_in = model.components_.shape
    W_dec = cast(model.components_)
    norms = np.linalg.norm(W_dec.astype(np.float64), axis=1)
    cfg = {
        "activation": arch.sparsify_activation,
        "expansion_factor": max(1, d_sae // d_in),  # num_latents takes precedence
        # a training setting; loading keeps the saved rows whatever it says
        "normalize_decoder": bool(np.allclose(norms, 1, rtol=0, atol=1e-4)),
        "num_latents": int(d_sae),
        "k": int(model.k),
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": int(d_in),  # sparsify's own fields only: it reports any other on loading
    }
    tensors = {"encoder.weight": cast(model.encoder_weights_),
               "encoder.bias": cast(model.encoder_bias_),
               "W_dec": W_dec, "b_dec": cast(model.decoder_bias_)}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _write_files(folder, {SPARSIFY_WEIGHTS: to_bytes(tensors),
                          SPARSIFY_CFG: json.dumps(cfg, indent=2).encode()})
    return folder


def from_sparsify(path, *, device="auto", dtype="float32"):
    """Import an EleutherAI sparsify SAE folder as a fitted SparseAutoencoder.

    Reads ``cfg.json`` (``k``, ``d_in``, ``num_latents``...) and
    ``sae.safetensors`` (``encoder.weight`` ``[d_sae, d_in]``,
    ``encoder.bias`` ``[d_sae]``, ``W_dec`` ``[d_sae, d_in]``, ``b_dec``
    ``[d_in]``). sparsify encodes with ``TopK(ReLU(encoder(x - b_dec)))``,
    which is sksae's ``architecture="topk"``. Transcoders, skip connections
    and activations other than TopK are refused. A checkpoint folder holding
    one subfolder per hookpoint is refused with the list of subfolders: pass
    one of them.

    Parameters
    ----------
    path : str or path-like
        The folder of one sparsify SAE.
    device : str, default="auto"
        ``device`` parameter of the returned estimator.
    dtype : {"float32", "float64"}, default="float32"
        Dtype of the fitted arrays.

    Returns
    -------
    sae : SparseAutoencoder
        A fitted estimator with ``architecture="topk"``.

    Raises
    ------
    FileNotFoundError
        ``cfg.json`` or ``sae.safetensors`` is missing.
    ValueError
        As :func:`from_saelens`: a non-float ``dtype``, an oversized or too
        deeply nested ``cfg.json``, a non-floating-point, misshapen or
        non-finite tensor, an unsupported configuration or ``k`` larger than
        the number of latents. No other exception type escapes for a
        malformed folder.

    See Also
    --------
    from_saelens : Import a SAELens SAE.
    """
    folder = Path(path)
    source = f"sparsify folder {str(folder)!r}"
    dtype = _float_dtype(dtype)
    return _refusing(source, lambda: _from_sparsify(folder, source, device, dtype))


def _from_sparsify(folder, source, device, dtype):
    if not (folder / SPARSIFY_CFG).is_file() and folder.is_dir():
        subs = sorted(p.name for p in folder.iterdir() if (p / SPARSIFY_CFG).is_file())
        if subs:
            raise ValueError(f"{source} holds one SAE per hookpoint {subs}; pass one of "
                             "these subfolders.")
    cfg = _read_json(folder / SPARSIFY_CFG)
    if cfg.get("transcode"):
        raise ValueError(f"{source} is a transcoder (it predicts another layer), not an "
                         "autoencoder: not supported.")
    if cfg.get("skip_connection"):
        raise ValueError(f"{source} has a skip connection (W_skip): not supported.")
    activation = cfg.get("activation", "topk")
    readers = [name for name in architectures.available()
               if isinstance(activation, str)
               and architectures.get(name).sparsify_activation == activation]
    if not readers:
        raise ValueError(f"{source} uses activation={activation!r}, which no registered "
                         "architecture reads.")
    k = _positive_int(cfg, "k", source)
    tensors = _read_tensors(folder / SPARSIFY_WEIGHTS, dtype)
    if "W_skip" in tensors:
        raise ValueError(f"{source} has a skip connection (W_skip): not supported.")
    if "encoder.weight" not in tensors:
        raise ValueError(f"{source} has no tensor 'encoder.weight' (found "
                         f"{sorted(tensors)}).")
    if tensors["encoder.weight"].ndim != 2:
        raise ValueError(f"{source}: encoder.weight has shape "
                         f"{list(tensors['encoder.weight'].shape)}; expected [d_sae, d_in].")
    d_sae, d_in = tensors["encoder.weight"].shape
    if cfg.get("d_in") is not None and _positive_int(cfg, "d_in", source) != d_in:
        raise ValueError(f"{source}: cfg d_in={cfg['d_in']} but encoder.weight has "
                         f"{d_in} columns.")
    if cfg.get("num_latents") and cfg["num_latents"] != d_sae:  # 0: from expansion_factor
        raise ValueError(f"{source}: cfg num_latents={cfg['num_latents']} but "
                         f"encoder.weight has {d_sae} rows.")
    if k > d_sae:
        raise ValueError(f"{source}: k={k} exceeds the {d_sae} latents.")
    W_enc = _expect(tensors, "encoder.weight", (d_sae, d_in), source)
    b_enc = _expect(tensors, "encoder.bias", (d_sae,), source)
    W_dec = _expect(tensors, "W_dec", (d_sae, d_in), source)
    b_dec = _expect(tensors, "b_dec", (d_in,), source)
    return _fitted_sae(readers[0], W_enc, b_enc, W_dec, b_dec, k=k, device=device,
                       source=source)
