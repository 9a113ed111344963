"""Faults and forgeries: sksae.load and the importers validate everything they read.

Each test forges a folder as a deliberate forger would (recomputing every
digest), so that the checks behind the digests are the ones exercised.
"""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from numpy.testing import assert_array_equal
from safetensors.torch import save_file as save_torch

import sksae
from _folders import copy_folder, forge
from sksae import DictionaryLearnerGPU, SparseAutoencoder
from sksae import _io
from sksae._io import _canonical
from sksae.interop import from_saelens, from_sparsify, to_saelens


@pytest.fixture(scope="module")
def X():
    return np.random.RandomState(0).randn(240, 8).astype(np.float32)


@pytest.fixture(scope="module")
def saved_sae(X, tmp_path_factory):
    model = SparseAutoencoder(n_components=16, architecture="topk", k=2, max_iter=2,
                              batch_size=64, random_state=0, device="cpu",
                              precision="float32").fit(X)
    return sksae.save(model, tmp_path_factory.mktemp("sae"))


@pytest.fixture(scope="module")
def saved_dl(X, tmp_path_factory):
    model = DictionaryLearnerGPU(n_components=6, alpha=0.2, max_iter=1, batch_size=64,
                                 random_state=0, device="cpu").fit(X)
    return sksae.save(model, tmp_path_factory.mktemp("dl"))


def _forged(src, tmp_path, edit_config=None, edit_arrays=None):
    folder = copy_folder(src, tmp_path / "forged")
    forge(folder, edit_config, edit_arrays)
    return folder


def test_forging_helper_keeps_a_loadable_folder(saved_sae, saved_dl, tmp_path):
    """The forger's rewrite alone changes nothing that load refuses."""
    sksae.load(_forged(saved_sae, tmp_path / "a", edit_arrays=lambda a: None))
    sksae.load(_forged(saved_dl, tmp_path / "b", edit_arrays=lambda a: None))


# ---------------------------------------------------------------- state/ whitelist
def _set(name, value):
    return lambda a: a.__setitem__(name, value)


