"""sksae.plotting: every function draws on the Axes it is given and returns them."""

import sys

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sksae import SparseAutoencoder, plotting  # noqa: E402
from sksae.datasets import make_sparse_superposition  # noqa: E402


@pytest.fixture(scope="module")
def data():
    X, features = make_sparse_superposition(400, 16, 24, random_state=0,
                                            return_features=True)
    sae = SparseAutoencoder(n_components=32, k=3, max_iter=2, batch_size=64,
                            random_state=0, device="cpu", precision="float32").fit(X)
    return X, features, sae


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_training_curves(data):
    _, _, sae = data
    axes = plotting.plot_training_curves(sae, keys=("loss", "fve", "l0", "nope"), smooth=3)
    assert len(axes) == 3 and axes[1].get_title() == "FVE"
    ax = plotting.plot_training_curves(sae.history_, keys=("lr",), per="epoch")[0]
    assert len(ax.lines[0].get_xdata()) == sae.n_iter_
    with pytest.raises(ValueError, match="None of the requested"):
        plotting.plot_training_curves(sae, keys=("nope",))


def test_feature_density_and_recovery(data):
    X, features, sae = data
    fig, (a, b) = plt.subplots(1, 2)
    assert plotting.plot_feature_density(sae, X, ax=a, label="sae") is a
    assert "dead of 32" in a.get_legend().get_texts()[0].get_text()
    assert plotting.plot_feature_density(sae.transform(X)).patches
    with pytest.raises(ValueError, match="X is required"):
        plotting.plot_feature_density(sae)
    assert plotting.plot_recovery(features, sae, ax=b) is b
    assert "MMCS" in b.get_legend().get_texts()[0].get_text()


def test_atoms(data):
    _, _, sae = data
    ax = plotting.plot_atoms(sae, (4, 4), n_atoms=10)
    img = ax.images[0].get_array()
    assert img.shape == (3 * 5 + 1, 4 * 5 + 1)
    assert plotting.plot_atoms(np.random.rand(5, 12), (2, 2, 3)).images
    with pytest.raises(ValueError, match="patch_shape"):
        plotting.plot_atoms(sae, (3, 3))


def test_dictionary_size_sweep():
    from sklearn.utils import Bunch

    res = Bunch(n_components=np.array([4, 8, 16]), fve=np.array([0.5, 0.7, 0.8]),
                l0=np.array([3.0, 3.0, 3.0]), mmcs_to_previous=np.array([np.nan, 0.8, 0.9]))
    axes = plotting.plot_dictionary_size_sweep(res, label="sae")
    assert [ax.get_title() for ax in axes] == ["FVE", "L0 (active latents per row)",
                                               "MMCS to previous size"]


def test_clear_error_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"sksae\[plot\]"):
        plotting.plot_feature_density(np.ones((3, 2)))
