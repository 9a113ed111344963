"""SparseAutoencoder: the scikit-learn contract, numerics and bad input."""

import pickle

import joblib
import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sksae import SparseAutoencoder
from sksae.datasets import make_sparse_superposition


@pytest.fixture(scope="module")
def toy():
    X, F = make_sparse_superposition(3000, 16, 32, random_state=0, return_features=True)
    return X, F


def small_sae(**kw):
    params = dict(n_components=48, k=4, max_iter=3, batch_size=256, random_state=0,
                  precision="float32")
    params.update(kw)
    return SparseAutoencoder(**params)


def test_fit_transform_shapes_and_sparsity(toy, device):
    X, _ = toy
    sae = small_sae(device=device).fit(X)
    codes = sae.transform(X)
    assert codes.shape == (X.shape[0], 48)
    assert (codes >= 0).all()
    assert ((codes > 0).sum(1) <= 4).all()
    assert sae.components_.shape == (48, 16)
    assert_allclose(np.linalg.norm(sae.components_, axis=1), 1.0, rtol=1e-5)
    assert sae.encoder_weights_.shape == (48, 16)
    assert sae.encoder_bias_.shape == (48,)
    assert sae.decoder_bias_.shape == (16,)
    assert sae.n_components_ == 48 and sae.n_features_in_ == 16
    assert sae.n_iter_ >= 1 and sae.n_steps_ >= sae.n_iter_
    assert len(sae.loss_curve_) == sae.n_steps_
    for key in ("loss", "mse", "fvu", "l0", "dead_fraction", "lr", "epoch"):
        assert len(sae.history_["step"][key]) == sae.n_steps_
    assert len(sae.history_["epoch"]["loss"]) == sae.n_iter_


def test_training_reduces_loss_and_explains_variance(toy):
    X, _ = toy
    sae = small_sae(max_iter=10, max_no_improvement=None).fit(X)
    epochs = sae.history_["epoch"]["loss"]
    assert epochs[-1] < epochs[0]
    assert sae.score(X) > 0.6


def test_default_n_components_is_8x_features(toy):
    X, _ = toy
    sae = SparseAutoencoder(k=4, max_iter=1, random_state=0, precision="float32").fit(X[:500])
    assert sae.n_components_ == 8 * X.shape[1]
    assert sae.transform(X[:5]).shape == (5, 8 * X.shape[1])


def test_score_is_variance_weighted_r2(toy):
    from sklearn.metrics import r2_score

    X, _ = toy
    sae = small_sae().fit(X)
    X_hat = sae.inverse_transform(sae.transform(X))
    assert_allclose(sae.score(X), r2_score(X, X_hat, multioutput="variance_weighted"),
                    rtol=1e-5)


def test_inverse_transform_is_linear_decoder(toy):
    X, _ = toy
    sae = small_sae().fit(X)
    codes = sae.transform(X[:10])
    assert_allclose(sae.inverse_transform(codes),
                    codes @ sae.components_ + sae.decoder_bias_, rtol=1e-5, atol=1e-6)


def test_normalisation_is_folded_into_user_units(toy):
    """Fitting 100 * X gives the same atoms and 100x the codes and biases."""
    X, _ = toy
    a = small_sae(max_iter=1).fit(X)
    b = small_sae(max_iter=1).fit(100 * X)
    # observed (float32, this seed): 1e-10 relative, 1.5e-7, 1.9e-6 and 1.9e-5 absolute
    # (biases of ~23 and codes of ~85 in the units of 100 * X)
    assert_allclose(a.input_scale_, 100 * b.input_scale_, rtol=1e-8)
    assert_allclose(a.components_, b.components_, rtol=0, atol=2e-6)
    assert_allclose(100 * a.decoder_bias_, b.decoder_bias_, rtol=0, atol=1e-4)
    assert_allclose(100 * a.transform(X[:50]), b.transform(100 * X[:50]), rtol=0, atol=5e-4)


