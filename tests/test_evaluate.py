"""sksae.metrics.evaluate against independent numpy computations, over arrays, memmaps, stores."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import MiniBatchDictionaryLearning

from sksae import SparseAutoencoder
from sksae.activations import loss_recovered, save_store
from sksae.metrics import evaluate


def _reference(X, X_hat, codes):
    """The core metrics in plain numpy, on whole arrays (float64)."""
    X, X_hat, codes = (np.asarray(a, dtype=np.float64) for a in (X, X_hat, codes))
    resid = X - X_hat
    centred = X - X.mean(0)
    nx, nh = np.linalg.norm(X, axis=1), np.linalg.norm(X_hat, axis=1)
    density = (codes != 0).mean(0)
    hc = X_hat - X.mean(0)
    return {
        "explained_variance": 1 - (resid ** 2).sum() / (centred ** 2).sum(),
        "mse": (resid ** 2).mean(),
        "cossim": np.mean((X * X_hat).sum(1) / (nx * nh)),
        "l2_ratio": np.mean(nh / nx),
        "relative_reconstruction_bias": (hc * centred).sum() / (hc ** 2).sum(),
        "l0": (codes != 0).sum(1).mean(),
        "l1": np.abs(codes).sum(1).mean(),
        "frac_alive": (density > 0).mean(),
        "freq_over_1_percent": (density > 0.01).mean(),
        "freq_over_10_percent": (density > 0.1).mean(),
    }, density


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    # an offset far larger than the spread: centring must not lose it
    X = (rng.normal(size=(3000, 10)) * rng.uniform(0.5, 2, 10) + 50.0).astype(np.float32)
    sae = SparseAutoencoder(n_components=40, k=5, max_iter=2, random_state=0,
                            precision="float32").fit(X)
    return X, sae


def _check(result, X, estimator):
    codes = estimator.transform(X)
    codes = codes.toarray() if hasattr(codes, "toarray") else codes
    X_hat = estimator.inverse_transform(codes)
    want, density = _reference(X, X_hat, codes)
    for key, value in want.items():
        assert result[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    np.testing.assert_allclose(result.feature_density, density, rtol=0, atol=0)
    assert result.n_samples == X.shape[0]


def test_evaluate_matches_numpy_in_chunks(data):
    X, sae = data
    for chunk_rows in (None, 700, 1):
        _check(evaluate(sae, X, chunk_rows=chunk_rows), X, sae)


def test_evaluate_over_memmaps_and_stores(data, tmp_path):
    X, sae = data
    path = tmp_path / "x.npy"
    np.save(path, X)
    _check(evaluate(sae, np.load(path, mmap_mode="r"), chunk_rows=999), X, sae)
    store = save_store(X, tmp_path / "store", dtype="float32", shard_rows=1100)
    _check(evaluate(sae, store, chunk_rows=512), X, sae)
    _check(evaluate(sae.set_params(sparse_output=True), store), X, sae)
    sae.set_params(sparse_output=False)


def test_evaluate_signed_codes_and_dead_latents():
    """scikit-learn's dictionary learning (signed codes: L1 of |codes|), and a latent that
    never fires, one that fires on < 1% and one on > 10% of the rows."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 6))
    mbdl = MiniBatchDictionaryLearning(n_components=8, alpha=0.3, max_iter=3,
                                       transform_algorithm="lasso_cd", transform_alpha=0.3,
                                       random_state=0).fit(X)
    result = evaluate(mbdl, X, chunk_rows=128)
    _check(result, X, mbdl)
    codes = mbdl.transform(X)
    assert (codes < 0).any()
    assert result.l1 > np.abs(codes.sum(1)).mean()
    zero = X.copy()
    zero[0] = 0.0  # a zero row: left out of the L2 ratio, cosine 0
    res = evaluate(mbdl, zero)
    X_hat = mbdl.inverse_transform(mbdl.transform(zero))
    nx, nh = np.linalg.norm(zero, axis=1), np.linalg.norm(X_hat, axis=1)
    assert res.l2_ratio == pytest.approx(np.mean(nh[1:] / nx[1:]), rel=1e-9)
    both = (nx > 0) & (nh > 0)
    cos = (zero * X_hat).sum(1)[both] / (nx * nh)[both]
    assert res.cossim == pytest.approx(cos.sum() / len(zero), rel=1e-9)


def test_density_thresholds():
    """Latents with hand-set densities: 0, 0.5%, 5% and 50%."""
    class Fixed:
        components_ = np.eye(4)

        def transform(self, X):
            return X

        def inverse_transform(self, codes):
            return codes

    X = np.zeros((1000, 4))
    X[:5, 1] = 1.0
    X[:50, 2] = 2.0
    X[::2, 3] = 3.0
    r = evaluate(Fixed(), X)
    assert r.frac_alive == 0.75
    assert r.freq_over_1_percent == 0.5
    assert r.freq_over_10_percent == 0.25
    assert r.explained_variance == 1.0 and r.mse == 0.0
    assert r.l0 == pytest.approx((5 + 50 + 500) / 1000)


def test_evaluate_with_a_model_adds_loss_recovered(data):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 10), torch.nn.Linear(10, 10),
                                torch.nn.Linear(10, 11))
    tokens = torch.randint(0, 11, (6, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        X = model[:2](tokens).reshape(-1, 10).numpy()
    sae = SparseAutoencoder(n_components=20, k=4, max_iter=5, random_state=0,
                            precision="float32").fit(X)
    result = evaluate(sae, X, model=model, layer="1", batches=tokens.split(3))
    alone = loss_recovered(model, "1", sae, tokens.split(3))
    for key, value in alone.items():
        assert result[key] == pytest.approx(value, rel=1e-12), key
    _check(result, X, sae)
    with pytest.raises(ValueError, match="layer and batches"):
        evaluate(sae, X, model=model)
