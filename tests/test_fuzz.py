"""Fuzzing with hypothesis: only documented exceptions, never a model with non-finite arrays.

Four surfaces are fuzzed:

- saved folders of both estimators, mutated (JSON values, the manifest, tensor
  names, shapes, dtypes and values, bytes of the weights file) and then signed
  again with the loader's own digests, so that the mutations reach the checks
  behind the digests (anyone who can write a folder can recompute them);
- SAELens and sparsify folders given to the importers, mutated the same way;
- random hyperparameters and inputs for ``fit`` and ``transform``;
- random argument lists for the command line.

The property: ``load`` and the importers raise ``ValueError`` (or
``FileNotFoundError``) or return a model whose arrays are finite and whose
``transform`` is finite; ``fit`` raises ``ValueError``, ``TypeError`` or
``FloatingPointError`` (a diverging fit) or gives such a model; the CLI exits
with 0 or 2 (a user error), never with a traceback.

CI runs the "ci" profile (a fixed budget of a few minutes); a longer run is
``python -m pytest tests/test_fuzz.py --hypothesis-profile=long``.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from _folders import forge
from sksae import DictionaryLearnerGPU, SparseAutoencoder, load, save
from sksae import _io
from sksae.architectures import available
from sksae.interop import from_saelens, from_sparsify, to_saelens

# the profiles ("ci", the default, and "long") are registered in conftest.py

X = np.random.RandomState(0).randn(120, 6).astype(np.float32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Saved folders of a fitted SAE (each architecture family) and DictionaryLearnerGPU."""
    root = tmp_path_factory.mktemp("saved")
    models = {
        "topk": SparseAutoencoder(n_components=12, k=3, max_iter=2, batch_size=32,
                                  random_state=0, device="cpu").fit(X),
        "jumprelu": SparseAutoencoder(n_components=12, architecture="jumprelu", max_iter=2,
                                      batch_size=32, random_state=0, device="cpu").fit(X),
        "matryoshka": SparseAutoencoder(n_components=16, architecture="matryoshka", k=3,
                                        architecture_params={"prefix_sizes": [4, 8]},
                                        max_iter=2, batch_size=32, random_state=0,
                                        device="cpu").fit(X),
        "dl": DictionaryLearnerGPU(n_components=5, alpha=0.2, max_iter=2, batch_size=32,
                                   random_state=0, device="cpu").fit(X),
    }
    out = {name: save(model, root / name) for name, model in models.items()}
    out["saelens"] = to_saelens(models["topk"], root / "saelens")
    sparsify = root / "sparsify"
    sparsify.mkdir()
    m = models["topk"]
    save_file({"encoder.weight": m.encoder_weights_, "encoder.bias": m.encoder_bias_,
               "W_dec": m.components_, "b_dec": m.decoder_bias_},
              str(sparsify / "sae.safetensors"))
    (sparsify / "cfg.json").write_text(json.dumps({"k": 3, "d_in": 6, "num_latents": 12,
                                                   "activation": "topk"}))
    out["sparsify"] = sparsify
    return out


# -- mutations ----------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


