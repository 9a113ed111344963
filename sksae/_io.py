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
import re
import secrets
import warnings
from pathlib import Path

import numpy as np

__all__ = ["save", "load"]

FORMAT = "sksae"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_MAX_CONFIG_BYTES = 16 * 2**20
_MAX_JSON_DEPTH = 32  # sksae writes depth 4; SAELens and sparsify configs stay under 10
_FLOAT_DTYPES = ("float32", "float64")
# dtypes a saved tensor may have: weights, history records (int64 epochs), the RNG key
_TENSOR_DTYPES = ("float32", "float64", "int64", "uint32")
_MT19937_KEY = 624

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


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _json_depth(text):
    """Deepest nesting of arrays and objects in the JSON ``text`` (brackets in strings skipped)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    return int(np.cumsum(np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)).max())


def _loads_bounded(text, max_depth=_MAX_JSON_DEPTH):
    """``json.loads(text)``, refusing (ValueError) nesting deeper than ``max_depth``.

    The depth is measured before parsing, so a deeply nested document is
    refused without recursing; a RecursionError that escapes anyway (a
    smaller interpreter limit) is refused as well.
    """
    depth = _json_depth(text)
    if depth > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep (at most {max_depth} allowed)")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to parse") from None


def read_json_bounded(path, max_bytes, max_depth=_MAX_JSON_DEPTH):
    """The JSON document in ``path``, read with a size and a nesting bound.

    Raises
    ------
    ValueError
        When the file cannot be read, is larger than ``max_bytes``, or is not
        valid JSON nested at most ``max_depth`` levels; the message names the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # read(n) sets aside n bytes first: ask for the file's size (a file that
            # grows meanwhile is still cut at max_bytes + 1)
            size = os.fstat(f.fileno()).st_size
            raw = f.read(min(size, max_bytes) + 1)
    except OSError as exc:
        raise ValueError(f"{path.name} cannot be read ({exc}).") from None
    if len(raw) > max_bytes:
        raise ValueError(f"{path.name} is larger than {max_bytes} bytes.")
    try:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return _loads_bounded(raw.decode("utf-8"), max_depth)
    except ValueError as exc:
        raise ValueError(f"{path.name} is not valid JSON ({exc}).") from None


#: exceptions of a malformed value that no explicit check anticipated: load and the
#: importers refuse them as ValueError
MALFORMED = (TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError)


def _write_exclusive(folder, name, data, temps):
    """Write ``data`` to a new temporary file in ``folder``, recorded as ``temps[name]``.

    The file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` under a random
    name: a file or symbolic link planted in the folder is never opened or
    followed. Its path is in ``temps`` before it exists, so that a caller's
    clean-up finds it whenever an interrupt lands. The data is flushed to disk
    before returning.
    """
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_BINARY", 0))
    for _ in range(64):
        tmp = temps[name] = Path(folder) / f".{name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            del temps[name]  # not ours
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp
    raise FileExistsError(f"could not create a temporary file for {name} in {folder}.")


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms where a folder cannot be opened (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_files(folder, files):
    """Write ``{name: bytes}`` into ``folder``, each file replaced atomically.

    Every temporary file is written (and flushed) first, then each is renamed
    over its target in order; the renames never follow a link planted under a
    target's name (the link itself is replaced). A failure before the renames
    leaves the folder as it was; a Ctrl-C during the renames is held until
    they are done.
    """
    from ._base import deferred_interrupts

    folder = Path(folder)
    temps = {}
    try:
        for name, data in files.items():
            _write_exclusive(folder, name, data, temps)
        with deferred_interrupts():  # a Ctrl-C lands before the renames or after them
            for name, tmp in temps.items():
                os.replace(tmp, folder / name)
        _fsync_dir(folder)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)  # no-op for the temporaries already renamed


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
        ``model.safetensors`` in it are replaced: each file is first written
        in full to a new temporary file in the folder (created exclusively,
        never through a link planted there), then renamed over the old one,
        so a failure while writing leaves the old folder intact, and a link
        named ``config.json`` or ``model.safetensors`` is replaced, not
        followed.

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

    from safetensors.numpy import save as to_bytes

    weights = to_bytes(arrays, metadata={"format": FORMAT})
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
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    config = {**body, "config_sha256": hashlib.sha256(_canonical(body)).hexdigest()}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    # The weights are renamed into place before the config that names their digest:
    # an interruption in between leaves a folder that load refuses (digest mismatch).
    _write_files(folder, {WEIGHTS_FILE: weights,
                          CONFIG_FILE: json.dumps(config, indent=1, sort_keys=True).encode()})
    return folder


