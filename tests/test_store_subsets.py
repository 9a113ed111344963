"""Lazy subsets of an activation store, and scikit-learn's searches over folds of a store."""

import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from joblib import Parallel, delayed
from sklearn.model_selection import GridSearchCV, KFold, cross_validate
from sklearn.pipeline import Pipeline

from sksae import DictionaryLearnerGPU, SparseAutoencoder
from sksae._data import NonFiniteRowError
from sksae.activations import ActivationStore, open_store, save_store
from sksae.datasets import make_sparse_superposition
from sksae.metrics import fve_scorer, make_sparsity_scorer
from sksae.model_selection import dictionary_size_sweep

KEYS = [slice(None), slice(20, 75), slice(90, 10, -7), [3, 99, 3, 40, -1],
        np.arange(100) % 3 == 0, np.array([64, 1, 65, 2], dtype=np.int32)]


@pytest.mark.parametrize("key", KEYS, ids=range(len(KEYS)))
def test_a_subset_reads_exactly_its_rows(small_store, key):
    X, path = small_store
    sub = open_store(path).subset(key)
    expected = X[key]
    assert isinstance(sub, ActivationStore) and sub.shape == expected.shape
    np.testing.assert_array_equal(np.asarray(sub), expected)
    np.testing.assert_array_equal(sub[2:7], expected[2:7])  # a run of rows, or a gather
    pick = [len(expected) - 1, 0, len(expected) - 1]
    np.testing.assert_array_equal(sub[pick], expected[pick])
    np.testing.assert_array_equal(sub[-1], expected[-1])
    np.testing.assert_array_equal(sub.take_raw([1, 0]).numpy(), expected[[1, 0]])
    # a subset of a subset picks among the subset's rows
    np.testing.assert_array_equal(np.asarray(sub.subset([2, 0, 2])), expected[[2, 0, 2]])
    with pytest.raises(IndexError, match="out of range"):
        sub[[len(expected)]]


@st.composite
def row_keys(draw, n):
    """A row key numpy takes for ``n`` rows: a slice, an int list (negatives, repeats), a mask."""
    kind = draw(st.sampled_from(["slice", "ints", "mask"]))
    if kind == "slice":
        bound = st.one_of(st.none(), st.integers(-n - 2, n + 2))
        step = draw(st.one_of(st.none(), st.integers(1, 7), st.integers(-7, -1)))
        return slice(draw(bound), draw(bound), step)
    if kind == "ints":
        return draw(st.lists(st.integers(-n, n - 1), max_size=12)) if n else []
    return np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)


@given(data=st.data())
def test_chained_lazy_indexing_is_numpy_indexing(small_store, data):
    X, path = small_store
    store, expected = open_store(path, indexing="lazy"), X
    key = data.draw(row_keys(len(X)))
    np.testing.assert_array_equal(open_store(path)[key], X[key])  # numpy indexing: read now
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(row_keys(len(expected)))
        store, expected = store[key], expected[key]
        assert isinstance(store, ActivationStore) and store.shape == expected.shape
    np.testing.assert_array_equal(np.asarray(store), expected)
    start = data.draw(st.integers(0, len(expected)))
    stop = data.draw(st.integers(start, len(expected)))
    np.testing.assert_array_equal(store.read_raw(start, stop).numpy(), expected[start:stop])


def test_a_run_of_subset_rows_is_read_as_one_slice(small_store, monkeypatch):
    X, path = small_store
    sub = open_store(path).subset(np.r_[10:50, 70:80])
    gathers = []
    real = ActivationStore._gather
    monkeypatch.setattr(ActivationStore, "_gather",
                        lambda self, *a: gathers.append(1) or real(self, *a))
    np.testing.assert_array_equal(sub[5:40], X[15:50])
    assert gathers == []  # read as rows 15:50 of the layer
    np.testing.assert_array_equal(sub[35:45], X[np.r_[45:50, 70:75]])
    assert gathers == [1]


