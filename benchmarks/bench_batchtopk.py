"""BatchTopK CPU training: the compiled batch selection against ``torch.topk``, side by side.

BatchTopK keeps the ``k B`` largest pre-activations of a whole batch. Without
the ``numba`` extra that is one ``torch.topk`` over the flattened (B, F)
batch; with it, the compiled bucket selection of :mod:`sksae._accel._topk_nb`
(``sksae._accel.select._compiled_batch_topk``). For each shape of
``bench_throughput.py`` this prints, in one run:

- the selection alone on a batch of bf16 pre-activations (best of 5, all of
  torch's threads), both ways, and their ratio;
- samples/s of a whole ``SparseAutoencoder(architecture="batchtopk")`` fit (set-up included)
  with the compiled kernels on and off (the same data, epochs and
  ``random_state``), their ratio and both FVUs, and TopK's samples/s for
  reference.

Usage::

    python benchmarks/bench_batchtopk.py            # both shapes, a few minutes on 2 cores

Measured numbers are in ``benchmarks/results/batchtopk.txt``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_throughput import SHAPES, fvu, make_data, timed  # noqa: E402

from sksae import SparseAutoencoder  # noqa: E402
from sksae._accel import compiled as _compiled  # noqa: E402
from sksae._accel.select import batch_topk_pattern  # noqa: E402


def compiled(on):
    """Switch sksae's compiled CPU kernels on or off (returns the previous setting)."""
    old = _compiled._USE_NUMBA
    _compiled._USE_NUMBA = on
    return old


def fit(X, architecture, F, k, B, epochs):
    sae = SparseAutoencoder(n_components=F, k=k, architecture=architecture, batch_size=B,
                            max_iter=epochs, tol=0.0, max_no_improvement=None, random_state=0)
    t0 = time.perf_counter()
    sae.fit(X)
    seconds = time.perf_counter() - t0

    def recon(x):
        return torch.as_tensor(sae.inverse_transform(sae.transform(x.numpy())))

    return X.shape[0] * epochs / seconds, fvu(recon, X, torch.device("cpu"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="0,1", help="indices into bench_throughput.SHAPES")
    args = parser.parse_args(argv)
    if _compiled.kernel("batch_select") is None:
        print("numba is not installed (pip install 'sksae[numba]'): nothing to compare")
        return
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    for i in [int(s) for s in args.shapes.split(",")]:
        D, F, k, B = SHAPES[i]
        large = F > 8192
        n_samples, epochs = (16 * B, 1) if large else (32 * B, 2)
        print(f"\n== n_features={D} n_components={F} k={k} batch={B}: "
              f"{n_samples} rows x {epochs} epochs ==")
        g = torch.Generator().manual_seed(0)
        pre = (torch.randn(B, D, generator=g) @ torch.randn(D, F, generator=g) / D**0.5)
        pre = pre.bfloat16()
        times = {}
        for on in (True, False):
            old = compiled(on)
            try:
                times[on] = timed(lambda: batch_topk_pattern(pre, k * B),  # k B entries
                                  torch.device("cpu"), 5, best=True)
            finally:
                compiled(old)
        print(f"  selection of k B = {k * B} of {B} x {F} bf16: compiled {times[True] * 1e3:.1f} ms, "
              f"torch.topk {times[False] * 1e3:.1f} ms: {times[False] / times[True]:.1f}x")
        X = make_data(n_samples, D, k)
        fit(X[:B], "batchtopk", F, k, B, 1)  # warm-up: numba's cache, torch's first calls
        runs = {}
        for on in (True, False):
            old = compiled(on)
            try:
                runs[on] = fit(X, "batchtopk", F, k, B, epochs)
            finally:
                compiled(old)
        topk = fit(X, "topk", F, k, B, epochs)
        print(f"  BatchTopK fit, samples/s: compiled {runs[True][0]:.0f} (FVU {runs[True][1]:.4f}), "
              f"torch.topk {runs[False][0]:.0f} (FVU {runs[False][1]:.4f}): "
              f"{runs[True][0] / runs[False][0]:.2f}x; TopK fit for reference {topk[0]:.0f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
