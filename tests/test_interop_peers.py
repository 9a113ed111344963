"""Round trips through the peers' own code: SAELens's and sparsify's loaders, encoders, savers.

tests/test_interop.py checks the folders against the peers' formulas rewritten
in the tests; here the installed packages (the ``peers`` extra of
pyproject.toml) load what sksae writes and write what sksae reads:

- sksae -> peer -> sksae: a fitted estimator exported, loaded by the peer
  (whose ``encode``/``decode`` must give ``transform``/``inverse_transform``),
  saved again by the peer and imported back;
- peer -> sksae -> peer: an SAE built by the peer and saved by it, imported
  (``transform`` must give the peer's ``encode``), exported and loaded by the
  peer again (the same codes and reconstructions as the original).

Each test records the largest absolute difference of codes and of
reconstructions (``record_property``: ``--junitxml`` reports them).

Without the peers these tests skip, unless ``SKSAE_REQUIRE_PEERS=1`` (set by
``.ci/run``), which makes a missing peer a failure. An installed peer outside
the supported range (the ``peers`` extra, stated in docs/user_guide.rst) fails
with a message naming the range.
"""

import importlib
import importlib.metadata
import os
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from sksae import SparseAutoencoder
from sksae.architectures import available
from sksae.interop import from_saelens, from_sparsify, to_saelens, to_sparsify

ROOT = Path(__file__).resolve().parents[1]
D_IN, D_SAE, K = 8, 32, 4
# float32 throughout: the same operations in another order (SAELens multiplies
# W_enc by exp(r_mag) before the product, sparsify decodes with embedding_bag)
CODES_ATOL = RECONS_ATOL = 1e-5


def peer_requirements():
    """{distribution name: requirement string} of the ``peers`` extra of pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(Requirement(r).name): r
            for r in project["optional-dependencies"]["peers"]}


def check_peer_version(dist, version):
    """Fail, naming the supported range, when ``version`` of ``dist`` is outside it."""
    req = peer_requirements()[dist]
    if not Requirement(req).specifier.contains(Version(version), prereleases=True):
        pytest.fail(f"{dist} {version} is installed, outside the range sksae's interop "
                    f"supports and tests ({req}: the 'peers' extra of pyproject.toml, "
                    "stated in docs/user_guide.rst). Install a supported version "
                    "(pip install 'sksae[peers]'), or check the round trips with this "
                    "one and widen the range.", pytrace=False)


def import_peer(module, dist):
    """The peer's module, its version checked; a skip, or a failure under SKSAE_REQUIRE_PEERS=1."""
    try:
        with warnings.catch_warnings():  # the peers' own deprecations at import
            warnings.simplefilter("ignore", DeprecationWarning)
            mod = importlib.import_module(module)
    except ImportError as exc:
        message = (f"{dist} is not installed ({exc}); pip install 'sksae[peers]' to run "
                   "the round trips through the peers' own code.")
        if os.environ.get("SKSAE_REQUIRE_PEERS") == "1":
            pytest.fail(f"SKSAE_REQUIRE_PEERS=1: {message}", pytrace=False)
        pytest.skip(message)
    check_peer_version(dist, importlib.metadata.version(dist))
    return mod


@pytest.fixture(scope="module")
def sae_lens():
    return import_peer("sae_lens", "sae-lens")


@pytest.fixture(scope="module")
def sparsify():
    return import_peer("sparsify", "eai-sparsify")


@pytest.fixture(scope="module")
def X():
    return np.random.RandomState(0).randn(300, D_IN).astype(np.float32)


@pytest.fixture(scope="module")
def fitted(X):
    return {a: SparseAutoencoder(n_components=D_SAE, architecture=a, k=K, max_iter=3,
                                 batch_size=64, random_state=0, device="cpu").fit(X)
            for a in available()}


def assert_close(record, what, got, expected, atol):
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    record(f"max_diff_{what}", float(np.abs(got - expected).max()))
    assert_allclose(got, expected, rtol=0, atol=atol, err_msg=what)


def saelens_apply(sae, X, codes=None):
    """SAELens's ``encode`` of X and ``decode`` of ``codes`` (its own codes by default)."""
    with torch.no_grad():
        z = sae.encode(torch.as_tensor(X))
        x_hat = sae.decode(z if codes is None else torch.as_tensor(codes))
    return z.numpy(), x_hat.numpy()


