"""SAELens and sparsify folders: export/import round trips and the peers' own formulas.

The same round trips through the installed peers' own code: tests/test_interop_peers.py.
"""

import doctest
import json

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from sksae import SparseAutoencoder
from sksae.architectures import REGISTRY
import sksae.interop
from sksae.interop import from_saelens, from_sparsify, to_saelens, to_sparsify

D_IN, D_SAE = 8, 16
SAELENS_ARCH = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu",
                "batchtopk": "jumprelu", "gated": "gated", "matryoshka": "jumprelu"}


@pytest.fixture(scope="module")
def X():
    return np.random.RandomState(0).randn(200, D_IN).astype(np.float32)


@pytest.fixture(scope="module")
def fitted(X):
    return {a: SparseAutoencoder(n_components=D_SAE, architecture=a, k=3, max_iter=1,
                                 batch_size=64, random_state=0, device="cpu").fit(X)
            for a in sorted(REGISTRY)}


def saelens_encode(folder, x):
    """SAELens's inference encode/decode, written from its source, in torch."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = {k: v.double() for k, v in
         load_torch(str(folder / "sae_weights.safetensors")).items()}
    x = torch.as_tensor(x, dtype=torch.float64)
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    arch = cfg["architecture"]
    if arch == "gated":
        active = (sae_in @ w["W_enc"] + w["b_gate"] > 0).double()
        z = active * torch.relu(sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
    else:
        pre = sae_in @ w["W_enc"] + w["b_enc"]
        if arch == "topk" or cfg.get("activation_fn_str") == "topk":  # SAELens < 6 layout
            k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
            top = torch.topk(pre, k=k, dim=-1)
            z = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
        elif arch == "jumprelu":
            z = torch.relu(pre) * (pre > w["threshold"]).double()
        else:
            z = torch.relu(pre)
    return z.numpy(), (z @ w["W_dec"] + w["b_dec"]).numpy()


@pytest.mark.parametrize("architecture", sorted(REGISTRY))
def test_saelens_round_trip_and_names(fitted, X, tmp_path, architecture):
    model = fitted[architecture]
    folder = to_saelens(model, tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == SAELENS_ARCH[architecture]
    assert (cfg["d_in"], cfg["d_sae"]) == (D_IN, D_SAE)
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    shapes = {k: v.shape for k, v in tensors.items()}
    assert shapes["W_enc"] == (D_IN, D_SAE) and shapes["W_dec"] == (D_SAE, D_IN)
    assert shapes["b_dec"] == (D_IN,)
    if architecture == "gated":
        assert {"b_gate", "r_mag", "b_mag"} <= set(shapes) and "b_enc" not in shapes
    else:
        assert shapes["b_enc"] == (D_SAE,)
    if cfg["architecture"] == "jumprelu":
        assert shapes["threshold"] == (D_SAE,)
    if architecture == "topk":
        assert cfg["k"] == 3
    # SAELens 6's layout: a version >= 6 in metadata, no pre-6 top-level fields
    assert cfg["metadata"]["sae_lens_version"] == "6.0.0"
    assert cfg["metadata"]["sksae_architecture"] == architecture
    assert not {"hook_name", "model_name", "activation_fn_str", "activation_fn"} & set(cfg)

    imported = from_saelens(folder)
    codes = model.transform(X)
    # float32 codes from re-derived tensors (gated: the magnitude path from r_mag):
    # equal to the last bits on some CPUs, one ulp apart on others (seen on a Xeon)
    assert_allclose(imported.transform(X), codes, rtol=1e-5, atol=1e-6)
    # float32 GEMMs on a GPU are not bitwise reproducible between calls (cuBLAS may
    # pick another reduction order): seen at 2e-7 on an H100, exact on the CPU
    assert_allclose(imported.inverse_transform(codes), model.inverse_transform(codes),
                    rtol=1e-6, atol=1e-6)
    # the peer's own formula gives the same codes and reconstruction
    z, x_hat = saelens_encode(folder, X)
    assert_allclose(z, codes, atol=1e-5)
    assert_allclose(x_hat, model.inverse_transform(codes), atol=1e-4)


def _random_saelens(folder, architecture="standard", dtype=torch.float32, **cfg_extra):
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(D_IN, D_SAE, generator=g),
         "W_dec": torch.randn(D_SAE, D_IN, generator=g),
         "b_dec": torch.randn(D_IN, generator=g),
         "b_enc": torch.randn(D_SAE, generator=g) * 0.1}
    if architecture == "jumprelu":
        w["threshold"] = torch.rand(D_SAE, generator=g)
    folder.mkdir()
    save_file({k: v.to(dtype).contiguous() for k, v in w.items()},
              str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE,
           "apply_b_dec_to_input": True, "normalize_activations": "none", **cfg_extra}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("architecture, extra", [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("jumprelu", {"apply_b_dec_to_input": False}),
    ("standard", {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}}),
    ("topk", {"k": 5}),
])
def test_saelens_folders_written_elsewhere(X, tmp_path, architecture, extra):
    folder = _random_saelens(tmp_path / "s", architecture, **extra)
    imported = from_saelens(folder, dtype="float64")
    z, x_hat = saelens_encode(folder, X)
    assert_allclose(imported.transform(X.astype(np.float64)), z, atol=1e-10)
    assert_allclose(imported.inverse_transform(z), x_hat, atol=1e-10)


def test_saelens_bfloat16_weights(X, tmp_path):
    folder = _random_saelens(tmp_path / "s", "standard", dtype=torch.bfloat16)
    imported = from_saelens(folder)
    assert imported.components_.dtype == np.float32
    assert_allclose(imported.transform(X), saelens_encode(folder, X)[0], atol=1e-4)


@pytest.mark.parametrize("extra, message", [
    ({"normalize_activations": "expected_average_only_in"}, "normalize_activations"),
    ({"architecture": "transcoder"}, "not supported"),
    ({"d_sae": 17}, "W_enc has shape"),
    ({"architecture": "topk"}, "without k"),
])
def test_saelens_unsupported_folders_are_refused(tmp_path, extra, message):
    folder = _random_saelens(tmp_path / "s")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **extra}))
    with pytest.raises(ValueError, match=message):
        from_saelens(folder)


def _random_sparsify(folder, k=4, **cfg_extra):
    g = torch.Generator().manual_seed(1)
    w = {"encoder.weight": torch.randn(D_SAE, D_IN, generator=g),
         "encoder.bias": torch.randn(D_SAE, generator=g) * 0.1,
         "W_dec": torch.randn(D_SAE, D_IN, generator=g),
         "b_dec": torch.randn(D_IN, generator=g)}
    folder.mkdir(parents=True)
    save_file(w, str(folder / "sae.safetensors"))
    cfg = {"expansion_factor": 2, "normalize_decoder": True, "num_latents": D_SAE, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": False,
           "d_in": D_IN, **cfg_extra}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return w


def test_sparsify_import_matches_its_encoder(X, tmp_path):
    w = {k: v.double() for k, v in _random_sparsify(tmp_path / "sp").items()}
    imported = from_sparsify(tmp_path / "sp", dtype="float64")
    assert imported.architecture == "topk" and imported.k == 4
    # sparsify: TopK(ReLU(encoder(x - b_dec))), decode = z @ W_dec + b_dec
    x = torch.as_tensor(X, dtype=torch.float64)
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    top = pre.topk(4, dim=-1)
    z = torch.zeros_like(pre).scatter_(-1, top.indices, top.values).numpy()
    assert_allclose(imported.transform(X.astype(np.float64)), z, atol=1e-10)
    assert_allclose(imported.inverse_transform(z),
                    (torch.as_tensor(z) @ w["W_dec"] + w["b_dec"]).numpy(), atol=1e-10)


def test_sparsify_unsupported_folders_are_refused(tmp_path):
    _random_sparsify(tmp_path / "ckpt" / "layers.0")
    _random_sparsify(tmp_path / "ckpt" / "layers.1")
    with pytest.raises(ValueError, match=r"one SAE per hookpoint \['layers.0', 'layers.1'\]"):
        from_sparsify(tmp_path / "ckpt")
    _random_sparsify(tmp_path / "tc", transcode=True)
    with pytest.raises(ValueError, match="transcoder"):
        from_sparsify(tmp_path / "tc")
    _random_sparsify(tmp_path / "big", k=D_SAE + 1)
    with pytest.raises(ValueError, match="exceeds"):
        from_sparsify(tmp_path / "big")


def test_imported_sae_in_a_pipeline(fitted, X, tmp_path):
    imported = from_saelens(to_saelens(fitted["topk"], tmp_path / "sae"))
    y = (X[:, 0] > 0).astype(int)
    weights = imported.encoder_weights_.copy()
    pipe = make_pipeline(FrozenEstimator(imported), LogisticRegression()).fit(X, y)
    # the classifier sees the SAELens folder's TopK codes, written out in numpy
    tensors = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    pre = (X - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    codes = np.where(pre >= np.sort(pre, axis=1)[:, [-3]], np.maximum(pre, 0), 0)
    reference = LogisticRegression().fit(codes, y)
    assert_allclose(pipe[-1].coef_, reference.coef_, rtol=1e-5, atol=1e-6)
    majority = max(y.mean(), 1 - y.mean())  # 0.55: what a constant prediction scores
    assert pipe.score(X, y) == reference.score(codes, y) > majority + 0.1
    assert_array_equal(imported.encoder_weights_, weights)  # not retrained
    assert make_pipeline(imported).transform(X).shape == (len(X), D_SAE)
    assert imported.get_feature_names_out()[0] == "sparseautoencoder0"


def test_saelens_metadata_from_the_arguments(fitted, tmp_path):
    folder = to_saelens(fitted["topk"], tmp_path / "a")
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    # strings where SAELens wants strings (hook_name is tested with `in` on load)
    assert meta["model_name"] == meta["hook_name"] == "unknown"
    assert meta["context_size"] is None and meta["prepend_bos"] is True
    folder = to_saelens(fitted["topk"], tmp_path / "b", model_name="gpt2",
                        hook_name="blocks.8.hook_resid_pre", context_size=np.int64(128),
                        prepend_bos=False)
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    assert (meta["model_name"], meta["hook_name"], meta["context_size"],
            meta["prepend_bos"]) == ("gpt2", "blocks.8.hook_resid_pre", 128, False)
    assert from_saelens(folder).k == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"model_name": None}, "model_name must be a non-empty string"),
    ({"hook_name": ""}, "hook_name must be a non-empty string"),
    ({"context_size": 0}, "context_size must be None or a positive integer"),
    ({"context_size": True}, "context_size must be None or a positive integer"),
    ({"context_size": 12.0}, "context_size must be None or a positive integer"),
    ({"prepend_bos": "yes"}, "prepend_bos must be a bool"),
])
def test_saelens_metadata_arguments_are_checked(fitted, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        to_saelens(fitted["topk"], tmp_path / "sae", **kwargs)
    assert not (tmp_path / "sae").exists()


def test_sparsify_export_round_trip(fitted, X, tmp_path):
    model = fitted["topk"]
    folder = to_sparsify(model, tmp_path / "sp")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["activation"] == "topk" and cfg["k"] == 3
    assert (cfg["d_in"], cfg["num_latents"]) == (D_IN, D_SAE)
    assert not (cfg["transcode"] or cfg["skip_connection"] or cfg["multi_topk"])
    shapes = {k: v.shape for k, v in load_file(str(folder / "sae.safetensors")).items()}
    assert shapes == {"encoder.weight": (D_SAE, D_IN), "encoder.bias": (D_SAE,),
                      "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)}
    back = from_sparsify(folder)
    assert back.architecture == "topk" and back.k == 3
    assert_array_equal(back.transform(X), model.transform(X))
    codes = model.transform(X)
    assert_array_equal(back.inverse_transform(codes), model.inverse_transform(codes))
    assert load_file(str(to_sparsify(model, tmp_path / "f64", dtype="float64")
                         / "sae.safetensors"))["W_dec"].dtype == np.float64


@pytest.mark.parametrize("architecture", sorted(set(REGISTRY) - {"topk"}))
def test_sparsify_export_refuses_other_architectures(fitted, tmp_path, architecture):
    with pytest.raises(ValueError, match=f"architecture '{architecture}' has no sparsify"):
        to_sparsify(fitted[architecture], tmp_path / "sp")


def test_exports_refuse_other_estimators(tmp_path):
    from sksae import DictionaryLearnerGPU

    for export in (to_saelens, to_sparsify):
        with pytest.raises(TypeError, match="exports a SparseAutoencoder"):
            export(DictionaryLearnerGPU(n_components=2), tmp_path / "x")


def test_interop_docstring_examples():
    result = doctest.testmod(sksae.interop, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