@pytest.mark.parametrize("edit, message", [
    (lambda a: a["state/_A"].__setitem__((0, 0), np.nan), r"state/_A contains NaN"),
    (lambda a: a["state/_B"].__setitem__((1, 2), np.inf), r"state/_B contains NaN or inf"),
    (lambda a: a.update({"state/transform": np.zeros(3, np.float32)}),
     r"private state 'state/transform' is not one of DictionaryLearnerGPU's"),
    (lambda a: a.update({"state/_C": np.zeros((6, 6), np.float32)}), r"'state/_C'"),
    (lambda a: a.update({"state/_A": np.zeros((6, 5), np.float32)}),
     r"state/_A has shape \(6, 5\); expected \(6, 6\)"),
    (lambda a: a.update({"state/_B": np.zeros((6, 8), np.float32)}),
     r"state/_B has shape \(6, 8\); expected \(8, 6\)"),
    (lambda a: a.update({"state/_A": a["state/_A"].astype(np.float64)}), r"state/_A has dtype"),
    (lambda a: a.pop("state/_B"), r"state/_B is missing"),
    (lambda a: a.pop("state/_random_state"), r"random state of partial_fit is missing"),
    (lambda a: a.update({"state/_random_state": a["state/_random_state"][:623]}),
     r"624 uint32"),
    (lambda a: a.update({"state/_random_state":
                         a["state/_random_state"].astype(np.int64)}), r"624 uint32"),
    (lambda a: a.update({"extra_": np.zeros(3, np.float32)}),
     r"fitted array 'extra_' is not one of"),
])
def test_dictionary_learner_state_is_checked(saved_dl, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        sksae.load(_forged(saved_dl, tmp_path, edit_arrays=edit))


def test_a_nan_state_components_is_refused(saved_dl, saved_sae, tmp_path):
    """The reported bypass: components_ smuggled in under state/."""
    def smuggle(a):
        a["state/components_"] = np.full_like(a["components_"], np.nan)

    for src in (saved_dl, saved_sae):
        with pytest.raises(ValueError, match="private state 'state/components_'"):
            sksae.load(_forged(src, tmp_path / src.name, edit_arrays=smuggle))


def test_sparse_autoencoder_has_no_private_state(saved_sae, tmp_path):
    with pytest.raises(ValueError, match="private state 'state/_A'"):
        sksae.load(_forged(saved_sae, tmp_path / "a",
                           edit_arrays=_set("state/_A", np.zeros((16, 16), np.float32))))
    state = {"kind": "MT19937", "pos": 0, "has_gauss": 0, "cached_gaussian": 0.0}
    with pytest.raises(ValueError, match="has no saved random state"):
        sksae.load(_forged(saved_sae, tmp_path / "b",
                           edit_config=lambda c: c.update(random_state=state)))


# ----------------------------------------------------------------------- RNG state
@pytest.mark.parametrize("field, value, message", [
    ("pos", 625, r"pos=625 is not an integer in \[0, 624\]"),
    ("pos", -1, r"pos=-1"),
    ("pos", 10**30, r"pos="),
    ("pos", 3.0, r"pos=3.0"),
    ("pos", True, r"pos=True"),
    ("has_gauss", 2, r"has_gauss=2 is not 0 or 1"),
    ("has_gauss", "1", r"has_gauss='1'"),
    ("cached_gaussian", float("nan"), r"cached_gaussian=nan is not a finite number"),
    ("cached_gaussian", float("inf"), r"cached_gaussian=inf"),
    ("cached_gaussian", "0", r"cached_gaussian='0'"),
    ("kind", "PCG64", r"kind 'PCG64' is not 'MT19937'"),
    ("extra", 1, r"random state is malformed"),
])
def test_random_state_is_checked_in_full(saved_dl, tmp_path, field, value, message):
    def edit(cfg):
        cfg["random_state"][field] = value

    with pytest.raises(ValueError, match=message):
        sksae.load(_forged(saved_dl, tmp_path, edit_config=edit))


@pytest.mark.parametrize("value", [None, [], "MT19937"])
def test_random_state_missing_or_malformed(saved_dl, tmp_path, value):
    with pytest.raises(ValueError, match="random_state|random state"):
        sksae.load(_forged(saved_dl, tmp_path,
                           edit_config=lambda c: c.update(random_state=value)))


def test_random_state_at_the_boundary_continues(saved_dl, tmp_path, X):
    """pos=624 (the key exhausted, regenerated on the next draw) is a valid state."""
    def edit(cfg):
        cfg["random_state"].update(pos=624, has_gauss=1, cached_gaussian=0.5)

    loaded = sksae.load(_forged(saved_dl, tmp_path, edit_config=edit))
    assert loaded._random_state.get_state()[2:] == (624, 1, 0.5)
    loaded.partial_fit(X[:64])
    assert np.isfinite(loaded.components_).all()


# ------------------------------------------------------------------- JSON nesting
def test_deeply_nested_config_is_refused(saved_sae, tmp_path):
    folder = copy_folder(saved_sae, tmp_path / "m")
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested 100000 levels deep"):
        sksae.load(folder)
    # a digest-consistent config with one nested parameter is refused the same way
    deep = 0
    for _ in range(40):
        deep = [deep]
    folder = _forged(saved_sae, tmp_path / "f",
                     edit_config=lambda c: c["params"].update(architecture_params={"x": deep}))
    with pytest.raises(ValueError, match="levels deep"):
        sksae.load(folder)


def test_brackets_inside_strings_do_not_count(saved_sae, tmp_path):
    folder = _forged(saved_sae, tmp_path,
                     edit_config=lambda c: c.update(sksae_version="[" * 100 + '\\"{' * 50))
    assert isinstance(sksae.load(folder), SparseAutoencoder)


def test_json_depth_counter():
    depth = _io._json_depth
    assert depth('{"a": [1, {"b": "[[[[["}], "c": "\\"]]]"}') == 3
    assert depth("1") == 0
    assert depth("[[[]]]") == 3
    with pytest.raises(ValueError, match="levels deep"):
        _io._loads_bounded("[" * 33 + "]" * 33)
    assert _io._loads_bounded("[" * 32 + "]" * 32) is not None


# --------------------------------------------------------- cross-parameter constraints
@pytest.mark.parametrize("params, message", [
    ({"k": 17}, r"k=17 must be at most n_components=16"),
    ({"n_components": 8}, r"n_components=8 does not match components_"),
    ({"n_components": None}, r"n_components=None does not match"),  # 8 * n_features = 64
])
def test_sae_constraints_checked_as_at_fit(saved_sae, tmp_path, params, message):
    with pytest.raises(ValueError, match=message):
        sksae.load(_forged(saved_sae, tmp_path,
                           edit_config=lambda c: c["params"].update(params)))


def test_sae_init_array_checked_as_at_fit(saved_sae, tmp_path):
    def bad_init(shape, fill=0.0):
        def edit(a):
            a["params/init"] = np.full(shape, fill)
        return edit

    def drop_init(c):
        c["params"].pop("init")

    with pytest.raises(ValueError, match=r"init has shape \(3, 8\)"):
        sksae.load(_forged(saved_sae, tmp_path / "a", edit_config=drop_init,
                           edit_arrays=bad_init((3, 8))))
    with pytest.raises(ValueError, match="NaN|infinity"):
        sksae.load(_forged(saved_sae, tmp_path / "b", edit_config=drop_init,
                           edit_arrays=bad_init((16, 8), np.nan)))
    loaded = sksae.load(_forged(saved_sae, tmp_path / "c", edit_config=drop_init,
                                edit_arrays=bad_init((16, 8), 1.0)))
    assert loaded.init.shape == (16, 8)


def test_matryoshka_prefix_sizes_checked(X, tmp_path):
    model = SparseAutoencoder(n_components=16, architecture="matryoshka", k=2, max_iter=1,
                              batch_size=64, random_state=0, device="cpu",
                              precision="float32",
                              architecture_params={"prefix_sizes": [4, 8]}).fit(X)
    folder = copy_folder(sksae.save(model, tmp_path / "m"), tmp_path / "f")
    forge(folder, edit_config=lambda c: c["params"].update(
        architecture_params={"prefix_sizes": [4, 16]}))
    with pytest.raises(ValueError, match="prefix_sizes"):
        sksae.load(folder)


@pytest.mark.parametrize("params, message", [
    ({"n_components": 5}, r"n_components=5 does not match"),
    ({"n_components": None}, r"n_components=None does not match"),  # n_features = 8
    ({"fit_algorithm": "lars", "positive_code": True}, r"Positive constraint"),
])
def test_dictionary_learner_constraints_checked_as_at_fit(saved_dl, tmp_path, params,
                                                          message):
    with pytest.raises(ValueError, match=message):
        sksae.load(_forged(saved_dl, tmp_path,
                           edit_config=lambda c: c["params"].update(params)))


def test_dictionary_learner_dict_init_checked(saved_dl, tmp_path):
    def drop(c):
        c["params"].pop("dict_init")

    for name, init in (("cols", np.zeros((6, 5))), ("nan", np.full((6, 8), np.nan)),
                       ("1d", np.zeros(8))):
        with pytest.raises(ValueError, match="dict_init"):
            sksae.load(_forged(saved_dl, tmp_path / name, edit_config=drop,
                               edit_arrays=_set("params/dict_init", init)))
    # integers are what fit accepts (it casts them): a DL fitted so saves and loads
    loaded = sksae.load(_forged(saved_dl, tmp_path / "int", edit_config=drop,
                                edit_arrays=_set("params/dict_init",
                                                 np.ones((6, 8), np.int64))))
    assert loaded.dict_init.dtype == np.int64


def test_every_estimator_configuration_that_fits_saves_and_loads(X, tmp_path):
    """The load checks refuse nothing that fit accepted."""
    models = [
        DictionaryLearnerGPU(n_components=None, max_iter=1, random_state=0, device="cpu",
                             dict_init=np.arange(64).reshape(8, 8) % 5 + 1,
                             fit_algorithm="cd", positive_code=True,
                             transform_algorithm="lasso_cd"),
        SparseAutoencoder(n_components=None, architecture="relu", max_iter=1,
                          batch_size=64, random_state=0, device="cpu", precision="float32"),
        SparseAutoencoder(n_components=16, architecture="topk", k=16, max_iter=1,
                          batch_size=64, random_state=0, device="cpu", precision="float32",
                          init=np.random.RandomState(0).randn(16, 8).tolist()),
    ]
    for i, model in enumerate(models):
        model.fit(X)
        loaded = sksae.load(sksae.save(model, tmp_path / str(i)))
        assert_array_equal(loaded.transform(X), model.transform(X))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["attributes"].update(n_steps_=-1), r"n_steps_=-1 is not an integer >= 0"),
    (lambda c: c["attributes"].update(n_iter_=1.5), r"n_iter_=1.5"),
    (lambda c: c["attributes"].update(n_features_in_=True), r"n_features_in_=True"),
    (lambda c: c["attributes"].pop("n_steps_"), r"n_steps_=None"),
    (lambda c: c["attributes"].update(input_scale_=float("nan")), r"input_scale_"),
    (lambda c: c["attributes"].update(other_=float("inf")), r"other_=inf is not finite"),
    (lambda c: c["params"].update(tol=float("nan")), r"tol=nan is not finite"),
    (lambda c: c["string_attributes"].update(classes_=["a"]), r"'classes_' is not"),
    (lambda c: c.update(format_version=True), r"format_version"),
    (lambda c: c.update(random_state=[1]), r"'random_state' is missing or malformed"),
    (lambda c: c["arrays"]["components_"].update(dtype="object"), r"manifest entry"),
])
def test_scalar_metadata_checked(saved_sae, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        sksae.load(_forged(saved_sae, tmp_path, edit_config=edit))


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.update({"history_/step": np.zeros(8)}), r"'history_/step' is not a history"),
    (lambda a: [a.pop(k) for k in list(a) if k.startswith("history_/epoch/")]
     and a.update({"history_/epoch": np.zeros(2)}), r"not a dict of records"),
    (lambda a: a.update({"history_/other/x": np.zeros(8)}), r"history_ has groups"),
    (lambda a: a.update({"history_/step/x": np.zeros(3)}), r"different lengths"),
    (lambda a: a.update({"history_/step/x": np.zeros((8, 2))}), r"not a 1-D numeric"),
    (lambda a: a.update({"history_/step/x/y": np.zeros(8)}), r"not a history record"),
    (lambda a: a.update({"components_/x": np.zeros(8)}), r"only history_ holds"),
    (lambda a: a.update({"loss_curve_": np.zeros((2, 4))}), r"loss_curve_ is not"),
])
def test_history_structure_checked(saved_sae, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        sksae.load(_forged(saved_sae, tmp_path, edit_arrays=edit))


def test_history_records_may_hold_nan(saved_sae, tmp_path):
    """NaN marks a metric not recorded at a step (resumed fits): a genuine model."""
    def edit(a):
        a["history_/step/loss"][0] = np.nan

    loaded = sksae.load(_forged(saved_sae, tmp_path, edit_arrays=edit))
    assert np.isnan(loaded.history_["step"]["loss"][0])


def test_imported_sae_round_trips_with_an_empty_history(X, saved_sae, tmp_path):
    sae = from_saelens(to_saelens(sksae.load(saved_sae), tmp_path / "sl"))
    loaded = sksae.load(sksae.save(sae, tmp_path / "m"))
    assert loaded.history_ == {"step": {}, "epoch": {}}
    assert_array_equal(loaded.transform(X), sae.transform(X))


def test_unexpected_exception_types_become_value_errors(saved_sae, tmp_path, monkeypatch):
    """A check that trips over a value with a TypeError still refuses with ValueError."""
    def boom(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr(_io, "_check_fitted_arrays", boom)
    with pytest.raises(ValueError, match="malformed contents \\(KeyError"):
        sksae.load(saved_sae)


# ------------------------------------------------------------------------ saving
def test_save_does_not_follow_planted_links(X, saved_sae, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = copy_folder(saved_sae, tmp_path / "m")
    os.symlink(victim, folder / "config.json.tmp")
    os.symlink(victim, folder / "model.safetensors.tmp")
    model = sksae.load(folder)
    sksae.save(model, folder)
    assert victim.read_text() == "precious"
    # links planted under the final names are replaced, not written through
    (folder / "config.json").unlink()
    (folder / "model.safetensors").unlink()
    os.symlink(victim, folder / "config.json")
    os.symlink(victim, folder / "model.safetensors")
    sksae.save(model, folder)
    assert victim.read_text() == "precious"
    assert not (folder / "config.json").is_symlink()
    assert_array_equal(sksae.load(folder).transform(X), model.transform(X))
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "config.json.tmp", "model.safetensors", "model.safetensors.tmp"]


def test_to_saelens_does_not_follow_planted_links(saved_sae, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "sl"
    folder.mkdir()
    os.symlink(victim, folder / "cfg.json")
    to_saelens(sksae.load(saved_sae), folder)
    assert victim.read_text() == "precious"
    from_saelens(folder)


def test_interrupted_save_leaves_the_old_folder(X, saved_sae, tmp_path, monkeypatch):
    folder = copy_folder(saved_sae, tmp_path / "m")
    old = sksae.load(folder)
    new = SparseAutoencoder(n_components=16, architecture="relu", max_iter=1,
                            batch_size=64, random_state=1, device="cpu",
                            precision="float32").fit(X)
    real_write = _io._write_exclusive
    calls = []

    def fail_on_second(folder, name, data, temps):
        calls.append(name)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(folder, name, data, temps)

    monkeypatch.setattr(_io, "_write_exclusive", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        sksae.save(new, folder)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert_array_equal(sksae.load(folder).transform(X), old.transform(X))


def test_save_interrupted_between_renames_is_refused_not_mixed(X, saved_sae, tmp_path,
                                                               monkeypatch):
    """The weights are renamed first; a crash before the config follows is detected."""
    folder = copy_folder(saved_sae, tmp_path / "m")
    new = SparseAutoencoder(n_components=16, architecture="relu", max_iter=1,
                            batch_size=64, random_state=1, device="cpu",
                            precision="float32").fit(X)
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(_io.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="power cut"):
        sksae.save(new, folder)
    monkeypatch.undo()
    assert [p.name for p in calls] == ["model.safetensors", "config.json"]
    with pytest.raises(ValueError, match="model.safetensors is corrupted"):
        sksae.load(folder)


# --------------------------------------------------------------------- importers
def _saelens_folder(folder, tensors=None, **cfg):
    rng = np.random.RandomState(0)
    w = {"W_enc": rng.randn(8, 16), "W_dec": rng.randn(16, 8), "b_enc": rng.randn(16),
         "b_dec": rng.randn(8)}
    w = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in w.items()}
    w.update(tensors or {})
    folder.mkdir(parents=True)
    save_torch({k: v.contiguous() for k, v in w.items()},
               str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(
        {"architecture": "standard", "d_in": 8, "d_sae": 16, **cfg}))
    return folder


def _sparsify_folder(folder, tensors=None, **cfg):
    rng = np.random.RandomState(0)
    w = {"encoder.weight": rng.randn(16, 8), "encoder.bias": rng.randn(16),
         "W_dec": rng.randn(16, 8), "b_dec": rng.randn(8)}
    w = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in w.items()}
    w.update(tensors or {})
    folder.mkdir(parents=True)
    save_torch({k: v.contiguous() for k, v in w.items()}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"k": 4, "d_in": 8, **cfg}))
    return folder


