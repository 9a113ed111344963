"""Harvesting activations from a torch model into an on-disk store, and reading it back."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from sksae.activations import _store, harvest, open_store, save_store


class TinyLM(nn.Module):
    """A two-layer causal transformer language model, small enough for the suite."""

    def __init__(self, vocab=40, d=16, n_layers=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 2, 32, dropout=0.2, batch_first=True)
            for _ in range(n_layers))
        self.head = nn.Linear(d, vocab)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        h = self.embed(input_ids)
        causal = nn.Transformer.generate_square_subsequent_mask(input_ids.shape[1])
        for block in self.blocks:
            h = block(h, src_mask=causal, is_causal=True)
        return self.head(h)


def make_batches(n_batches=6, batch=3, seq=7, vocab=40, seed=0):
    """Dict batches with right padding (attention_mask zero on the padding)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, vocab, (batch, seq), generator=gen)
        lengths = torch.randint(2, seq + 1, (batch,), generator=gen)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def reference(model, batches, layer, keep=lambda b: b["attention_mask"].bool()):
    """What a forward hook sees at ``layer`` (eval mode), masked rows dropped."""
    seen = []
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
    model.eval()
    with torch.no_grad():
        rows = []
        for b in batches:
            seen.clear()
            model(**b)
            rows.append(seen[0][keep(b)])
    handle.remove()
    return torch.cat(rows)


@pytest.fixture
def model():
    return TinyLM()


def test_store_holds_exactly_the_hooked_activations(model, tmp_path):
    batches = make_batches()
    ref = reference(model, batches, "blocks.0")
    model.train()
    model.blocks[1].eval()
    store = harvest(model, batches, "blocks.0", tmp_path / "s", dtype="float32",
                    shard_rows=10, progress=False)
    assert store.shape == tuple(ref.shape)
    assert store.n_shards > 2
    np.testing.assert_array_equal(np.asarray(store), ref.numpy())
    assert model.training and not model.blocks[1].training  # modes are put back


@pytest.mark.parametrize("dtype, torch_dtype", [("float16", torch.float16),
                                                ("bfloat16", torch.bfloat16)])
def test_half_precision_store_holds_the_rounded_activations(model, tmp_path, dtype, torch_dtype):
    batches = make_batches()
    ref = reference(model, batches, "blocks.1")
    store = harvest(model, batches, "blocks.1", tmp_path / "s", dtype=dtype, shard_rows=16,
                    progress=False)
    assert store.storage_dtype == dtype
    expected = ref.to(torch_dtype).float().numpy()
    np.testing.assert_array_equal(np.asarray(store).astype(np.float32), expected)
    assert store.dtype == (np.float16 if dtype == "float16" else np.float32)
    # the files hold 2 bytes a value
    assert store.nbytes == store.shape[0] * store.shape[1] * 2


def test_masked_positions_are_absent(model, tmp_path):
    batches = make_batches()
    n_kept = sum(int(b["attention_mask"].sum()) for b in batches)
    store = harvest(model, batches, "embed", tmp_path / "a", dtype="float32", progress=False)
    assert store.shape[0] == n_kept
    # the embedding rows of the kept tokens, in order: padding (token 0) never appears
    ids = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches])
    np.testing.assert_array_equal(np.asarray(store), model.embed.weight[ids].detach().numpy())

    def no_bos(b):  # a user mask: padding and the first position dropped
        return b["attention_mask"].bool() & (torch.arange(b["input_ids"].shape[1]) > 0)

    store2 = harvest(model, batches, "embed", tmp_path / "b", mask=no_bos, dtype="float32",
                     progress=False)
    assert store2.shape[0] == n_kept - sum(len(b["input_ids"]) for b in batches)
    full = harvest(model, batches, "embed", tmp_path / "c", mask=None, dtype="float32",
                   progress=False)
    assert full.shape[0] == sum(b["input_ids"].numel() for b in batches)


