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
    step = sae.history_["step"]
    axes = plotting.plot_training_curves(sae, keys=("loss", "fve", "l0", "nope"), smooth=3)
    assert len(axes) == 3 and axes[1].get_title() == "FVE"
    for ax, key in zip(axes, ("loss", "fve", "l0")):
        raw, smoothed = ax.lines
        np.testing.assert_array_equal(raw.get_xdata(), np.arange(1, sae.n_steps_ + 1))
        np.testing.assert_array_equal(raw.get_ydata(), step[key])
        # the moving average over 3 steps, written out, drawn from the third step on
        y = step[key]
        np.testing.assert_allclose(smoothed.get_ydata(), (y[:-2] + y[1:-1] + y[2:]) / 3,
                                   rtol=1e-12)
        np.testing.assert_array_equal(smoothed.get_xdata(), np.arange(3, sae.n_steps_ + 1))
    assert axes[0].get_yscale() == "log" and axes[1].get_yscale() == "linear"
    ax = plotting.plot_training_curves(sae.history_, keys=("lr",), per="epoch")[0]
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), np.arange(1, sae.n_iter_ + 1))
    np.testing.assert_allclose(ax.lines[0].get_ydata(),
                               [step["lr"][step["epoch"] == e].mean() for e in range(sae.n_iter_)],
                               rtol=1e-12)
    assert len(ax.lines) == 1  # no smoothing of per-epoch curves
    with pytest.raises(ValueError, match="None of the requested"):
        plotting.plot_training_curves(sae, keys=("nope",))


def test_feature_density_and_recovery(data):
    X, features, sae = data
    fig, (a, b) = plt.subplots(1, 2)
    assert plotting.plot_feature_density(sae, X, ax=a, label="sae", bins=10) is a
    codes = sae.transform(X)
    density = (codes != 0).mean(0)
    n_dead = int((density == 0).sum())
    assert a.get_legend().get_texts()[0].get_text() == f"sae: {n_dead} dead of 32"
    # the bars: a histogram of log10 density of the alive atoms, over their range
    heights, edges = np.histogram(np.log10(density[density > 0]), bins=10)
    bars = a.patches
    np.testing.assert_array_equal([bar.get_height() for bar in bars], heights)
    np.testing.assert_allclose([bar.get_x() for bar in bars], edges[:-1], rtol=1e-12)
    assert sum(bar.get_height() for bar in bars) == 32 - n_dead
    again = plotting.plot_feature_density(codes, bins=10)
    assert [bar.get_height() for bar in again.patches] == [bar.get_height() for bar in bars]
    with pytest.raises(ValueError, match="X is required"):
        plotting.plot_feature_density(sae)
    assert plotting.plot_recovery(features, sae, ax=b, bins=20) is b
    unit = lambda A: A / np.linalg.norm(A, axis=1, keepdims=True)  # noqa: E731
    sims = (unit(features) @ unit(sae.components_).T).max(1)
    heights, _ = np.histogram(sims, bins=np.linspace(min(0.0, sims.min()), 1, 21))
    np.testing.assert_array_equal([bar.get_height() for bar in b.patches], heights)
    assert b.get_legend().get_texts()[0].get_text() == (
        f"MMCS {sims.mean():.3f}, {np.mean(sims >= 0.9):.0%} >= 0.9")
    assert b.lines[0].get_xdata() == [0.9, 0.9]  # the threshold line


def test_atoms(data):
    _, _, sae = data
    ax = plotting.plot_atoms(sae, (4, 4), n_atoms=10)
    img = np.asarray(ax.images[0].get_array())
    assert img.shape == (3 * 5 + 1, 4 * 5 + 1)
    # 10 atoms in a grid of 4 columns, each scaled to [0, 1], separated by blank (NaN) lines
    for i in range(10):
        r, c = divmod(i, 4)
        atom = sae.components_[i].reshape(4, 4)
        want = (atom - atom.min()) / (atom.max() - atom.min())
        np.testing.assert_allclose(img[1 + 5 * r:5 + 5 * r, 1 + 5 * c:5 + 5 * c], want,
                                   rtol=1e-6, atol=1e-7)
    assert np.isnan(img[0]).all() and np.isnan(img[:, 5]).all() and np.isnan(img[11:, 11:]).all()
    assert ax.get_title() == "10 of 32 atoms"
    rgb = np.random.default_rng(0).random((5, 12))
    ax = plotting.plot_atoms(rgb, (2, 2, 3), order=[4, 0])
    img = np.asarray(ax.images[0].get_array())
    assert img.shape == (4, 7, 3) and (img[0] == 1).all()  # colour: white separators
    np.testing.assert_allclose(img[1:3, 1:3], (rgb[4] - rgb[4].min()).reshape(2, 2, 3)
                               / np.ptp(rgb[4]), rtol=1e-12)
    np.testing.assert_allclose(img[1:3, 4:6], (rgb[0] - rgb[0].min()).reshape(2, 2, 3)
                               / np.ptp(rgb[0]), rtol=1e-12)
    with pytest.raises(ValueError, match="patch_shape"):
        plotting.plot_atoms(sae, (3, 3))


def test_dictionary_size_sweep():
    from sklearn.utils import Bunch

    res = Bunch(n_components=np.array([4, 8, 16]), fve=np.array([0.5, 0.7, 0.8]),
                l0=np.array([3.0, 3.0, 3.0]), mmcs_to_previous=np.array([np.nan, 0.8, 0.9]))
    axes = plotting.plot_dictionary_size_sweep(res, label="sae")
    assert [ax.get_title() for ax in axes] == ["FVE", "L0 (active latents per row)",
                                               "MMCS to previous size"]
    for ax, key in zip(axes, ("fve", "l0", "mmcs_to_previous")):
        (line,) = ax.lines
        np.testing.assert_array_equal(line.get_xdata(), [4, 8, 16])
        np.testing.assert_array_equal(line.get_ydata(), res[key])
        assert ax.get_xscale() == "log" and line.get_label() == "sae"


def test_clear_error_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"sksae\[plot\]"):
        plotting.plot_feature_density(np.ones((3, 2)))
