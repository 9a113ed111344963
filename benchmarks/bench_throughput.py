"""TopK SAE training throughput: sksae vs the roofline, EleutherAI sparsify and SAELens.

For each shape (n_features, n_components, k, batch_size) every library trains a
TopK SAE on the same float32 data, with the same batch size, learning rate and
number of epochs; we report training samples/s of the training loop (the same
thing for every library: the steps over the epochs, after the model is built
and initialised), the set-up time before the loop separately, the ratio to
each peer, the ratio to the roofline, and the FVU of every model on the
training data after training (sum ||x - x_hat||^2 / sum ||x - mean||^2). Each
library first runs one untimed step on a small slice, so that no library pays
torch's first-call costs for the others.

Roofline: the floor of a TopK step is one dense encoder product
(2 B D F flops) plus the top-k selection; it is measured in the same run as
``addmm(b_enc, x, W_enc^T)`` into a reused buffer + ``topk`` on a batch, so
the ratio depends little on how loaded the machine is. It is a best case:
the fastest repetition, with the faster of all threads or one thread on the
CPU and the faster of ``torch.topk`` and sksae's selection (compiled with
the ``numba`` extra), measured before and after the libraries train. It is
measured in float32 and, where some library's products run in bf16 (sksae's
default on CUDA and on CPUs with AVX512-BF16 or AMX; the peers' on CUDA), in
bf16 as well; each library's ``/roofline`` is against the roofline of its
own products' precision, so bf16 products earn no credit over a float32
floor.

Precision: sksae runs with ``precision="auto"`` (``--precision``). On a CPU
where that means bf16, sparsify also runs a second time with its forward
wrapped in CPU bf16 autocast (``sparsify-bf16``; its own autocast is CUDA
only), so the table shows what bf16 gives a dense-backward library too.

Threads (CPU): sksae chooses per operation between one thread and all of
torch's (``sksae._accel.threads``); each peer is run twice, with all threads and
with one, and its faster run is reported (``--peer-threads``), so a busy
machine does not handicap a peer that uses every thread by default.

Peers (imported when installed, skipped with a note otherwise; their code is
never vendored here):

- EleutherAI sparsify (``pip install eai-sparsify``): ``SparseCoder`` with
  its own forward (TopK, AuxK, FVU loss) in a loop that follows its trainer:
  Adam, decoder gradient projection, decoder renormalisation.
  ``SPARSIFY_DISABLE_TRITON=1`` is set on CPU runs.
- SAELens (``pip install sae-lens``): ``TopKTrainingSAE.training_forward_pass``
  in a loop that follows its ``SAETrainer``: Adam, gradient clipping at 1.

Data: sparse superposition, 2 n_features unit ground-truth directions, ~k/2
active per row with uniform magnitudes, plus 1% Gaussian noise.

Usage::

    python benchmarks/bench_throughput.py --quick          # a few minutes on 2 cores
    python benchmarks/bench_throughput.py --device cuda     # the same table on a GPU

Measured numbers are in ``benchmarks/results/throughput.txt``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import os
import sys
import time

import numpy as np
import torch

from sksae import SparseAutoencoder
from sksae._accel.device import synchronize
from sksae._sae_trainer import product_dtype
from sksae._accel.select import select_topk

SHAPES = [(384, 3072, 32, 1024), (768, 24576, 32, 4096)]


def make_data(n_samples, n_features, k, seed=0):
    rng = np.random.RandomState(seed)
    n_true = 2 * n_features
    F = rng.randn(n_true, n_features)
    F /= np.linalg.norm(F, axis=1, keepdims=True)
    p = 0.995 ** np.arange(n_true)
    p = np.minimum(p / p.sum() * max(1, k // 2), 1)
    X = np.zeros((n_samples, n_features), dtype=np.float32)
    for s in range(0, n_samples, 8192):  # bounded memory
        m = min(8192, n_samples - s)
        acts = (rng.rand(m, n_true) < p) * rng.rand(m, n_true)
        X[s:s + m] = acts @ F + 0.01 * rng.randn(m, n_features)
    return X


def default_lr(n_components):
    return 2e-4 / math.sqrt(n_components / 2**14)


def fvu(recon, X, device, chunk=1024):
    """FVU of ``recon`` (tensor -> tensor) over the rows of X."""
    resid = total = 0.0
    mean = torch.as_tensor(X.mean(0, dtype=np.float64))
    with torch.no_grad():
        for s in range(0, X.shape[0], chunk):
            x = torch.as_tensor(X[s:s + chunk]).to(device)
            x_hat = recon(x).float()
            resid += (x - x_hat).double().pow(2).sum().item()
            total += (x.double().cpu() - mean).pow(2).sum().item()
    return resid / total


def timed(fn, device, reps, best=False):
    fn()
    synchronize(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        ts.append(time.perf_counter() - t0)
    return float(np.min(ts) if best else np.median(ts))


def roofline(n_features, n_components, k, batch_size, device, dtype=torch.float32, reps=7):
    """Samples/s of the unavoidable work (dense encoder product + top-k), best case.

    The product runs in ``dtype`` (bf16: the operands as bf16, as under autocast).
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, n_features, generator=g).to(device, dtype)
    W = torch.randn(n_components, n_features, generator=g).to(device, dtype)
    b = torch.zeros(n_components, device=device, dtype=dtype)
    # into one buffer: a fresh (B, F) result would add page faults to the floor on the CPU
    pre = torch.empty(batch_size, n_components, device=device, dtype=dtype)

    def work(select):
        torch.addmm(b, x, W.T, out=pre)
        select(pre)

    # the faster of torch's top-k and sksae's compiled one (numba extra): a
    # faster selection in sksae's step lowers the floor as well
    selects = [lambda p: torch.topk(p, k, dim=-1, sorted=False), lambda p: select_topk(p, k)]
    n = torch.get_num_threads()
    best = math.inf
    for threads in [n] + ([1] if device.type == "cpu" and n > 1 else []):
        torch.set_num_threads(threads)
        try:
            best = min(best, *(timed(lambda: work(s), device, reps, best=True) for s in selects))
        finally:
            torch.set_num_threads(n)
    return batch_size / best


