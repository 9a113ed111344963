"""Activation stores at scale: open files, memory held while writing, subsets of many rows.

The sizes here are small; what is checked is what grows with a store: how many
shards stay mapped, how much of a shard ``save_store`` holds, and whether a
subset of a slice costs memory in proportion to its rows.
"""

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import threading
import tracemalloc


import numpy as np
import pytest

from sksae.activations import _store, open_store, save_store
from sksae.activations._store import StoreWriter

N_ROWS, SHARD_ROWS = 400, 10  # 40 shards


@pytest.fixture
def many_shards(tmp_path):
    """``(X, path)``: 400 float32 rows of 3 features in 40 shards of 10 rows."""
    X = np.random.RandomState(0).randn(N_ROWS, 3).astype(np.float32)
    save_store(X, tmp_path / "s", dtype="float32", shard_rows=SHARD_ROWS)
    return X, tmp_path / "s"


def _mapped(store):
    """How many of the store's shards are memory-mapped now."""
    maps = store._maps.values() if isinstance(store._maps, dict) else store._maps
    return sum(m is not None for m in maps)


def _open_fds():
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None


# ------------------------------------------------------------------ open shards
def test_reading_every_shard_keeps_only_the_cap_mapped(many_shards, monkeypatch):
    monkeypatch.setattr(_store, "_MAX_OPEN_SHARDS", 4, raising=False)
    X, path = many_shards
    store = open_store(path)
    fds = _open_fds()
    np.testing.assert_array_equal(np.asarray(store), X)
    rows = np.random.RandomState(1).randint(0, N_ROWS, 300)  # scattered, repeats
    np.testing.assert_array_equal(store.take_raw(rows).numpy(), X[rows])
    np.testing.assert_array_equal(store.read_raw(5, 395).numpy(), X[5:395])
    np.testing.assert_array_equal(store[::-7], X[::-7])
    sub = store.subset(rows)  # a subset reads through its parent's maps
    np.testing.assert_array_equal(np.asarray(sub), X[rows])
    np.testing.assert_array_equal(np.asarray(np.asarray(store)), X)  # again, maps reopened
    assert _mapped(store) <= 4
    if fds is not None:
        assert _open_fds() - fds <= 4  # the maps let go closed their files
    blob = pickle.dumps(sub)  # the maps stay in this process
    assert len(blob) < 20_000
    np.testing.assert_array_equal(np.asarray(pickle.loads(blob)), X[rows])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_NOFILE on Linux")
