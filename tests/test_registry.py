"""An architecture defined outside the package goes through every path of sksae.

Registered from this test file, with no edit to sksae: it trains, transforms,
saves and loads, exports to SAELens (its mapping allows it), appears among the
CLI's choices and trains from the CLI; its own hyperparameter travels in
``architecture_params`` and is validated against the constraints it declares.
"""

import json
from numbers import Real

import numpy as np
import pytest
from sklearn.utils._param_validation import Interval

from sksae import SparseAutoencoder, load, save
from sksae.__main__ import build_parser, main
from sksae.architectures import (REGISTRY, Architecture, EncodeOutput, PenaltyWarmup,
                                 available, register)
from sksae.interop import from_saelens, to_saelens


class FixedThreshold(PenaltyWarmup, Architecture):
    """z = pre * 1[pre > t] with a fixed threshold t and an L1 penalty on the codes."""

    name = "fixed_threshold_test"
    hyperparameters = {
        "alpha": [Interval(Real, 0, None, closed="left")],
        "threshold": [Interval(Real, 0, None, closed="left")],
    }
    defaults = {"threshold": 0.1}
    decoder_in_losses = False
    saelens_architecture = "jumprelu"

    def encode(self, p, x_BD, training=False, ws=None):
        pre = self.pre_activation(p, x_BD)
        z = pre * (pre > self.hparams["threshold"]).to(pre.dtype)
        return EncodeOutput(z, pre) if training else z

    def losses(self, inp):
        return {"l1": inp.coef["sparsity"] * self.hparams["alpha"] * inp.enc.codes.sum(-1).mean()}

    def to_saelens(self, model):
        d_sae = model.components_.shape[0]
        t = self.hparams["threshold"]
        return {"b_enc": model.encoder_bias_, "threshold": np.full(d_sae, t)}, {}


@pytest.fixture
def registered():
    register(FixedThreshold)
    yield FixedThreshold.name
    del REGISTRY[FixedThreshold.name]


@pytest.fixture(scope="module")
def X():
    return np.random.RandomState(0).randn(300, 6).astype(np.float32)


def _model(**kw):
    kw = {"architecture_params": {"threshold": 0.3}, **kw}
    return SparseAutoencoder(n_components=12, architecture=FixedThreshold.name, alpha=0.01,
                             max_iter=2, batch_size=64, normalize=False, device="cpu",
                             precision="float32",
                             random_state=0, **kw)


def _expected_codes(model, X):
    pre = (X - model.decoder_bias_) @ model.encoder_weights_.T + model.encoder_bias_
    return pre * (pre > 0.3)


def test_outside_architecture_fits_transforms_saves_and_loads(registered, X, tmp_path):
    assert registered in available()
    model = _model().fit(X)
    codes = model.transform(X)
    np.testing.assert_allclose(codes, _expected_codes(model, X), rtol=1e-5, atol=1e-5)
    assert (codes > 0).any() and (codes == 0).any()
    assert "l1" in model.history_["step"]
    loaded = load(save(model, tmp_path / "m"))
    assert loaded.architecture == registered
    assert loaded.architecture_params == {"threshold": 0.3}
    np.testing.assert_array_equal(loaded.transform(X), codes)


def test_outside_architecture_exports_to_saelens(registered, X, tmp_path):
    model = _model().fit(X)
    folder = to_saelens(model, tmp_path / "saelens")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    back = from_saelens(folder, device="cpu")  # read by the built-in JumpReLU
    assert back.architecture == "jumprelu"
    np.testing.assert_allclose(back.transform(X), model.transform(X), rtol=1e-5, atol=1e-6)


def test_outside_architecture_in_the_cli(registered, X, tmp_path):
    fit = build_parser()._subparsers._group_actions[0].choices["fit"]
    choices = next(a.choices for a in fit._actions if "--architecture" in a.option_strings)
    assert registered in choices
    acts = tmp_path / "acts.npy"
    np.save(acts, X)
    out = tmp_path / "cli_model"
    assert main(["fit", str(acts), "-o", str(out), "--architecture", registered,
                 "--architecture-params", '{"threshold": 0.3}', "--n-components", "12",
                 "--max-iter", "1", "--batch-size", "64", "--device", "cpu", "-q"]) == 0
    model = load(out)
    assert model.architecture == registered and model.architecture_params == {"threshold": 0.3}
    np.testing.assert_allclose(model.transform(X), _expected_codes(model, X), rtol=1e-5,
                               atol=1e-5)


def test_architecture_params_are_checked_against_the_declaration(registered, X):
    with pytest.raises(ValueError, match=r"does not take.*\['threshold'\]"):
        _model(architecture_params={"treshold": 0.3}).fit(X)
    with pytest.raises(ValueError, match="threshold"):
        SparseAutoencoder(architecture=registered, architecture_params={"threshold": -1.0},
                          max_iter=1, device="cpu").fit(X)


def test_unregistered_name_is_refused_with_the_registered_ones(X):
    with pytest.raises(ValueError, match="topk"):
        SparseAutoencoder(architecture="fixed_threshold_test", device="cpu").fit(X)


def test_register_refuses_what_is_not_an_architecture():
    with pytest.raises(TypeError, match="Architecture subclass"):
        register(int)

    class Nameless(Architecture):
        pass

    with pytest.raises(ValueError, match="name"):
        register(Nameless)
    assert "" not in REGISTRY and None not in REGISTRY