@pytest.mark.parametrize("dtype", ["int64", "int32", "float16", "bool", "complex128",
                                   np.int64, "nonsense", True, None, ""])
def test_importers_refuse_non_float_dtypes(tmp_path, saved_sae, dtype):
    saelens = _saelens_folder(tmp_path / "sl")
    sparsify = _sparsify_folder(tmp_path / "sp")
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float64'"):
        from_saelens(saelens, dtype=dtype)
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float64'"):
        from_sparsify(sparsify, dtype=dtype)
    if dtype is not None:  # to_saelens's None keeps the model's dtype
        with pytest.raises(ValueError, match="dtype must be 'float32' or 'float64'"):
            to_saelens(sksae.load(saved_sae), tmp_path / "out", dtype=dtype)


@pytest.mark.parametrize("dtype, expected", [("float32", np.float32), ("float64", np.float64),
                                             (np.float64, np.float64), (">f4", np.float32)])
def test_importers_accept_float_dtypes(tmp_path, X, dtype, expected):
    sae = from_saelens(_saelens_folder(tmp_path / "sl"), dtype=dtype)
    assert sae.components_.dtype == np.dtype(expected)  # native byte order
    sae.transform(X)
    sae = from_sparsify(_sparsify_folder(tmp_path / "sp"), dtype=dtype)
    assert sae.components_.dtype == np.dtype(expected)
    sae.transform(X)


