"""Save and load fitted sksae estimators as a folder of safetensors + JSON.

A saved model is a folder with two files:

- ``model.safetensors``: every fitted array attribute (``components_``,
  ``encoder_weights_``, ..., the per-step and per-epoch ``history_`` arrays
  under ``history_/step/<name>`` and ``history_/epoch/<name>``, array-valued
  parameters under ``params/<name>``);
- ``config.json``: the estimator's class name, its JSON-serialisable
  parameters, scalar fitted attributes, the sksae version, a manifest of the
  arrays (dtype and shape) and SHA-256 digests of the weights file and of the
  JSON body.

Loading never unpickles and never imports or runs code named by the file: the
class comes from a fixed whitelist of sksae estimators, parameters are checked
against the estimator's own constraints, arrays against the manifest and
against each other (shapes, dtypes, finiteness). A folder that fails any check
is refused with a :class:`ValueError` naming the problem. The digests detect
corruption and accidental edits; they are not a signature (anyone who can
write the folder can recompute them), which is why every value is validated
as well.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import warnings
from pathlib import Path

import numpy as np

__all__ = ["save", "load"]

FORMAT = "sksae"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_MAX_CONFIG_BYTES = 16 * 2**20
_FLOAT_DTYPES = ("float32", "float64")

# class name -> (module, private numpy state restored so that partial_fit continues)
_REGISTRY = {
    "SparseAutoencoder": ("sksae._sae", ()),
    "DictionaryLearnerGPU": ("sksae._dict_learning", ("_A", "_B")),
}
_RANDOM_STATE_ATTRS = {"DictionaryLearnerGPU": "_random_state"}


def _estimator_class(name):
    import importlib

    if name not in _REGISTRY:
        raise ValueError(
            f"Refusing to load: estimator {name!r} is not one of the sksae estimators "
            f"{sorted(_REGISTRY)}."
        )
    return getattr(importlib.import_module(_REGISTRY[name][0]), name)


# ---------------------------------------------------------------------- helpers
def _sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _canonical(body):
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def _json_scalar(value):
    """``value`` as a JSON scalar, or raise TypeError."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(type(value).__name__)


def _json_mapping(value):
    """A dict parameter (``architecture_params``) as JSON: string keys, scalar or list values."""
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(type(key).__name__)
        if isinstance(item, (list, tuple, np.ndarray)):
            out[key] = [_json_scalar(v) for v in np.asarray(item).tolist()]
        else:
            out[key] = _json_scalar(item)
    return out


def _is_json_mapping(value):
    """Whether a loaded parameter is a mapping :func:`_json_mapping` could have written."""
    return isinstance(value, dict) and all(
        isinstance(v, (type(None), bool, int, float, str)) or (
            isinstance(v, list) and all(isinstance(x, (bool, int, float)) for x in v))
        for v in value.values())


def _contiguous(value):
    """A C-contiguous copy; unlike ``np.ascontiguousarray`` keeps 0-d arrays 0-d."""
    return np.array(value, order="C")


def _is_public_fitted(name):
    return name.endswith("_") and not name.startswith("_")


