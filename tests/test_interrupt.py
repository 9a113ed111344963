"""Ctrl-C in the middle of fit, partial_fit, save and the CLI's transform loses nothing.

Each case runs in a real subprocess that receives SIGINT (Python turns it into
KeyboardInterrupt) in the middle of the operation. Afterwards the estimator,
the saved folder and the input files are each intact: the old state or the
new one, never a mix.
"""

import hashlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import sksae

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

_PRELUDE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import sksae
    from sksae import SparseAutoencoder, DictionaryLearnerGPU

    X = np.random.RandomState(0).randn(400, 8).astype(np.float32)

    def interrupt_after(n):
        calls = []
        def callback(*args):
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, mid-loop
        return callback

    def interrupt_inside(owner, name, n=1):
        # send SIGINT from inside the n-th call of owner.name (then leave it)
        real, calls = getattr(owner, name), []
        def wrapped(*args, **kwargs):
            calls.append(1)
            out = real(*args, **kwargs)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGINT)
            return out
        setattr(owner, name, wrapped)
        return lambda: setattr(owner, name, real)

    def arrays(model):
        return {k: np.array(v, copy=True) for k, v in vars(model).items()
                if isinstance(v, np.ndarray)}

    def same(a, b):
        return a.keys() == b.keys() and all(
            np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") for k in a)
""")


def _run(body, *args, timeout=240):
    proc = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(body), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


_SAE = ("SparseAutoencoder(n_components=16, k=3, max_iter=4, batch_size=32, random_state=0, "
        "device='cpu')")
_DL = ("DictionaryLearnerGPU(n_components=6, alpha=0.2, max_iter=4, batch_size=32, "
       "random_state=0, device='cpu')")


@pytest.mark.parametrize("make, method, inject", [
    (_SAE, "fit", "model.set_params(callback=interrupt_after(3))"),
    (_SAE, "partial_fit", "import sksae._sae_trainer as t; interrupt_inside(t.SAETrainer, 'step', 3)"),
    (_DL, "fit", "model.set_params(callback=interrupt_after(3))"),
    # one minibatch: the Ctrl-C lands inside its dictionary update
    (_DL, "partial_fit", "import sksae._dict_learning as d; undo = interrupt_inside(d, 'update_dictionary')"),
])
def test_sigint_mid_training_leaves_the_estimator_as_it_was(make, method, inject):
    out = _run(f"""
        model = {make}.fit(X)
        before = arrays(model)
        undo = lambda: None
        {inject}
        try:
            getattr(model, "{method}")(X[::-1].copy() * 2)
        except KeyboardInterrupt:
            print("interrupted")
        undo()
        assert same(arrays(model), before), "fitted arrays changed"
        model.set_params(callback=None)
        # the training state goes on from where it was: the same as an uninterrupted twin
        twin = {make}.fit(X)
        getattr(twin, "{method}")(X)
        getattr(model, "{method}")(X)
        assert same(arrays(model), arrays(twin)), "training state moved"
        print("intact")
    """)
    assert "interrupted" in out and "intact" in out


def test_sigint_during_a_first_fit_leaves_the_estimator_unfitted():
    out = _run("""
        from sklearn.exceptions import NotFittedError
        from sklearn.utils.validation import check_is_fitted
        for model in (SparseAutoencoder(n_components=16, k=3, max_iter=4, batch_size=32,
                                        device="cpu"),
                      DictionaryLearnerGPU(n_components=6, max_iter=4, batch_size=32,
                                           device="cpu")):
            model.set_params(callback=interrupt_after(2))
            try:
                model.fit(X)
            except KeyboardInterrupt:
                pass
            try:
                check_is_fitted(model)
            except NotFittedError:
                print("unfitted")
    """)
    assert out.count("unfitted") == 2


@pytest.mark.parametrize("where, expected", [
    ("_write_exclusive", "old"),  # after the first file's temporary: nothing replaced yet
    ("_fsync_dir", "new"),  # after the renames
    ("replace", "new"),  # between the two renames: held until both are done
])
def test_sigint_mid_save_leaves_the_old_folder_or_the_new_one(tmp_path, where, expected):
    folder = tmp_path / "model"
    owner = "sksae._io.os" if where == "replace" else "sksae._io"
    out = _run(f"""
        import sksae._io
        folder = sys.argv[1]
        old = SparseAutoencoder(n_components=16, k=3, max_iter=1, random_state=0,
                                device="cpu").fit(X)
        new = SparseAutoencoder(n_components=16, k=3, max_iter=2, random_state=1,
                                device="cpu").fit(X)
        sksae.save(old, folder)
        undo = interrupt_inside({owner}, "{where}")
        try:
            sksae.save(new, folder)
        except KeyboardInterrupt:
            print("interrupted")
        undo()
        got = sksae.load(folder).components_
        assert np.array_equal(got, old.components_) or np.array_equal(got, new.components_)
        print("old" if np.array_equal(got, old.components_) else "new")
    """, str(folder))
    assert "interrupted" in out and out.split()[-1] == expected
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sigint_mid_cli_transform_keeps_the_input_and_leaves_no_half_output(tmp_path):
    X = np.random.RandomState(0).randn(400_000, 8).astype(np.float32)
    acts = tmp_path / "acts.npy"
    np.save(acts, X)
    model = sksae.SparseAutoencoder(n_components=64, k=4, max_iter=1, device="cpu",
                                    random_state=0).fit(X[:2000])
    sksae.save(model, tmp_path / "model")
    digest = _sha(acts)
    out = tmp_path / "codes.npy"
    proc = subprocess.Popen([sys.executable, "-m", "sksae", "transform", str(tmp_path / "model"),
                             str(acts), "-o", str(out), "--chunk-rows", "32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.monotonic()  # wait until it writes (a file beside the input appears)
    while {p.name for p in tmp_path.iterdir()} <= {"acts.npy", "model"}:
        assert proc.poll() is None and time.monotonic() - start < 120, proc.poll()
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), stderr[-2000:]
    assert "Traceback" not in stderr
    assert _sha(acts) == digest  # the input is untouched
    if proc.returncode == 130:  # interrupted: no output at all, no temporary left
        assert not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.npy", "model"]
    else:  # it finished first: the whole output
        assert np.load(out, mmap_mode="r").shape == (400_000, 64)
