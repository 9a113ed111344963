"""The floor of a TopK training step on this machine, pass by pass, against the roofline.

    python benchmarks/bench_step_floor.py [--shapes 0,1] [--reps 15]

``bench_throughput.py`` compares training samples/s with a roofline that
counts only the encoder product and the top-k. A training step also has
passes no implementation can skip: Adam over every parameter (it reads the
parameters, the gradients and both moments and writes three of them back),
the sparse decode and its backward, the encoder's gradient over the active
latents, the decoder's renormalisation, the batch's gather from the data and,
with bf16 products, the bf16 copy of ``W_enc``. This script times each of
them alone, on sksae's own kernels and threads as the CPU step calls them,
best of ``--reps`` repetitions (warm caches, no other pass between), and
prints:

- each pass in ms and as a share of the roofline's time;
- the floor: the roofline plus those passes, and the best ``/roofline`` a
  step made of exactly these passes could reach (no Python, no autograd, no
  hand-over between threads, no elementwise glue);
- sksae's measured step in the same run (a short fit), and how far above
  the floor it is.

The roofline here is ``bench_throughput.roofline`` in the step's product
precision (bf16 where the CPU has native bf16), as in that benchmark.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_throughput import SHAPES, make_data, roofline, run_sksae, timed  # noqa: E402

from sksae._accel.adam import FusedAdam, fused_cpu_kernel
from sksae._accel.device import native_bf16
from sksae._accel.sparse import gather_pre, sparse_decode, unit_rows_
from sksae._accel.threads import even_bounds, parallel, run_ranges, serial
from sksae._accel.workspace import StepWorkspace


def best_ms(fn, reps, warm=3):
    for _ in range(warm - 1):  # the thread choosers settle (timed makes one more call)
        fn()
    return 1e3 * timed(fn, torch.device("cpu"), reps, best=True)


def _last_grads(params, names):
    """Pop the parameters' gradients for the next backward to write into (as the step does)."""
    for name in names:
        grad, params[name].grad = params[name].grad, None
        yield grad


def passes(D, F, k, B, reps, low):
    """ms of each pass beyond the product and the top-k, alone, as the CPU step calls it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g)
    W_enc = torch.randn(F, D, generator=g) / math.sqrt(D)
    W_dec = W_enc.clone()
    unit_rows_(W_dec)
    b_enc, b_dec = torch.zeros(F), x.mean(0)
    params = {n: t.requires_grad_(True) for n, t in
              {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}.items()}
    idx = torch.rand(B, F, generator=g).topk(k, dim=-1).indices  # k distinct latents a row
    pre = torch.randn(B, F, generator=g).to(low or torch.float32)  # the selection's product
    grad_vals = torch.randn(B, k, generator=g)
    grad_xhat = torch.randn(B, D, generator=g)
    data = torch.randn(64 * 1024, D, generator=g)
    order = torch.randperm(data.shape[0], generator=g)[:B]
    ws = StepWorkspace(selection_dtype=low)
    out = {}
    with serial(x):
        out["batch gather"] = best_ms(lambda: data.index_select(0, order), reps)
        if low is not None:
            W_low = torch.empty(F, D, dtype=low)

            def cast():
                with parallel(W_enc, "cast", own=True):
                    run_ranges(lambda a, b: W_low[a:b].copy_(W_enc[a:b].detach()),
                               even_bounds(F))
            out["bf16 copy of W_enc"] = best_ms(cast, reps)

        def encoder_values():  # the active entries and the encoder's gradients
            with ws.lending(_last_grads(params, ("W_enc", "b_enc", "b_dec"))):
                vals = gather_pre(pre, idx, x, params, centred=x - b_dec.detach(), ws=ws)
                vals.backward(grad_vals)
        out["active values + encoder backward"] = best_ms(encoder_values, reps)

        values = torch.rand(B, k, generator=g).requires_grad_(True)

        def decode():
            with ws.lending(_last_grads(params, ("W_dec", "b_dec"))), ws.projecting(W_dec):
                x_hat = sparse_decode(values, idx, W_dec, b_dec, ws=ws)
                x_hat.backward(grad_xhat)
        out["decode + backward"] = best_ms(decode, reps)

        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        opt = FusedAdam(list(params.values()), lr=1e-4) if fused_cpu_kernel() else \
            torch.optim.Adam(list(params.values()), lr=1e-4)

        def adam():
            with parallel(W_dec, "adam", own=True):
                opt.step()
        out["Adam"] = best_ms(adam, reps)
        with torch.no_grad():
            out["decoder renormalisation"] = best_ms(lambda: unit_rows_(W_dec), reps)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="0,1", help="indices into bench_throughput.SHAPES")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--no-fit", action="store_true", help="skip the measured sksae step")
    args = ap.parse_args(argv)
    device = torch.device("cpu")
    low = torch.bfloat16 if native_bf16(device) else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, products in "
          f"{'bf16' if low else 'fp32'}")
    for i in map(int, args.shapes.split(",")):
        D, F, k, B = SHAPES[i]
        epochs = 3 if B <= 1024 else 1
        print(f"\n== n_features={D} n_components={F} k={k} batch={B} ==")
        roof_ms = 1e3 * B / roofline(D, F, k, B, device, low or torch.float32)
        parts = passes(D, F, k, B, args.reps, low)
        print(f"  {'pass':36s} {'ms':>8} {'/roofline':>10}")
        print(f"  {'roofline (product + top-k)':36s} {roof_ms:8.2f} {1:10.2f}")
        for name, ms in parts.items():
            print(f"  {name:36s} {ms:8.2f} {ms / roof_ms:10.2f}")
        floor = roof_ms + sum(parts.values())
        print(f"  {'floor (sum)':36s} {floor:8.2f} {floor / roof_ms:10.2f}")
        print(f"  best /roofline of a step made of these passes: {roof_ms / floor:.2f}")
        if not args.no_fit:
            n = 16 * B
            X = make_data(n, D, k)
            run_sksae(X[:B], F, k, B, 1, device)  # first-call costs
            seconds, _, _ = run_sksae(X, F, k, B, epochs, device)
            step = 1e3 * seconds / (n * epochs / B)
            print(f"  sksae's step in this run: {step:.2f} ms, /roofline {roof_ms / step:.2f}, "
                  f"{step / floor:.2f}x the floor")


if __name__ == "__main__":
    main()