@pytest.mark.parametrize("make", [_saelens_folder, _sparsify_folder])
def test_importers_refuse_integer_tensors(tmp_path, make):
    name = "W_dec"
    folder = make(tmp_path / "f", tensors={name: torch.ones(16, 8, dtype=torch.int64)})
    importer = from_saelens if make is _saelens_folder else from_sparsify
    with pytest.raises(ValueError, match="tensor 'W_dec' has dtype torch.int64"):
        importer(folder)


@pytest.mark.parametrize("make", [_saelens_folder, _sparsify_folder])
def test_importers_refuse_values_that_overflow(tmp_path, make):
    huge = torch.full((16, 8), 1e300, dtype=torch.float64)
    folder = make(tmp_path / "f", tensors={"W_dec": huge})
    importer = from_saelens if make is _saelens_folder else from_sparsify
    with pytest.raises(ValueError, match="W_dec contains NaN or infinite"):
        importer(folder)  # finite in float64, inf in float32
    importer(folder, dtype="float64")


def test_saelens_folded_bias_overflow_is_refused(tmp_path):
    """b_enc + b_dec @ W_enc overflows although every tensor is finite."""
    big = torch.full((8,), 3e38, dtype=torch.float32)
    folder = _saelens_folder(tmp_path / "f", tensors={"b_dec": big,
                                                      "W_enc": torch.ones(8, 16)},
                             apply_b_dec_to_input=False)
    with pytest.raises(ValueError, match="encoder_bias_ holds NaN or infinite"):
        from_saelens(folder)