def test_several_layers_are_row_aligned(model, tmp_path):
    batches = make_batches()
    stores = harvest(model, batches, ["blocks.0", "head"], tmp_path / "s", dtype="float32",
                     shard_rows=12, progress=False)
    assert set(stores) == {"blocks.0", "head"}
    assert stores["blocks.0"].shape == (stores["head"].shape[0], 16)
    assert stores["head"].shape[1] == 40
    # the head's rows are the head applied to the last block's rows: check alignment
    last = reference(model, batches, "blocks.1")
    np.testing.assert_allclose(np.asarray(stores["head"]),
                               model.head(last).detach().numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"holds 2 layers .*pass layer="):
        open_store(tmp_path / "s")
    # each layer's store holds (and pickles) its own files' records, not every layer's: at
    # 32 layers of 12,000 shards that was 180 MB per store, for each layer opened
    import pickle

    for name, store in stores.items():
        for opened in (store, open_store(tmp_path / "s", layer=name),
                       pickle.loads(pickle.dumps(store))):
            assert opened.manifest["shards"] and all(
                list(shard["files"]) == [name] and "positions" in shard
                for shard in opened.manifest["shards"])
            assert [e["name"] for e in opened.manifest["layers"]] == ["blocks.0", "head"]
            np.testing.assert_array_equal(opened.positions(), stores["head"].positions())
    whole = _store._read_manifest(tmp_path / "s")
    assert all(list(shard["files"]) == ["blocks.0", "head"] for shard in whole["shards"])


def test_stop_early_skips_the_later_layers(tmp_path):
    model = TinyLM()
    ran = []
    model.head.register_forward_hook(lambda *a: ran.append(1))
    harvest(model, make_batches(2), "blocks.0", tmp_path / "a", progress=False)
    assert ran == []
    harvest(model, make_batches(2), "blocks.0", tmp_path / "b", stop_early=False,
            progress=False)
    assert len(ran) == 2


class Interrupted(Exception):
    pass


def interrupt_after(batches, n):
    for i, b in enumerate(batches):
        if i == n:
            raise KeyboardInterrupt
        yield b


def test_interrupted_harvest_resumes_to_the_same_store(tmp_path):
    batches = make_batches(n_batches=9)
    whole = harvest(TinyLM(), batches, "blocks.0", tmp_path / "whole", shard_rows=10,
                    progress=False)
    model = TinyLM()
    with pytest.raises(KeyboardInterrupt):
        harvest(model, interrupt_after(batches, 6), "blocks.0", tmp_path / "part",
                shard_rows=10, progress=False)
    part = _store._read_manifest(tmp_path / "part")
    assert not part["complete"] and 0 < len(part["shards"]) < whole.n_shards
    done = part["n_batches"]
    assert 0 < done <= 6
    # an unfinished store is readable, and is not taken over by a run that does not resume
    assert open_store(tmp_path / "part").complete is False
    with pytest.raises(FileExistsError, match="unfinished store"):
        harvest(TinyLM(), batches, "blocks.0", tmp_path / "part", shard_rows=10,
                resume=False, progress=False)
    model = TinyLM()
    resumed = harvest(model, batches, "blocks.0", tmp_path / "part", shard_rows=10,
                      progress=False)
    # the model ran on the first batch (to size the layers) and the batches not yet stored
    assert model.calls == 1 + len(batches) - done
    a = _store._read_manifest(tmp_path / "whole")
    b = _store._read_manifest(tmp_path / "part")
    assert a["shards"] == b["shards"] and b["complete"]
    np.testing.assert_array_equal(np.asarray(resumed), np.asarray(whole))
    with pytest.raises(FileExistsError, match="complete store"):
        harvest(TinyLM(), batches, "blocks.0", tmp_path / "part", progress=False)