def batches(X, batch_size, epochs, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.as_tensor(X).to(device)
    for _ in range(epochs):
        order = torch.randperm(X.shape[0], generator=g).to(device)
        for s in range(0, X.shape[0], batch_size):
            yield data[order[s:s + batch_size]]


# -- sksae ----------------------------------------------------------------------
def run_sksae(X, n_components, k, batch_size, epochs, device, precision="auto",
              dead_window="auto"):
    import sksae._sae

    sae = SparseAutoencoder(n_components=n_components, k=k, batch_size=batch_size,
                            max_iter=epochs, tol=0.0, max_no_improvement=None,
                            random_state=0, device=str(device), precision=precision,
                            dead_window=dead_window)
    loop = sksae._sae.run_minibatch_loop
    marks = {}

    def timed_loop(*args, **kwargs):  # the training loop, after set-up
        synchronize(device)
        marks["start"] = time.perf_counter()
        try:
            return loop(*args, **kwargs)
        finally:
            synchronize(device)
            marks["end"] = time.perf_counter()

    synchronize(device)
    t0 = time.perf_counter()
    sksae._sae.run_minibatch_loop = timed_loop
    try:
        sae.fit(X)
    finally:
        sksae._sae.run_minibatch_loop = loop
    seconds = marks["end"] - marks["start"]
    setup = marks["start"] - t0
    p = {n: torch.as_tensor(getattr(sae, a)).to(device) for n, a in [
        ("W_enc", "encoder_weights_"), ("b_enc", "encoder_bias_"),
        ("W_dec", "components_"), ("b_dec", "decoder_bias_")]}

    def recon(x):
        pre = torch.addmm(p["b_enc"], x - p["b_dec"], p["W_enc"].T)
        v, i = torch.topk(pre, k, dim=-1, sorted=False)
        return torch.nn.functional.embedding_bag(i, p["W_dec"], per_sample_weights=v.clamp_min(0),
                                                 mode="sum") + p["b_dec"]

    return seconds, setup, recon


# -- EleutherAI sparsify ------------------------------------------------------------
def run_sparsify(X, n_components, k, batch_size, epochs, device, bf16=None):
    from sparsify import SparseCoder, SparseCoderConfig

    synchronize(device)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = SparseCoderConfig(num_latents=n_components, k=k)
    sae = SparseCoder(X.shape[1], cfg, device=device, dtype=torch.float32)
    sae.b_dec.data = torch.as_tensor(X[:4096].mean(0)).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=default_lr(n_components))
    since_fired = torch.zeros(n_components, dtype=torch.long, device=device)
    dead_threshold = 10_000_000  # sparsify's default, in tokens
    # its forward autocasts to bf16 on CUDA only; bf16=True wraps it on the CPU too
    use_autocast = device.type == "cuda" if bf16 is None else bf16
    if device.type == "cuda":
        # Triton compiles sparsify's kernels at their first call: in the set-up, on a
        # throwaway copy (as sksae's set-up is not timed either), not in the timed loop
        warm = SparseCoder(X.shape[1], cfg, device=device, dtype=torch.float32)
        x0 = torch.as_tensor(X[:batch_size]).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=use_autocast):
            warm(x0, dead_mask=torch.ones(n_components, dtype=torch.bool,
                                          device=device)).fvu.backward()
        del warm
    step = sparsify_step(sae, opt, since_fired, dead_threshold, use_autocast)
    synchronize(device)
    t1 = time.perf_counter()
    for x in batches(X, batch_size, epochs, device):
        step(x)
    synchronize(device)
    seconds = time.perf_counter() - t1
    return seconds, t1 - t0, lambda x: sae(x).sae_out