@pytest.mark.parametrize("make, cfg_name", [(_saelens_folder, "cfg.json"),
                                            (_sparsify_folder, "cfg.json")])
def test_importers_bound_json_nesting(tmp_path, make, cfg_name):
    folder = make(tmp_path / "f")
    (folder / cfg_name).write_text('{"d_in": 8, "x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    importer = from_saelens if make is _saelens_folder else from_sparsify
    with pytest.raises(ValueError, match="levels deep"):
        importer(folder)


@pytest.mark.parametrize("cfg, message", [
    ({"architecture": ["topk"]}, "not supported|malformed"),
    ({"architecture": "topk", "k": 17}, "k=17 must be at most n_components=16"),
    ({"architecture": "topk", "activation_fn_kwargs": 3}, "malformed contents"),
    ({"d_in": "8"}, "d_in='8' is not a positive integer"),
])
def test_saelens_malformed_configs_raise_value_error(tmp_path, cfg, message):
    with pytest.raises(ValueError, match=message):
        from_saelens(_saelens_folder(tmp_path / "f", **cfg))


@pytest.mark.parametrize("cfg, tensors, message", [
    ({"k": 17}, None, "k=17 exceeds the 16 latents"),
    ({"num_latents": 8}, None, "num_latents=8"),
    ({}, {"encoder.weight": torch.ones(16)}, r"encoder.weight has shape \[16\]"),
    ({}, {"encoder.bias": torch.full((16,), float("nan"))}, "encoder.bias contains NaN"),
])
def test_sparsify_malformed_folders_raise_value_error(tmp_path, cfg, tensors, message):
    with pytest.raises(ValueError, match=message):
        from_sparsify(_sparsify_folder(tmp_path / "f", tensors=tensors, **cfg))


def test_importers_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\S* does not exist"):
        from_saelens(tmp_path / "nothing")
    folder = _saelens_folder(tmp_path / "f")
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"sae_weights.safetensors does not exist"):
        from_saelens(folder)
    folder = _sparsify_folder(tmp_path / "g")
    (folder / "sae.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        from_sparsify(folder)


# ------------------------------------------------------------------ mutation test
_ODD_VALUES = [None, True, False, 0, -1, 1, 2, 623, 624, 625, 17, 10**20, -(10**20), 0.5,
               -0.0, 1e308, float("nan"), float("inf"), float("-inf"), "", "x", "auto",
               "float16", "MT19937", "uint32", [], [1, 2], {}, {"a": 1}, [[[]]]]


def _leaves(node, path=()):
    """Paths of every value in a JSON tree (containers included)."""
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, path + (i,))


