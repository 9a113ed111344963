"""``python -m sksae``: every command in a subprocess on small inputs, and --help."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from numpy.testing import assert_allclose

import sksae
from sksae.__main__ import main


def run(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "sksae", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("command", ["demo", "fit", "transform", "bench"])
def test_help(command, capsys):
    with pytest.raises(SystemExit, match="^0$") as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python -m sksae " + command in out
    # the exit statuses are documented (issue 19)
    assert "exit statuses:" in out and "130" in out and "--debug" in out


def test_module_docstring_documents_exit_statuses():
    from sksae import __main__ as cli

    assert "Exit statuses" in cli.__doc__ and "130" in cli.__doc__


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "acts.npy"
    np.save(path, np.random.RandomState(0).randn(300, 8).astype(np.float32))
    return path


def test_fit_then_transform(acts, tmp_path):
    out = run("fit", acts, "--architecture", "topk", "--k", "2", "--n-components", "16",
              "--max-iter", "2", "--batch-size", "64", "--random-state", "0",
              "--precision", "float32", "-o", tmp_path / "model", cwd=tmp_path)
    assert "Saved to" in out and "FVE" in out
    assert "step/s" in out or "it/s" in out or "100%" in out  # the progress bar ran
    model = sksae.load(tmp_path / "model")
    assert (model.architecture, model.k, model.n_components_) == ("topk", 2, 16)
    assert model.precision == "float32"

    run("transform", tmp_path / "model", acts, "-o", tmp_path / "codes.npy",
        "--chunk-rows", "128", cwd=tmp_path)
    codes = np.load(tmp_path / "codes.npy")
    X = np.load(acts)
    assert codes.shape == (300, 16) and codes.dtype == np.float32
    assert_allclose(codes, model.transform(X))
    assert ((codes > 0).sum(axis=1) <= 2).all()
    # outputs were written under temporary names and renamed: none left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy", "model"]


def test_transform_reads_saelens_folders(acts, tmp_path):
    from sksae.interop import to_saelens

    X = np.load(acts)
    model = sksae.SparseAutoencoder(n_components=16, k=2, max_iter=1, batch_size=64,
                                    random_state=0, device="cpu", precision="float32").fit(X)
    to_saelens(model, tmp_path / "saelens")
    run("transform", tmp_path / "saelens", acts, "-o", tmp_path / "codes.npy", cwd=tmp_path)
    assert_allclose(np.load(tmp_path / "codes.npy"), model.transform(X))


def _recording_evaluations(monkeypatch):
    """Wrap the table's evaluate_recovery: each (row, model, X_test, features) it saw."""
    import sksae._demo

    seen = []
    real = sksae._demo.evaluate_recovery

    def evaluate(name, model, X_test, features, seconds):
        row = real(name, model, X_test, features, seconds)
        seen.append((row, model, X_test, features))
        return row

    monkeypatch.setattr(sksae._demo, "evaluate_recovery", evaluate)
    return seen


def _check_table(out, seen):
    """Each row's numbers recomputed with numpy and scikit-learn, and printed as computed."""
    from sklearn.metrics import r2_score

    for row, model, X_test, features in seen:
        codes = model.transform(X_test)
        X_hat = np.asarray(model.inverse_transform(codes), dtype=np.float64)
        unit = lambda A: A / np.linalg.norm(A, axis=1, keepdims=True)  # noqa: E731
        best = (unit(features) @ unit(model.components_.astype(np.float64)).T).max(1)
        want = {"held-out FVE": r2_score(X_test.astype(np.float64), X_hat,
                                         multioutput="variance_weighted"),
                "L0": (codes != 0).sum(1).mean(), "MMCS": best.mean(),
                "recovered@0.9": (best >= 0.9).mean()}
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (row["model"], key)
        cells = [f"{row[k]:.3f}" for k in ("fit s", "held-out FVE", "L0", "MMCS",
                                            "recovered@0.9")]
        line = next(x for x in out.splitlines() if x.strip().startswith(row["model"] + "  "))
        assert line.strip()[len(row["model"]):].split()[:5] == cells, line
    assert out.count("\n" + "-" * 5) == 1  # one table


def test_bench(tmp_path, capsys, monkeypatch):
    seen = _recording_evaluations(monkeypatch)
    assert main(["bench", "--n-samples", "300", "--n-features", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    names = [row["model"] for row, *_ in seen]
    assert names == [f"SAE {a}" for a in sksae.architectures.available()] + [
        "DictionaryLearnerGPU", "sklearn MiniBatchDictionaryLearning"]
    assert "Toy data: 300 rows, 8 dims, 16 true features; 32 atoms." in out
    _check_table(out, seen)
    rows = {row["model"]: row for row, *_ in seen}
    assert rows["SAE topk"]["L0"] == 5.0  # k=5 latents on every row
    X_test = seen[0][2]
    assert X_test.shape == (60, 8)  # a fifth of the rows held out
    for row, *_ in seen:
        assert re.fullmatch(r"[\d,]+", row["transform rows/s"])


@pytest.mark.slow
def test_demo_writes_png_in_working_directory(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    seen = _recording_evaluations(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--n-samples", "300", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert [row["model"] for row, *_ in seen] == ["SparseAutoencoder(topk, k=8)",
                                                  "sklearn MiniBatchDictionaryLearning"]
    _check_table(out, seen)
    assert seen[0][0]["L0"] == 8.0
    png = tmp_path / "sksae_demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sksae_demo.png"]
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0.05