def sparsify_step(sae, opt, since_fired, dead_threshold, use_autocast):
    """One training step of a sparsify ``SparseCoder`` as its trainer takes it."""
    def step(x):
        with torch.autocast(x.device.type, torch.bfloat16, enabled=use_autocast):
            out = sae(x, dead_mask=since_fired > dead_threshold)
            loss = out.fvu + 1 / 32 * out.auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[out.latent_indices.flatten()] = 0
        return out
    return step


# -- SAELens ----------------------------------------------------------------------
def run_saelens(X, n_components, k, batch_size, epochs, device):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    synchronize(device)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = TopKTrainingSAEConfig(d_in=X.shape[1], d_sae=n_components, k=k,
                                device=str(device))
    sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=default_lr(n_components), betas=(0.9, 0.999))
    since_fired = torch.zeros(n_components, device=device)
    dead_window = 1000  # SAELens's default dead_feature_window, in steps
    use_autocast = device.type == "cuda"
    synchronize(device)
    t1 = time.perf_counter()
    for step, x in enumerate(batches(X, batch_size, epochs, device)):
        with torch.autocast(device.type, torch.bfloat16, enabled=use_autocast):
            out = sae.training_forward_pass(step_input=TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=since_fired > dead_window,
                n_training_steps=step, is_logging_step=False))
        with torch.no_grad():
            fired = out.feature_acts.bool().any(0)
            since_fired += 1
            since_fired[fired] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    synchronize(device)
    seconds = time.perf_counter() - t1
    return seconds, t1 - t0, lambda x: sae(x)


PEERS = {"sparsify": ("sparsify", run_sparsify), "SAELens": ("sae_lens", run_saelens),
         "sparsify-bf16": ("sparsify", functools.partial(run_sparsify, bf16=True))}


