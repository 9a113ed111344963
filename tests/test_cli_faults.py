"""``python -m sksae`` under faults (issue 19): user errors, interrupts, outputs.

User errors print one line on stderr and exit 2 (``--debug``: the traceback);
Ctrl-C exits 130; other exceptions (bugs) keep their traceback (status 1);
outputs are written under a temporary name and renamed at the end, so a failed
or interrupted run leaves no partial output and never touches its inputs.
"""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import sksae
import sksae.__main__ as cli
from sksae.__main__ import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
FIT = ["--k", "2", "--n-components", "16", "--max-iter", "1", "--batch-size", "64",
       "--device", "cpu", "--random-state", "0", "-q"]


def cli_run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "sksae", *map(str, args)], cwd=cwd,
                          env=ENV, capture_output=True, text=True, timeout=300)


def leftovers(folder):
    """Temporary siblings left behind in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    path = tmp_path_factory.mktemp("acts") / "acts.npy"
    np.save(path, np.random.RandomState(0).randn(300, 8).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def model_dir(acts, tmp_path_factory):
    sae = sksae.SparseAutoencoder(n_components=16, k=2, max_iter=1, batch_size=64,
                                  random_state=0, device="cpu",
                                  precision="float32").fit(np.load(acts))
    return sksae.save(sae, tmp_path_factory.mktemp("model") / "model")


def assert_user_error(status, capsys, *fragments):
    captured = capsys.readouterr()
    assert status == 2, captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------- user errors: status 2
@pytest.mark.parametrize("case", ["missing", "not_npy", "not_a_model", "bad_k"])
def test_user_errors_in_a_subprocess_are_one_line_status_2(case, acts, model_dir, tmp_path):
    args = {
        "missing": ["fit", tmp_path / "missing.npy", "-o", tmp_path / "m"],
        "not_npy": ["fit", tmp_path / "acts.txt", "-o", tmp_path / "m"],
        "not_a_model": ["transform", tmp_path, acts, "-o", tmp_path / "elsewhere.npy"],
        "bad_k": ["fit", acts, "-o", tmp_path / "m", *FIT, "--k", "20"],
    }[case]
    if case == "not_npy":
        (tmp_path / "acts.txt").write_text("1 2 3\n")
    if case == "not_a_model":
        args[1] = tmp_path / "empty"
        args[1].mkdir()
    proc = cli_run(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []


def test_debug_shows_the_traceback(tmp_path):
    proc = cli_run("fit", tmp_path / "missing.npy", "-o", tmp_path / "m", "--debug",
                   cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "FileNotFoundError" in proc.stderr
    with pytest.raises(FileNotFoundError, match="missing.npy"):  # before the command too
        main(["--debug", "fit", str(tmp_path / "missing.npy"), "-o", str(tmp_path / "m")])


def test_input_errors(acts, model_dir, tmp_path, capsys):
    out = str(tmp_path / "codes.npy")
    model = str(model_dir)
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "text.npy").write_text("not an array")
    np.save(tmp_path / "object.npy", np.array([{}, 1], dtype=object))
    np.save(tmp_path / "no_rows.npy", np.zeros((0, 8), np.float32))
    np.save(tmp_path / "scalar.npy", np.float32(1))
    np.save(tmp_path / "nan.npy", np.full((10, 8), np.nan, np.float32))
    (tmp_path / "dir.npy").mkdir()
    for name, fragment in [("missing.npy", "No such file"), ("empty.npy", "empty.npy"),
                           ("text.npy", "text.npy"), ("object.npy", "object.npy"),
                           ("no_rows.npy", "no rows"), ("scalar.npy", "no rows"),
                           ("nan.npy", "NaN"), ("dir.npy", "dir.npy")]:
        assert_user_error(main(["transform", model, str(tmp_path / name), "-o", out]),
                          capsys, fragment)
        assert_user_error(main(["fit", str(tmp_path / name), "-o",
                                str(tmp_path / "m"), *FIT]), capsys)
    assert not (tmp_path / "codes.npy").exists() and not (tmp_path / "m").exists()
    assert leftovers(tmp_path) == []


def test_model_folder_errors(acts, model_dir, tmp_path, capsys):
    import shutil

    out = str(tmp_path / "codes.npy")
    bad_json = shutil.copytree(model_dir, tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{not json")
    bad_weights = shutil.copytree(model_dir, tmp_path / "bad_weights")
    data = (bad_weights / "model.safetensors").read_bytes()
    (bad_weights / "model.safetensors").write_bytes(data[:100])
    (tmp_path / "empty").mkdir()
    for folder, fragment in [(tmp_path / "missing", "missing"), (acts, "acts.npy"),
                             (tmp_path / "empty", "not an sksae, SAELens or sparsify"),
                             (bad_json, "Refusing to load"),
                             (bad_weights, "Refusing to load")]:
        assert_user_error(main(["transform", str(folder), str(acts), "-o", out]), capsys,
                          fragment)
    assert not (tmp_path / "codes.npy").exists() and leftovers(tmp_path) == []


def test_parameter_errors_from_the_estimator(acts, tmp_path, capsys):
    out = ["-o", str(tmp_path / "m")]
    for extra, fragment in [
            (["--k", "20"], "k=20"),
            (["--device", "tpu"], "tpu"),
            (["--architecture-params", "{bad json"], "not valid JSON"),
            (["--architecture-params", "[1]"], "JSON object"),
            (["--architecture-params", '{"bogus": 1}'], "bogus"),
            (["--architecture", "matryoshka", "--architecture-params",
              '{"prefix_sizes": "x"}'], "prefix_sizes")]:  # InvalidParameterError
        assert_user_error(main(["fit", str(acts), *out, *FIT, *extra]), capsys, fragment)
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []


POS, NONNEG = "must be a positive integer (>= 1)", "must be a non-negative integer (>= 0)"


@pytest.mark.parametrize("command, option, value, reason", [
    ("transform", "--chunk-rows", "-5", POS), ("transform", "--chunk-rows", "0", POS),
    ("transform", "--chunk-rows", "1.5", "is not an integer"),
    ("fit", "--n-components", "0", POS), ("fit", "--k", "-1", POS),
    ("fit", "--batch-size", "0", POS), ("fit", "--max-iter", "-1", NONNEG),
    ("fit", "--learning-rate", "0", "must be 'auto' or a number > 0"),
    ("fit", "--learning-rate", "-1e-3", "must be 'auto' or a number > 0"),
    ("fit", "--learning-rate", "nan", "must be a finite number"),
    ("fit", "--learning-rate", "fast", "is not a number"),
    ("fit", "--alpha", "-1", "must be >= 0"), ("fit", "--alpha", "inf", "must be a finite number"),
    ("fit", "--alpha", "x", "is not a number"), ("fit", "--l0-coefficient", "-2", "must be >= 0"),
    ("fit", "--random-state", "-1", NONNEG),
    ("fit", "--random-state", "4294967296", "must be at most 2**32 - 1"),
    ("fit", "--checkpoint-every", "often",
     "must be a number of steps or a duration such as 90s, 15min or 2h"),
    ("fit", "--checkpoint-every", "0",
     "must be a number of steps or a duration such as 90s, 15min or 2h"),
    ("demo", "--n-samples", "0", POS), ("bench", "--n-samples", "-3", POS),
    ("bench", "--n-features", "0", POS)])
def test_numeric_options_are_validated(command, option, value, reason, acts, model_dir,
                                       tmp_path, capsys):
    args = {"transform": ["transform", str(model_dir), str(acts), "-o",
                          str(tmp_path / "codes.npy")],
            "fit": ["fit", str(acts), "-o", str(tmp_path / "m")],
            "demo": ["demo", "--no-figure"], "bench": ["bench"]}[command]
    with pytest.raises(SystemExit, match="^2$") as exc:
        main([*args, f"{option}={value}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {value!r}" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(f"{value!r}{':' if reason[0] == 'm' else ''} "
                                                 f"{reason}"), err
    assert list(tmp_path.iterdir()) == []  # the regression: --chunk-rows -5 wrote zeros


# ---------------------------------------------------------------- outputs
def test_transform_refuses_to_overwrite_its_input(acts, model_dir, tmp_path, capsys):
    import shutil

    small = shutil.copy(acts, tmp_path / "acts.npy")
    before = (tmp_path / "acts.npy").read_bytes()
    os.symlink(small, tmp_path / "symlink.npy")
    os.link(small, tmp_path / "hardlink.npy")
    for output in ["acts.npy", "./sub/../acts.npy", "symlink.npy", "hardlink.npy"]:
        (tmp_path / "sub").mkdir(exist_ok=True)
        assert_user_error(main(["transform", str(model_dir), str(small), "-o",
                                str(tmp_path / output)]), capsys, "is the input")
    assert (tmp_path / "acts.npy").read_bytes() == before
    weights = (model_dir / "model.safetensors").read_bytes()
    for output in [model_dir / "codes.npy", model_dir / "model.safetensors", model_dir]:
        assert_user_error(main(["transform", str(model_dir), str(small), "-o",
                                str(output)]), capsys, "model folder")
    assert (model_dir / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]


def test_transform_output_path_errors(acts, model_dir, tmp_path, capsys):
    (tmp_path / "folder.npy").mkdir()
    assert_user_error(main(["transform", str(model_dir), str(acts), "-o",
                            str(tmp_path / "folder.npy")]), capsys, "folder")
    assert_user_error(main(["transform", str(model_dir), str(acts), "-o",
                            str(tmp_path / "no" / "codes.npy")]), capsys, "does not exist")
    assert leftovers(tmp_path) == [] and not (tmp_path / "no").exists()


def test_subprocess_refuses_acts_as_output(acts, model_dir, tmp_path):
    import shutil

    path = shutil.copy(acts, tmp_path / "acts.npy")
    before = (tmp_path / "acts.npy").read_bytes()
    proc = cli_run("transform", model_dir, "acts.npy", "-o", "acts.npy", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert open(path, "rb").read() == before


def test_fit_refuses_to_replace_what_is_not_a_model(acts, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(acts, data / "acts.npy")
    (data / "notes.txt").write_text("keep me")
    (tmp_path / "file").write_text("keep me too")
    assert_user_error(main(["fit", str(data / "acts.npy"), "-o", str(data), *FIT]), capsys,
                      "contains) the input")
    assert_user_error(main(["fit", str(acts), "-o", str(data), *FIT]), capsys,
                      "not an sksae model folder")
    assert_user_error(main(["fit", str(acts), "-o", str(tmp_path / "file"), *FIT]), capsys,
                      "not a folder")
    assert (data / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "file").read_text() == "keep me too"
    assert leftovers(tmp_path) == []


def test_fit_replaces_a_model_folder_at_the_end(acts, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["fit", str(acts), "-o", str(out), *FIT]) == 0
    assert main(["fit", str(acts), "-o", str(out), *FIT, "--n-components", "12"]) == 0
    assert sksae.load(out).n_components_ == 12
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    (tmp_path / "empty").mkdir()  # an empty folder is fine too
    assert main(["fit", str(acts), "-o", str(tmp_path / "empty"), *FIT]) == 0
    assert sksae.load(tmp_path / "empty").n_components_ == 16


def test_fit_max_iter_zero_saves_the_initialization(acts, tmp_path, capsys):
    assert main(["fit", str(acts), "-o", str(tmp_path / "m"), *FIT, "--max-iter", "0"]) == 0
    out = capsys.readouterr().out
    assert "no epoch trained" in out and "Saved to" in out
    model = sksae.load(tmp_path / "m")
    assert model.n_steps_ == 0 and model.transform(np.load(acts)).shape == (300, 16)


# ------------------------------------------------ interrupts, divergence, bugs
class _FailingModel:
    """Wraps a model; its transform raises ``error`` on call number ``at``."""

    def __init__(self, model, error, at):
        self.model, self.error, self.at, self.calls = model, error, at, 0

    def transform(self, X):
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return self.model.transform(X)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("a bug")])
def test_transform_failure_leaves_old_output(error, acts, model_dir, tmp_path, capsys,
                                             monkeypatch):
    codes = tmp_path / "codes.npy"
    np.save(codes, np.arange(3.0))
    before = codes.read_bytes()
    model = sksae.load(model_dir)
    # call 1 sizes the output, call 3 is the second chunk
    monkeypatch.setattr(cli, "_load_model", lambda folder: _FailingModel(model, error, 3))
    args = ["transform", str(model_dir), str(acts), "-o", str(codes), "--chunk-rows", "100"]
    if isinstance(error, KeyboardInterrupt):
        assert main(args) == 130
        assert capsys.readouterr().err.strip() == "interrupted"
    else:  # a bug keeps its traceback (status 1)
        with pytest.raises(RuntimeError, match="a bug"):
            main(args)
    assert codes.read_bytes() == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("a bug"),
                                   OSError(28, "No space left on device")])
def test_fit_failure_while_saving_leaves_old_model(error, acts, tmp_path, capsys,
                                                   monkeypatch):
    import sksae._io

    out = tmp_path / "model"
    assert main(["fit", str(acts), "-o", str(out), *FIT]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save = sksae._io.save

    def save_then_fail(model, path):
        real_save(model, path)  # the whole folder is written, not yet renamed
        raise error

    monkeypatch.setattr(sksae._io, "save", save_then_fail)
    args = ["fit", str(acts), "-o", str(out), *FIT, "--n-components", "12"]
    if isinstance(error, KeyboardInterrupt):
        assert main(args) == 130
        assert capsys.readouterr().err.strip() == "interrupted"
    elif isinstance(error, RuntimeError):
        with pytest.raises(RuntimeError, match="a bug"):
            main(args)
    else:  # disk full: a user's problem, one line
        assert_user_error(main(args), capsys, "No space left")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_divergence_is_a_user_error_with_a_hint(acts, tmp_path, capsys, monkeypatch):
    def diverge(self, X, y=None):
        raise FloatingPointError("the loss is nan at step 3")

    monkeypatch.setattr(sksae.SparseAutoencoder, "fit", diverge)
    line = assert_user_error(main(["fit", str(acts), "-o", str(tmp_path / "m"), *FIT]),
                             capsys, "step 3", "--learning-rate")
    assert "diverged" in line
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_fit_exits_130_and_writes_nothing(tmp_path):
    X = np.random.RandomState(0).randn(4000, 16).astype(np.float32)
    np.save(tmp_path / "acts.npy", X)
    before = (tmp_path / "acts.npy").read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sksae", "fit", "acts.npy", "-o", "model", "--k", "4",
         "--max-iter", "100000", "--batch-size", "64", "--device", "cpu", "-q"],
        cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("Fitting")
        time.sleep(1.0)  # well into training
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert err.strip() == "interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.npy"]
    assert (tmp_path / "acts.npy").read_bytes() == before


def test_real_divergence_is_a_user_error(acts, tmp_path, capsys):
    line = assert_user_error(main(["fit", str(acts), "-o", str(tmp_path / "m"), *FIT,
                                   "--learning-rate", "1e12", "--max-iter", "3"]),
                             capsys, "diverged")
    assert "--learning-rate" in line
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------ every error branch, by its message
MODEL_PY = """
import torch