def test_lazy_indexing_returns_subsets_and_reads_nothing(small_store, tamper_shard):
    X, path = small_store
    tamper_shard(path)
    store = open_store(path, indexing="lazy")
    fold = store[np.arange(40, 100)]  # rows of the altered shard: nothing read yet
    assert isinstance(fold, ActivationStore) and fold.indexing == "lazy"
    assert isinstance(store[5:9, ...], ActivationStore)  # scikit-learn's X[train, ...]
    assert isinstance(store[3], np.ndarray) and isinstance(store[:4, 1:3], np.ndarray)
    np.testing.assert_array_equal(np.asarray(fold[:10]), X[40:50])  # shard 1 only
    np.testing.assert_array_equal(store[:30, [0, 2]], X[:30, [0, 2]])
    with pytest.raises(ValueError, match=r"shard 2 .* SHA-256"):
        np.asarray(fold)
    with pytest.raises(ValueError, match="indexing must be 'numpy' or 'lazy'"):
        open_store(path, indexing="views")
    with pytest.raises(IndexError, match="1-D row index"):
        store.subset(np.zeros((2, 2), dtype=int))


def test_a_subset_pickles_as_its_rows(tmp_path):
    X = np.random.RandomState(0).randn(5000, 64).astype(np.float32)
    store = save_store(X, tmp_path / "s", dtype="float32", shard_rows=1024)
    rows = np.random.RandomState(1).permutation(5000)[:3000]
    sub = open_store(tmp_path / "s", indexing="lazy").subset(rows)
    blob = pickle.dumps(sub)
    assert len(blob) < X.nbytes // 20  # the path, manifest and row numbers, not the values
    back = pickle.loads(blob)
    assert back.indexing == "lazy" and back.shape == (3000, 64)
    np.testing.assert_array_equal(np.asarray(back), X[rows])
    got = Parallel(n_jobs=2, backend="loky")(delayed(np.asarray)(sub[i::2]) for i in range(2))
    np.testing.assert_array_equal(np.concatenate(got), np.concatenate([X[rows][0::2],
                                                                       X[rows][1::2]]))
    assert "subset of 5000 rows" in repr(sub) and repr(store).endswith("'float32')")
    fold = store.subset(np.r_[0:1000, 2000:3000, 7, 8, 9, 4])  # runs travel as (start, length)
    blob = pickle.dumps(fold)
    assert len(blob) < len(pickle.dumps(store)) + 1000
    np.testing.assert_array_equal(np.asarray(pickle.loads(blob)), np.asarray(fold))
    empty = pickle.loads(pickle.dumps(sub.subset([])))
    assert empty.shape == (0, 64)


def test_a_nan_in_a_subset_names_its_row_and_the_layers_row(small_store, tmp_path):
    X, _ = small_store
    X = X.copy()
    X[65, 1] = np.nan
    store = save_store(X, tmp_path / "nan", dtype="float32", shard_rows=30)
    sae = SparseAutoencoder(n_components=8, k=2, max_iter=1, batch_size=16, random_state=0)
    with pytest.raises(NonFiniteRowError,
                       match=r"row 15 \(row 65 of the whole layer, shard 2, "
                             r"layer-000/shard-000002.npy"):
        sae.fit(store.subset(np.arange(50, 100)))
    assert not hasattr(sae, "components_")


# ------------------------------------------------------------------ searches
def _sae(**params):
    return SparseAutoencoder(n_components=24, k=2, max_iter=2, batch_size=64, shuffle=False,
                             random_state=0, precision="float32", **params)


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    """A float32 store and its values; ``no_loading()``: loading a store whole fails."""
    X = make_sparse_superposition(600, 12, 24, avg_active=3, random_state=0)
    X = X.astype(np.float32)
    path = tmp_path_factory.mktemp("folds") / "s"
    save_store(X, path, dtype="float32", shard_rows=128)
    return X, path


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(self, dtype=None, copy=None):
        raise AssertionError("a fold of the store was loaded whole")

    monkeypatch.setattr(ActivationStore, "__array__", refuse)