# ------------------------------------------------------------------------- save
def save(model, path):
    """Save a fitted sksae estimator to the folder ``path``.

    Writes ``model.safetensors`` (every fitted array) and ``config.json``
    (class, parameters, scalar fitted attributes, sksae version, SHA-256
    digests). No pickle is involved: the folder can be loaded on another
    machine, CPU or GPU, by :func:`load`, and its weights read by any
    safetensors reader.

    Parameters that cannot be stored as JSON are dropped with a warning and
    reset to ``None``: a ``callback`` function, a ``RandomState`` instance as
    ``random_state``. Array-valued parameters (``init``, ``dict_init``) are
    stored with the weights. The optimizer state of a
    :class:`~sksae.SparseAutoencoder` is not saved: a loaded model transforms
    and reconstructs exactly like the saved one, but training it again
    (``fit``, ``partial_fit``) starts afresh.

    Parameters
    ----------
    model : SparseAutoencoder or DictionaryLearnerGPU
        A fitted estimator (any architecture).
    path : str or path-like
        Folder to write; created if needed. Existing ``config.json`` and
        ``model.safetensors`` in it are overwritten.

    Returns
    -------
    path : pathlib.Path
        The folder.

    See Also
    --------
    load : Load the folder back.
    sksae.interop.to_saelens : Export a SparseAutoencoder in SAELens's format.

    Examples
    --------
    >>> import numpy as np, tempfile, sksae
    >>> X = np.random.RandomState(0).randn(200, 8)
    >>> sae = sksae.SparseAutoencoder(n_components=16, k=2, max_iter=1,
    ...                               random_state=0).fit(X)
    >>> folder = sksae.save(sae, tempfile.mkdtemp())
    >>> np.allclose(sksae.load(folder).transform(X), sae.transform(X))
    True
    """
    from safetensors.numpy import save_file
    from sklearn.utils.validation import check_is_fitted

    import sksae

    name = type(model).__name__
    if name not in _REGISTRY or type(model) is not _estimator_class(name):
        raise TypeError(
            f"sksae.save handles the sksae estimators {sorted(_REGISTRY)}, "
            f"not {type(model).__module__}.{name}."
        )
    check_is_fitted(model)

    arrays, params, attributes, strings = {}, {}, {}, {}
    for key, value in model.get_params(deep=False).items():
        if isinstance(value, np.ndarray) or (
                isinstance(value, (list, tuple)) and key in ("init", "dict_init")):
            arrays[f"params/{key}"] = _contiguous(value)
            continue
        if type(value).__name__ == "device" and type(value).__module__ == "torch":
            value = str(value)
        try:
            params[key] = (_json_mapping(value) if isinstance(value, dict)
                           else _json_scalar(value))
        except TypeError:
            warnings.warn(
                f"sksae.save: parameter {key}={type(value).__name__} cannot be stored "
                "without pickle; it is saved as None.", UserWarning, stacklevel=2)
            params[key] = None

    for key, value in vars(model).items():
        if not _is_public_fitted(key):
            continue
        if isinstance(value, np.ndarray) and value.dtype == object:
            strings[key] = [str(v) for v in value]
        elif isinstance(value, np.ndarray):
            arrays[key] = _contiguous(value)
        elif isinstance(value, dict):
            for group, inner in value.items():
                items = inner.items() if isinstance(inner, dict) else [(None, inner)]
                for sub, arr in items:
                    flat = f"{key}/{group}" + ("" if sub is None else f"/{sub}")
                    arrays[flat] = _contiguous(np.asarray(arr))
        else:
            try:
                attributes[key] = _json_scalar(value)
            except TypeError:
                warnings.warn(f"sksae.save: fitted attribute {key} of type "
                              f"{type(value).__name__} is not saved.", UserWarning,
                              stacklevel=2)
    for key in _REGISTRY[name][1]:
        if isinstance(getattr(model, key, None), np.ndarray):
            arrays[f"state/{key}"] = _contiguous(getattr(model, key))
    rs_attr = _RANDOM_STATE_ATTRS.get(name)
    rs = getattr(model, rs_attr, None) if rs_attr else None
    if isinstance(rs, np.random.RandomState):
        kind, keys, pos, has_gauss, gauss = rs.get_state()
        arrays[f"state/{rs_attr}"] = np.asarray(keys, dtype=np.uint32)
        attributes_state = {"pos": int(pos), "has_gauss": int(has_gauss),
                            "cached_gaussian": float(gauss), "kind": str(kind)}
    else:
        attributes_state = None

    for key, arr in arrays.items():
        if arr.dtype == object:
            raise TypeError(f"sksae.save: array {key} has dtype object.")

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    save_file(arrays, str(weights), metadata={"format": FORMAT})
    body = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sksae_version": sksae.__version__,
        "estimator": name,
        "params": params,
        "attributes": attributes,
        "string_attributes": strings,
        "random_state": attributes_state,
        "arrays": {k: {"dtype": str(v.dtype), "shape": list(v.shape)}
                   for k, v in sorted(arrays.items())},
        "weights_sha256": _sha256_file(weights),
    }
    config = {**body, "config_sha256": hashlib.sha256(_canonical(body)).hexdigest()}
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=1, sort_keys=True))
    os.replace(tmp, folder / CONFIG_FILE)
    return folder


# ------------------------------------------------------------------------- load
def _refuse(path, problem):
    raise ValueError(f"Refusing to load {str(path)!r}: {problem}")


def _read_config(folder):
    cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        _refuse(folder, "not a folder (sksae.save writes a folder).")
    for f in (cfg_path, weights):
        if not f.is_file():
            _refuse(folder, f"{f.name} is missing.")
    if cfg_path.stat().st_size > _MAX_CONFIG_BYTES:
        _refuse(folder, f"{CONFIG_FILE} is larger than {_MAX_CONFIG_BYTES} bytes.")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        _refuse(folder, f"{CONFIG_FILE} is not valid JSON ({exc}).")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        _refuse(folder, f"{CONFIG_FILE} is not an sksae model config (no "
                        f"'format': {FORMAT!r}); for SAELens or sparsify folders use "
                        "sksae.interop.")
    if config.get("format_version") != FORMAT_VERSION:
        _refuse(folder, f"format_version {config.get('format_version')!r} is not "
                        f"supported (this sksae reads version {FORMAT_VERSION}).")
    body = {k: v for k, v in config.items() if k != "config_sha256"}
    if hashlib.sha256(_canonical(body)).hexdigest() != config.get("config_sha256"):
        _refuse(folder, f"{CONFIG_FILE} was modified after saving (its SHA-256 does "
                        "not match config_sha256).")
    if _sha256_file(weights) != config.get("weights_sha256"):
        _refuse(folder, f"{WEIGHTS_FILE} is corrupted or was modified after saving "
                        "(its SHA-256 does not match weights_sha256).")
    for key, kind in (("params", dict), ("attributes", dict), ("string_attributes", dict),
                      ("arrays", dict), ("estimator", str)):
        if not isinstance(config.get(key), kind):
            _refuse(folder, f"{CONFIG_FILE} field {key!r} is missing or malformed.")
    return config


