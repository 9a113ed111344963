"""Latent-sharded TopK training (sksae.distributed._sharded) equals unsharded training.

Two gloo processes on the CPU train the same problem with the latents split
26/25 (51 latents: uneven slices) and are compared with the single-process
:class:`sksae._sae_trainer.SAETrainer` after 300 steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _sharded_worker as w
from sksae import architectures
from sksae.distributed._sharded import (LatentShardedTrainer, local_candidates,
                                        merge_candidates)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

BASE = {"seed": 0, "n_components": 51, "k": 4, "auxk_alpha": 1 / 32, "lr": 3e-3,
        "steps": 300}
CASES = {
    # no latent stays unfired for 20 epochs: AuxK is zero throughout
    "alive": {**BASE, "dead_window": 40_000},
    # latents die after 3 batches without firing: AuxK runs and revives them
    "dead": {**BASE, "seed": 1, "dead_window": 96, "auxk_alpha": 0.5},
    # the sparse kernels (the rule picks them at widths of 512 and more), AuxK included
    "sparse": {**BASE, "seed": 1, "dead_window": 96, "auxk_alpha": 0.5, "kernels": "sparse"},
}


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    mp.start_processes(w.worker, args=(2, f"file://{folder}/rdv", str(folder), CASES),
                       nprocs=2, start_method="spawn")
    return {name: [torch.load(folder / f"{name}-rank{r}.pt") for r in range(2)]
            for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_equals_unsharded(sharded_runs, name):
    ranks = sharded_runs[name]
    assert [r["slice"] for r in ranks] == [(0, 26), (26, 51)]
    # every rank exports the same model and logged the same metrics
    for key, value in ranks[0]["full"].items():
        torch.testing.assert_close(ranks[1]["full"][key], value, atol=0, rtol=0)
    assert ranks[0]["history"] == ranks[1]["history"]

    params, history = w.unsharded(CASES[name])
    full = ranks[0]["full"]
    assert full["W_dec"].shape == (51, w.N_FEATURES)
    for key in ("W_dec", "b_dec", "W_enc", "b_enc"):
        torch.testing.assert_close(full[key], params[key], atol=1e-4, rtol=1e-4)
    sharded_history = ranks[0]["history"]
    assert len(sharded_history) == len(history) == CASES[name]["steps"]
    for metric in ("loss", "mse", "fvu", "l0", "dead_fraction", "grad_norm", "auxk"):
        got = torch.tensor([h[metric] for h in sharded_history])
        want = torch.tensor([h[metric] for h in history])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3, msg=metric)
    auxk = max(h["auxk"] for h in history)
    if name != "alive":
        assert auxk > 0 and max(h["dead_fraction"] for h in history) > 0
    else:
        assert auxk == 0
    # training did something: the reconstruction improved
    assert history[-1]["fvu"] < 0.5 * history[0]["fvu"]


@pytest.mark.parametrize("seed, F, k, bounds", [
    *((seed, 53, 7, [0, 3, 20, 41, 53]) for seed in range(5)),  # one slice narrower than k
    (0, 3000, 16, [0, 1300, 3000]),  # wide slices: the compiled selection (16 k <= F_local)
])
def test_candidate_merge_equals_topk(seed, F, k, bounds):
    g = torch.Generator().manual_seed(seed)
    B = 17
    pre = torch.randn(B, F, generator=g)
    values, ids = zip(*(local_candidates(pre[:, a:b], k, a)
                        for a, b in zip(bounds, bounds[1:])))
    got_values, got_ids = merge_candidates(torch.cat(values, 1), torch.cat(ids, 1), k)
    want = torch.topk(pre, k, dim=-1)
    assert torch.equal(got_ids.sort(-1).values, want.indices.sort(-1).values)
    torch.testing.assert_close(got_values.sort(-1).values, want.values.sort(-1).values,
                               atol=0, rtol=0)


@pytest.mark.parametrize("F, k", [(10, 3), (1000, 3)])  # torch.topk, the compiled selection
def test_candidate_merge_masked(F, k):
    # masked (dead-latent) selection: -inf entries are only picked as padding
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(4, F, generator=g)
    alive = torch.zeros(F, dtype=torch.bool)
    alive[[1, F - 3]] = True
    masked = pre.masked_fill(~alive, float("-inf"))
    half = F // 2
    values, ids = zip(*(local_candidates(masked[:, a:b], k, a) for a, b in ((0, half),
                                                                            (half, F))))
    got_values, got_ids = merge_candidates(torch.cat(values, 1), torch.cat(ids, 1), k)
    valid = got_values > float("-inf")
    assert valid.sum(1).tolist() == [2] * 4
    assert torch.equal(got_ids[valid].view(4, 2).sort(-1).values,
                       torch.tensor([[1, F - 3]] * 4))


def test_other_architectures_refused():
    arch = architectures.get("relu")({"alpha": 1.0}, 8, 4)
    with pytest.raises(ValueError, match="latent sharding supports architecture='topk'"):
        LatentShardedTrainer(arch, {}, {}, lr=1e-3, schedule=None, warmup_steps=1,
                             dead_window=10)


class _OneRank:
    """A process group of one rank that counts its all-reduces (no torch.distributed)."""

    rank, world_size = 0, 1

    def __init__(self):
        self.calls = {"sum_": 0, "max_": 0}

    def part(self, n_rows, rank=None):
        return 0, int(n_rows)

    def sum_(self, t):
        self.calls["sum_"] += 1
        return t

    def max_(self, t):
        self.calls["max_"] += 1
        return t

    def all_gather(self, t):
        return t.clone()


def test_no_dead_latent_count_is_reduced_while_none_can_be_dead(monkeypatch):
    # the step all-reduced the number of dead latents and read it on the host every step;
    # the unsharded trainer's host-side bound now says when none can be dead (on a GPU
    # the read was a sync per step)
    case = dict(CASES["alive"], steps=60)

    def run(always_read):
        if always_read:
            monkeypatch.setattr("sksae._sae_trainer.DeadLatentBound.may_be_dead",
                                lambda self, step, n_rows: True)
        arch, params, batches, calibration, kwargs = w.problem(case)
        group = _OneRank()
        trainer = LatentShardedTrainer(arch, params, {}, group=group, **kwargs)
        w.train(trainer, batches, calibration)
        monkeypatch.undo()
        return group.calls, trainer.full_params()

    bounded, params = run(False)
    every_step, params_every_step = run(True)
    assert every_step["sum_"] - bounded["sum_"] == case["steps"]  # one n_dead per step
    assert 1 <= bounded["max_"] <= 2  # the bound read once (and maybe once more)
    for key, value in params.items():
        torch.testing.assert_close(params_every_step[key], value, atol=0, rtol=0)
