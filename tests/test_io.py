"""sksae.save / sksae.load: exact round trips, and refusal of damaged or tampered folders."""

import json

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from sklearn.exceptions import NotFittedError

import sksae
from _folders import copy_folder, forge
from sksae import DictionaryLearnerGPU, SparseAutoencoder
from sksae.architectures import REGISTRY

ARCHITECTURES = sorted(REGISTRY)


@pytest.fixture(scope="module")
def X():
    return np.random.RandomState(0).randn(240, 8).astype(np.float32)


def _sae(architecture, **kw):
    params = dict(n_components=16, architecture=architecture, k=2, max_iter=2,
                  batch_size=64, random_state=0, device="cpu", precision="float32")
    return SparseAutoencoder(**{**params, **kw})


@pytest.fixture(scope="module")
def saved_topk(X, tmp_path_factory):
    path = tmp_path_factory.mktemp("topk")
    sksae.save(_sae("topk").fit(X), path)
    return path


def _assert_same_history(a, b):
    assert a.keys() == b.keys()
    for group in a:
        assert a[group].keys() == b[group].keys()
        for key in a[group]:
            assert_array_equal(a[group][key], b[group][key])


@pytest.mark.parametrize("architecture, dtype", [(a, np.float32) for a in ARCHITECTURES]
                         + [("topk", np.float64), ("jumprelu", np.float64)])
def test_round_trip_every_architecture(X, tmp_path, architecture, dtype):
    Xd = X.astype(dtype)
    model = _sae(architecture).fit(Xd)
    loaded = sksae.load(sksae.save(model, tmp_path / "m"))
    assert type(loaded) is SparseAutoencoder
    assert loaded.get_params() == model.get_params()
    codes = model.transform(Xd)
    assert_array_equal(loaded.transform(Xd), codes)
    assert_array_equal(loaded.inverse_transform(codes), model.inverse_transform(codes))
    assert loaded.score(Xd) == model.score(Xd)
    for attr in ("n_components_", "n_features_in_", "input_scale_", "n_iter_", "n_steps_"):
        assert getattr(loaded, attr) == getattr(model, attr)
        assert type(getattr(loaded, attr)) is type(getattr(model, attr))
    for attr in vars(model):
        if attr.endswith("_") and not attr.startswith("_") and attr != "history_":
            assert_array_equal(getattr(loaded, attr), getattr(model, attr))
            assert np.asarray(getattr(loaded, attr)).dtype == \
                np.asarray(getattr(model, attr)).dtype
    _assert_same_history(loaded.history_, model.history_)
    assert "fvu" in loaded.history_["epoch"] and "lr" in loaded.history_["step"]


def test_round_trip_dictionary_learner_and_partial_fit(X, tmp_path):
    model = DictionaryLearnerGPU(n_components=6, alpha=0.2, max_iter=2, batch_size=64,
                                 random_state=0, device="cpu").fit(X)
    loaded = sksae.load(sksae.save(model, tmp_path / "dl"))
    assert loaded.get_params() == model.get_params()
    assert_array_equal(loaded.transform(X), model.transform(X))
    assert (loaded.n_iter_, loaded.n_steps_) == (model.n_iter_, model.n_steps_)
    # sufficient statistics and random state are saved: partial_fit continues identically
    model.partial_fit(X[:64])
    loaded.partial_fit(X[:64])
    assert_array_equal(loaded.components_, model.components_)


def test_array_parameters_and_feature_names(X, tmp_path):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    init = np.random.RandomState(1).randn(16, 8)
    model = _sae("topk", init=init).fit(df)
    loaded = sksae.load(sksae.save(model, tmp_path / "m"))
    assert_array_equal(loaded.init, init)
    assert_array_equal(loaded.feature_names_in_, model.feature_names_in_)
    assert_array_equal(loaded.transform(df), model.transform(df))


