"""The CLI with activation stores: harvest, fit STORE, transform STORE."""

import numpy as np
import pytest
import torch

from sksae import load
from sksae.__main__ import main
from sksae.activations import open_codes, open_store, save_store

MODEL_FILE = '''
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
'''


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(MODEL_FILE)
    return path


@pytest.fixture
def tokens(tmp_path):
    ids = np.random.RandomState(0).randint(1, 30, size=(20, 6))
    ids[:, 4:] = 0  # padding
    np.save(tmp_path / "ids.npy", ids)
    return ids


def test_harvest_fit_transform_a_store(model_file, tokens, tmp_path, capsys):
    status = main(["harvest", f"{model_file}:make", "--layer", "1", "--layer", "2",
                   "--tokens", str(tmp_path / "ids.npy"), "--pad-id", "0", "--skip-first",
                   "--batch-size", "6", "--shard-rows", "20", "--dtype", "float32", "-q",
                   "-o", str(tmp_path / "acts")])
    assert status == 0
    assert "Wrote the activation store" in capsys.readouterr().out
    store = open_store(tmp_path / "acts", layer="2")
    assert store.shape == (20 * 3, 8)  # positions 1, 2, 3 of each sequence
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Embedding(30, 8), torch.nn.Linear(8, 8))
    expected = torch.relu(ref(torch.from_numpy(tokens[:, 1:4].astype(np.int64)))).reshape(-1, 8)
    np.testing.assert_allclose(np.asarray(store), expected.detach().numpy(), rtol=1e-6)

    assert main(["fit", str(tmp_path / "acts"), "--layer", "2", "--n-components", "16",
                 "--k", "2", "--max-iter", "2", "--batch-size", "16", "--random-state", "0",
                 "--precision", "float32", "-q", "-o", str(tmp_path / "model")]) == 0
    assert "read batch by batch" in capsys.readouterr().out
    sae = load(tmp_path / "model")
    assert sae.n_features_in_ == 8 and sae.shuffle == "auto"

    assert main(["transform", str(tmp_path / "model"), str(tmp_path / "acts"), "--layer", "2",
                 "-o", str(tmp_path / "codes")]) == 0
    codes = open_codes(tmp_path / "codes")
    np.testing.assert_array_equal(codes.to_csr().toarray(), sae.transform(store))
    assert main(["transform", str(tmp_path / "model"), str(tmp_path / "acts"), "--layer", "2",
                 "-o", str(tmp_path / "codes.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "codes.npy"), sae.transform(store))


def test_harvest_from_a_dotted_path(tmp_path, tokens, monkeypatch):
    package = tmp_path / "pkg_models"
    package.mkdir()
    (package / "__init__.py").write_text(MODEL_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["harvest", "pkg_models:make", "--layer", "0", "--tokens",
                 str(tmp_path / "ids.npy"), "-q", "-o", str(tmp_path / "s")]) == 0
    assert open_store(tmp_path / "s").shape == (120, 8)


@pytest.mark.parametrize("args, message", [
    (["--tokens", "{ids}"], "must be 'package.module:name'"),
    (["--text", "{ids}", "--tokens", "{ids}"], "exactly one of --tokens"),
    (["--tokens", "{tmp}/none.npy"], "No such file"),
    (["--tokens", "{tmp}/floats.npy"], "2-D array of integer token ids"),
])
def test_harvest_user_errors_are_one_line(model_file, tokens, tmp_path, capsys, args, message):
    np.save(tmp_path / "floats.npy", np.zeros((3, 3)))
    model = "nomodule" if "must be" in message else f"{model_file}:make"
    argv = ["harvest", model, "--layer", "1", "-o", str(tmp_path / "out"), "-q"] + [
        a.format(ids=tmp_path / "ids.npy", tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_harvest_unknown_layer_and_missing_store(model_file, tokens, tmp_path, capsys):
    assert main(["harvest", f"{model_file}:make", "--layer", "9", "--tokens",
                 str(tmp_path / "ids.npy"), "-q", "-o", str(tmp_path / "out")]) == 2
    assert "no submodule '9'" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    assert main(["fit", str(tmp_path / "folder"), "-o", str(tmp_path / "m")]) == 2
    assert "not an activation store" in capsys.readouterr().err
    save_store(np.zeros((5, 3), np.float32), tmp_path / "s")
    assert main(["fit", str(tmp_path / "s"), "--layer", "x", "-o", str(tmp_path / "m")]) == 2
    assert "has no layer 'x'" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["store", "npy"])
def test_fit_holds_out_the_last_rows_and_reports_them(tmp_path, capsys, what):
    from sksae import SparseAutoencoder
    from sksae.metrics import evaluate

    X = np.random.RandomState(0).randn(400, 6).astype(np.float32)
    path = tmp_path / "acts"
    if what == "store":
        save_store(X, path, dtype="float32", shard_rows=128)
    else:
        path = tmp_path / "acts.npy"
        np.save(path, X)
    args = ["fit", str(path), "--n-components", "12", "--k", "2", "--max-iter", "2",
            "--batch-size", "32", "--random-state", "0", "--precision", "float32",
            "--shuffle", "none", "-q", "-o", str(tmp_path / "model")]
    assert main(args + ["--holdout", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "Fitting topk SAE on 300 rows" in out
    sae = load(tmp_path / "model")
    ref = SparseAutoencoder(n_components=12, k=2, max_iter=2, batch_size=32, random_state=0,
                            precision="float32", shuffle=False).fit(X[:300])
    np.testing.assert_array_equal(sae.components_, ref.components_)  # trained on the rest
    held = evaluate(sae, X[300:])
    assert (f"held out (the last 100 rows): FVE {held.explained_variance:.4f}, "
            f"L0 {held.l0:.1f}") in out
    assert main(args + ["--holdout", "100"]) == 0
    assert "the last 100 rows" in capsys.readouterr().out
    assert main(args + ["--holdout", "400"]) == 2
    assert "leaves no rows to train on (400 rows in all)" in capsys.readouterr().err
    for bad in ("0", "1.0", "-3", "x"):
        with pytest.raises(SystemExit) as exit_:
            main(args + ["--holdout", bad])
        assert exit_.value.code == 2


def test_ctrl_c_while_evaluating_the_holdout_leaves_the_old_model(tmp_path, capsys,
                                                                   monkeypatch):
    import sksae.metrics

    X = np.random.RandomState(0).randn(200, 6).astype(np.float32)
    save_store(X, tmp_path / "acts", dtype="float32", shard_rows=64)
    args = ["fit", str(tmp_path / "acts"), "--n-components", "12", "--k", "2", "--max-iter",
            "1", "--batch-size", "32", "--random-state", "0", "-q", "-o", str(tmp_path / "m")]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sksae.metrics, "evaluate", interrupted)
    assert main(args + ["--random-state", "1", "--holdout", "0.1"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts", "m"]  # no temporary left
