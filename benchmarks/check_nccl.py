"""GPU check: a 1-rank NCCL process group trains and equals the non-distributed fit.

Run by ``benchmarks/run_gpu_checks.sh`` (check ``dist``) as
``torchrun --standalone --nproc_per_node=1 benchmarks/check_nccl.py``. The
GPU machines this project can use have one GPU each, so NCCL across GPUs is
not tested; the NCCL path is torch's own (no custom collectives), and this
runs every collective of a data-parallel step on it once per step.
"""

import numpy as np
import torch
import torch.distributed as dist

from sksae import SparseAutoencoder
from sksae.distributed import init_from_environment


def main():
    dist.init_process_group("nccl") if not init_from_environment() else None
    assert "nccl" in dist.get_backend(), dist.get_backend()
    rng = np.random.RandomState(0)
    X = (rng.randn(20_000, 64) @ rng.randn(64, 64)).astype(np.float32)
    worst = 0.0
    for arch in ("topk", "batchtopk", "jumprelu", "gated", "relu"):
        kw = dict(n_components=512, architecture=arch, k=8, batch_size=256, max_iter=2,
                  random_state=0, precision="float32", device="cuda")
        ddp = SparseAutoencoder(**kw, distributed="data").fit(X)
        ref = SparseAutoencoder(**kw, distributed=False).fit(X)
        diff = float(np.abs(ddp.components_ - ref.components_).max())
        worst = max(worst, diff)
        print(f"{arch:10s} 1-rank NCCL vs non-distributed: max |diff| {diff:.2e}, "
              f"FVE {ddp.history_['epoch']['fve'][-1]:.3f} vs {ref.history_['epoch']['fve'][-1]:.3f}")
    print("PASS" if worst < 1e-3 else "FAIL", f"(worst {worst:.2e}; device "
          f"{torch.cuda.get_device_name()})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