def test_resume_refuses_a_different_run(tmp_path):
    batches = make_batches()
    with pytest.raises(KeyboardInterrupt):
        harvest(TinyLM(), interrupt_after(batches, 4), "blocks.0", tmp_path / "s",
                shard_rows=5, progress=False)
    with pytest.raises(ValueError, match="Cannot resume .* storage_dtype differ"):
        harvest(TinyLM(), batches, "blocks.0", tmp_path / "s", shard_rows=5, dtype="float32",
                progress=False)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_bad_arguments_are_named(model, tmp_path):
    with pytest.raises(ValueError, match=r"no submodule 'blocks\.7' \(did you mean"):
        harvest(model, make_batches(1), "blocks.7", tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="dtype must be"):
        harvest(model, make_batches(1), "embed", tmp_path / "s", dtype="int8", progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        harvest(model, [], "embed", tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="mask must be"):
        harvest(model, make_batches(1), "embed", tmp_path / "s", mask="padding",
                progress=False)
    with pytest.raises(ValueError, match="the mask has shape"):
        harvest(model, make_batches(1), "embed", tmp_path / "t",
                mask=lambda b: torch.ones(2, 2, dtype=torch.bool), progress=False)
    scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="TorchScript modules do not support forward hooks"):
        harvest(scripted, [torch.zeros(2, 4)], "0", tmp_path / "u", progress=False)


def test_max_rows_and_plain_tensor_batches(tmp_path):
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(50, 5, generator=gen)
    store = harvest(model, X.split(8), "1", tmp_path / "s", dtype="float32", max_rows=21,
                    progress=False)
    assert store.shape == (21, 6)
    np.testing.assert_array_equal(np.asarray(store), torch.relu(model[0](X[:21])).detach())


# ----------------------------------------------------------------- integrity
def test_tampered_shard_is_refused(small_store, tamper_shard):
    X, path = small_store
    tamper_shard(path)
    with pytest.raises(ValueError, match=r"shard 2 .* does not match its SHA-256 digest"):
        open_store(path, verify="full")
    store = open_store(path)  # lazy: the shard is checked when first read
    np.testing.assert_array_equal(store[:30], X[:30])
    with pytest.raises(ValueError, match=r"shard 2 .* SHA-256"):
        store[65:70]
    with pytest.raises(ValueError, match="SHA-256"):
        open_store(path).verify()


def test_truncated_or_missing_shard_is_refused(small_store):
    _, path = small_store
    shard = path / "layer-000" / "shard-000001.npy"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"shard 1 .* bytes, expected .*truncated"):
        open_store(path, verify="none")
    shard.unlink()
    with pytest.raises(ValueError, match=r"shard 1 .* is missing"):
        open_store(path)