def _read_arrays(folder, manifest):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        _refuse(folder, f"{WEIGHTS_FILE} is not a readable safetensors file ({exc}).")
    if set(arrays) != set(manifest):
        _refuse(folder, f"the tensors in {WEIGHTS_FILE} {sorted(arrays)} do not match "
                        f"the manifest {sorted(manifest)}.")
    for key, arr in arrays.items():
        spec = manifest[key]
        if (not isinstance(spec, dict) or str(arr.dtype) != spec.get("dtype")
                or list(arr.shape) != spec.get("shape")):
            _refuse(folder, f"tensor {key!r} has dtype {arr.dtype} and shape "
                            f"{list(arr.shape)}, the manifest says {spec}.")
    return arrays


def _check_fitted_arrays(folder, model, fitted):
    """Shapes, dtypes and finiteness of the weights against the scalar metadata."""
    comps = fitted.get("components_")
    if not isinstance(comps, np.ndarray) or comps.ndim != 2:
        _refuse(folder, "components_ is missing or not a 2-D array.")
    if str(comps.dtype) not in _FLOAT_DTYPES:
        _refuse(folder, f"components_ has dtype {comps.dtype}; expected float32 or float64.")
    n_atoms, n_features = comps.shape
    if fitted.get("n_features_in_") != n_features:
        _refuse(folder, f"n_features_in_={fitted.get('n_features_in_')!r} does not match "
                        f"components_ of shape {comps.shape}.")
    names = fitted.get("feature_names_in_")
    if names is not None and len(names) != n_features:
        _refuse(folder, "feature_names_in_ does not have n_features_in_ entries.")
    expected = {"components_": [(n_atoms, n_features)]}
    if type(model).__name__ == "SparseAutoencoder":
        if fitted.get("n_components_") != n_atoms:
            _refuse(folder, f"n_components_={fitted.get('n_components_')!r} does not "
                            f"match components_ of shape {comps.shape}.")
        if not (isinstance(fitted.get("input_scale_"), float)
                and math.isfinite(fitted["input_scale_"]) and fitted["input_scale_"] > 0):
            _refuse(folder, "input_scale_ is missing or not a positive number.")
        try:
            arch = model._architecture(n_atoms, n_features)
        except (ValueError, TypeError) as exc:
            _refuse(folder, f"invalid architecture hyperparameters ({exc}).")
        expected.update({"encoder_weights_": [(n_atoms, n_features)],
                         "encoder_bias_": [(n_atoms,)], "decoder_bias_": [(n_features,)]})
        expected.update(arch.fitted_shapes(n_atoms))
    else:
        if model.n_components is not None and model.n_components != n_atoms:
            _refuse(folder, f"n_components={model.n_components} does not match "
                            f"components_ of shape {comps.shape}.")
        for key in _REGISTRY[type(model).__name__][1]:
            state = fitted.get(f"state/{key}")
            if state is not None and (state.dtype != comps.dtype or state.ndim != 2):
                _refuse(folder, f"state {key} has the wrong dtype or shape.")
    for attr, shapes in expected.items():
        arr = fitted.get(attr)
        if not isinstance(arr, np.ndarray):
            _refuse(folder, f"fitted attribute {attr} is missing.")
        if arr.shape not in shapes:
            _refuse(folder, f"{attr} has shape {arr.shape}; expected "
                            f"{' or '.join(map(str, shapes))}.")
        if arr.dtype != comps.dtype:
            _refuse(folder, f"{attr} has dtype {arr.dtype}, components_ {comps.dtype}.")
        if not np.isfinite(arr).all():
            _refuse(folder, f"{attr} contains NaN or infinite values.")


