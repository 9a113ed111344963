"""Every error branch of the importers (sksae.interop.from_saelens / from_sparsify).

Each malformed folder is refused with the exception its docstring promises and a
message naming what is wrong (checked with ``match=``). A valid folder is built
first and imported, so that each case differs from an importable folder by the
one defect it plants.
"""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sksae.interop import from_saelens, from_sparsify

D_IN, D_SAE = 6, 10


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return g, lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float32)


def saelens(folder, cfg=None, tensors=None, drop=()):
    """A SAELens folder (standard ReLU) with ``cfg`` and ``tensors`` merged in."""
    _, randn = _weights()
    w = {"W_enc": randn(D_IN, D_SAE), "W_dec": randn(D_SAE, D_IN), "b_enc": randn(D_SAE),
         "b_dec": randn(D_IN)}
    w.update(tensors or {})
    for name in drop:
        del w[name]
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in w.items()}, str(folder / "sae_weights.safetensors"))
    base = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE}
    (folder / "cfg.json").write_text(json.dumps({**base, **(cfg or {})}))
    return folder


def sparsify(folder, cfg=None, tensors=None, drop=()):
    """A sparsify folder (TopK, k=3) with ``cfg`` and ``tensors`` merged in."""
    _, randn = _weights()
    w = {"encoder.weight": randn(D_SAE, D_IN), "encoder.bias": randn(D_SAE),
         "W_dec": randn(D_SAE, D_IN), "b_dec": randn(D_IN)}
    w.update(tensors or {})
    for name in drop:
        del w[name]
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in w.items()}, str(folder / "sae.safetensors"))
    base = {"activation": "topk", "k": 3, "d_in": D_IN, "num_latents": D_SAE}
    (folder / "cfg.json").write_text(json.dumps({**base, **(cfg or {})}))
    return folder


def test_the_valid_folders_import(tmp_path):
    a = from_saelens(saelens(tmp_path / "a"))
    b = from_sparsify(sparsify(tmp_path / "b"))
    assert (a.architecture, a.components_.shape) == ("relu", (D_SAE, D_IN))
    assert (b.architecture, b.k, b.components_.shape) == ("topk", 3, (D_SAE, D_IN))


# -------------------------------------------------------------- both importers
@pytest.mark.parametrize("importer, make, cfg_name, weights", [
    (from_saelens, saelens, "cfg.json", "sae_weights.safetensors"),
    (from_sparsify, sparsify, "cfg.json", "sae.safetensors")])
def test_files(tmp_path, importer, make, cfg_name, weights):
    with pytest.raises(FileNotFoundError, match=r"nowhere.cfg\.json does not exist"):
        importer(tmp_path / "nowhere")
    folder = make(tmp_path / "no_weights")
    (folder / weights).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(weights) + " does not exist"):
        importer(folder)
    folder = make(tmp_path / "no_cfg")
    (folder / cfg_name).unlink()
    with pytest.raises(FileNotFoundError, match=r"cfg\.json does not exist"):
        importer(folder)

    def refused(name, content, message):
        folder = make(tmp_path / name)
        target = folder / (weights if name.startswith("weights") else cfg_name)
        target.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            importer(folder)

    refused("list", b"[1, 2]", r"cfg\.json does not hold a JSON object")
    refused("not_json", b"{'d_in': 6}", r"cfg\.json is not valid JSON")
    refused("not_utf8", b'{"d_in": "\xff"}', r"cfg\.json is not valid JSON")
    refused("deep", b"[" * 40 + b"]" * 40, r"cfg\.json is not valid JSON \(JSON nested")
    refused("big", b'{"pad": "' + b"x" * 2**20 + b'"}', r"cfg\.json is larger than 1048576")
    refused("weights_garbage", b"\xff" * 64, "is not a readable safetensors file")
    refused("weights_empty", b"", "is not a readable safetensors file")


@pytest.mark.parametrize("importer, make, name", [(from_saelens, saelens, "W_dec"),
                                                  (from_sparsify, sparsify, "W_dec")])