# ------------------------------------------------------------------------- load
def _refuse(path, problem):
    raise ValueError(f"Refusing to load {str(path)!r}: {problem}")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _read_config(folder):
    cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        _refuse(folder, "not a folder (sksae.save writes a folder).")
    for f in (cfg_path, weights):
        if not f.is_file():
            _refuse(folder, f"{f.name} is missing.")
    try:
        config = read_json_bounded(cfg_path, _MAX_CONFIG_BYTES)
    except ValueError as exc:
        _refuse(folder, str(exc))
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        _refuse(folder, f"{CONFIG_FILE} is not an sksae model config (no "
                        f"'format': {FORMAT!r}); for SAELens or sparsify folders use "
                        "sksae.interop.")
    if config.get("format_version") != FORMAT_VERSION \
            or type(config.get("format_version")) is not int:
        _refuse(folder, f"format_version {config.get('format_version')!r} is not "
                        f"supported (this sksae reads version {FORMAT_VERSION}).")
    body = {k: v for k, v in config.items() if k != "config_sha256"}
    if hashlib.sha256(_canonical(body)).hexdigest() != config.get("config_sha256"):
        _refuse(folder, f"{CONFIG_FILE} was modified after saving (its SHA-256 does "
                        "not match config_sha256).")
    try:
        digest = _sha256_file(weights)
    except OSError as exc:
        _refuse(folder, f"{WEIGHTS_FILE} cannot be read ({exc}).")
    if digest != config.get("weights_sha256"):
        _refuse(folder, f"{WEIGHTS_FILE} is corrupted or was modified after saving "
                        "(its SHA-256 does not match weights_sha256).")
    for key, kind in (("params", dict), ("attributes", dict), ("string_attributes", dict),
                      ("arrays", dict), ("estimator", str), ("random_state", (dict, type(None)))):
        if not isinstance(config.get(key), kind):
            _refuse(folder, f"{CONFIG_FILE} field {key!r} is missing or malformed.")
    return config


def _read_arrays(folder, manifest):
    from safetensors.numpy import load_file

    for key, spec in manifest.items():
        if not (isinstance(spec, dict) and spec.get("dtype") in _TENSOR_DTYPES
                and isinstance(spec.get("shape"), list)
                and all(_is_int(n) and n >= 0 for n in spec["shape"])):
            _refuse(folder, f"the manifest entry of tensor {key!r} is malformed ({spec!r}; "
                            f"dtypes allowed: {', '.join(_TENSOR_DTYPES)}).")
    try:
        arrays = load_file(str(folder / WEIGHTS_FILE))
    except MemoryError:
        raise
    except Exception as exc:  # the parser's own errors: the file is not safetensors
        _refuse(folder, f"{WEIGHTS_FILE} is not a readable safetensors file "
                        f"({type(exc).__name__}: {exc}).")
    if set(arrays) != set(manifest):
        _refuse(folder, f"the tensors in {WEIGHTS_FILE} {sorted(arrays)} do not match "
                        f"the manifest {sorted(manifest)}.")
    for key, arr in arrays.items():
        spec = manifest[key]
        if str(arr.dtype) != spec["dtype"] or list(arr.shape) != spec["shape"]:
            _refuse(folder, f"tensor {key!r} has dtype {arr.dtype} and shape "
                            f"{list(arr.shape)}, the manifest says {spec}.")
    return arrays


def _check_array(folder, name, arr, shapes, dtype):
    """``arr`` is an ndarray of one of ``shapes``, of ``dtype``, all finite."""
    if not isinstance(arr, np.ndarray):
        _refuse(folder, f"fitted attribute {name} is missing.")
    if arr.shape not in shapes:
        _refuse(folder, f"{name} has shape {arr.shape}; expected "
                        f"{' or '.join(map(str, shapes))}.")
    if arr.dtype != dtype:
        _refuse(folder, f"{name} has dtype {arr.dtype}, components_ {dtype}.")
    if not np.isfinite(arr).all():
        _refuse(folder, f"{name} contains NaN or infinite values.")