def test_a_store_of_more_shards_than_open_files_reads(tmp_path):
    # 300 shards under a limit of 40 more open files than the process has: every shard
    # kept mapped would fail with "Too many open files".
    X = np.arange(300 * 2, dtype=np.float32).reshape(300, 2)
    save_store(X, tmp_path / "s", dtype="float32", shard_rows=1)
    script = f"""
import os, resource, numpy as np
from sksae.activations import _store, open_store
_store._MAX_OPEN_SHARDS = 16
store = open_store({str(tmp_path / "s")!r})
n = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 40, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
X = np.asarray(store)
got = store.take_raw(np.random.RandomState(0).permutation(300)).numpy()
print(X.sum(), got.sum())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(X.sum())] * 2


def test_reads_from_two_threads_under_a_small_cap_are_right(many_shards, monkeypatch):
    # the read-ahead thread reads while the main thread may: maps are evicted under both
    monkeypatch.setattr(_store, "_MAX_OPEN_SHARDS", 2, raising=False)
    X, path = many_shards
    store = open_store(path)
    errors = []

    def read(seed):
        rng = np.random.RandomState(seed)
        try:
            for _ in range(60):
                start = rng.randint(0, N_ROWS)
                stop = rng.randint(start, N_ROWS + 1)
                np.testing.assert_array_equal(store.read_raw(start, stop).numpy(),
                                              X[start:stop])
                rows = rng.randint(0, N_ROWS, 25)
                np.testing.assert_array_equal(store.take_raw(rows).numpy(), X[rows])
        except Exception as exc:  # noqa: BLE001 - reported on the main thread
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _mapped(store) <= 2


def test_a_shard_reopened_after_eviction_is_not_hashed_again(many_shards, monkeypatch):
    monkeypatch.setattr(_store, "_MAX_OPEN_SHARDS", 4, raising=False)
    X, path = many_shards
    hashed = _counting_checks(monkeypatch)
    store = open_store(path)  # verify="lazy"
    for _ in range(2):
        np.testing.assert_array_equal(np.asarray(store), X)
        np.testing.assert_array_equal(np.asarray(store.subset(slice(None, None, -1))), X[::-1])
    assert sorted(hashed) == [(i, 0) for i in range(40)]  # one block per shard, once


# ------------------------------------------------------------------ save_store
def test_the_default_shard_holds_about_a_gib():
    assert _store._default_shard_rows(4096, "float16") == 2**30 // (4096 * 2) == 131072
    assert _store._default_shard_rows(4096, "bfloat16") == 131072
    assert _store._default_shard_rows(4096, "float32") == 65536
    assert _store._default_shard_rows(768, "float64") == 2**30 // (768 * 8)
    assert _store._default_shard_rows(2**28, "float64") == 1  # a row over a GiB: one a shard


def test_save_store_sizes_its_shards_in_bytes_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(_store, "_SHARD_BYTES", 1600, raising=False)
    X = np.random.RandomState(0).randn(1000, 8).astype(np.float32)
    store = save_store(X, tmp_path / "d", dtype="float16")  # 16 bytes a row: 100 a shard
    assert store.n_shards == 10
    assert {s["rows"] for s in store.manifest["shards"]} == {100}
    explicit = save_store(X, tmp_path / "e", dtype="float16", shard_rows=300)
    assert [s["rows"] for s in explicit.manifest["shards"]] == [300, 300, 300, 100]
    np.testing.assert_array_equal(np.asarray(explicit), np.asarray(store))
    with pytest.raises(ValueError, match="shard_rows must be at least 1"):
        save_store(X, tmp_path / "z", dtype="float16", shard_rows=0)


def test_save_store_holds_a_chunk_not_a_shard(tmp_path):
    n, d, shard_rows, chunk_rows = 16384, 256, 8192, 1024  # shards of 8 MiB, chunks of 1
    chunk_bytes = chunk_rows * d * 4
    X = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.float32, (n, d))
    X[:] = np.random.RandomState(0).randn(n, d)
    X.flush()
    X = np.load(tmp_path / "x.npy", mmap_mode="r")
    tracemalloc.start()
    try:
        store = save_store(X, tmp_path / "s", dtype="float32", shard_rows=shard_rows,
                           chunk_rows=chunk_rows)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * chunk_bytes, peak  # the old writer joined each shard: over 8 MiB
    assert store.n_shards == 2
    np.testing.assert_array_equal(np.asarray(open_store(tmp_path / "s", verify="full")), X)
    assert not list((tmp_path / "s" / "layer-000").glob("*.tmp"))


def test_a_save_interrupted_mid_shard_leaves_the_completed_shards(tmp_path):
    X = np.random.RandomState(0).randn(100, 4).astype(np.float32)

    class FailsAt:
        shape, dtype = X.shape, X.dtype

        def __getitem__(self, key):
            if key.stop > 75:
                raise OSError("the disk went away")
            return X[key]

    with pytest.raises(OSError, match="disk went away"):
        save_store(FailsAt(), tmp_path / "s", dtype="float32", shard_rows=30, chunk_rows=10)
    manifest = _store._read_manifest(tmp_path / "s")
    assert not manifest["complete"] and [s["rows"] for s in manifest["shards"]] == [30, 30]
    assert sorted(f.name for f in (tmp_path / "s" / "layer-000").iterdir()) == [
        "shard-000000.npy", "shard-000000.sha256", "shard-000001.npy", "shard-000001.sha256"]
    np.testing.assert_array_equal(np.asarray(open_store(tmp_path / "s", verify="full")),
                                  X[:60])


def test_a_streamed_shard_file_is_what_numpy_writes(tmp_path):
    a = np.random.RandomState(0).randn(7, 3).astype("<f2")
    writer = StoreWriter(tmp_path / "s", {"a": 3}, "float16", {})
    writer._write_shard_chunks(7, [a[:2], a[2:2], a[2:]])
    with pytest.raises(ValueError, match="5 rows were given for a shard of 7"):
        writer._write_shard_chunks(7, [a[:5]])
    with pytest.raises(ValueError, match="expected rows of 3 float16 values"):
        writer._write_shard_chunks(7, [a.astype(np.float32)])
    writer.close()
    expected = io.BytesIO()
    np.lib.format.write_array(expected, a)
    assert (tmp_path / "s" / "layer-000" / "shard-000000.npy").read_bytes() == \
        expected.getvalue()
    assert sorted(f.name for f in (tmp_path / "s" / "layer-000").iterdir()) == [
        "shard-000000.npy", "shard-000000.sha256"]
    np.testing.assert_array_equal(np.asarray(open_store(tmp_path / "s", verify="full")), a)


# ------------------------------------------------------------------ subsets of slices
def _virtual_store(path, n):
    """A float16 store of ``n`` rows of 1 feature, all zero, in one sparse shard file."""
    save_store(np.zeros((1, 1), np.float32), path, dtype="float16")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f2", "fortran_order": False, "shape": (n, 1)})
    with open(path / "layer-000" / "shard-000000.npy", "wb") as f:
        f.write(header.getvalue())
        f.truncate(len(header.getvalue()) + 2 * n)  # a hole: no disk, no memory
    manifest = _store._read_manifest(path)
    manifest["shards"][0]["rows"] = manifest["n_rows"] = n
    # no block digests of the hole (never checked: verify="none"), as older stores list it
    manifest["shards"][0]["files"]["activations"] = {
        "file": "layer-000/shard-000000.npy", "sha256": "0" * 64}
    _store._write_manifest(path, manifest)
    return open_store(path, verify="none")


def test_a_subset_of_a_slice_costs_nothing_per_row(tmp_path):
    # (opening the store included: its manifest is read into a buffer of its size, not of
    # the 64 MiB bound)
    n = 30_000_000  # ids of every row would take 240 MB
    store = _virtual_store(tmp_path / "v", n)
    tracemalloc.start()
    try:
        train = store.subset(slice(0, n - 1000))  # what the CLI's --holdout takes
        back = store.subset(slice(None, None, -3)).subset(slice(10, -10, 2))
        lazy = open_store(tmp_path / "v", verify="none", indexing="lazy")[5:][::7][-100:]
        blobs = [pickle.dumps(v) for v in (train, back, lazy)]
        again = [pickle.loads(b) for b in blobs]
        np.testing.assert_array_equal(train[-3:], np.zeros((3, 1), np.float16))
        assert train.take_raw([n - 1001]).shape == (1, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak
    assert all(len(b) < 10_000 for b in blobs)
    assert train.shape == (n - 1000, 1) and again[0].shape == train.shape
    expected_back = range(n)[::-3][10:-10:2]
    assert back.shape == again[1].shape == (len(expected_back), 1)
    assert back.shard_of(0) == 0 and f"row {expected_back[0]} of the whole layer" in \
        back._where(0)
    assert lazy.shape == again[2].shape == (100, 1)
    assert f"row {range(n)[5:][::7][-100]} of the whole layer" in again[2]._where(0)


def test_a_pickled_subset_of_a_slice_is_checked_against_the_layer(small_store):
    _, path = small_store
    sub = open_store(path).subset(slice(10, 90, 4))
    rows = sub.__reduce__()[1][-1]
    assert rows == range(10, 90, 4)
    with pytest.raises(ValueError, match="subset of rows range"):
        _store._reopen(str(path), None, "lazy", sub.manifest, "numpy", range(10, 500, 4))


def _positioned_store(path):
    """``(X, positions, path)``: a store of 50 rows in shards of 12, with positions."""
    rng = np.random.RandomState(0)
    X = rng.randn(50, 3).astype(np.float32)
    pos = np.c_[np.arange(50) // 7, np.arange(50) % 7].astype(np.int64)
    writer = StoreWriter(path, {"a": 3}, "float32", {})
    for lo in range(0, 50, 12):
        writer.write_shard({"a": X[lo:lo + 12]}, 1, positions=pos[lo:lo + 12])
    writer.close()
    return X, pos, path


@pytest.mark.parametrize("keys", [[slice(3, 40)], [slice(None, None, -1)],
                                  [slice(45, 2, -3), slice(1, None, 2)],
                                  [slice(5, 45, 2), np.array([3, 0, 3, 10])],
                                  [np.array([40, 41, 42, 7]), slice(None, None, -1)],
                                  [slice(49, None, -1), slice(48, 60)], [slice(7, 7)]],
                         ids=range(7))
def test_subsets_of_slices_read_values_and_positions_as_numpy(tmp_path, keys):
    X, pos, path = _positioned_store(tmp_path / "p")
    store = open_store(path)
    view, expected, expected_pos = store, X, pos
    for key in keys:
        view, expected, expected_pos = view.subset(key), expected[key], expected_pos[key]
    assert view.shape == expected.shape
    np.testing.assert_array_equal(np.asarray(view), expected)
    np.testing.assert_array_equal(view.positions(), expected_pos)
    np.testing.assert_array_equal(view.positions(1, 4), expected_pos[1:4])
    np.testing.assert_array_equal(view.read_raw(1, 6).numpy(), expected[1:6])
    picks = [len(expected) - 1, 0] if len(expected) else []
    np.testing.assert_array_equal(view.take_raw(picks).numpy(), expected[picks])
    np.testing.assert_array_equal(np.asarray(pickle.loads(pickle.dumps(view))), expected)


def test_appending_a_shard_writes_a_line_and_a_manifest_of_constant_size(tmp_path):
    # version 1 rewrote a manifest listing every shard after each one: at 12,000 shards of
    # 32 layers that was 64 MiB per shard written (and the most a store opens)
    X = np.arange(600, dtype=np.float32).reshape(200, 3)
    save_store(X[:4], tmp_path / "few", dtype="float32", shard_rows=1)
    many = save_store(X, tmp_path / "many", dtype="float32", shard_rows=1)
    size = {name: len((tmp_path / name / "manifest.json").read_bytes()) for name in
            ("few", "many")}
    assert size["many"] - size["few"] <= 4  # the counts' digits
    lines = (tmp_path / "many" / "shards.jsonl").read_bytes().splitlines()
    assert len(lines) == 200 == many.n_shards
    np.testing.assert_array_equal(np.asarray(open_store(tmp_path / "many", verify="full")), X)


def _two_shard_writer(path):
    writer = StoreWriter(path, {"a": 3}, "float32", {"what": "test"})
    for i in range(2):
        writer.write_shard({"a": np.full((5, 3), i, np.float32)}, n_batches=1)
    return writer


def test_an_append_stopped_between_its_two_writes_leaves_the_store_as_it_was(
        tmp_path, monkeypatch):
    writer = _two_shard_writer(tmp_path / "s")
    records = (tmp_path / "s" / "shards.jsonl").read_bytes()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_store, "_write_json_atomic", stopped)
    with pytest.raises(KeyboardInterrupt):
        writer.write_shard({"a": np.full((5, 3), 2, np.float32)}, n_batches=1)
    monkeypatch.undo()
    assert (tmp_path / "s" / "shards.jsonl").read_bytes() == records  # the line cut off
    assert writer.n_rows == 10 and len(writer.manifest["shards"]) == 2
    assert open_store(tmp_path / "s", verify="full").shape == (10, 3)
    writer.write_shard({"a": np.full((5, 3), 2, np.float32)}, n_batches=1)
    writer.close()
    np.testing.assert_array_equal(np.asarray(open_store(tmp_path / "s", verify="full"))[:, 0],
                                  np.repeat([0, 1, 2], 5))


def test_a_line_past_the_manifest_count_is_ignored_and_dropped_on_resume(tmp_path):
    _two_shard_writer(tmp_path / "s")
    records = tmp_path / "s" / "shards.jsonl"
    whole = records.read_bytes()
    with open(records, "ab") as f:
        f.write(b'{"rows": 5, "batc')  # a run stopped inside its append
    assert open_store(tmp_path / "s").shape == (10, 3)
    StoreWriter(tmp_path / "s", {"a": 3}, "float32", {"what": "test"}, resume=True)
    assert records.read_bytes() == whole


def test_altered_or_cut_shard_records_are_refused(tmp_path):
    _two_shard_writer(tmp_path / "s")
    records = tmp_path / "s" / "shards.jsonl"
    whole = records.read_bytes()
    records.write_bytes(whole.replace(b'"rows":5', b'"rows":4', 1))
    with pytest.raises(_store.StoreError, match="does not match its SHA-256 digest"):
        open_store(tmp_path / "s", verify="none")
    records.write_bytes(whole.splitlines(keepends=True)[0])
    with pytest.raises(_store.StoreError, match="counts 2 shards, but the file holds 1 lines"):
        open_store(tmp_path / "s")
    records.unlink()
    with pytest.raises(_store.StoreError, match="shards.jsonl is missing"):
        open_store(tmp_path / "s")


def test_a_version_1_store_is_read_and_resumed_as_version_2(tmp_path):
    path = tmp_path / "s"
    _two_shard_writer(path)
    manifest = _store._read_manifest(path)
    for key in ("n_shards", "shards_sha256"):
        del manifest[key]
    (path / "manifest.json").write_text(json.dumps(dict(manifest, version=1)))
    (path / "shards.jsonl").unlink()
    np.testing.assert_array_equal(np.asarray(open_store(path, verify="full"))[:, 0],
                                  np.repeat([0, 1], 5))
    writer = StoreWriter(path, {"a": 3}, "float32", {"what": "test"}, resume=True)
    writer.write_shard({"a": np.full((5, 3), 2, np.float32)}, n_batches=1)
    writer.close()
    assert json.loads((path / "manifest.json").read_text())["version"] == 2
    store = open_store(path, verify="full")
    assert store.complete and store.manifest["n_batches"] == 3
    np.testing.assert_array_equal(np.asarray(store)[:, 0], np.repeat([0, 1, 2], 5))


def test_a_shard_given_as_blocks_is_written_without_joining_them(tmp_path):
    # a harvest buffers each layer's batches; joined into one array per layer (all layers
    # at once) the shard was held twice: 32 layers of 65,536 x 4096 float16 rows, 32 GiB
    rng = np.random.RandomState(0)
    blocks = {n: [rng.randn(64, 256).astype(np.float16) for _ in range(16)] for n in "ab"}
    where = [np.stack([np.full(64, b), np.arange(64)], 1) for b in range(16)]
    joined = StoreWriter(tmp_path / "joined", {"a": 256, "b": 256}, "float16", {})
    joined.write_shard({n: np.concatenate(v) for n, v in blocks.items()}, 16,
                       positions=np.concatenate(where))
    tracemalloc.start()
    try:
        streamed = StoreWriter(tmp_path / "blocks", {"a": 256, "b": 256}, "float16", {})
        streamed.write_shard(blocks, 16, positions=where)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024  # a shard of a layer is 512 KiB; nothing of its size is made
    assert streamed.manifest["shards"] == joined.manifest["shards"]  # the same digests
    for name in ("a", "b"):
        np.testing.assert_array_equal(
            np.asarray(_store.ActivationStore(tmp_path / "blocks", name)),
            np.concatenate(blocks[name]))
    with pytest.raises(ValueError, match="same number of rows"):
        streamed.write_shard({"a": blocks["a"], "b": blocks["b"][1:]}, 1)


# ------------------------------------------------------------------ block digests
@pytest.fixture
def blocked_store(tmp_path, monkeypatch):
    """``(X, path)``: 1000 rows of 16 float32 in 2 shards digested in blocks of 256 bytes
    (4 rows; the 128-byte .npy header ends block 0 halfway)."""
    monkeypatch.setattr(_store, "_BLOCK_BYTES", 256)
    X = np.random.RandomState(0).randn(1000, 16).astype(np.float32)
    save_store(X, tmp_path / "s", dtype="float32", shard_rows=500)
    monkeypatch.undo()
    return X, tmp_path / "s"


def _counting_checks(monkeypatch):
    hashed = []
    real = _store.ActivationStore._check_blocks

    def check_blocks(self, i, spec, blocks):
        hashed.extend((i, int(j)) for j in blocks)
        return real(self, i, spec, blocks)

    monkeypatch.setattr(_store.ActivationStore, "_check_blocks", check_blocks)
    return hashed


def test_a_lazy_read_hashes_only_the_blocks_it_reads(blocked_store, monkeypatch):
    # a digest of the whole shard made the first read of any row hash the shard through: a
    # fit's 16,384 starting rows hashed most shards of a large store
    X, path = blocked_store
    hashed = _counting_checks(monkeypatch)
    store = open_store(path)
    np.testing.assert_array_equal(store[0:10], X[0:10])  # bytes 128 to 768: blocks 0 to 2
    assert hashed == [(0, 0), (0, 1), (0, 2)]
    rows = [997, 2, 501, 600, 3]
    np.testing.assert_array_equal(store.take_raw(rows).numpy(), X[rows])
    # row 501 is row 1 of shard 1 (bytes 192 to 256, block 0), row 600 its row 100 (bytes
    # 6528 to 6592, block 25), row 997 its row 497 (block 124); rows 2 and 3 were checked
    assert hashed[3:] == [(1, 0), (1, 25), (1, 124)]
    np.testing.assert_array_equal(np.asarray(store), X)  # the rest, each block once
    assert sorted(hashed) == sorted(set(hashed)) and len(hashed) == 2 * 126
    np.testing.assert_array_equal(np.asarray(store), X)
    assert len(hashed) == 2 * 126  # checked shards are not hashed again


def test_an_altered_block_is_refused_when_read(blocked_store):
    X, path = blocked_store
    shard = path / "layer-000" / "shard-000000.npy"
    data = bytearray(shard.read_bytes())
    data[128 + 300 * 64 + 5] ^= 0xFF  # row 300 of shard 0: bytes 19328 to 19392, block 75
    shard.write_bytes(bytes(data))
    store = open_store(path)
    np.testing.assert_array_equal(store[:296], X[:296])  # blocks 0 to 74
    np.testing.assert_array_equal(store[304:], X[304:])
    with pytest.raises(_store.StoreError, match=r"shard 0 \(layer-000/shard-000000.npy\) does "
                       r"not match its SHA-256 digest in the manifest \(bytes 19200 to 19456"):
        store[299:301]
    with pytest.raises(_store.StoreError, match="does not match its SHA-256 digest"):
        open_store(path, verify="full")
    with pytest.raises(_store.StoreError, match="does not match its SHA-256 digest"):
        open_store(path, verify="none").verify()


def test_altered_or_missing_block_digests_are_refused(blocked_store):
    _, path = blocked_store
    sidecar = path / "layer-000" / "shard-000001.sha256"
    digests = bytearray(sidecar.read_bytes())
    digests[40] ^= 0xFF
    sidecar.write_bytes(bytes(digests))
    store = open_store(path)
    store[:500]  # shard 0
    with pytest.raises(_store.StoreError, match=r"shard 1's block digests \(layer-000/"
                       r"shard-000001.sha256\) do not match their SHA-256 digest"):
        store[500]
    sidecar.write_bytes(bytes(digests[:-32]))
    with pytest.raises(_store.StoreError, match=r"shard 1's block digests .* are missing, or "
                       r"not the 126 digests"):
        open_store(path)
    sidecar.unlink()
    with pytest.raises(_store.StoreError, match="are missing"):
        open_store(path, verify="none")


def test_block_digests_do_not_depend_on_how_the_rows_were_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(_store, "_BLOCK_BYTES", 100)  # not a multiple of a row (48 bytes)
    a = np.random.RandomState(0).randn(40, 12).astype(np.float32)
    for name, cuts in (("one", [40]), ("ragged", [1, 7, 20, 21, 39, 40])):
        writer = StoreWriter(tmp_path / name, {"a": 12}, "float32", {})
        writer._write_shard_chunks(40, np.split(a, cuts[:-1]))
        writer.close()
    one = (tmp_path / "one" / "layer-000" / "shard-000000.sha256").read_bytes()
    file = (tmp_path / "one" / "layer-000" / "shard-000000.npy").read_bytes()
    assert one == b"".join(hashlib.sha256(file[j:j + 100]).digest()
                           for j in range(0, len(file), 100))
    assert (tmp_path / "ragged" / "layer-000" / "shard-000000.sha256").read_bytes() == one
    np.testing.assert_array_equal(np.asarray(open_store(tmp_path / "ragged", verify="full")), a)


def test_resuming_checks_the_shards_sizes_not_their_contents(blocked_store, monkeypatch,
                                                               tamper_shard):
    # resuming hashed every listed shard: a harvest of terabytes read them all again at
    # every resumption; the readers check the contents, as for any store
    X, path = blocked_store
    manifest = _store._read_manifest(path)
    manifest["complete"] = False
    _store._write_manifest(path, manifest)
    tamper_shard(path, shard=1)
    hashed = _counting_checks(monkeypatch)
    writer = StoreWriter(path, {"activations": 16}, "float32", manifest["source"], resume=True)
    writer._write_shard_chunks(10, [X[:10]])
    writer.close()
    assert hashed == []
    store = open_store(path)
    np.testing.assert_array_equal(store[:500], X[:500])
    np.testing.assert_array_equal(store[1000:], X[:10])
    with pytest.raises(_store.StoreError, match="shard 1 .* does not match its SHA-256"):
        np.asarray(store)
    _store._write_manifest(path, dict(_store._read_manifest(path), complete=False))
    (path / "layer-000" / "shard-000001.npy").write_bytes(b"")
    with pytest.raises(_store.StoreError, match="shard 1 .* is not a readable .npy"):
        StoreWriter(path, {"activations": 16}, "float32", manifest["source"], resume=True)


def test_an_interrupt_after_the_manifest_rename_keeps_the_shard_listed(tmp_path, monkeypatch):
    # the line was cut off on any exception, also one raised after the rename (Ctrl-C inside
    # the call): the manifest then counted a line that was gone, and the store neither
    # opened nor resumed
    writer = _two_shard_writer(tmp_path / "s")
    real = _store._write_json_atomic

    def renamed_then_stopped(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(_store, "_write_json_atomic", renamed_then_stopped)
    with pytest.raises(KeyboardInterrupt):
        writer.write_shard({"a": np.full((5, 3), 2, np.float32)}, n_batches=1)
    monkeypatch.undo()
    assert writer.n_rows == 15 and len(writer.manifest["shards"]) == 3
    np.testing.assert_array_equal(np.asarray(open_store(tmp_path / "s", verify="full"))[:, 0],
                                  np.repeat([0, 1, 2], 5))
    writer.write_shard({"a": np.full((5, 3), 3, np.float32)}, n_batches=1)
    writer.close()
    np.testing.assert_array_equal(np.asarray(open_store(tmp_path / "s", verify="full"))[:, 0],
                                  np.repeat([0, 1, 2, 3], 5))


def test_a_shard_record_longer_than_a_store_reads_is_refused_before_it_is_written(
        tmp_path, monkeypatch):
    layers = {f"model.layers.{i}.{'mlp.' * 40}out": 1 for i in range(3000)}
    with pytest.raises(ValueError, match="A shard's record of these 3000 layers would take"):
        StoreWriter(tmp_path / "many", layers, "float32", {})
    writer = _two_shard_writer(tmp_path / "s")
    monkeypatch.setattr(_store, "_MAX_RECORD_BYTES", 100)
    with pytest.raises(_store.StoreError, match="longer than the 100 a store reads"):
        writer.write_shard({"a": np.full((5, 3), 2, np.float32)}, n_batches=1)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "s" / "layer-000").iterdir()) == [
        "shard-000000.npy", "shard-000000.sha256", "shard-000001.npy", "shard-000001.sha256"]
    assert open_store(tmp_path / "s", verify="full").shape == (10, 3)


def test_a_record_naming_huge_blocks_is_refused(blocked_store):
    # the reader holds a block in memory: a record could have it allocate terabytes
    _, path = blocked_store
    manifest = _store._read_manifest(path)
    manifest["shards"][0]["files"]["activations"]["blocks"]["bytes"] = 2**40
    _store._write_manifest(path, manifest)
    with pytest.raises(_store.StoreError, match="shard 0's block digests are .* in blocks of "
                                                "1099511627776 bytes"):
        open_store(path)


def test_block_reads_go_on_until_the_block_is_whole():
    class Trickle(io.RawIOBase):  # a network file system's short reads
        def __init__(self, data):
            self.data, self.pos = data, 0

        def readinto(self, b):
            got = self.data[self.pos: self.pos + min(len(b), 7)]
            b[:len(got)] = got
            self.pos += len(got)
            return len(got)

    buffer = memoryview(bytearray(100))
    assert _store._read_full(Trickle(bytes(range(60))), buffer) == 60
    assert bytes(buffer[:60]) == bytes(range(60))
    assert _store._read_full(Trickle(bytes(300)), buffer) == 100


def test_a_listing_that_failed_part_way_refuses_more_until_resumed(tmp_path, monkeypatch):
    # when the manifest cannot be read back after a failed append, whether the shard is
    # listed is unknown: appending more (or closing) could corrupt the records
    writer = _two_shard_writer(tmp_path / "s")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(_store, "_write_json_atomic", disk_full)
    monkeypatch.setattr(_store, "_counted_shards", lambda path: None)
    with pytest.raises(OSError, match="No space left"):
        writer.write_shard({"a": np.full((5, 3), 2, np.float32)}, n_batches=1)
    monkeypatch.undo()
    with pytest.raises(_store.StoreError, match="failed part-way; open the store again"):
        writer.write_shard({"a": np.full((5, 3), 2, np.float32)}, n_batches=1)
    with pytest.raises(_store.StoreError, match="failed part-way"):
        writer.close()
    writer = StoreWriter(tmp_path / "s", {"a": 3}, "float32", {"what": "test"}, resume=True)
    writer.write_shard({"a": np.full((5, 3), 2, np.float32)}, n_batches=1)
    writer.close()
    np.testing.assert_array_equal(np.asarray(open_store(tmp_path / "s", verify="full"))[:, 0],
                                  np.repeat([0, 1, 2], 5))


def test_scattered_reads_read_each_shards_block_digests_once(blocked_store, monkeypatch):
    X, path = blocked_store
    reads = []
    real = _store.Path.read_bytes
    monkeypatch.setattr(_store.Path, "read_bytes",
                        lambda self: reads.append(self.name) or real(self))
    store = open_store(path)
    rng = np.random.RandomState(0)
    for _ in range(20):  # random batches: every call touches both shards' unchecked blocks
        rows = rng.choice(1000, 16, replace=False)
        np.testing.assert_array_equal(store.take_raw(rows).numpy(), X[rows])
    assert sorted(reads) == ["shard-000000.sha256", "shard-000001.sha256"]
