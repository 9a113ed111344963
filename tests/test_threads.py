"""The CPU step's threads: torch on one, the parallel work on sksae's pool, same results."""

import numpy as np
import pytest
import torch

from sksae._accel import threads as _threads
from sksae import SparseAutoencoder
from sksae._accel.threads import parallel, serial


def test_parallel_gives_the_fit_its_threads_inside_serial_and_is_inert_outside():
    n = torch.get_num_threads()
    x = torch.zeros(3)
    torch.set_num_threads(2)
    try:
        with parallel(x):
            assert torch.get_num_threads() == 2
        assert _threads.serial_threads() is None
        with serial(x):
            assert torch.get_num_threads() == 1
            assert _threads.serial_threads() == 2
            for _ in range(3):
                with parallel(x):
                    assert torch.get_num_threads() == 2
                assert torch.get_num_threads() == 1
                with parallel(x, own=True):  # the pool's threads, torch stays on one
                    assert torch.get_num_threads() == 1 and _threads.granted() == 2
                assert _threads.granted() == 1
        assert torch.get_num_threads() == 2
        with serial(x.to("meta")):  # off the CPU nothing changes
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_thread_count_does_not_change_the_fit(architecture):
    # with two threads the chooser may route any call either way; the bits must not move
    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, 24)).astype(np.float32)
    params = dict(n_components=512, k=4, architecture=architecture, batch_size=64,
                  max_iter=2, random_state=0, device="cpu", precision="float32")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = SparseAutoencoder(**params).fit(X)
        torch.set_num_threads(2)
        two = SparseAutoencoder(**params).fit(X)
    finally:
        torch.set_num_threads(n)
    np.testing.assert_array_equal(one.components_, two.components_)
    np.testing.assert_array_equal(one.encoder_weights_, two.encoder_weights_)


@pytest.mark.parametrize("algorithm", ["lasso_lars", "omp"])
def test_thread_count_does_not_change_dictionary_learning(algorithm):
    from sksae import DictionaryLearnerGPU

    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 16))
    params = dict(n_components=24, alpha=0.5, batch_size=32, max_iter=2, random_state=0,
                  transform_algorithm=algorithm, transform_n_nonzero_coefs=3, device="cpu")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = DictionaryLearnerGPU(**params).fit(X)
        codes_one = one.transform(X)
        torch.set_num_threads(2)
        two = DictionaryLearnerGPU(**params).fit(X)
        codes_two = two.transform(X)
    finally:
        torch.set_num_threads(n)
    np.testing.assert_array_equal(one.components_, two.components_)
    np.testing.assert_array_equal(codes_one, codes_two)


def test_own_grant_keeps_torch_on_one_thread_and_fixes_the_ranges():
    import threading

    n = torch.get_num_threads()
    x = torch.zeros(3)
    torch.set_num_threads(2)
    try:
        with serial(x):
            seen = {}
            for grant in (1, 2):
                with _threads._granting(grant, 1):
                    assert torch.get_num_threads() == 1  # torch's team stays asleep
                    # the ranges follow the fit's thread count, not the grant
                    bounds = _threads.even_bounds(10)
                    assert list(bounds) == [0, 5, 10]
                    where = []
                    _threads.run_ranges(lambda a, b: where.append(
                        (a, b, threading.get_ident(), torch.get_num_threads())), bounds)
                    seen[grant] = where
            assert _threads.granted() == 1
        me = threading.get_ident()
        # one thread: the ranges one after another on the caller; two: at once,
        # the second on a worker whose torch also runs on one thread
        assert [(a, b, t) for a, b, t, _ in seen[1]] == [(0, 5, me), (5, 10, me)]
        assert sorted((a, b) for a, b, _, _ in seen[2]) == [(0, 5), (5, 10)]
        assert {t for _, _, t, _ in seen[2]} - {me} and {m for *_, m in seen[2]} == {1}
        assert list(_threads.even_bounds(10, min_size=6)) == [0, 10]
    finally:
        torch.set_num_threads(n)


def _granted_both(x, fn):
    """``fn()`` inside a serial block of a 2-thread fit, granted 1 and then 2 threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with serial(x):
            out = []
            for grant in (1, 2):
                with _threads._granting(grant, 1):
                    out.append(fn())
            return out
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_encoder_product_gives_the_same_bits(dtype):
    from sksae._accel.select import encoder_product as _encoder_product

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 40, generator=g).to(dtype)
    W = torch.randn(96, 40, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    whole = torch.addmm(b, x, W.T)
    for bias in (b, None):
        outs = _granted_both(x, lambda: _encoder_product(
            bias, x, W, torch.empty(200, 96, dtype=dtype)).clone())
        ref = whole if bias is not None else x @ W.T
        for out in outs:
            torch.testing.assert_close(out, ref)
        assert torch.equal(outs[0], outs[1])


def test_split_adam_and_decode_give_the_same_bits():
    from sksae._accel.adam import FusedAdam, fused_cpu_kernel
    from sksae._accel.sparse import _gather_rows, as_pattern

    g = torch.Generator().manual_seed(1)
    W = torch.randn(300, 16, generator=g)
    idx = torch.randint(0, 300, (500, 4), generator=g)
    vals = torch.rand(500, 4, generator=g)
    pat = as_pattern(idx, 300)
    outs = _granted_both(W, lambda: _gather_rows(pat, W, vals.reshape(-1)))
    ref = torch.nn.functional.embedding_bag(idx, W, mode="sum", per_sample_weights=vals)
    torch.testing.assert_close(outs[0], ref)
    assert torch.equal(outs[0], outs[1])

    if not fused_cpu_kernel():
        return
    shapes = [(700, 90), (33,), (90,)]  # 63k elements: the ranges cut the first tensor

    def run(grants):
        params = [torch.randn(s, generator=torch.Generator().manual_seed(i))
                  for i, s in enumerate(shapes)]
        opt = FusedAdam(params, lr=1e-2)
        n = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            for step, grant in enumerate(grants):
                for i, p in enumerate(params):
                    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(
                        10 * step + i))
                if grant is None:  # outside a step: one call over every tensor
                    opt.step(grad_scale=2.0)
                    continue
                with serial(params[0]), _threads._granting(grant, 1):
                    opt.step(grad_scale=2.0)
        finally:
            torch.set_num_threads(n)
        return params

    ref = run([None] * 3)
    for grants in ([1, 2, 1], [2, 2, 2]):
        for a, b in zip(ref, run(grants)):
            assert torch.equal(a, b)
