import numpy as np
import pytest
import torch
from joblib import parallel_config
from sklearn.decomposition import MiniBatchDictionaryLearning
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from sksae import SparseAutoencoder
from sksae.datasets import make_sparse_superposition
from sksae.metrics import (
    duplicate_fraction,
    fve_scorer,
    l0,
    make_mmcs_scorer,
    mean_max_cosine_similarity,
)
from sksae.model_selection import dictionary_size_sweep

pytestmark = pytest.mark.filterwarnings(
    "ignore::sklearn.exceptions.ConvergenceWarning"
)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # The SAEs here are tiny: a second intra-op thread only adds
    # synchronisation (10x slower per step on a busy 2-core machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mbdl():
    return MiniBatchDictionaryLearning(
        alpha=0.1, max_iter=2, batch_size=64, fit_algorithm="cd",
        transform_algorithm="lasso_lars", transform_alpha=0.05,
        positive_code=True, random_state=0,
    )


@pytest.fixture(scope="module")
def toy():
    return make_sparse_superposition(
        400, 8, 12, avg_active=2, random_state=0, return_features=True
    )


def test_sweep_result_layout(toy):
    X, F = toy
    res = dictionary_size_sweep(_mbdl(), X, [8, 4, 16, 8], true_features=F)
    np.testing.assert_array_equal(res.n_components, [4, 8, 16])
    for key in ("fve", "l0", "dead_fraction", "duplicate_fraction",
                "mmcs_to_previous", "mmcs_to_truth"):
        assert res[key].shape == (3,), key
    assert np.isnan(res.mmcs_to_previous[0])
    assert np.all((res.mmcs_to_previous[1:] > 0) & (res.mmcs_to_previous[1:] <= 1))
    assert [e.n_components for e in res.estimators] == [4, 8, 16]

    # Every entry is the documented metric of the fitted clone.
    small, big = res.estimators[1:]
    codes_small, codes_big = small.transform(X), big.transform(X)
    assert res.fve[2] == pytest.approx(fve_scorer(big, X))
    assert res.l0[2] == pytest.approx(l0(codes_big))
    assert res.mmcs_to_truth[2] == pytest.approx(
        mean_max_cosine_similarity(F, big.components_)
    )
    alive_s = (codes_small != 0).any(0)
    alive_b = (codes_big != 0).any(0)
    assert res.dead_fraction[2] == pytest.approx(1 - alive_b.mean())
    assert res.mmcs_to_previous[2] == pytest.approx(
        mean_max_cosine_similarity(small.components_[alive_s],
                                   big.components_[alive_b])
    )
    assert res.duplicate_fraction[2] == pytest.approx(
        duplicate_fraction(big.components_[alive_b]) * alive_b.mean()
    )


def test_sweep_eval_set_pipeline_and_errors(toy):
    X, _ = toy
    res = dictionary_size_sweep(_mbdl(), X[:300], [4, 8], X_eval=X[300:])
    assert "mmcs_to_truth" not in res
    assert res.fve[1] == pytest.approx(fve_scorer(res.estimators[1], X[300:]))

    pipe = Pipeline([("id", FunctionTransformer()), ("dl", _mbdl())])
    res = dictionary_size_sweep(pipe, X, [4, 6], param_name="dl__n_components")
    assert res.estimators[1][-1].components_.shape == (6, 8)

    with pytest.raises(ValueError, match="param_name"):
        dictionary_size_sweep(pipe, X, [4, 6])
    with pytest.raises(ValueError, match="positive sizes"):
        dictionary_size_sweep(_mbdl(), X, [0, 4])


def test_sweep_parallel_matches_serial(toy):
    X, F = toy
    serial = dictionary_size_sweep(_mbdl(), X, [4, 8], true_features=F)
    with parallel_config(backend="threading"):  # no process start-up cost
        parallel = dictionary_size_sweep(
            _mbdl(), X, [4, 8], true_features=F, n_jobs=2
        )
    for key in ("fve", "l0", "dead_fraction", "mmcs_to_previous", "mmcs_to_truth"):
        np.testing.assert_allclose(parallel[key], serial[key], err_msg=key)


def test_grid_search_with_mmcs_scorer_picks_true_sparsity():
    # 16 features in 8 dims, 3 active on average. Too weak an L1 penalty gives
    # dense codes and mixed atoms, too strong kills atoms; the ground-truth MMCS
    # scorer picks the penalty whose sparsity matches the data.
    X, F = make_sparse_superposition(
        2000, 8, 16, avg_active=3, random_state=0, return_features=True
    )
    sae = SparseAutoencoder(
        n_components=16, architecture="relu", max_iter=10, batch_size=128,
        learning_rate=0.01, max_no_improvement=None, device="cpu", random_state=0,
    )
    search = GridSearchCV(
        sae, {"alpha": [0.1, 1.0, 10.0]}, scoring=make_mmcs_scorer(F), cv=2
    ).fit(X)
    assert search.best_params_ == {"alpha": 1.0}
    assert search.best_score_ > 0.83
    assert 2.0 <= l0(search.best_estimator_.transform(X)) <= 5.0


@pytest.mark.slow
def test_size_sweep_finds_true_number_of_features():
    # 64 true features in 32 dims. Below 64 atoms every atom is used and a
    # larger dictionary finds new directions (low MMCS to the smaller one);
    # past 64 the extra atoms die or duplicate, and neighbouring sizes agree.
    X, F = make_sparse_superposition(
        3000, 32, 64, avg_active=3, random_state=0, return_features=True
    )
    sae = SparseAutoencoder(
        architecture="relu", alpha=1.0, max_iter=12, batch_size=256,
        learning_rate=0.01, max_no_improvement=None, device="cpu", random_state=0,
    )
    res = dictionary_size_sweep(
        sae, X, [16, 32, 64, 128, 256], true_features=F, n_jobs=1
    )
    below, above = slice(0, 3), slice(3, 5)  # sizes <= 64, sizes > 64
    wasted = res.dead_fraction + res.duplicate_fraction
    assert wasted[below].max() < 0.2
    assert wasted[above].min() > 0.3
    # Cross-size agreement saturates once the smaller dictionary reaches 64.
    assert np.all(res.mmcs_to_previous[1:3] < 0.9)
    assert np.all(res.mmcs_to_previous[above] > 0.92)
    knee = res.n_components[np.argmax(res.mmcs_to_previous > 0.92) - 1]
    assert knee == 64
    # Recovery of the truth: poor below 64 atoms, near-complete from 64 on.
    assert np.all(res.mmcs_to_truth[:2] < 0.85)
    assert np.all(res.mmcs_to_truth[2:] > 0.9)
    assert res.fve[2:].min() > 0.85 > res.fve[:2].max()