def test_transform_rows_are_independent(toy):
    X, _ = toy
    sae = small_sae().fit(X)
    full = sae.transform(X[:64])
    one_by_one = np.vstack([sae.transform(X[i : i + 1]) for i in range(64)])
    assert_allclose(full, one_by_one, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_preserved(toy, dtype):
    X, _ = toy
    X = X.astype(dtype)
    sae = small_sae().fit(X)
    assert sae.transform(X).dtype == dtype
    assert sae.inverse_transform(sae.transform(X)).dtype == dtype
    assert sae.components_.dtype == dtype


def test_integers_become_float64(toy):
    X, _ = toy
    Xi = np.round(X * 10).astype(np.int64)
    sae = small_sae().fit(Xi)
    assert sae.transform(Xi).dtype == np.float64


def test_same_random_state_same_model_on_cpu(toy):
    X, _ = toy
    a = small_sae(device="cpu").fit(X)
    b = small_sae(device="cpu").fit(X)
    assert_array_equal(a.components_, b.components_)
    assert_array_equal(a.transform(X), b.transform(X))
    c = small_sae(device="cpu", random_state=1).fit(X)
    assert not np.array_equal(a.components_, c.components_)


def test_pipeline_with_classifier(toy):
    X, F = toy
    y = (X @ F[0] > np.median(X @ F[0])).astype(int)
    pipe = make_pipeline(StandardScaler(), small_sae(), LogisticRegression(max_iter=300))
    pipe.fit(X, y)
    assert pipe.score(X, y) > 0.7
    assert pipe.predict(X[:7]).shape == (7,)


def test_grid_search_over_k_and_alpha_parallel(toy):
    X, _ = toy
    grid = [{"architecture": ["topk"], "k": [1, 8]},
            {"architecture": ["relu"], "alpha": [0.1, 100.0]}]
    search = GridSearchCV(small_sae(max_iter=2), grid, cv=2, n_jobs=2).fit(X[:1500])
    scores = search.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores))
    ks = search.cv_results_["param_k"]
    # more active latents explain more variance
    assert scores[list(ks).index(8)] > scores[list(ks).index(1)]
    assert search.best_estimator_.n_components_ == 48


def test_clone_gives_unfitted_copy_with_same_params(toy):
    X, _ = toy
    sae = small_sae(k=3).fit(X)
    c = clone(sae)
    assert c.get_params() == sae.get_params()
    assert not hasattr(c, "components_")


@pytest.mark.parametrize("dumper", ["pickle", "joblib"])
def test_serialisation_round_trip(toy, tmp_path, dumper):
    X, _ = toy
    sae = small_sae().fit(X)
    path = tmp_path / "model.bin"
    if dumper == "pickle":
        path.write_bytes(pickle.dumps(sae))
        loaded = pickle.loads(path.read_bytes())
    else:
        joblib.dump(sae, path)
        loaded = joblib.load(path)
    assert_array_equal(loaded.transform(X), sae.transform(X))
    # the pickled model can keep training
    loaded.partial_fit(X[:512])
    assert loaded.n_steps_ > sae.n_steps_


def test_partial_fit_over_chunks(toy):
    X, _ = toy
    sae = small_sae()
    for chunk in np.array_split(X, 6):
        sae.partial_fit(chunk)
    assert sae.n_iter_ == 6
    assert sae.n_steps_ == sum(int(np.ceil(len(c) / 256)) for c in np.array_split(X, 6))
    assert sae.score(X) > 0.3
    first = sae.history_["step"]["loss"][:4].mean()
    last = sae.history_["step"]["loss"][-4:].mean()
    assert last < first


def test_warm_start_continues_training(toy):
    X, _ = toy
    sae = small_sae(max_iter=2, warm_start=True, max_no_improvement=None).fit(X)
    steps, comps = sae.n_steps_, sae.components_.copy()
    sae.fit(X)
    assert sae.n_steps_ == 2 * steps
    assert not np.array_equal(sae.components_, comps)
    cold = small_sae(max_iter=2, max_no_improvement=None).fit(X)
    cold.fit(X)
    assert cold.n_steps_ == steps