def load(path, *, device=None):
    """Load an estimator saved by :func:`save`.

    Nothing is unpickled and no code named by the folder is imported or run.
    The folder is refused, with a :class:`ValueError` naming the problem, when
    a file is missing or unreadable, a SHA-256 digest does not match (a
    corrupted or edited file), the class is not an sksae estimator, a
    parameter is unknown or invalid, or the arrays disagree with the manifest
    or with each other.

    The loaded estimator is fitted: ``transform``, ``inverse_transform`` and
    ``score`` give the results of the saved one. A
    :class:`~sksae.SparseAutoencoder` is loaded without its optimizer state,
    so ``fit`` and ``partial_fit`` on it start a new training run (to
    fine-tune from the saved atoms, pass ``init=loaded.components_`` to a new
    estimator). A :class:`~sksae.DictionaryLearnerGPU` keeps its sufficient
    statistics, so its ``partial_fit`` continues.

    Parameters
    ----------
    path : str or path-like
        Folder written by :func:`save`.
    device : str or None, default=None
        Overrides the saved ``device`` parameter (e.g. ``"cpu"`` to use a
        model fitted on a GPU on a CPU-only machine). None keeps the saved
        value, except that a CUDA device is replaced by ``"auto"`` with a
        warning when CUDA is not available.

    Returns
    -------
    model : SparseAutoencoder or DictionaryLearnerGPU
        The fitted estimator.

    See Also
    --------
    save : Write the folder.
    sksae.interop.from_saelens : Import an SAE saved by SAELens.
    """
    from ._accel.device import device_available

    folder = Path(path)
    config = _read_config(folder)
    cls = _estimator_class(config["estimator"])
    arrays = _read_arrays(folder, config["arrays"])

    defaults = cls().get_params(deep=False)
    params = dict(config["params"])
    for key, value in arrays.items():
        if key.startswith("params/"):
            params[key[len("params/"):]] = value
    unknown = set(params) - set(defaults)
    if unknown:
        _refuse(folder, f"unknown parameters {sorted(unknown)} for {cls.__name__}.")
    for key, value in config["params"].items():
        if isinstance(value, list) or (isinstance(value, dict) and not (
                isinstance(defaults.get(key, 0), (dict, type(None))) and _is_json_mapping(value))):
            _refuse(folder, f"parameter {key} is not a JSON scalar.")
    if device is not None:
        params["device"] = device
    elif isinstance(params.get("device"), str) and params["device"].startswith("cuda") \
            and not device_available(params["device"]):
        warnings.warn(f"The model was saved with device={params['device']!r}, but CUDA is "
                      "not available here: using device='auto'.", UserWarning, stacklevel=2)
        params["device"] = "auto"
    model = cls(**params)
    try:
        model._validate_params()
    except (ValueError, TypeError) as exc:
        _refuse(folder, f"invalid parameters ({exc}).")

    fitted = {}
    for key, value in config["attributes"].items():
        if not _is_public_fitted(key) or isinstance(value, (dict, list)):
            _refuse(folder, f"attribute {key!r} is not a fitted scalar attribute.")
        fitted[key] = value
    for key, value in config["string_attributes"].items():
        if not _is_public_fitted(key) or not isinstance(value, list) \
                or not all(isinstance(v, str) for v in value):
            _refuse(folder, f"string attribute {key!r} is malformed.")
        fitted[key] = np.asarray(value, dtype=object)
    history = {}
    for key, arr in arrays.items():
        head, _, rest = key.partition("/")
        if head in ("params", "state"):
            if head == "state":
                fitted[key] = arr
            continue
        if not _is_public_fitted(head):
            _refuse(folder, f"tensor name {key!r} is not a fitted attribute.")
        if rest:
            group, _, sub = rest.partition("/")
            target = history.setdefault(head, {})
            if sub:
                target.setdefault(group, {})[sub] = arr
            else:
                target[group] = arr
        else:
            fitted[key] = arr
    fitted.update(history)
    for key in fitted:
        if "/" not in key and hasattr(cls, key):
            _refuse(folder, f"attribute {key!r} would shadow a class attribute.")
    _check_fitted_arrays(folder, model, fitted)

    for key, value in fitted.items():
        if key.startswith("state/"):
            setattr(model, key[len("state/"):], value)
        else:
            setattr(model, key, value)
    rs_attr = _RANDOM_STATE_ATTRS.get(cls.__name__)
    rs_state = config.get("random_state")
    if rs_attr and rs_state is not None:
        keys = getattr(model, rs_attr, None)
        try:
            rs = np.random.RandomState()
            rs.set_state((str(rs_state["kind"]), keys, int(rs_state["pos"]),
                          int(rs_state["has_gauss"]), float(rs_state["cached_gaussian"])))
        except (TypeError, ValueError, KeyError) as exc:
            _refuse(folder, f"the saved random state is malformed ({exc}).")
        setattr(model, rs_attr, rs)
    return model
