"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node=2`` (gloo, CPU).

``python -m torch.distributed.run --nproc_per_node=2 tests/_distributed_worker.py CASE OUT``

Each rank fits in its process group and writes ``OUT/{name}_rank{r}.npy``
(the decoder) and ``OUT/{name}_rank{r}_l0.npy`` (a SparseAutoencoder's per-step L0); the
test fits the single-process references and compares.
"""

import os
import signal
import sys

import numpy as np
import torch.distributed as dist

from sksae import DictionaryLearnerGPU, SparseAutoencoder
from sksae.distributed import init_from_environment


def data(n=1200, d=16, seed=0):
    rng = np.random.RandomState(seed)
    return (rng.randn(n, d) @ rng.randn(d, d)).astype(np.float32)


# every model of the equality cases: name -> (estimator, input kind)
SAE = dict(n_components=48, k=4, batch_size=16, max_iter=3, random_state=0,
           precision="float32")
CASES = {
    "topk": (lambda: SparseAutoencoder(**SAE), "array"),
    "topk_auxk": (lambda: SparseAutoencoder(**{**SAE, "k": 2}, dead_window=64), "array"),
    "batchtopk": (lambda: SparseAutoencoder(**SAE, architecture="batchtopk"), "array"),
    "relu": (lambda: SparseAutoencoder(**SAE, architecture="relu"), "array"),
    "jumprelu": (lambda: SparseAutoencoder(**SAE, architecture="jumprelu"), "array"),
    "gated": (lambda: SparseAutoencoder(**SAE, architecture="gated"), "array"),
    "matryoshka": (lambda: SparseAutoencoder(**SAE, architecture="matryoshka",
                                             architecture_params={"prefix_sizes": [8, 24]}),
                   "array"),
    "topk_store": (lambda: SparseAutoencoder(**SAE, shuffle_buffer=160), "store"),
    "latent": (lambda: SparseAutoencoder(**{**SAE, "n_components": 51}, dead_window=64),
               "array"),
    "topk_partial": (lambda: SparseAutoencoder(**SAE), "array"),
    "dictionary": (lambda: DictionaryLearnerGPU(24, alpha=0.3, batch_size=16, max_iter=3,
                                                random_state=0, tol=0,
                                                max_no_improvement=None), "array64"),
    # a last batch of one row: one rank's part of it is empty
    "batchtopk_ragged": (lambda: SparseAutoencoder(**SAE, architecture="batchtopk"), "ragged"),
    "matryoshka_ragged": (lambda: SparseAutoencoder(**SAE, architecture="matryoshka"),
                          "ragged"),
}
# bf16 selection products (CUDA's autocast; on the CPU precision="bfloat16"): ties at the cut
TIES = {
    name: (lambda arch=arch: SparseAutoencoder(
        n_components=512, k=8, batch_size=512, max_iter=1, random_state=0,
        architecture=arch, precision="bfloat16"), "wide")
    for name, arch in (("batchtopk_bf16", "batchtopk"), ("matryoshka_bf16", "matryoshka"))}


# cases where the ranks must agree, whatever one process would fit: random_state=None
# (every rank draws rank 0's batches and rows), and a dictionary update that rounds
# differently on rank 1 (as a GPU's timed choice between device and host sweeps can)
ALIKE = {
    "topk_unseeded": (lambda: SparseAutoencoder(**{**SAE, "random_state": None}), "array"),
    "dictionary_unseeded": (lambda: DictionaryLearnerGPU(
        24, alpha=0.3, batch_size=16, max_iter=3, random_state=None, tol=0,
        max_no_improvement=None), "array64"),
    "dictionary_rounding": (lambda: DictionaryLearnerGPU(
        24, alpha=0.3, batch_size=16, max_iter=1, random_state=0), "array64"),
}


def _round_differently():
    """Rank 1's dictionary sweeps end one part in 10^9 off (another placement's rounding)."""
    import sksae._online as online

    def sweep(site, t, on_device, on_host):
        out = on_device()
        t.mul_(1 + 1e-9)
        return out

    online.run_faster = sweep


def make(name, distributed):
    est, kind = {**CASES, **TIES, **ALIKE}[name]
    model = est()
    model.set_params(distributed=("latent" if name == "latent" else "data")
                     if distributed else False)
    return model, kind


def fit(model, name, X):
    """``fit``, or for the ``_partial`` cases two ``partial_fit`` calls."""
    if name.endswith("_partial"):
        return model.partial_fit(X).partial_fit(X)
    return model.fit(X)


def inputs(kind, out):
    if kind == "ragged":
        return data(n=1201)
    if kind == "wide":
        return data(n=4096, d=64)
    X = data()
    if kind == "array64":
        return X.astype(np.float64)
    if kind == "store":
        from sksae.activations import open_store
        return open_store(os.path.join(out, "store"))
    return X


def main():
    case, out = sys.argv[1], sys.argv[2]
    # cli_slow: collectives time out after 10 s, and rank 0 writes the model for 15 s
    init_from_environment(timeout_s=10 if case == "cli_slow" else 60)
    rank = dist.get_rank()
    if case == "cli_slow" and rank == 0:
        import time

        import sksae._io

        save = sksae._io.save

        def slow_save(*args, **kwargs):
            time.sleep(15)
            return save(*args, **kwargs)

        sksae._io.save = slow_save
    if case == "equal":
        for name in sys.argv[3].split(","):
            if name == "dictionary_rounding" and rank == 1:
                _round_differently()
            model, kind = make(name, True)
            fit(model, name, inputs(kind, out))
            np.save(os.path.join(out, f"{name}_rank{rank}.npy"), model.components_)
            if hasattr(model, "history_"):  # SparseAutoencoder's per-step L0
                np.save(os.path.join(out, f"{name}_rank{rank}_l0.npy"),
                        model.history_["step"]["l0"])
    elif case in ("killed", "resumed"):
        model, kind = make("topk", True)
        model.set_params(checkpoint_dir=os.path.join(out, "ckpt"), checkpoint_every=40)
        if case == "killed" and rank == 1:
            def die(loc):  # a hard kill after the second checkpoint
                if loc["n_steps"] == 97:
                    os.kill(os.getpid(), signal.SIGKILL)
            model.set_params(callback=die)
        model.fit(inputs(kind, out))
        np.save(os.path.join(out, f"resumed_rank{rank}.npy"), model.components_)
    elif case in ("cli", "cli_slow"):
        from sksae.__main__ import main as cli

        status = cli(["fit", os.path.join(out, "acts.npy"), "-o", os.path.join(out, "cli-model"),
                      "--n-components", "32", "--k", "4", "--batch-size", "32",
                      "--max-iter", "2", "--random-state", "0", "-q",
                      "--precision", "float32"])
        sys.exit(status)
    elif case == "failing":
        model, kind = make("topk", True)
        if rank == 1:
            def fail(loc):
                if loc["n_steps"] == 50:
                    raise RuntimeError("rank 1 failed on purpose")
            model.set_params(callback=fail)
        model.fit(inputs(kind, out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