def make():
    return torch.nn.Sequential(torch.nn.Embedding(30, 4), torch.nn.Linear(4, 4))


not_a_module = 3
"""


def _error_cases(tmp, acts, model):
    """(argv, regex of the whole message after 'error: ') for each user-error branch."""
    (tmp / "folder.npy").mkdir()
    (tmp / "plain_dir").mkdir()
    (tmp / "file").write_text("x")
    (tmp / "notes").mkdir()
    (tmp / "notes" / "notes.txt").write_text("keep")
    (tmp / "acts.txt").write_text("1 2")
    (tmp / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    np.save(tmp / "empty.npy", np.zeros((0, 3), np.float32))
    (tmp / "codes_dir").mkdir()
    (tmp / "m.py").write_text(MODEL_PY)
    np.save(tmp / "ids.npy", np.ones((2, 3), np.int64))
    np.save(tmp / "fids.npy", np.ones((2, 3)))
    (tmp / "ids.txt").write_text("1 2 3")
    (tmp / "blank.txt").write_text("\n  \n")
    (tmp / "lines.txt").write_text("hello\n")
    t, a, m = str(tmp), str(acts), str(model)
    fit = ["fit", a, *FIT, "-o"]
    tr = ["transform", m, a, "-o"]
    hv = ["harvest", f"{t}/m.py:make", "--layer", "1", "-q", "-o", f"{t}/store"]
    e = re.escape
    return [
        (tr + [f"{t}/no/codes.npy"], f"output folder does not exist: {e(t)}/no"),
        (tr + [f"{t}/folder.npy"], f"output is a folder: {e(t)}/folder.npy"),
        (fit + [f"{t}/file"], f"output exists and is not a folder: {e(t)}/file"),
        (fit + [f"{t}/notes"], f"{e(t)}/notes exists and is not an sksae model folder; remove "
                               "it or choose another --output."),
        (["fit", f"{t}/plain_dir", "-o", f"{t}/m"],
         f"{e(t)}/plain_dir is a folder but not an activation store \\(no manifest.json\\)."),
        (["fit", a, "--layer", "x", "-o", f"{t}/m"],
         f"--layer applies to an activation store; {e(a)} is a file."),
        (["fit", f"{t}/acts.txt", "-o", f"{t}/m"],
         f"{e(t)}/acts.txt is not a .npy file \\(save arrays with numpy.save\\) nor an "
         "activation store folder."),
        (["fit", f"{t}/bad.npy", "-o", f"{t}/m"], f"{e(t)}/bad.npy is not a readable .npy "
                                                  "array: .+"),
        (["fit", f"{t}/empty.npy", "-o", f"{t}/m"],
         f"{e(t)}/empty.npy holds an array of shape \\(0, 3\\): no rows to use."),
        (["transform", f"{t}/nomodel", a, "-o", f"{t}/c.npy"],
         f"No such model folder: {e(t)}/nomodel"),
        (["transform", a, a, "-o", f"{t}/c.npy"], f"model is not a folder: {e(a)}"),
        (["transform", f"{t}/plain_dir", a, "-o", f"{t}/c.npy"],
         f"{e(t)}/plain_dir is not an sksae, SAELens or sparsify model folder."),
        (fit + [f"{t}/m", "--architecture-params", "{x"],
         "--architecture-params is not valid JSON \\(.+\\)."),
        (fit + [f"{t}/m", "--architecture-params", "[1]"],
         "--architecture-params must be a JSON object, e.g. .+"),
        (["fit", a, *FIT, "-o", str(acts.parent)],
         f"--output {e(str(acts.parent))} is \\(or contains\\) the input {e(a)}; choose "
         "another folder."),
        (tr + [a], f"--output {e(a)} is the input {e(a)}; write the codes to another file."),
        (tr + [f"{m}/codes.npy"], f"--output {e(m)}/codes.npy is inside the model folder "
                                  f"{e(m)}; write the codes elsewhere."),
        (tr + [f"{t}/codes_dir"], f"--output {e(t)}/codes_dir exists and is not a code store; "
                                  "choose another path."),
        (["harvest", "nomodule", "--layer", "1", "--tokens", f"{t}/ids.npy", "-o", f"{t}/s"],
         "MODEL 'nomodule' must be 'package.module:name' or 'path/to/file.py:name'."),
        (["harvest", f"{t}/none.py:make", "--layer", "1", "--tokens", f"{t}/ids.npy",
          "-o", f"{t}/s"], f"No such model file: {e(t)}/none.py"),
        (["harvest", "sksae_no_such_pkg:make", "--layer", "1", "--tokens", f"{t}/ids.npy",
          "-o", f"{t}/s"], "cannot import 'sksae_no_such_pkg' \\(No module named .+\\)."),
        (["harvest", f"{t}/m.py:nothing", "--layer", "1", "--tokens", f"{t}/ids.npy",
          "-o", f"{t}/s"], f"{e(t)}/m.py has no 'nothing'."),
        (["harvest", f"{t}/m.py:not_a_module", "--layer", "1", "--tokens", f"{t}/ids.npy",
          "-o", f"{t}/s"], f"{e(t)}/m.py:not_a_module is a int, not a torch.nn.Module or a "
                           "function returning one."),
        (hv, "give exactly one of --tokens \\(a .npy of token ids\\) and --text \\(a text "
             "file, one input per line\\)."),
        (hv[:-1] + [f"{t}/file", "--tokens", f"{t}/ids.npy"],
         f"--output {e(t)}/file exists and is not a folder."),
        (hv + ["--tokens", f"{t}/ids.txt"], f"--tokens {e(t)}/ids.txt is not a .npy file."),
        (hv + ["--tokens", f"{t}/bad.npy"], f"{e(t)}/bad.npy is not a readable .npy array: .+"),
        (hv + ["--tokens", f"{t}/fids.npy"],
         f"--tokens {e(t)}/fids.npy must hold a 2-D array of integer token ids \\(sequences x "
         "positions\\); it holds \\(2, 3\\) float64."),
        (hv + ["--text", f"{t}/lines.txt"], "--text needs --tokenizer \\(a local tokenizer "
                                            "folder\\)."),
        (hv + ["--text", f"{t}/blank.txt", "--tokenizer", f"{t}/tok"],
         f"--text {e(t)}/blank.txt has no non-empty line."),
        (hv + ["--text", f"{t}/lines.txt", "--tokenizer", f"{t}/plain_dir"],
         f"cannot load the tokenizer '{e(t)}/plain_dir' offline \\(.+\\)."),
    ]


def test_every_user_error_branch_names_its_cause(acts, model_dir, tmp_path, capsys,
                                                 monkeypatch):
    before = {p: p.read_bytes() for p in (acts, model_dir / "config.json")}
    cases = _error_cases(tmp_path, acts, model_dir)
    for argv, message in cases:
        line = assert_user_error(main(argv), capsys)
        assert re.fullmatch("error: " + message, line), (argv, line)
    assert len(cases) == 31
    # --text without the optional transformers wheel
    monkeypatch.setitem(sys.modules, "transformers", None)
    line = assert_user_error(main(["harvest", f"{tmp_path}/m.py:make", "--layer", "1", "-o",
                                   f"{tmp_path}/s", "--text", f"{tmp_path}/lines.txt"]), capsys)
    assert line == ("error: --text needs the transformers package (pip install transformers); "
                    "or pass --tokens with token ids.")
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "m").exists() and not (tmp_path / "s").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("inside", ["checkpoints in the model", "model in the checkpoints"])
def test_fit_refuses_overlapping_checkpoint_and_model_folders(inside, acts, tmp_path, capsys):
    model, ckpt = ((tmp_path / "m", tmp_path / "m" / "ckpt") if inside.startswith("checkpoints")
                   else (tmp_path / "ckpt" / "m", tmp_path / "ckpt"))
    assert main(["fit", str(acts), "-o", str(model), "--checkpoint-dir", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "overlap" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_fit_writes_checkpoints_marked_finished(acts, tmp_path, capsys):
    from sksae._checkpoint import read_checkpoint

    args = ["fit", str(acts), "--n-components", "16", "--k", "2", "--batch-size", "32",
            "--max-iter", "2", "--random-state", "0", "-q", "--checkpoint-every", "5",
            "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    saved = read_checkpoint(tmp_path / "ckpt")
    assert saved["complete"] and saved["loop"]["n_steps"] > 5