def _mutate_config(cfg, rng):
    for _ in range(rng.randint(1, 4)):
        paths = [p for p in _leaves(cfg)
                 if p and p[0] not in ("config_sha256", "weights_sha256")]
        if not paths:
            return
        path = paths[rng.randint(len(paths))]
        node = cfg
        for key in path[:-1]:
            node = node[key]
        value = _ODD_VALUES[rng.randint(len(_ODD_VALUES))]
        choice = rng.randint(3)
        if choice == 0 and isinstance(node, dict):
            del node[path[-1]]
        elif choice == 1 and isinstance(node, dict):
            node[path[-1] + "_"] = value
        else:
            node[path[-1]] = value


def _mutate_bytes(data, rng):
    data = bytearray(data)
    header = 8 + int.from_bytes(data[:8], "little")
    for _ in range(rng.randint(1, 6)):
        # mostly the tensor data (values), sometimes the header
        lo = 0 if rng.rand() < 0.25 else header
        i = rng.randint(lo, len(data))
        data[i] = rng.randint(256) if rng.rand() < 0.5 else data[i] ^ (1 << rng.randint(8))
    return bytes(data)


def _assert_loaded_model_is_sound(model):
    for key, value in vars(model).items():
        if key in ("history_", "loss_curve_") or not isinstance(value, np.ndarray):
            continue
        if value.dtype.kind == "f":
            assert np.isfinite(value).all(), key
    if isinstance(model, DictionaryLearnerGPU):
        kind, keys, pos, has_gauss, gauss = model._random_state.get_state()
        assert keys.shape == (624,) and 0 <= pos <= 624 and has_gauss in (0, 1)
        assert np.isfinite(gauss)