def _check_scalars(folder, model, fitted):
    """Types and ranges of the scalar fitted attributes."""
    sae = type(model).__name__ == "SparseAutoencoder"
    counts = {"n_features_in_": 1, "n_iter_": 0, "n_steps_": 0}
    if sae:
        counts["n_components_"] = 1
    for name, low in counts.items():
        value = fitted.get(name)
        if not _is_int(value) or value < low:
            _refuse(folder, f"{name}={value!r} is not an integer >= {low}.")
    for name, value in fitted.items():
        if "/" in name or name in counts or isinstance(value, (np.ndarray, dict)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            _refuse(folder, f"attribute {name}={value!r} is not finite.")
    if sae:
        scale = fitted.get("input_scale_")
        if not (isinstance(scale, float) and math.isfinite(scale) and scale > 0):
            _refuse(folder, "input_scale_ is missing or not a positive number.")


def _check_history(folder, fitted):
    """``history_`` and ``loss_curve_``: records of the training run.

    They are 1-D numeric arrays (one length per group); their values are what
    training recorded and may hold NaN (a metric not recorded at a step) or
    infinities (e.g. the FVU of a constant batch), so finiteness is not
    required of them.
    """
    history = fitted.setdefault("history_", {"step": {}, "epoch": {}})
    if not isinstance(history, dict) or not set(history) <= {"step", "epoch"}:
        _refuse(folder, f"history_ has groups {sorted(history)}; expected 'step' and "
                        "'epoch'.")
    for group in ("step", "epoch"):
        records = history.setdefault(group, {})
        if not isinstance(records, dict):
            _refuse(folder, f"history_[{group!r}] is an array, not a dict of records.")
        lengths = set()
        for key, arr in records.items():
            if arr.ndim != 1 or arr.dtype.kind not in "fi":
                _refuse(folder, f"history_[{group!r}][{key!r}] is not a 1-D numeric array.")
            lengths.add(arr.shape[0])
        if len(lengths) > 1:
            _refuse(folder, f"the records of history_[{group!r}] have different lengths "
                            f"{sorted(lengths)}.")
    curve = fitted.get("loss_curve_")
    if curve is not None and (curve.ndim != 1 or curve.dtype.kind != "f"):
        _refuse(folder, "loss_curve_ is not a 1-D float array.")


def _check_random_state(folder, keys, state):
    """The MT19937 state in full: numpy accepts some invalid ones and crashes later."""
    if not isinstance(keys, np.ndarray) or keys.dtype != np.uint32 \
            or keys.shape != (_MT19937_KEY,):
        _refuse(folder, f"the random state's key must be {_MT19937_KEY} uint32 values.")
    if not isinstance(state, dict) or set(state) != {"kind", "pos", "has_gauss",
                                                     "cached_gaussian"}:
        _refuse(folder, "the saved random state is malformed (expected the fields kind, "
                        "pos, has_gauss, cached_gaussian).")
    if state["kind"] != "MT19937":
        _refuse(folder, f"random state kind {state['kind']!r} is not 'MT19937'.")
    pos, has_gauss, gauss = state["pos"], state["has_gauss"], state["cached_gaussian"]
    if not _is_int(pos) or not 0 <= pos <= _MT19937_KEY:
        _refuse(folder, f"random state pos={pos!r} is not an integer in [0, {_MT19937_KEY}].")
    if not _is_int(has_gauss) or has_gauss not in (0, 1):
        _refuse(folder, f"random state has_gauss={has_gauss!r} is not 0 or 1.")
    if isinstance(gauss, bool) or not isinstance(gauss, (int, float)) \
            or not math.isfinite(gauss):
        _refuse(folder, f"random state cached_gaussian={gauss!r} is not a finite number.")
    rs = np.random.RandomState()
    rs.set_state(("MT19937", keys, int(pos), int(has_gauss), float(gauss)))
    return rs


def _check_sae(folder, model, fitted, comps):
    """Fit's constraints of a SparseAutoencoder, and the shapes of its arrays."""
    n_atoms, n_features = comps.shape
    if fitted["n_components_"] != n_atoms:
        _refuse(folder, f"n_components_={fitted['n_components_']!r} does not "
                        f"match components_ of shape {comps.shape}.")
    try:  # the checks fit runs before training: architecture hyperparameters, init
        arch, n_components, _ = model._resolve(n_features)
    except (ValueError, TypeError) as exc:
        _refuse(folder, f"invalid architecture hyperparameters ({exc}).")
    if n_components != n_atoms:
        _refuse(folder, f"n_components={model.n_components} does not match "
                        f"components_ of shape {comps.shape}.")
    expected = {"components_": [(n_atoms, n_features)],
                "encoder_weights_": [(n_atoms, n_features)],
                "encoder_bias_": [(n_atoms,)], "decoder_bias_": [(n_features,)]}
    expected.update(arch.fitted_shapes(n_atoms))
    _check_history(folder, fitted)
    return expected, {}


def _check_dictionary_learner(folder, model, fitted, comps, rs_state):
    """Fit's constraints of a DictionaryLearnerGPU, its arrays and its private state."""
    from .coders import check_positive_coding

    n_atoms, n_features = comps.shape
    n_components = model.n_components if model.n_components is not None else n_features
    if n_components != n_atoms:
        _refuse(folder, f"n_components={model.n_components} does not match "
                        f"components_ of shape {comps.shape}.")
    try:
        check_positive_coding(model.fit_algorithm, model.positive_code)
    except ValueError as exc:
        _refuse(folder, f"invalid parameters ({exc}).")
    if model.dict_init is not None:
        init = model.dict_init
        if not (isinstance(init, np.ndarray) and init.ndim == 2
                and init.dtype.kind in "fiu" and init.shape[1] == n_features
                and np.isfinite(init).all()):  # fit casts it with check_array
            _refuse(folder, f"dict_init must be a finite numeric 2-D array with "
                            f"{n_features} columns.")
    expected = {"components_": [(n_atoms, n_features)]}
    state = {"state/_A": [(n_atoms, n_atoms)], "state/_B": [(n_features, n_atoms)]}
    keys = fitted.get("state/_random_state")
    if rs_state is None or keys is None:
        _refuse(folder, "the random state of partial_fit is missing.")
    rs = _check_random_state(folder, keys, rs_state)
    return expected, {**state, "state/_random_state": rs}


def _check_fitted_arrays(folder, model, fitted, rs_state=None):
    """Every fitted value against the parameters and each other: names, shapes, dtypes,
    finiteness, and the constraints fit checks. Returns the private state to set."""
    comps = fitted.get("components_")
    if not isinstance(comps, np.ndarray) or comps.ndim != 2:
        _refuse(folder, "components_ is missing or not a 2-D array.")
    if str(comps.dtype) not in _FLOAT_DTYPES:
        _refuse(folder, f"components_ has dtype {comps.dtype}; expected float32 or float64.")
    _check_scalars(folder, model, fitted)
    n_atoms, n_features = comps.shape
    if fitted["n_features_in_"] != n_features:
        _refuse(folder, f"n_features_in_={fitted.get('n_features_in_')!r} does not match "
                        f"components_ of shape {comps.shape}.")
    names = fitted.get("feature_names_in_")
    if names is not None and len(names) != n_features:
        _refuse(folder, "feature_names_in_ does not have n_features_in_ entries.")
    for key, value in fitted.items():
        if isinstance(value, np.ndarray) and value.dtype == object \
                and key != "feature_names_in_":
            _refuse(folder, f"string attribute {key!r} is not feature_names_in_.")
    if type(model).__name__ == "SparseAutoencoder":
        if rs_state is not None:
            _refuse(folder, "a SparseAutoencoder has no saved random state.")
        expected, state = _check_sae(folder, model, fitted, comps)
    else:
        expected, state = _check_dictionary_learner(folder, model, fitted, comps, rs_state)
    records = ("history_", "loss_curve_")
    for key, value in fitted.items():
        if isinstance(value, np.ndarray) and value.dtype != object and key not in expected \
                and key not in state and key not in records:
            where = "private state" if key.startswith("state/") else "fitted array"
            _refuse(folder, f"{where} {key!r} is not one of {type(model).__name__}'s "
                            f"({sorted(set(expected) | set(state))}).")
    for attr, shapes in {**expected, **{k: v for k, v in state.items()
                                        if isinstance(v, list)}}.items():
        _check_array(folder, attr, fitted.get(attr), shapes, comps.dtype)
    return {key[len("state/"):]: fitted[key] if isinstance(value, list) else value
            for key, value in state.items()}


def load(path, *, device=None):
    """Load an estimator saved by :func:`save`.

    Nothing is unpickled and no code named by the folder is imported or run.
    Every value read is validated: the class comes from a whitelist, each
    parameter is checked against the estimator's constraints and the
    cross-parameter constraints that ``fit`` checks, every array against the
    manifest, the parameters and the other arrays (name, shape, dtype,
    finiteness), and the private state a :class:`~sksae.DictionaryLearnerGPU`
    keeps for ``partial_fit`` against its own whitelist.

    The loaded estimator is fitted: ``transform``, ``inverse_transform`` and
    ``score`` give the results of the saved one. A
    :class:`~sksae.SparseAutoencoder` is loaded without its optimizer state,
    so ``fit`` and ``partial_fit`` on it start a new training run (to
    fine-tune from the saved atoms, pass ``init=loaded.components_`` to a new
    estimator). A :class:`~sksae.DictionaryLearnerGPU` keeps its sufficient
    statistics and random state, so its ``partial_fit`` continues.

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
        The fitted estimator. Its weights and state are finite; the training
        records ``history_`` and ``loss_curve_`` are returned as saved (they
        may hold NaN for a metric that was not recorded at a step).

    Raises
    ------
    ValueError
        The folder is refused, with a message naming the problem, when:

        - it is not a folder, or ``config.json`` or ``model.safetensors`` is
          missing or unreadable;
        - ``config.json`` is not JSON, is larger than 16 MiB or nests arrays
          and objects more than 32 levels deep, is not an sksae config, or
          has a ``format_version`` this sksae does not read;
        - a SHA-256 digest does not match (a corrupted or edited file; an
          interrupted :func:`save` is refused the same way);
        - the class is not an sksae estimator;
        - a parameter is unknown, not a JSON scalar, or invalid, or the
          parameters break a constraint that ``fit`` checks (``k`` larger
          than the number of components, ``n_components`` other than the
          number of atoms, an ``init``/``dict_init`` of the wrong shape,
          ``positive_code`` with a greedy ``fit_algorithm``...);
        - a tensor is not in the manifest or has another dtype or shape, is
          not a fitted attribute of the estimator, disagrees with the other
          arrays in shape or dtype, or holds NaN or infinite values;
        - a scalar fitted attribute has the wrong type or range, or would
          shadow a method;
        - a tensor under ``state/`` is not in the estimator's whitelist
          (:class:`~sksae.DictionaryLearnerGPU`: ``_A`` of shape
          ``(n_components, n_components)``, ``_B`` of shape
          ``(n_features, n_components)`` in the dtype of ``components_``,
          and the ``_random_state`` key), or the saved random state is not a
          valid MT19937 state (624 uint32 key values, ``0 <= pos <= 624``,
          ``has_gauss`` 0 or 1, a finite ``cached_gaussian``).

        No other exception type escapes for a malformed folder.

    See Also
    --------
    save : Write the folder.
    sksae.interop.from_saelens : Import an SAE saved by SAELens.
    """
    folder = Path(path)
    try:
        return _load(folder, device)
    except MALFORMED as exc:
        _refuse(folder, f"malformed contents ({type(exc).__name__}: {exc}).")


def _load(folder, device):
    from ._accel.device import device_available

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
        if isinstance(value, float) and not math.isfinite(value):
            _refuse(folder, f"parameter {key}={value!r} is not finite.")
    for key in params:
        if key.startswith("params/") or (f"params/{key}" in arrays
                                          and key not in ("init", "dict_init")):
            _refuse(folder, f"parameter {key} cannot be an array.")
    if device is not None:
        params["device"] = device
    elif isinstance(params.get("device"), str) and params["device"].startswith("cuda") \
            and not device_available(params["device"]):
        warnings.warn(f"The model was saved with device={params['device']!r}, but CUDA is "
                      "not available here: using device='auto'.", UserWarning, stacklevel=3)
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
        if head == "params":
            continue
        if head == "state":
            fitted[key] = arr
            continue
        if not _is_public_fitted(head):
            _refuse(folder, f"tensor name {key!r} is not a fitted attribute.")
        if rest:
            if head != "history_":
                _refuse(folder, f"tensor name {key!r}: only history_ holds nested records.")
            group, _, sub = rest.partition("/")
            target = history.setdefault(head, {})
            if sub:
                if not isinstance(target.setdefault(group, {}), dict) or "/" in sub:
                    _refuse(folder, f"tensor name {key!r} is not a history record.")
                target[group][sub] = arr
            else:
                if group in target:
                    _refuse(folder, f"tensor name {key!r} is not a history record.")
                target[group] = arr
        else:
            fitted[key] = arr
    for key in history:
        if key in fitted:
            _refuse(folder, f"{key} is saved both as an attribute and as records.")
    fitted.update(history)
    for key in fitted:
        if "/" not in key and hasattr(cls, key):
            _refuse(folder, f"attribute {key!r} would shadow a class attribute.")
    state = _check_fitted_arrays(folder, model, fitted, config.get("random_state"))

    for key, value in fitted.items():
        if not key.startswith("state/"):
            setattr(model, key, value)
    for key, value in state.items():
        setattr(model, key, value)
    return model