def _paths(obj, prefix=()):
    """Every path to a value inside nested dicts and lists."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            yield from _paths(v, prefix + (i,))


def _set(obj, path, value):
    if not path:
        return value
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return obj


@st.composite
def tensor_mutation(draw, tensors):
    """A new dict of tensors: one renamed, reshaped, recast, poisoned, dropped or added."""
    tensors = dict(tensors)
    names = sorted(tensors)
    kind = draw(st.sampled_from(["rename", "reshape", "dtype", "poison", "drop", "add"]))
    name = draw(st.sampled_from(names))
    arr = tensors[name]
    if kind == "rename":
        new = draw(st.sampled_from(["state/transform", "state/components_", "fit",
                                    "components_/x", "state/_A", "history_/step/loss",
                                    "params/init", name + "_", "__class__"]))
        tensors[new] = tensors.pop(name)
    elif kind == "reshape":
        flat = arr.reshape(-1)
        n = draw(st.integers(0, max(flat.size, 1)))
        shape = draw(st.sampled_from([(n,), (1, n), (n, 1), ()])) if n == 1 or n == 0 else (n,)
        tensors[name] = np.resize(flat, shape) if flat.size else np.zeros(shape, arr.dtype)
    elif kind == "dtype":
        dtype = draw(st.sampled_from(["float16", "float64", "float32", "int32", "int64",
                                      "uint8", "bool"]))
        tensors[name] = arr.astype(dtype)
    elif kind == "poison":
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e38, 0.0]))
        poisoned = arr.copy()
        if poisoned.size and poisoned.dtype.kind == "f":
            poisoned.reshape(-1)[draw(st.integers(0, poisoned.size - 1))] = value
        tensors[name] = poisoned
    elif kind == "drop":
        tensors.pop(name)
    else:
        tensors[draw(st.sampled_from(["state/_random_state", "state/extra", "extra_",
                                      "threshold_", "mag_scale_"]))] = np.ones(3, np.float32)
    return tensors


def _manifest(tensors):
    return {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in sorted(tensors.items())}


#: training records, not the model: a resumed fit fills a new metric's earlier steps
#: with NaN, and the FVU of a constant batch is infinite
_RECORDS = ("loss_curve_", "history_")


def _check_model(model):
    """Every float array of the model is finite and transform gives finite codes."""
    for key, value in vars(model).items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and key not in _RECORDS:
            assert np.isfinite(value).all(), key
    codes = model.transform(X[:, :model.n_features_in_] if model.n_features_in_ <= 6 else X)
    assert np.isfinite(codes).all()


def _load_or_refuse(loader, folder):
    try:
        model = loader(folder)
    except (ValueError, FileNotFoundError):
        return
    _check_model(model)


@pytest.mark.parametrize("name", ["topk", "jumprelu", "matryoshka", "dl"])
@given(data=st.data())
def test_mutated_config_is_refused_or_loads_finite(folders, tmp_path, name, data):
    folder = tmp_path / "m"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(folders[name], folder)
    config = json.loads((folder / _io.CONFIG_FILE).read_text())
    paths = [p for p in _paths(config) if p and p[0] != "config_sha256"]
    path = data.draw(st.sampled_from(paths))
    config = _set(config, path, data.draw(json_values))
    (folder / _io.CONFIG_FILE).write_text(json.dumps(config))
    forge(folder)
    _load_or_refuse(load, folder)


@pytest.mark.parametrize("name", ["topk", "matryoshka", "dl"])
@given(data=st.data())
def test_mutated_tensors_are_refused_or_load_finite(folders, tmp_path, name, data):
    folder = tmp_path / "m"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(folders[name], folder)
    tensors = data.draw(tensor_mutation(load_file(str(folder / _io.WEIGHTS_FILE))))
    save_file(tensors, str(folder / _io.WEIGHTS_FILE), metadata={"format": _io.FORMAT})
    config = json.loads((folder / _io.CONFIG_FILE).read_text())
    if data.draw(st.booleans()):  # a consistent manifest reaches the checks behind it
        config["arrays"] = _manifest(tensors)
    (folder / _io.CONFIG_FILE).write_text(json.dumps(config))
    forge(folder)
    _load_or_refuse(load, folder)


@pytest.mark.parametrize("name", ["topk", "dl"])
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1,
                      max_size=6))
def test_flipped_weight_bytes_are_refused_or_load_finite(folders, tmp_path, name, flips):
    folder = tmp_path / "m"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(folders[name], folder)
    weights = folder / _io.WEIGHTS_FILE
    raw = bytearray(weights.read_bytes())
    for pos, xor in flips:
        raw[pos % len(raw)] ^= xor
    weights.write_bytes(bytes(raw))
    forge(folder)
    _load_or_refuse(load, folder)


@pytest.mark.parametrize("name, loader, cfg_name, weights_name", [
    ("saelens", from_saelens, "cfg.json", "sae_weights.safetensors"),
    ("sparsify", from_sparsify, "cfg.json", "sae.safetensors")])
@given(data=st.data())
def test_mutated_peer_folders_are_refused_or_import_finite(folders, tmp_path, name, loader,
                                                          cfg_name, weights_name, data):
    folder = tmp_path / "p"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(folders[name], folder)
    if data.draw(st.booleans()):
        cfg = json.loads((folder / cfg_name).read_text())
        path = data.draw(st.sampled_from([p for p in _paths(cfg) if p]))
        (folder / cfg_name).write_text(json.dumps(_set(cfg, path, data.draw(json_values))))
    else:
        tensors = data.draw(tensor_mutation(load_file(str(folder / weights_name))))
        save_file(tensors, str(folder / weights_name))
    _load_or_refuse(lambda f: loader(f, device="cpu"), folder)


# -- fit and transform ----------------------------------------------------------------
finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=32)
inputs = st.builds(
    lambda rows, cols, seed, scale, poison, form: _make_input(rows, cols, seed, scale, poison,
                                                              form),
    st.integers(1, 40), st.integers(1, 6), st.integers(0, 10**6),
    st.sampled_from([1.0, 1e-30, 1e6, 1e18, 1e30]),
    st.one_of(st.none(), finite_or_not),
    # what users pass: numpy arrays, and torch tensors (half precision read batch by batch)
    st.sampled_from(["float32", "float16", "tensor", "bfloat16 tensor"]))


def _make_input(rows, cols, seed, scale, poison, form="float32"):
    X = (np.random.RandomState(seed).randn(rows, cols) * scale).astype(np.float32)
    if poison is not None:
        X[0, 0] = poison
    if form == "float16":
        with np.errstate(over="ignore"):  # large values overflow to inf: refused, as NaN is
            return X.astype(np.float16)
    if form == "tensor":
        return torch.from_numpy(X)
    if form == "bfloat16 tensor":
        return torch.from_numpy(X).bfloat16()
    return X


def _all_finite(X):
    return bool(torch.isfinite(torch.as_tensor(X)).all())


@given(X=inputs, arch=st.sampled_from(available()), k=st.integers(-1, 20),
       n_components=st.one_of(st.none(), st.integers(-1, 24)),
       learning_rate=st.one_of(st.just("auto"), st.just(float("nan")), st.floats(-1, 1e30)),
       batch_size=st.integers(0, 64), max_iter=st.integers(0, 2),
       normalize=st.booleans(), init=st.sampled_from(["data", "random", "bogus"]))
def test_sparse_autoencoder_fit_raises_documented_or_gives_finite(
        X, arch, k, n_components, learning_rate, batch_size, max_iter, normalize, init):
    model = SparseAutoencoder(n_components=n_components, architecture=arch, k=k,
                              learning_rate=learning_rate, batch_size=batch_size,
                              max_iter=max_iter, normalize=normalize, init=init,
                              device="cpu", random_state=0)
    try:
        model.fit(X)
    except (ValueError, TypeError, FloatingPointError):
        return
    for key, value in vars(model).items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and key not in _RECORDS:
            assert np.isfinite(value).all(), key
    _transform_finite_or_refused(model, X)


def _transform_finite_or_refused(model, X):
    """``transform`` gives finite codes for finite X, or refuses an overflow with ValueError."""
    try:
        codes = model.transform(X)
    except ValueError as exc:
        assert "overflowed" in str(exc) or not _all_finite(X), exc
        return
    assert np.isfinite(codes).all() or not _all_finite(X)


@given(X=inputs, n_components=st.one_of(st.none(), st.integers(-1, 8)),
       alpha=st.one_of(st.just(float("nan")), st.floats(-1, 1e6)), max_iter=st.integers(0, 2),
       fit_algorithm=st.sampled_from(["lars", "cd", "bogus"]),
       transform_algorithm=st.sampled_from(["omp", "lasso_lars", "lasso_cd", "lars",
                                            "threshold"]))
def test_dictionary_learner_fit_raises_documented_or_gives_finite(
        X, n_components, alpha, max_iter, fit_algorithm, transform_algorithm):
    model = DictionaryLearnerGPU(n_components=n_components, alpha=alpha, max_iter=max_iter,
                                 batch_size=16, fit_algorithm=fit_algorithm,
                                 transform_algorithm=transform_algorithm, device="cpu",
                                 random_state=0)
    try:
        model.fit(X)
    except (ValueError, TypeError, FloatingPointError):
        return
    assert np.isfinite(model.components_).all()
    _transform_finite_or_refused(model, X)


# -- the command line -------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, folders):
    root = tmp_path_factory.mktemp("cli")
    np.save(root / "acts.npy", X)
    (root / "not_npy.txt").write_text("hello")
    return {"acts": str(root / "acts.npy"), "text": str(root / "not_npy.txt"),
            "missing": str(root / "missing.npy"), "model": str(folders["topk"]),
            "saelens": str(folders["saelens"]), "out": str(root / "out"),
            "dir": str(root)}


_VALUES = ["-5", "0", "1", "3", "1e30", "nan", "auto", "topk", "matryoshka", "bogus",
           "float64", "{}", '{"prefix_sizes": [2, 4]}', "[1", ""]


@given(data=st.data())
def test_cli_exits_with_a_status_not_a_traceback(cli_files, data, capsys):
    from sksae.__main__ import main

    command = data.draw(st.sampled_from(["fit", "transform", "bench", "demo", "nope"]))
    files = st.sampled_from([cli_files[k] for k in ("acts", "text", "missing", "model",
                                                    "saelens", "dir")])
    argv = [command]
    if command == "fit":
        argv += [data.draw(files), "-o", cli_files["out"] + str(data.draw(st.integers(0, 3))),
                 "--max-iter", data.draw(st.sampled_from(["0", "1", "-1", "x"])),
                 "--n-components", data.draw(st.sampled_from(["4", "0", "-2", "12"])),
                 "--device", "cpu", "-q"]
    elif command == "transform":
        argv += [data.draw(files), data.draw(files), "-o",
                 data.draw(st.sampled_from([cli_files["out"] + ".npy", cli_files["acts"]])),
                 "--chunk-rows", data.draw(st.sampled_from(["-5", "0", "7", "x"]))]
    elif command in ("bench", "demo"):
        argv += ["--n-samples", data.draw(st.sampled_from(["-3", "0", "x"])), "--device", "cpu"]
    options = ["--k", "--alpha", "--learning-rate", "--architecture", "--batch-size",
               "--architecture-params", "--dtype", "--precision"]
    for _ in range(data.draw(st.integers(0, 3))):
        argv += [data.draw(st.sampled_from(options)), data.draw(st.sampled_from(_VALUES))]
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    assert status in (0, 2, None), (argv, status)
    if status == 2:
        err = capsys.readouterr().err
        assert "Traceback" not in err, (argv, err)


def test_out_of_range_random_state_cannot_crash_a_process(folders, tmp_path):
    """The crash this suite first found: a saved RNG position out of range made numpy
    segfault in partial_fit. In a subprocess, so that a crash fails the test."""
    folder = tmp_path / "dl"
    shutil.copytree(folders["dl"], folder)
    config = json.loads((folder / _io.CONFIG_FILE).read_text())
    config["random_state"]["pos"] = 10**6
    (folder / _io.CONFIG_FILE).write_text(json.dumps(config))
    forge(folder)
    code = ("import sys, numpy as np, sksae\n"
            "try:\n"
            "    m = sksae.load(sys.argv[1])\n"
            "except ValueError as e:\n"
            "    print('refused', e); sys.exit(0)\n"
            "m.partial_fit(np.random.randn(40, 6).astype('float32'))\n"
            "print('loaded')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("refused") and "random" in proc.stdout


# -- what the long runs found (each fixed; kept as plain regression tests) -------------------
def test_weights_that_overflow_a_forward_pass_are_a_divergence():
    X = np.random.RandomState(0).randn(2, 1).astype(np.float32)
    model = SparseAutoencoder(architecture="batchtopk", k=2, learning_rate=1.8446744953318855e19,
                              batch_size=2, max_iter=1, normalize=False, device="cpu",
                              random_state=0)
    with pytest.raises(FloatingPointError, match="diverged"):
        model.fit(X)
    assert not hasattr(model, "components_")


def test_untrained_dictionary_that_overflows_transform_is_refused():
    X = (np.random.RandomState(0).randn(1, 2) * 1e30).astype(np.float32)
    model = DictionaryLearnerGPU(alpha=0.0, batch_size=16, max_iter=0, device="cpu",
                                 random_state=0).fit(X)
    assert np.isfinite(model.components_).all()
    with pytest.raises(ValueError, match="transform overflowed.*Scale X down"):
        model.transform(X)


def test_sparsify_folder_without_an_activation_name_is_refused(folders, tmp_path):
    folder = tmp_path / "s"
    shutil.copytree(folders["sparsify"], folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "activation": None}))
    with pytest.raises(ValueError, match="activation=None"):
        from_sparsify(folder)