@pytest.mark.parametrize("which", ["sae", "dl"])
def test_mutated_folders_load_soundly_or_raise_value_error(which, saved_sae, saved_dl,
                                                           tmp_path):
    """Random byte flips and JSON edits (digests recomputed half of the time)."""
    src = saved_sae if which == "sae" else saved_dl
    rng = np.random.RandomState(1234 if which == "sae" else 4321)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(40):
        folder = copy_folder(src, tmp_path / f"case{case}")
        if case % 2 == 0:
            weights = folder / "model.safetensors"
            weights.write_bytes(_mutate_bytes(weights.read_bytes(), rng))
        else:
            cfg = json.loads((folder / "config.json").read_text())
            _mutate_config(cfg, rng)
            (folder / "config.json").write_text(json.dumps(cfg))
        if case % 4 < 2:  # a forger: the digests no longer tell
            cfg = json.loads((folder / "config.json").read_text())
            if not isinstance(cfg, dict):
                continue
            cfg["weights_sha256"] = hashlib.sha256(
                (folder / "model.safetensors").read_bytes()).hexdigest()
            body = {k: v for k, v in cfg.items() if k != "config_sha256"}
            cfg["config_sha256"] = hashlib.sha256(_canonical(body)).hexdigest()
            (folder / "config.json").write_text(json.dumps(cfg))
        try:
            model = sksae.load(folder)
        except ValueError:
            outcomes["refused"] += 1
            continue
        outcomes["loaded"] += 1
        _assert_loaded_model_is_sound(model)
    assert outcomes["refused"] > 0


@pytest.mark.parametrize("which", ["saelens", "sparsify"])
def test_mutated_peer_folders_import_soundly_or_raise_value_error(which, saved_sae,
                                                                  tmp_path):
    if which == "saelens":
        src = to_saelens(sksae.load(saved_sae), tmp_path / "src")
        weights, importer = "sae_weights.safetensors", from_saelens
    else:
        src = _sparsify_folder(tmp_path / "src")
        weights, importer = "sae.safetensors", from_sparsify
    rng = np.random.RandomState(99)
    refused = 0
    for case in range(30):
        folder = tmp_path / f"case{case}"
        folder.mkdir()
        for f in src.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        if case % 2 == 0:
            (folder / weights).write_bytes(_mutate_bytes((folder / weights).read_bytes(), rng))
        else:
            cfg = json.loads((folder / "cfg.json").read_text())
            _mutate_config(cfg, rng)
            (folder / "cfg.json").write_text(json.dumps(cfg))
        try:
            model = importer(folder, dtype="float64" if case % 3 == 0 else "float32")
        except ValueError:
            refused += 1
            continue
        _assert_loaded_model_is_sound(model)
    assert refused > 0