def test_unstorable_parameters_are_dropped_with_a_warning(X, tmp_path):
    model = _sae("topk", callback=lambda loc: None,
                 random_state=np.random.RandomState(0)).fit(X)
    with pytest.warns(UserWarning, match="callback"):
        path = sksae.save(model, tmp_path / "m")
    loaded = sksae.load(path)
    assert loaded.callback is None and loaded.random_state is None
    assert_array_equal(loaded.transform(X), model.transform(X))


def test_loaded_sae_trains_afresh(X, saved_topk):
    loaded = sksae.load(saved_topk)
    assert not hasattr(loaded, "_train_state")
    loaded.partial_fit(X)  # no optimizer state: a new run, not an error
    assert loaded.n_steps_ == 4


def test_device_override(saved_topk):
    assert sksae.load(saved_topk, device="cpu").device == "cpu"


def test_save_refuses_foreign_or_unfitted_estimators(tmp_path):
    from sklearn.decomposition import PCA

    with pytest.raises(TypeError, match="sksae estimators"):
        sksae.save(PCA().fit(np.eye(3)), tmp_path / "pca")
    with pytest.raises(NotFittedError, match="is not fitted yet"):
        sksae.save(SparseAutoencoder(), tmp_path / "unfitted")


# ------------------------------------------------------------------- tampering
def test_corrupted_weights_are_refused(saved_topk, tmp_path):
    folder = copy_folder(saved_topk, tmp_path / "m")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors is corrupted or was modified"):
        sksae.load(folder)


def test_edited_config_is_refused(saved_topk, tmp_path):
    folder = copy_folder(saved_topk, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["params"]["k"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json was modified"):
        sksae.load(folder)


@pytest.mark.parametrize("edit_config, edit_arrays, message", [
    (lambda c: c.update(estimator="os.system"), None, "not one of the sksae estimators"),
    (lambda c: c["params"].update(architecture="evil"), None, "invalid parameters"),
    (lambda c: c["params"].update(__class__="x"), None, "unknown parameters"),
    (lambda c: c["attributes"].update(_train_state=1), None, "not a fitted scalar"),
    (lambda c: c["attributes"].update(n_components_=17), None, "n_components_=17"),
    (lambda c: c["attributes"].update(transform=1), None, "not a fitted scalar"),
    (lambda c: c.update(format_version=99), None, "format_version"),
    (lambda c: c.update(format="pickle"), None, "not an sksae model config"),
    (None, lambda a: a.update(components_=a["components_"][:8]), "does not match"),
    (None, lambda a: a.update(decoder_bias_=a["decoder_bias_"][:3]), "decoder_bias_ has shape"),
    (None, lambda a: a.update(encoder_bias_=a["encoder_bias_"].astype(np.float64)),
     "dtype"),
    (None, lambda a: a["encoder_weights_"].__setitem__((0, 0), np.nan), "NaN"),
    (None, lambda a: a.pop("encoder_weights_"), "encoder_weights_ is missing"),
    (None, lambda a: a.update(_secret=np.zeros(1)), "not a fitted attribute"),
])
def test_forged_folders_are_refused(saved_topk, tmp_path, edit_config, edit_arrays, message):
    folder = copy_folder(saved_topk, tmp_path / "m")
    forge(folder, edit_config, edit_arrays)
    with pytest.raises(ValueError, match=message):
        sksae.load(folder)


def test_manifest_mismatch_is_refused(saved_topk, tmp_path):
    folder = copy_folder(saved_topk, tmp_path / "m")

    def lie(cfg):
        cfg["arrays"]["components_"]["shape"] = [1, 1]

    forge(folder, edit_config=lie)
    with pytest.raises(ValueError, match="manifest"):
        sksae.load(folder)


def test_missing_or_garbled_files_are_refused(saved_topk, tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        sksae.load(tmp_path / "nothing")
    folder = copy_folder(saved_topk, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        sksae.load(folder)
    folder = copy_folder(saved_topk, tmp_path / "g")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sksae.load(folder)
