"""Both estimators on inputs that are not loaded: stores, memory maps, zarr and h5py arrays."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sksae import DictionaryLearnerGPU, SparseAutoencoder
from sksae._accel.prefetch import read_ahead
from sksae._data import Rows
from sksae._stream import StreamSource
from sksae.activations import open_codes, save_store, transform_to_store
from sksae.datasets import make_sparse_superposition

SAE = dict(n_components=32, k=4, max_iter=2, batch_size=64, random_state=0,
           precision="float32")


@pytest.fixture(scope="module")
def data():
    X = make_sparse_superposition(n_samples=1500, n_features=12, n_components=24,
                                  random_state=0).astype(np.float32)
    return X


@pytest.fixture
def store16(data, tmp_path):
    """The data in a float16 store of 5 shards, and the same values as a float32 array."""
    store = save_store(data, tmp_path / "s", dtype="float16", shard_rows=300)
    return store, np.asarray(store).astype(np.float32)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu", "gated", "relu"])
def test_fit_store_equals_fit_array_without_shuffle(store16, architecture, device):
    store, X = store16
    kw = dict(SAE, architecture=architecture, shuffle=False, device=device)
    a = SparseAutoencoder(**kw).fit(X)
    b = SparseAutoencoder(**kw).fit(store)
    for attr in ("components_", "encoder_weights_", "encoder_bias_", "decoder_bias_"):
        np.testing.assert_array_equal(getattr(a, attr), getattr(b, attr))
    np.testing.assert_array_equal(a.loss_curve_, b.loss_curve_)
    assert b.components_.dtype == np.float32


def test_row_shuffle_of_a_store_is_the_array_shuffle(store16):
    store, X = store16
    a = SparseAutoencoder(**SAE, shuffle="rows").fit(X)
    b = SparseAutoencoder(**SAE, shuffle="rows").fit(store)
    np.testing.assert_array_equal(a.components_, b.components_)
    # and "auto" is the row shuffle for an array (what fit did before stores existed)
    c = SparseAutoencoder(**SAE).fit(X)
    np.testing.assert_array_equal(a.components_, c.components_)


def test_block_shuffle_trains_as_well_as_the_row_shuffle(store16):
    store, X = store16
    kw = {k: v for k, v in SAE.items() if k != "random_state"}
    kw["max_iter"] = 4
    rows = [SparseAutoencoder(**kw, shuffle="rows", random_state=s).fit(X).score(X)
            for s in range(3)]
    blocks = [SparseAutoencoder(**kw, shuffle_buffer=256, random_state=s).fit(store).score(X)
              for s in range(3)]
    # the seeds' spread is the noise: the block shuffle stays within it
    noise = max(np.ptp(rows), np.ptp(blocks), 0.01)
    assert abs(np.mean(rows) - np.mean(blocks)) < 2 * noise
    assert min(blocks) > 0.5


def test_block_shuffle_reads_every_row_once_per_epoch(data):
    rows = Rows(data)
    gen = torch.Generator().manual_seed(0)
    source = StreamSource(rows, 64, "cpu", torch.float32, gen, shuffle="blocks",
                          buffer_rows=320)
    assert source.block_rows == 20
    epochs = []
    for _ in range(2):
        batches = list(source.epoch())
        assert [len(b) for b in batches[:-1]] == [64] * (len(batches) - 1)
        got = torch.cat(batches).numpy()
        # every row exactly once: sort both by their bytes
        np.testing.assert_array_equal(np.unique(got, axis=0), np.unique(data, axis=0))
        assert len(got) == len(data)
        epochs.append(got)
    assert not np.array_equal(epochs[0], epochs[1])  # a new order each epoch
    assert not np.array_equal(epochs[0], data)
    # the same generator seed gives the same batches
    again = StreamSource(rows, 64, "cpu", torch.float32, torch.Generator().manual_seed(0),
                         shuffle="blocks", buffer_rows=320)
    np.testing.assert_array_equal(torch.cat(list(again.epoch())).numpy(), epochs[0])


def test_block_shuffle_reads_contiguous_blocks(data):
    reads = []

    class Spy(Rows):
        def read(self, start, stop):
            raise AssertionError("the block shuffle reads into its buffer")

        def read_into(self, out, start, stop):
            reads.append((start, stop))
            return super().read_into(out, start, stop)

        def take(self, rows):
            raise AssertionError("the block shuffle must not gather rows")

    source = StreamSource(Spy(data), 50, "cpu", torch.float32, torch.Generator().manual_seed(1),
                          shuffle="blocks", buffer_rows=160)
    for _ in source.epoch():
        pass
    assert all(stop - start == 10 for start, stop in reads[:-1])
    assert sorted(reads) == [(s, min(s + 10, len(data))) for s in range(0, len(data), 10)]


def test_nan_row_in_shard_3_stops_training_and_leaves_the_model(data, tmp_path):
    bad = data.copy()
    bad[1000, 5] = np.nan  # row 1000 is in shard 3 (300 rows a shard)
    store = save_store(bad, tmp_path / "bad", dtype="float16", shard_rows=300)
    clean = save_store(data, tmp_path / "ok", dtype="float16", shard_rows=300)
    msg = r"NaN or infinity in row 1000 \(shard 3, layer-000/shard-000003\.npy"
    fresh = SparseAutoencoder(**SAE)
    with pytest.raises(ValueError, match=msg):
        fresh.fit(store)
    assert not hasattr(fresh, "components_")
    sae = SparseAutoencoder(**SAE).fit(clean)
    before = {k: v.copy() for k, v in vars(sae).items() if isinstance(v, np.ndarray)}
    steps = sae.n_steps_
    with pytest.raises(ValueError, match=msg):
        sae.partial_fit(store)
    with pytest.raises(ValueError, match=msg):
        sae.transform(store)
    with pytest.raises(ValueError, match=msg):
        sae.set_params(warm_start=True).fit(store)
    assert sae.n_steps_ == steps
    for k, v in before.items():
        np.testing.assert_array_equal(getattr(sae, k), v)
    dl = DictionaryLearnerGPU(n_components=8, max_iter=1, random_state=0, device="cpu")
    with pytest.raises(ValueError, match=msg):
        dl.fit(store)
    assert not hasattr(dl, "components_")


def test_nan_found_in_an_accelerator_batch_is_named_when_read(data):
    """The deferred check of accelerators, run on the CPU: flags read every 32 batches."""
    bad = data.copy()
    bad[777] = np.inf
    rows = Rows(bad)
    source = StreamSource(rows, 10, "cpu", torch.float32, torch.Generator().manual_seed(0),
                          shuffle="none")
    import sksae._stream as stream

    real = stream.host_read_interval
    stream.host_read_interval = lambda device, every_step: 32
    try:
        seen = 0
        with pytest.raises(ValueError, match="NaN or infinity in row 777"):
            for _ in source.epoch():
                seen += 1
    finally:
        stream.host_read_interval = real
    # the flags of batches 65-96 are read when batch 96 is, before it is handed over
    assert seen == 95


def test_sparse_output_gives_the_dense_values(store16):
    store, X = store16
    dense = SparseAutoencoder(**SAE).fit(X)
    sparse = SparseAutoencoder(**SAE, sparse_output=True).fit(X)
    codes = sparse.transform(X)
    assert isinstance(codes, sp.csr_array) and codes.dtype == np.float32
    np.testing.assert_array_equal(codes.toarray(), dense.transform(X))
    assert codes.nnz == np.count_nonzero(dense.transform(X))
    np.testing.assert_allclose(sparse.inverse_transform(codes),
                               dense.inverse_transform(dense.transform(X)), rtol=1e-6,
                               atol=1e-6)
    # from a store, chunk by chunk (chunks of a few rows: several parts stacked)
    import sksae._sae as sae_module

    real = sae_module.inference_chunk_rows
    sae_module.inference_chunk_rows = lambda *a, **k: 97
    try:
        from_store = sparse.transform(store)
    finally:
        sae_module.inference_chunk_rows = real
    np.testing.assert_array_equal(from_store.toarray(), codes.toarray())
    assert sparse.score(store) == pytest.approx(dense.score(X), abs=1e-6)
    empty = sp.csr_array((3, 32), dtype=np.float32)
    np.testing.assert_allclose(sparse.inverse_transform(empty),
                               np.tile(sparse.decoder_bias_, (3, 1)))


def test_score_of_a_store_is_the_array_score(store16):
    store, X = store16
    sae = SparseAutoencoder(**SAE).fit(X)
    import sksae._sae as sae_module

    real = sae_module.inference_chunk_rows
    sae_module.inference_chunk_rows = lambda *a, **k: 128  # 12 chunks merged
    try:
        streamed = sae.score(store)
    finally:
        sae_module.inference_chunk_rows = real
    assert streamed == pytest.approx(sae.score(X), rel=1e-6)


def test_transform_to_store_writes_the_codes_chunk_by_chunk(store16, tmp_path):
    store, X = store16
    sae = SparseAutoencoder(**SAE).fit(X)
    codes = transform_to_store(sae, store, tmp_path / "codes", chunk_rows=100, shard_rows=250)
    assert codes.shape == (len(X), 32) and len(codes._shards) == 5
    expected = sae.transform(X)
    np.testing.assert_array_equal(codes.to_csr().toarray(), expected)
    np.testing.assert_array_equal(open_codes(tmp_path / "codes")[240:260].toarray(),
                                  expected[240:260])
    assert codes.nnz == np.count_nonzero(expected)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        transform_to_store(sae, X, tmp_path / "codes")
    dl = DictionaryLearnerGPU(n_components=8, max_iter=1, random_state=0, device="cpu").fit(X)
    dl_codes = transform_to_store(dl, X, tmp_path / "dl", chunk_rows=400)
    np.testing.assert_allclose(dl_codes.to_csr().toarray(), dl.transform(X), atol=1e-6)


def test_transform_to_store_never_holds_a_chunk_of_dense_codes(store16, tmp_path,
                                                                 monkeypatch):
    # a chunk of 65,536 rows of 24,576 latents is 6 GB of dense codes: a SparseAutoencoder
    # encodes sparse whatever its sparse_output, other estimators in bounded pieces
    import sksae._base

    store, X = store16
    sae = SparseAutoencoder(**SAE).fit(X)
    got, calls = [], []
    transform = SparseAutoencoder.transform

    def spy(self, Z):
        got.append(transform(self, Z))
        return got[-1]

    monkeypatch.setattr(SparseAutoencoder, "transform", spy)
    codes = transform_to_store(sae, store, tmp_path / "codes", chunk_rows=400)
    assert got and all(sp.issparse(c) for c in got) and not sae.sparse_output
    monkeypatch.undo()
    np.testing.assert_array_equal(codes.to_csr().toarray(), sae.transform(X))
    dl = DictionaryLearnerGPU(n_components=8, max_iter=1, random_state=0, device="cpu").fit(X)
    monkeypatch.setattr(sksae._base, "inference_chunk_rows", lambda n, itemsize=4: 70)
    dl_transform = DictionaryLearnerGPU.transform
    monkeypatch.setattr(DictionaryLearnerGPU, "transform",
                        lambda self, Z: calls.append(len(Z)) or dl_transform(self, Z))
    dl_codes = transform_to_store(dl, X, tmp_path / "dl", chunk_rows=400)
    assert max(calls) == 70 and sum(calls) == len(X)
    monkeypatch.undo()
    np.testing.assert_allclose(dl_codes.to_csr().toarray(), dl.transform(X), atol=1e-6)


def test_dictionary_learner_on_a_store(store16):
    store, X = store16
    kw = dict(n_components=8, alpha=0.5, max_iter=2, batch_size=100, random_state=0,
              shuffle=False, device="cpu")
    a = DictionaryLearnerGPU(**kw).fit(X)
    b = DictionaryLearnerGPU(**kw).fit(store)
    np.testing.assert_array_equal(a.components_, b.components_)
    np.testing.assert_array_equal(b.transform(store), a.transform(X))
    # partial_fit of a store: one step per batch_size rows, as partial_fit on each
    c = DictionaryLearnerGPU(**kw).partial_fit(store)
    d = DictionaryLearnerGPU(**kw)
    for start in range(0, len(X), 100):
        d.partial_fit(X[start:start + 100])
    assert c.n_steps_ == d.n_steps_ == 15
    np.testing.assert_array_equal(c.components_, d.components_)


def test_memmaps_train_like_arrays_without_a_copy(data, tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, data.astype(np.float16))
    mm = np.load(path, mmap_mode="r")
    X = mm.astype(np.float32)
    a = SparseAutoencoder(**SAE).fit(X)
    b = SparseAutoencoder(**SAE).fit(mm)  # float16, shuffled by rows as an array
    np.testing.assert_array_equal(a.components_, b.components_)
    np.testing.assert_array_equal(b.transform(mm), a.transform(X))
    assert b.transform(mm).dtype == np.float32
    ints = np.lib.format.open_memmap(tmp_path / "i.npy", mode="w+", dtype=np.int32,
                                     shape=(10, 12))
    with pytest.raises(ValueError, match="of dtype float16, bfloat16 .* got int32"):
        SparseAutoencoder(**SAE).fit(ints)


@pytest.mark.parametrize("Estimator, params", [
    (SparseAutoencoder, SAE),
    (DictionaryLearnerGPU, dict(n_components=16, alpha=0.1, max_iter=2, batch_size=64,
                                random_state=0)),
], ids=["sae", "dict"])
def test_float16_arrays_train_as_float32_without_a_float64_copy(data, Estimator, params,
                                                                  monkeypatch):
    from sksae._data import check_input

    X16 = data.astype(np.float16)
    rows = check_input(Estimator(**params), X16, reset=True)
    assert isinstance(rows, Rows) and rows.X is X16  # read batch by batch, not copied
    a = Estimator(**params).fit(X16.astype(np.float32))
    b = Estimator(**params).fit(X16)
    np.testing.assert_array_equal(b.components_, a.components_)
    assert b.components_.dtype == np.float32 and b.transform(X16).dtype == np.float32
    np.testing.assert_array_equal(b.transform(X16), a.transform(X16.astype(np.float32)))
    from sksae import metrics

    expected = metrics.fve_scorer(b, X16.astype(np.float32))
    monkeypatch.setattr(metrics, "_check_dense", None)  # read in chunks: no whole copy
    assert metrics.fve_scorer(b, X16) == pytest.approx(expected, rel=1e-6)
    c = Estimator(**params).partial_fit(X16[:300]).partial_fit(X16[300:600])
    d = Estimator(**params).partial_fit(X16[:300].astype(np.float32)).partial_fit(
        X16[300:600].astype(np.float32))
    np.testing.assert_array_equal(c.components_, d.components_)  # the same minibatches
    assert c.n_steps_ == d.n_steps_


@pytest.mark.parametrize("dtype, expected", [
    (torch.float32, np.float32), (torch.float64, np.float64), (torch.float16, np.float32),
    (torch.bfloat16, np.float32)])
def test_torch_tensors_train_as_arrays_of_their_values(data, dtype, expected, device):
    X = torch.from_numpy(data).to(device, dtype)
    values = X.cpu().to(torch.float64 if dtype == torch.float64 else torch.float32).numpy()
    for Estimator, params in ((SparseAutoencoder, SAE), (DictionaryLearnerGPU, dict(
            n_components=16, alpha=0.1, max_iter=2, batch_size=64, random_state=0))):
        a = Estimator(**params, device=device).fit(values)
        b = Estimator(**params, device=device).fit(X.requires_grad_(dtype.is_floating_point))
        np.testing.assert_array_equal(b.components_, a.components_)
        assert b.components_.dtype == expected and b.transform(X).dtype == expected
        codes = b.transform(X)
        np.testing.assert_array_equal(codes, a.transform(values))
        np.testing.assert_array_equal(b.inverse_transform(torch.from_numpy(codes)),
                                      b.inverse_transform(codes))
        c = Estimator(**params, device=device).partial_fit(X[:300])
        assert c.components_.dtype == expected
        half = b.inverse_transform(torch.from_numpy(codes).to(dtype))  # codes of any float
        assert half.dtype == expected
    bad = X.detach().clone()
    bad[7, 3] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):  # scanned, or named by its row
        SparseAutoencoder(**SAE, device=device).fit(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tensors_on_an_accelerator_are_read_there_batch_by_batch(data, dtype, device,
                                                                   monkeypatch, tmp_path):
    # on a GPU machine the device fixture's CUDA case is the real one; the CPU case runs the
    # same path (no host copy, no pinned staging, no read-ahead thread) on CPU tensors
    from sksae import _data, metrics
    from sksae._data import check_input

    monkeypatch.setattr(_data, "_stays_on_device", lambda t: True)
    X = torch.from_numpy(data).to(device, dtype)
    values = X.cpu().float().numpy()
    rows = check_input(SparseAutoencoder(**SAE), X, reset=True)
    assert isinstance(rows, Rows) and rows.X.data_ptr() == X.data_ptr()  # not copied
    assert rows.device == X.device and rows.take([5, 2]).device == X.device
    source = StreamSource(rows, 64, device, torch.float32, torch.Generator())
    assert source.depth == 0 and not source._pin
    for Estimator, params in ((SparseAutoencoder, SAE), (DictionaryLearnerGPU, dict(
            n_components=16, alpha=0.1, max_iter=2, batch_size=64, random_state=0))):
        a = Estimator(**params, device=device).fit(values)
        with monkeypatch.context() as m:
            from sksae import _dict_learning

            # the dictionary's initialisation reads every row: there, not through the host
            m.setattr(_dict_learning, "take", None)
            b = Estimator(**params, device=device).fit(X)
        np.testing.assert_array_equal(b.components_, a.components_)
        np.testing.assert_array_equal(b.transform(X), a.transform(values))
        if hasattr(b, "score"):  # SparseAutoencoder's FVE
            assert b.score(X) == pytest.approx(a.score(values), rel=1e-6)
        assert metrics.fve_scorer(b, X) == pytest.approx(metrics.fve_scorer(a, values),
                                                         rel=1e-6)
        c = Estimator(**params, device=device).partial_fit(X[:300])
        d = Estimator(**params, device=device).partial_fit(values[:300])
        np.testing.assert_array_equal(c.components_, d.components_)
        codes = torch.from_numpy(b.transform(values)).to(device)
        np.testing.assert_allclose(b.inverse_transform(codes),
                                   b.inverse_transform(codes.cpu().numpy()), rtol=1e-6)
        stored = transform_to_store(b, X, tmp_path / type(b).__name__, chunk_rows=400)
        np.testing.assert_array_equal(stored.to_csr().toarray(), b.transform(values))
        bad = X.clone()
        bad[700, 3] = float("nan")
        before = b.components_.copy()
        with pytest.raises(ValueError, match="NaN or infinity in row 700"):
            b.fit(bad)
        np.testing.assert_array_equal(b.components_, before)  # the model as it was


def test_zarr_and_h5py_arrays(data, tmp_path):
    zarr = pytest.importorskip("zarr")
    h5py = pytest.importorskip("h5py")
    z = zarr.open_array(str(tmp_path / "z.zarr"), mode="w", shape=data.shape,
                        chunks=(256, 12), dtype="float32")
    z[:] = data
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("acts", data=data, chunks=(256, 12))
    ref = SparseAutoencoder(**SAE, shuffle="rows").fit(data)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        for arr in (z, f["acts"]):
            sae = SparseAutoencoder(**SAE, shuffle="rows").fit(arr)
            np.testing.assert_array_equal(sae.components_, ref.components_)
            np.testing.assert_array_equal(sae.transform(arr), ref.transform(data))
            assert sae.score(arr) == pytest.approx(ref.score(data), rel=1e-6)


def test_out_of_core_inputs_are_checked_like_arrays(store16, tmp_path):
    store, X = store16
    sae = SparseAutoencoder(**SAE).fit(X)
    other = save_store(np.zeros((10, 5), np.float32), tmp_path / "o")
    with pytest.raises(ValueError, match="X has 5 features, but SparseAutoencoder is "
                                         "expecting 12 features"):
        sae.transform(other)
    with pytest.raises(ValueError, match="has 5 features"):
        sae.score(other)
    k_too_big = SparseAutoencoder(n_components=8, k=9)
    with pytest.raises(ValueError, match="k"):
        k_too_big.fit(store)


def test_read_ahead_raises_where_the_producer_failed_and_stops_its_thread():
    import threading

    def items():
        yield 1
        yield 2
        raise RuntimeError("disk gone")

    got = []
    with pytest.raises(RuntimeError, match="disk gone"):
        for x in read_ahead(items(), depth=2):
            got.append(x)
    assert got == [1, 2]

    def endless():
        i = 0
        while True:
            i += 1
            yield i

    gen = read_ahead(endless(), depth=2)
    assert next(gen) == 1
    gen.close()
    assert not any(t.name == "sksae-read-ahead" for t in threading.enumerate())
    assert list(read_ahead(iter([1, 2, 3]), depth=0)) == [1, 2, 3]


def test_row_samples_stay_small_for_huge_inputs():
    from sksae._data import sample_rows, sample_rows_torch

    rs = np.random.RandomState(0)
    np.testing.assert_array_equal(sample_rows(np.random.RandomState(0), 1000, 10),
                                  rs.choice(1000, 10, replace=False))  # as before, small n
    big = sample_rows(np.random.RandomState(0), 10**12, 5000)
    assert len(np.unique(big)) == 5000 and big.min() >= 0 and big.max() < 10**12
    gen = torch.Generator().manual_seed(0)
    expected = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:10].numpy()
    np.testing.assert_array_equal(sample_rows_torch(gen, 1000, 10), expected)
    big = sample_rows_torch(torch.Generator().manual_seed(0), 10**12, 5000)
    assert len(np.unique(big)) == 5000 and big.max() < 10**12