@pytest.mark.parametrize("scoring", [None, fve_scorer, make_sparsity_scorer(1.5)],
                         ids=["score", "fve", "sparsity"])
def test_grid_search_over_a_lazy_store_streams_its_folds(folds, scoring, no_loading):
    X, path = folds
    pipe = Pipeline([("sae", _sae())])
    grid = {"sae__k": [1, 2, 4]}
    in_memory = GridSearchCV(pipe, grid, cv=3, scoring=scoring).fit(X)
    lazy = GridSearchCV(pipe, grid, cv=3, scoring=scoring).fit(
        open_store(path, indexing="lazy"))
    assert lazy.best_params_ == in_memory.best_params_
    np.testing.assert_allclose(lazy.cv_results_["mean_test_score"],
                               in_memory.cv_results_["mean_test_score"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(lazy.best_estimator_[-1].components_,
                                  in_memory.best_estimator_[-1].components_)


def test_cross_validate_a_dictionary_learner_over_a_lazy_store(folds, no_loading):
    X, path = folds
    est = DictionaryLearnerGPU(n_components=16, alpha=0.1, max_iter=2, batch_size=64,
                               shuffle=False, random_state=0)
    cv = KFold(3, shuffle=True, random_state=0)  # folds of scattered rows: gathered reads
    a = cross_validate(est, X, cv=cv, scoring=fve_scorer)["test_score"]
    b = cross_validate(est, open_store(path, indexing="lazy"), cv=cv,
                       scoring=fve_scorer)["test_score"]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_dictionary_size_sweep_over_a_store_streams_fits_and_metrics(folds, no_loading):
    X, path = folds
    store = open_store(path)
    a = dictionary_size_sweep(_sae(), X, [8, 16, 32])
    b = dictionary_size_sweep(_sae(), store, [8, 16, 32], X_eval=store.subset(slice(0, 300)))
    c = dictionary_size_sweep(_sae(), X, [8, 16, 32], X_eval=X[:300])
    for key in ("fve", "l0", "dead_fraction", "duplicate_fraction", "mmcs_to_previous"):
        np.testing.assert_allclose(b[key], c[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for m, n in zip(a.estimators, b.estimators):  # the same fits: the store was streamed
        np.testing.assert_array_equal(m.components_, n.components_)


def test_train_test_split_of_a_lazy_store_gives_views(small_store):
    from sklearn.model_selection import train_test_split

    X, path = small_store
    train, test = train_test_split(open_store(path, indexing="lazy"), test_size=0.2,
                                   random_state=0)
    X_train, X_test = train_test_split(X, test_size=0.2, random_state=0)
    assert isinstance(train, ActivationStore) and isinstance(test, ActivationStore)
    np.testing.assert_array_equal(np.asarray(train), X_train)
    np.testing.assert_array_equal(np.asarray(test), X_test)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_subsets_of_half_precision_stores(tmp_path, dtype):
    X = np.random.RandomState(0).randn(300, 8).astype(np.float32)
    store = save_store(X, tmp_path / "s", dtype=dtype, shard_rows=70)
    whole = np.asarray(store)  # the stored values (bfloat16 read as float32)
    rows = np.r_[250:300, 5, 140, 141, 142, 69, 70]  # runs and gathers across shards
    sub = store.subset(rows)
    assert sub.dtype == store.dtype
    np.testing.assert_array_equal(np.asarray(sub), whole[rows])
    np.testing.assert_array_equal(sub[48:53], whole[rows[48:53]])
    kw = dict(n_components=16, k=2, max_iter=1, batch_size=16, shuffle=False, random_state=0,
              precision="float32")
    a = SparseAutoencoder(**kw).fit(sub)
    b = SparseAutoencoder(**kw).fit(whole[rows])
    np.testing.assert_array_equal(a.components_, b.components_)