def test_malformed_manifests_are_refused(small_store, tmp_path):
    _, path = small_store
    manifest = _store._read_manifest(path)
    bad = dict(manifest, shards=[dict(manifest["shards"][0], files={
        "activations": {"file": "../../etc/passwd", "sha256": "0"}})])
    _store._write_manifest(path, bad)
    with pytest.raises(ValueError, match="not a shard of layer-000"):
        open_store(path)
    _store._write_manifest(path, dict(manifest, n_rows=7))
    with pytest.raises(ValueError, match="the shards hold 100 rows, the manifest says 7"):
        open_store(path)
    (path / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        open_store(path)
    with pytest.raises(ValueError, match="not an activation store"):
        open_store(tmp_path)


def test_store_indexing_is_numpy_indexing(small_store):
    X, path = small_store
    store = open_store(path)
    assert len(store) == 100 and store.ndim == 2
    for key in [5, -1, slice(None), slice(20, 75), slice(10, 90, 7), [3, 99, 3, 40],
                np.arange(100) % 3 == 0, (slice(28, 33), 2), (np.array([64, 1]), slice(1, 3))]:
        np.testing.assert_array_equal(store[key], X[key])
    with pytest.raises(IndexError, match="out of range"):
        store[100]
    with pytest.raises(IndexError, match="out of range"):
        store[[0, 100]]
    with pytest.raises(ValueError, match="has no layer 'x'"):
        open_store(path, layer="x")


def test_positions_name_each_rows_sequence_and_token(model, tmp_path):
    batches = make_batches()
    store = harvest(model, batches, "embed", tmp_path / "s", dtype="float32", shard_rows=10,
                    progress=False)
    pos = store.positions()
    assert pos.shape == (store.shape[0], 2) and pos.dtype == np.int64
    ids = torch.cat([b["input_ids"] for b in batches])  # (sequences, positions)
    masks = torch.cat([b["attention_mask"] for b in batches])
    assert masks[pos[:, 0], pos[:, 1]].all()  # only kept positions
    expected = model.embed.weight[ids[pos[:, 0], pos[:, 1]]].detach().numpy()
    np.testing.assert_array_equal(np.asarray(store), expected)
    np.testing.assert_array_equal(store.positions(5, 25), pos[5:25])
    rows = [17, 2, 17, 30]  # a subset's positions are those of its rows
    np.testing.assert_array_equal(store.subset(rows).positions(), pos[rows])
    np.testing.assert_array_equal(store.subset(rows).positions(1, 3), pos[rows][1:3])
    plain = save_store(np.zeros((4, 2), np.float32), tmp_path / "p")
    with pytest.raises(ValueError, match="has no row positions"):
        plain.positions()


def test_a_store_pickles_as_its_files_and_reads_the_same_in_another_process(tmp_path):
    """joblib and dask ship a store to their workers: it reopens the files there."""
    import pickle

    from joblib import Parallel, delayed

    X = np.random.RandomState(0).randn(500, 6).astype(np.float32)
    store = save_store(X, tmp_path / "s", dtype="float32", shard_rows=128, layer="acts")
    store[:10]  # memory maps opened here stay here
    back = pickle.loads(pickle.dumps(store))
    assert len(pickle.dumps(store)) < 20_000  # the path and manifest, not the rows
    np.testing.assert_array_equal(back[:], X)
    assert back.shape == store.shape and back.layer == "acts"
    rows = [3, 499, 128, 0]
    got = Parallel(n_jobs=2, backend="loky")(delayed(lambda s, r: s[r])(store, rows)
                                             for _ in range(2))
    for g in got:
        np.testing.assert_array_equal(g, X[rows])
    # the receiver checks the files against the sender's manifest (with the sender's
    # verification: "lazy" for an opened store): an altered shard fails there
    opened = open_store(tmp_path / "s")
    opened[:]
    shard = sorted((tmp_path / "s").rglob("*.npy"))[1]
    data = np.load(shard)
    data[0, 0] += 1
    np.save(shard, data)
    with pytest.raises(ValueError, match="SHA-256"):
        pickle.loads(pickle.dumps(opened))[200:260]


def test_a_resumed_harvest_returns_a_store_that_checks_the_kept_shards(tmp_path,
                                                                       tamper_shard):
    # resuming no longer hashes the kept shards, and harvest returned its store unchecked
    # (verify="none"): altered rows of the interrupted run reached the fit
    batches = make_batches(n_batches=9)
    with pytest.raises(KeyboardInterrupt):
        harvest(TinyLM(), interrupt_after(batches, 6), "blocks.0", tmp_path / "s",
                shard_rows=10, progress=False)
    kept = len(_store._read_manifest(tmp_path / "s")["shards"])
    assert kept >= 1
    tamper_shard(tmp_path / "s", shard=0)
    store = harvest(TinyLM(), batches, "blocks.0", tmp_path / "s", shard_rows=10,
                    progress=False)
    assert store._verified == set(range(kept, store.n_shards))  # written here: digested
    with pytest.raises(_store.StoreError, match="shard 0 .* does not match its SHA-256"):
        np.asarray(store)


@pytest.fixture
def version_1_store(tmp_path):
    """``(X, path)``: an unfinished store as sksae wrote it before format 2: its shards
    listed in manifest.json, each with the SHA-256 of the whole file (no block digests)."""
    X = np.random.RandomState(0).randn(100, 4).astype(np.float32)
    path = tmp_path / "old"
    save_store(X, path, dtype="float32", shard_rows=25)
    manifest = _store._read_manifest(path)
    for shard in manifest["shards"]:
        info = shard["files"]["activations"]
        (path / info.pop("blocks")["file"]).unlink()
        info["sha256"] = _store._sha256(path / info["file"])
    for key in ("n_shards", "shards_sha256"):
        del manifest[key]
    (path / "shards.jsonl").unlink()
    (path / "manifest.json").write_text(json.dumps(dict(manifest, version=1, complete=False)))
    return X, path


def test_a_version_1_store_is_checked_by_whole_shards_and_resumed(version_1_store,
                                                                  tamper_shard):
    X, path = version_1_store
    np.testing.assert_array_equal(np.asarray(open_store(path, verify="full")), X)
    writer = _store.StoreWriter(path, {"activations": 4}, "float32", {"kind": "array"},
                                resume=True)
    writer._write_shard_chunks(10, [X[:10]])
    writer.close()
    store = open_store(path, verify="full")  # the old shards whole, the new one by blocks
    assert store.manifest["version"] == 2 and store.n_shards == 5
    assert [isinstance(d, _store._Whole) for d in store._digests] == [True] * 4 + [False]
    np.testing.assert_array_equal(np.asarray(store), np.concatenate([X, X[:10]]))
    tamper_shard(path, shard=2)
    lazy = open_store(path)
    np.testing.assert_array_equal(lazy[:50], X[:50])
    with pytest.raises(_store.StoreError, match="shard 2 .* does not match its SHA-256"):
        lazy[50]


def test_positions_are_checked_by_block_too(model, tmp_path, monkeypatch):
    # a positions file had one digest: its first read hashed it whole (2 MB per shard of
    # 131,072 rows), for each shard the feature browser looked into
    monkeypatch.setattr(_store, "_BLOCK_BYTES", 256)  # 16 rows of positions per block
    batches = make_batches(n_batches=12)
    harvest(model, batches, "embed", tmp_path / "s", dtype="float32", shard_rows=10_000,
            progress=False)
    monkeypatch.undo()
    expected = open_store(tmp_path / "s").positions()
    assert len(expected) > 60
    assert (tmp_path / "s" / "positions" / "shard-000000.sha256").is_file()
    file = tmp_path / "s" / "positions" / "shard-000000.npy"
    data = bytearray(file.read_bytes())
    data[128 + 16 * 40 + 3] ^= 0xFF  # row 40: block 3 (rows 40 to 55)
    file.write_bytes(bytes(data))
    store = open_store(tmp_path / "s")
    np.testing.assert_array_equal(store.positions(0, 40), expected[:40])
    np.testing.assert_array_equal(store.positions(56, None), expected[56:])
    np.testing.assert_array_equal(store.subset([58, 3]).positions(), expected[[58, 3]])
    with pytest.raises(_store.StoreError, match=r"shard 0's positions \(positions/shard-000000"
                       r".npy\) do not match their SHA-256 digest in the manifest \(bytes 768"):
        store.positions(40, 41)
    with pytest.raises(_store.StoreError, match="positions .* do not match"):
        open_store(tmp_path / "s", verify="full").positions(0, 1)  # whole on first use
    np.testing.assert_array_equal(open_store(tmp_path / "s", verify="none").positions(0, 40),
                                  expected[:40])
    # a positions record of an older store (one digest of the whole file): checked whole
    manifest = _store._read_manifest(tmp_path / "s")
    record = manifest["shards"][0]["positions"]
    del record["blocks"]
    record["sha256"] = _store._sha256(file)
    _store._write_manifest(tmp_path / "s", manifest)
    altered = np.frombuffer(bytes(data[128 + 640: 128 + 656]), "<i8")  # row 40 as it is now
    np.testing.assert_array_equal(open_store(tmp_path / "s").positions(40, 41)[0], altered)
    data[128 + 3] ^= 0xFF  # row 0
    file.write_bytes(bytes(data))
    with pytest.raises(_store.StoreError, match="shard 0's positions .* do not match"):
        open_store(tmp_path / "s").positions(60, 61)