def sparsify_apply(coder, X, codes=None):
    """sparsify's ``encode`` of X as dense codes, and its ``decode`` of ``codes``."""
    with torch.no_grad():
        out = coder.encode(torch.as_tensor(X))
        z = torch.zeros(len(X), coder.num_latents).scatter_(1, out.top_indices,
                                                            out.top_acts.float())
        if codes is None:
            x_hat = coder.decode(out.top_acts, out.top_indices)
        else:  # the k entries of each row of the given codes
            codes = torch.as_tensor(codes)
            idx = codes.topk(coder.cfg.k, dim=-1).indices
            x_hat = coder.decode(codes.gather(1, idx), idx)
    return z.numpy(), x_hat.numpy()


def assert_nontrivial(codes):
    """Some latents fire and some do not: the comparison tests the activation rule."""
    assert (codes > 0).any() and (codes == 0).any()


# ------------------------------------------------------------------ versions
def test_supported_versions_are_stated_in_the_docs():
    guide = (ROOT / "docs" / "user_guide.rst").read_text()
    reqs = peer_requirements()
    assert set(reqs) == {"sae-lens", "eai-sparsify"}
    for req in reqs.values():
        assert f"``{req}``" in guide, req


@pytest.mark.parametrize("dist, version", [("sae-lens", "5.11.0"), ("sae-lens", "7.0.0"),
                                           ("eai-sparsify", "1.2.0")])
def test_an_unsupported_peer_version_fails_naming_the_range(dist, version):
    with pytest.raises(pytest.fail.Exception, match=rf"{dist} {version} is installed, "
                       r"outside the range .*\(" + dist):
        check_peer_version(dist, version)


# ------------------------------------------------------------------- SAELens
@pytest.mark.parametrize("architecture", available())
def test_saelens_loads_every_export(sae_lens, fitted, X, tmp_path, record_property,
                                    architecture):
    """sksae -> SAELens -> sksae: SAELens's encode/decode are transform/inverse_transform."""
    model = fitted[architecture]
    codes, recons = model.transform(X), model.inverse_transform(model.transform(X))
    assert_nontrivial(codes)
    folder = to_saelens(model, tmp_path / "sae", model_name="gpt2",
                        hook_name="blocks.3.hook_resid_pre", context_size=128)
    sae = sae_lens.SAE.load_from_disk(folder)
    expected = {"relu": "standard", "topk": "topk", "gated": "gated"}.get(architecture,
                                                                          "jumprelu")
    assert sae.cfg.architecture() == expected
    assert (sae.cfg.metadata.model_name, sae.cfg.metadata.hook_name,
            sae.cfg.metadata.context_size) == ("gpt2", "blocks.3.hook_resid_pre", 128)
    z, x_hat = saelens_apply(sae, X, codes)
    assert_close(record_property, "codes_to_peer", z, codes, CODES_ATOL)
    assert_close(record_property, "recons_to_peer", x_hat, recons, RECONS_ATOL)

    sae.save_model(tmp_path / "saved_by_saelens")
    back = from_saelens(tmp_path / "saved_by_saelens")
    assert_close(record_property, "codes_back", back.transform(X), codes, CODES_ATOL)
    assert_close(record_property, "recons_back", back.inverse_transform(codes), recons,
                 RECONS_ATOL)


def test_saelens_export_defaults_load(sae_lens, fitted, X, tmp_path):
    """Without the metadata arguments SAELens still reads strings where it wants them."""
    sae = sae_lens.SAE.load_from_disk(to_saelens(fitted["topk"], tmp_path / "sae"))
    meta = sae.cfg.metadata
    assert meta.model_name == meta.hook_name == "unknown"
    assert meta.prepend_bos is True and meta.context_size is None
    assert sae.get_name() == f"sae_unknown_unknown_{D_SAE}"
    assert_allclose(saelens_apply(sae, X)[0], fitted["topk"].transform(X), atol=CODES_ATOL)


def test_saelens_loads_a_float64_export(sae_lens, fitted, X, tmp_path):
    sae = sae_lens.SAE.load_from_disk(to_saelens(fitted["jumprelu"], tmp_path / "sae",
                                                 dtype="float64"))
    assert sae.W_enc.dtype == torch.float64
    z, _ = saelens_apply(sae, X.astype(np.float64))
    assert_allclose(z, fitted["jumprelu"].transform(X), atol=CODES_ATOL)


