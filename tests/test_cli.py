"""``python -m sksae``: every command in a subprocess on small inputs, and --help."""

import os
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
                                    random_state=0, device="cpu").fit(X)
    to_saelens(model, tmp_path / "saelens")
    run("transform", tmp_path / "saelens", acts, "-o", tmp_path / "codes.npy", cwd=tmp_path)
    assert_allclose(np.load(tmp_path / "codes.npy"), model.transform(X))


def test_bench(tmp_path):
    out = run("bench", "--n-samples", "300", "--n-features", "8", cwd=tmp_path)
    for name in ("SAE topk", "SAE jumprelu", "DictionaryLearnerGPU",
                 "sklearn MiniBatchDictionaryLearning", "held-out FVE", "transform rows/s"):
        assert name in out


@pytest.mark.slow
def test_demo_writes_png_in_working_directory(tmp_path):
    pytest.importorskip("matplotlib")
    out = run("demo", "--n-samples", "300", cwd=tmp_path)
    assert "held-out FVE" in out and "MMCS" in out
    png = tmp_path / "sksae_demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sksae_demo.png"]