def available(module):
    try:
        importlib.import_module(module)
        return None
    except Exception as exc:  # not installed, or a broken install
        return f"{type(exc).__name__}: {exc}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows and epochs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default="0,1", help="indices into SHAPES")
    parser.add_argument("--peers", default="auto",
                        help="comma-separated among sparsify, sparsify-bf16, SAELens; auto: "
                             "sparsify and SAELens, and sparsify-bf16 when sksae's CPU step "
                             "runs bf16 products (sparsify's own autocast is CUDA-only)")
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="SparseAutoencoder(precision=...)")
    parser.add_argument("--peer-threads", choices=["best", "all", "one"], default="best",
                        help="CPU: run each peer with all of torch's threads and with one, "
                             "and report its faster run (best), or only one of them")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    if device.type == "cpu":
        print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {torch.get_num_threads()} threads"))
    ours_low = product_dtype(args.precision, device, torch.float32) is not None
    peers = args.peers
    if peers == "auto":
        peers = "sparsify,SAELens" + (",sparsify-bf16" if ours_low and device.type == "cpu"
                                      else "")
    # the precision of each library's products (the peers autocast on CUDA only)
    low = {"sksae": ours_low, "sparsify-bf16": True}
    print(f"sksae precision={args.precision!r}: products in "
          f"{'bf16' if ours_low else 'float32'}; /roofline compares each library with "
          "the roofline of its own products' precision")
    for i in [int(s) for s in args.shapes.split(",")]:
        D, F, k, B = SHAPES[i]
        large = F > 8192
        if device.type == "cuda":
            n_samples, epochs = (2**17, 3) if not args.quick else (2**16, 2)
        elif args.quick:
            n_samples, epochs = (8 * B, 1) if large else (16 * B, 2)
        else:
            n_samples, epochs = (16 * B, 1) if large else (64 * B, 3)
        X = make_data(n_samples, D, k)
        rows = n_samples * epochs
        print(f"\n== n_features={D} n_components={F} k={k} batch={B}: "
              f"{n_samples} rows x {epochs} epochs ==")
        roof_dtypes = {"fp32": torch.float32}
        if ours_low or device.type == "cuda":
            roof_dtypes["bf16"] = torch.bfloat16
        roofs = {n: roofline(D, F, k, B, device, dt) for n, dt in roof_dtypes.items()}
        runners = {"sksae": functools.partial(run_sksae, precision=args.precision)}
        for name in [p for p in peers.split(",") if p]:
            module, fn = PEERS[name]
            why = available(module)
            if why is not None:
                print(f"  {name}: skipped, not importable ({why})")
                continue
            runners[name] = fn
        for fn in runners.values():  # untimed warm-up: first-call costs paid by none
            fn(X[:B], F, k, B, 1, device)
        results = {}
        n_threads = torch.get_num_threads()
        for name, fn in runners.items():
            # sksae picks its threads per operation itself; a peer gets its faster
            # run of all threads and one thread (on busy cores the one-thread run
            # can be several times faster: threads wait for each other)
            options = ([n_threads] if name == "sksae" or device.type != "cpu"
                       or args.peer_threads == "all" or n_threads == 1
                       else [1] if args.peer_threads == "one" else [n_threads, 1])
            for threads in options:
                torch.set_num_threads(threads)
                try:
                    sec, setup, recon = fn(X, F, k, B, epochs, device)
                    result = (rows / sec, setup, fvu(recon, X, device), threads)
                finally:
                    torch.set_num_threads(n_threads)
                if name not in results or result[0] > results[name][0]:
                    results[name] = result
        roofs = {n: max(r, roofline(D, F, k, B, device, roof_dtypes[n])) for n, r in roofs.items()}
        ours = results["sksae"][0]
        print(f"  {'':13s} {'samples/s':>11s} {'setup s':>8s} {'FVU':>7s} "
              f"{'sksae/this':>10s} {'/roofline':>9s} {'products':>8s} {'threads':>8s}")
        for n, roof in roofs.items():
            print(f"  {'roofline ' + n:13s} {roof:11.0f} {'':>8s} {'':>7s} {ours / roof:10.2f} "
                  f"{1:9.2f} {n:>8s} {'best':>8s}")
        for name, (sps, setup, f, threads) in results.items():
            prec = "bf16" if low.get(name, device.type == "cuda") else "fp32"
            used = "auto" if name == "sksae" and device.type == "cpu" else str(threads)
            print(f"  {name:13s} {sps:11.0f} {setup:8.2f} {f:7.4f} {ours / sps:10.2f} "
                  f"{sps / roofs[prec]:9.2f} {prec:>8s} {used:>8s}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