def _randomised(sae, seed):
    """Random biases (and thresholds, gates) so that every weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if p.ndim == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(0.5 * torch.rand(sae.threshold.shape, generator=g))
    return sae


def _saelens_sae(sae_lens, architecture, X):
    """A SAELens SAE of ``architecture`` and how SAELens saves it for inference."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig)

    torch.manual_seed(0)
    if architecture == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    elif architecture == "matryoshka_batchtopk":
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=[D_SAE // 4, D_SAE // 2, D_SAE]))
    else:
        cfg_class = {"standard": sae_lens.StandardSAEConfig, "topk": sae_lens.TopKSAEConfig,
                     "jumprelu": sae_lens.JumpReLUSAEConfig,
                     "gated": sae_lens.GatedSAEConfig}[architecture]
        cfg = cfg_class(d_in=D_IN, d_sae=D_SAE, **({"k": K} if architecture == "topk" else {}))
        sae = sae_lens.SAE.get_sae_class_for_architecture(architecture)(cfg)
        return _randomised(sae, 1), sae.save_model
    _randomised(sae, 1)
    with torch.no_grad():  # a threshold that about 1 in 10 pre-activations passes
        _, pre = sae.encode_with_hidden_pre(torch.as_tensor(X))
        sae.topk_threshold.fill_(pre.quantile(0.9).clamp_min(0.01).item())
    return sae, sae.save_inference_model


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "gated", "batchtopk",
                                          "matryoshka_batchtopk"])
def test_saelens_folders_round_trip(sae_lens, X, tmp_path, record_property, architecture):
    """SAELens -> sksae -> SAELens: the same codes and reconstructions all along."""
    sae, save = _saelens_sae(sae_lens, architecture, X)
    save(tmp_path / "peer")
    original = sae_lens.SAE.load_from_disk(tmp_path / "peer")  # the inference SAE
    z, x_hat = saelens_apply(original, X)
    assert_nontrivial(z)

    model = from_saelens(tmp_path / "peer")
    codes = model.transform(X)
    assert_close(record_property, "codes_from_peer", codes, z, CODES_ATOL)
    assert_close(record_property, "recons_from_peer", model.inverse_transform(z), x_hat,
                 RECONS_ATOL)

    again = sae_lens.SAE.load_from_disk(to_saelens(model, tmp_path / "back"))
    assert again.cfg.architecture() == original.cfg.architecture()
    z2, x_hat2 = saelens_apply(again, X)
    assert_close(record_property, "codes_back", z2, z, CODES_ATOL)
    assert_close(record_property, "recons_back", x_hat2, x_hat, RECONS_ATOL)


# ------------------------------------------------------------------ sparsify
def test_sparsify_loads_a_topk_export(sparsify, fitted, X, tmp_path, record_property):
    """sksae -> sparsify -> sksae for TopK, the architecture sparsify has."""
    model = fitted["topk"]
    codes = model.transform(X)
    recons = model.inverse_transform(codes)
    coder = sparsify.SparseCoder.load_from_disk(to_sparsify(model, tmp_path / "sp"))
    assert (coder.num_latents, coder.d_in, coder.cfg.k) == (D_SAE, D_IN, K)
    z, x_hat = sparsify_apply(coder, X, codes)
    assert_close(record_property, "codes_to_peer", z, codes, CODES_ATOL)
    assert_close(record_property, "recons_to_peer", x_hat, recons, RECONS_ATOL)

    coder.save_to_disk(tmp_path / "saved_by_sparsify")
    back = from_sparsify(tmp_path / "saved_by_sparsify")
    assert_close(record_property, "codes_back", back.transform(X), codes, CODES_ATOL)
    assert_close(record_property, "recons_back", back.inverse_transform(codes), recons,
                 RECONS_ATOL)


def test_sparsify_folders_round_trip(sparsify, X, tmp_path, record_property):
    """sparsify -> sksae -> sparsify: the same codes and reconstructions all along."""
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=K))
    _randomised(coder.encoder, 2)
    with torch.no_grad():
        coder.b_dec.copy_(0.3 * torch.randn(D_IN))
    coder.save_to_disk(tmp_path / "peer")
    original = sparsify.SparseCoder.load_from_disk(tmp_path / "peer")
    z, x_hat = sparsify_apply(original, X)
    assert_nontrivial(z)

    model = from_sparsify(tmp_path / "peer")
    assert model.architecture == "topk" and model.k == K
    assert_close(record_property, "codes_from_peer", model.transform(X), z, CODES_ATOL)
    assert_close(record_property, "recons_from_peer", model.inverse_transform(z), x_hat,
                 RECONS_ATOL)

    again = sparsify.SparseCoder.load_from_disk(to_sparsify(model, tmp_path / "back"))
    # expansion_factor is unused when num_latents is set
    assert again.cfg.to_dict() | {"expansion_factor": 0} == (original.cfg.to_dict()
                                                             | {"expansion_factor": 0})
    z2, x_hat2 = sparsify_apply(again, X)
    assert_close(record_property, "codes_back", z2, z, CODES_ATOL)
    assert_close(record_property, "recons_back", x_hat2, x_hat, RECONS_ATOL)
    for name, tensor in original.state_dict().items():
        assert_array_equal(again.state_dict()[name].numpy(), tensor.numpy(), err_msg=name)