def test_early_stopping_stops_before_max_iter(toy):
    X, _ = toy
    # scikit-learn's rule ignores the first min(100, n_samples / batch_size) = 46.875
    # steps: step 47 is the first one counted (it sets the EWA's first minimum)
    sae = small_sae(max_iter=200, max_no_improvement=2, batch_size=64).fit(X)
    # the EWA did not improve on steps 48 and 49: the earliest possible stop
    assert sae.n_steps_ == 47 + 2 and sae.n_iter_ == 2
    assert len(sae.loss_curve_) == 49
    # tol=1e9: the first counted step's decoder change is below tol, so it stops there
    sae = small_sae(max_iter=200, tol=1e9, batch_size=64, max_no_improvement=None).fit(X)
    assert sae.n_steps_ == 47 and sae.n_iter_ == 1


def test_callback_can_stop_training(toy):
    X, _ = toy
    seen = []

    def cb(env):
        seen.append(1)
        return len(seen) < 5

    sae = small_sae(callback=cb, max_iter=10).fit(X)
    assert sae.n_steps_ == 5


def test_custom_init_array(toy):
    X, F = toy
    init = np.vstack([F, F[:16]])
    sae = small_sae(init=init, max_iter=0).fit(X)
    assert_allclose(sae.components_, init / np.linalg.norm(init, axis=1, keepdims=True),
                    rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="init has shape"):
        small_sae(init=F).fit(X)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "infinity")])
def test_nan_inf_rejected(toy, bad, word):
    X, _ = toy
    Xb = X.copy()
    Xb[3, 2] = bad
    with pytest.raises(ValueError, match=word):
        small_sae().fit(Xb)
    sae = small_sae().fit(X)
    with pytest.raises(ValueError, match=word):
        sae.transform(Xb)


def test_wrong_number_of_features(toy):
    X, _ = toy
    sae = small_sae().fit(X)
    with pytest.raises(ValueError, match="features"):
        sae.transform(X[:, :5])
    with pytest.raises(ValueError, match="components"):
        sae.inverse_transform(np.zeros((2, 7)))


def test_k_larger_than_n_components(toy):
    X, _ = toy
    with pytest.raises(ValueError, match="k=64 must be at most n_components=48"):
        small_sae(k=64).fit(X)


def test_sparse_input_gives_clear_type_error(toy):
    X, _ = toy
    with pytest.raises(TypeError, match="[Ss]parse"):
        small_sae().fit(sp.csr_matrix(X))


def test_failed_fit_keeps_previous_model(toy):
    X, _ = toy
    sae = small_sae().fit(X)
    before = {k: v for k, v in vars(sae).items() if k.endswith("_")}
    codes = sae.transform(X[:20])
    sae.set_params(k=1000)
    with pytest.raises(ValueError, match="k=1000 must be at most n_components=48"):
        sae.fit(X[:, :10])  # fewer features and an invalid k
    Xn = X.copy()
    Xn[0, 0] = np.nan
    sae.set_params(k=4)
    with pytest.raises(ValueError, match="Input X contains NaN"):
        sae.fit(Xn)
    with pytest.raises(ValueError, match="X has 10 features, but SparseAutoencoder is "
                                         "expecting 16 features"):
        sae.partial_fit(X[:, :10])
    after = {k: v for k, v in vars(sae).items() if k.endswith("_")}
    assert after.keys() == before.keys()
    assert sae.n_features_in_ == 16
    assert_array_equal(sae.transform(X[:20]), codes)


def test_invalid_parameters_are_named():
    X = np.random.RandomState(0).randn(50, 4)
    with pytest.raises(ValueError, match="architecture"):
        SparseAutoencoder(architecture="nope").fit(X)
    with pytest.raises(ValueError, match="batch_size"):
        SparseAutoencoder(batch_size=0).fit(X)


def test_resuming_does_not_touch_numpy_global_random_state(toy):
    X, _ = toy
    sae = SparseAutoencoder(n_components=48, k=4, max_iter=1, batch_size=256,
                            precision="float32").fit(X)
    np.random.seed(123)
    expected = np.random.RandomState(123)
    expected.rand(3)
    np.random.rand(3)
    sae.partial_fit(X[:512])
    assert np.random.rand() == expected.rand()