def test_integer_tensor_is_refused_not_cast(tmp_path, importer, make, name):
    folder = make(tmp_path / "f", tensors={name: torch.ones(D_SAE, D_IN, dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"tensor 'W_dec' has dtype torch.int32; SAE weights "
                                         "are floating point"):
        importer(folder)


@pytest.mark.parametrize("importer, make", [(from_saelens, saelens), (from_sparsify, sparsify)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, importer, make, bad):
    W = torch.ones(D_SAE, D_IN)
    W[2, 3] = bad
    with pytest.raises(ValueError, match="W_dec contains NaN or infinite values"):
        importer(make(tmp_path / "f", tensors={"W_dec": W}))
    # finite in float64 but not in float32: refused after the conversion
    big = torch.full((D_IN,), 1e300, dtype=torch.float64)
    with pytest.raises(ValueError, match="b_dec contains NaN or infinite values"):
        importer(make(tmp_path / "g", tensors={"b_dec": big}), dtype="float32")


# -------------------------------------------------------------- SAELens
@pytest.mark.parametrize("key, value", [("d_in", 0), ("d_in", -3), ("d_in", "6"),
                                        ("d_sae", True), ("d_sae", 2.5), ("d_sae", None)])
def test_saelens_sizes_must_be_positive_integers(tmp_path, key, value):
    with pytest.raises(ValueError, match=f"{key}={re.escape(repr(value))} is not a positive "
                                         "integer"):
        from_saelens(saelens(tmp_path / "f", cfg={key: value}))


@pytest.mark.parametrize("name, shape", [("W_enc", (D_SAE, D_IN)), ("W_dec", (D_IN, D_SAE)),
                                         ("b_dec", (D_IN + 1,)), ("b_enc", (D_SAE, 1))])
def test_saelens_tensor_shapes_must_match_d_in_and_d_sae(tmp_path, name, shape):
    folder = saelens(tmp_path / "f", tensors={name: torch.zeros(shape)})
    with pytest.raises(ValueError, match=rf"{name} has shape {re.escape(str(list(shape)))}; "
                                         r"expected \["):
        from_saelens(folder)


def test_saelens_d_in_and_d_sae_mismatching_the_weights(tmp_path):
    with pytest.raises(ValueError, match=r"W_enc has shape \[6, 10\]; expected \[7, 10\]"):
        from_saelens(saelens(tmp_path / "a", cfg={"d_in": D_IN + 1}))
    with pytest.raises(ValueError, match=r"W_enc has shape \[6, 10\]; expected \[6, 12\]"):
        from_saelens(saelens(tmp_path / "b", cfg={"d_sae": D_SAE + 2}))


@pytest.mark.parametrize("name", ["W_enc", "W_dec", "b_dec", "b_enc"])
def test_saelens_missing_tensor(tmp_path, name):
    with pytest.raises(ValueError, match=rf"has no tensor '{name}' \(found \["):
        from_saelens(saelens(tmp_path / "f", drop=[name]))


def test_saelens_missing_architecture_tensors(tmp_path):
    gated = {"architecture": "gated"}
    _, randn = _weights(1)
    full = {"b_gate": randn(D_SAE), "r_mag": randn(D_SAE), "b_mag": randn(D_SAE)}
    for name in full:
        tensors = {k: v for k, v in full.items() if k != name}
        with pytest.raises(ValueError, match=rf"has no tensor '{name}'"):
            from_saelens(saelens(tmp_path / f"g_{name}", cfg=gated, tensors=tensors))
    with pytest.raises(ValueError, match=r"scaling_factor has shape \[3\]; expected \[10\]"):
        from_saelens(saelens(tmp_path / "s", tensors={"scaling_factor": torch.ones(3)}))


@pytest.mark.parametrize("cfg, message", [
    ({"normalize_activations": "expected_average_only_in"},
     "normalize_activations='expected_average_only_in', which rescales inputs"),
    ({"rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm, not supported"),
    ({"architecture": "mystery"},
     r"architecture 'mystery' with activation 'relu' is not supported \(no registered"),
    ({"activation_fn_str": "gelu"},
     r"architecture 'standard' with activation 'gelu' is not supported"),
    ({"architecture": "topk"}, "a TopK SAE without k"),
    ({"architecture": "topk", "k": 0}, "a TopK SAE needs a positive integer k, got 0"),
    ({"architecture": "topk", "k": 2.5}, "a TopK SAE needs a positive integer k, got 2.5"),
    ({"architecture": "topk", "k": D_SAE + 1}, r"k=11 must be at most n_components=10"),
])
def test_saelens_unsupported_or_invalid_configurations(tmp_path, cfg, message):
    with pytest.raises(ValueError, match=message):
        from_saelens(saelens(tmp_path / "f", cfg=cfg))


# interop computes the fold without np.errstate: numpy warns before the refusal
@pytest.mark.filterwarnings("ignore:overflow encountered in matmul:RuntimeWarning")
def test_saelens_folding_overflow_is_refused(tmp_path):
    # apply_b_dec_to_input=False folds b_dec @ W_enc into the encoder's bias: finite
    # weights whose product overflows float32
    big = torch.full((D_IN,), 3e38)
    W_enc = torch.full((D_IN, D_SAE), 3e38)
    folder = saelens(tmp_path / "f", cfg={"apply_b_dec_to_input": False},
                     tensors={"b_dec": big, "W_enc": W_enc})
    with pytest.raises(ValueError, match=r"encoder_bias_ holds NaN or infinite values \(after "
                                         "folding"):
        from_saelens(folder)


def test_saelens_malformed_values_are_value_errors(tmp_path):
    # a cfg value of the wrong type that no explicit check anticipates
    folder = saelens(tmp_path / "f", cfg={"architecture": "topk", "activation_fn_kwargs": [3]})
    with pytest.raises(ValueError, match=r"malformed contents \(AttributeError: 'list' object"):
        from_saelens(folder)
    folder = saelens(tmp_path / "g", cfg={"architecture": ["standard"]})
    with pytest.raises(ValueError, match=r"architecture \['standard'\] with activation 'relu' "
                                         "is not supported"):
        from_saelens(folder)


# -------------------------------------------------------------- sparsify
def test_sparsify_folder_of_hookpoints(tmp_path):
    sparsify(tmp_path / "run" / "layers.3")
    sparsify(tmp_path / "run" / "layers.1")
    with pytest.raises(ValueError, match=r"one SAE per hookpoint \['layers.1', 'layers.3'\]; "
                                         "pass one of these subfolders"):
        from_sparsify(tmp_path / "run")


@pytest.mark.parametrize("cfg, message", [
    ({"transcode": True}, r"is a transcoder \(it predicts another layer\)"),
    ({"skip_connection": True}, r"has a skip connection \(W_skip\): not supported"),
    ({"activation": "groupmax"}, "uses activation='groupmax', which no registered architecture"),
    ({"activation": ["topk"]}, r"uses activation=\['topk'\], which no registered"),
    ({"k": 0}, "k=0 is not a positive integer"),
    ({"k": "3"}, "k='3' is not a positive integer"),
    ({"k": D_SAE + 1}, "k=11 exceeds the 10 latents"),
    ({"d_in": D_IN + 1}, r"cfg d_in=7 but encoder.weight has 6 columns"),
    ({"d_in": -1}, r"d_in=-1 is not a positive integer"),
    ({"num_latents": D_SAE + 5}, r"cfg num_latents=15 but encoder.weight has 10 rows"),
])
def test_sparsify_unsupported_or_inconsistent_configurations(tmp_path, cfg, message):
    with pytest.raises(ValueError, match=message):
        from_sparsify(sparsify(tmp_path / "f", cfg=cfg))


def test_sparsify_num_latents_zero_means_from_the_weights(tmp_path):
    sae = from_sparsify(sparsify(tmp_path / "f", cfg={"num_latents": 0}))
    assert sae.components_.shape == (D_SAE, D_IN)


@pytest.mark.parametrize("tensors, drop, message", [
    ({"W_skip": torch.zeros(D_IN, D_IN)}, (), r"has a skip connection \(W_skip\)"),
    ({}, ("encoder.weight",), r"has no tensor 'encoder.weight' \(found \['W_dec', 'b_dec', "
                              r"'encoder.bias'\]\)"),
    ({"encoder.weight": torch.zeros(D_SAE * D_IN)}, (),
     r"encoder.weight has shape \[60\]; expected \[d_sae, d_in\]"),
    ({}, ("encoder.bias",), r"has no tensor 'encoder.bias'"),
    ({}, ("W_dec",), r"has no tensor 'W_dec'"),
    ({}, ("b_dec",), r"has no tensor 'b_dec'"),
    ({"encoder.bias": torch.zeros(D_SAE + 1)}, (), r"encoder.bias has shape \[11\]; expected "
                                                   r"\[10\]"),
    ({"W_dec": torch.zeros(D_SAE, D_IN + 1)}, (), r"W_dec has shape \[10, 7\]; expected "
                                                  r"\[10, 6\]"),
    ({"b_dec": torch.zeros(D_IN - 1)}, (), r"b_dec has shape \[5\]; expected \[6\]"),
])
def test_sparsify_tensors(tmp_path, tensors, drop, message):
    with pytest.raises(ValueError, match=message):
        from_sparsify(sparsify(tmp_path / "f", tensors=tensors, drop=drop))


# -------------------------------------------------------------- generic validation
@pytest.mark.parametrize("importer, make", [(from_saelens, saelens), (from_sparsify, sparsify)])
@pytest.mark.parametrize("dtype", ["float16", "int64", None, True, "nonsense"])
def test_dtype_must_be_float32_or_float64(tmp_path, importer, make, dtype):
    folder = make(tmp_path / "f")
    with pytest.raises(ValueError, match=rf"dtype must be 'float32' or 'float64', got "
                                         rf"{re.escape(repr(dtype))}\."):
        importer(folder, dtype=dtype)
    assert importer(folder, dtype=">f8").components_.dtype == np.float64


@pytest.mark.parametrize("importer, make", [(from_saelens, saelens), (from_sparsify, sparsify)])
def test_memory_error_is_not_disguised_as_a_malformed_file(tmp_path, importer, make,
                                                           monkeypatch):
    import safetensors.torch

    def no_memory(*args, **kwargs):
        raise MemoryError("test: out of memory")

    folder = make(tmp_path / "f")
    monkeypatch.setattr(safetensors.torch, "load_file", no_memory)
    with pytest.raises(MemoryError, match="test: out of memory"):
        importer(folder)
