#!/usr/bin/env bash
# GPU checks in one go (for a machine with CUDA; CI has none): the eager-vs-recorded step
# timings and a kernel profile, the test suite with the device fixture including CUDA,
# then the benchmarks on the GPU.
# Usage: [CHECKS="step tests throughput toy dict"] bash benchmarks/run_gpu_checks.sh [OUTDIR]
#   (run from the repository root; CHECKS picks and orders the parts among step, tests,
#    throughput, throughput-small, toy, toy-sae, dict, dict-quick, ooc, dist, kernels, rule,
#    scaling, fusion, cuda-tests, tensor; by default step tests throughput toy dict-quick. Two
#    presets, each under the device tool's 10 minutes a command: CHECKS=triton runs issue 21's Must-show checks, kernels rule throughput (about
#    5 minutes); CHECKS=widths runs scaling fusion dist (the scaling table in F, the step's
#    elementwise end, issue 18's NCCL check; about 6 minutes))
# Peers that are not installed there can travel as wheels in .peers/ (pure-Python
# wheels fetched with `pip download --no-deps --python-version 3.12 ...`).
set -u
out=${1:-gpu_results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .peers/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers .peers/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/peers"
fi
python3 - <<'PY' 2>&1 | tee "$out/env.txt"
import sklearn, torch
print("torch", torch.__version__, "| sklearn", sklearn.__version__, "|",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
PY
checks=${CHECKS:-step tests throughput toy dict-quick}
[ "$checks" = triton ] && checks="kernels rule throughput"
[ "$checks" = widths ] && checks="scaling fusion dist"
for check in $checks; do
    case $check in
    step)
        timeout "${STEP_TIMEOUT:-90}" python3 benchmarks/bench_gpu_step.py --profile 2>&1 \
            | tee "$out/gpu_step.txt" ;;
    tests)
        xdist=""
        python3 -c "import xdist" 2>/dev/null && xdist="-n ${TEST_WORKERS:-6}"
        timeout "${TESTS_TIMEOUT:-150}" python3 -m pytest tests -q -rs -p no:cacheprovider $xdist \
            --deselect tests/test_examples.py --durations=10 > "$out/tests.txt" 2>&1
        tail -40 "$out/tests.txt" ;;
    throughput|throughput-small)
        shapes=0,1; [ "$check" = throughput-small ] && shapes=0
        timeout "${THROUGHPUT_TIMEOUT:-100}" python3 benchmarks/bench_throughput.py --device cuda \
            --shapes "$shapes" 2>&1 | tee "$out/throughput_cuda.txt" ;;
    ooc)
        timeout "${OOC_TIMEOUT:-300}" python3 benchmarks/bench_out_of_core.py --quick --device cuda \
            --dir /tmp/sksae_ooc_gpu 2>&1 | tee "$out/out_of_core_cuda.txt" ;;
    tensor)
        # activations already on the GPU: read there against copied to the host first
        timeout "${OOC_TIMEOUT:-300}" python3 benchmarks/bench_out_of_core.py --sections tensor \
            --device cuda --dir /tmp/sksae_ooc_gpu 2>&1 | tee "$out/tensor_input_cuda.txt" ;;
    dist)
        # a 1-rank NCCL group trains and equals the non-distributed fit (one GPU per machine),
        # then the data-parallel benchmark beside the non-distributed fit on the GPU
        timeout "${DIST_TIMEOUT:-120}" python3 -m torch.distributed.run --standalone \
            --nproc_per_node=1 benchmarks/check_nccl.py 2>&1 | tee "$out/nccl_check.txt"
        timeout "${DIST_TIMEOUT:-120}" python3 benchmarks/bench_distributed.py --device cuda \
            --batch 4096 --rows 409600 --latents 24576 --features 768 2>&1 \
            | tee "$out/distributed_cuda.txt" ;;
    kernels)
        # the Triton kernels compiled on the GPU against eager torch, then the selections timed
        timeout "${KERNELS_TIMEOUT:-150}" python3 -m pytest tests/test_triton.py -q -rs \
            -p no:cacheprovider > "$out/triton_tests.txt" 2>&1
        tail -5 "$out/triton_tests.txt"
        timeout "${TOPK_TIMEOUT:-90}" python3 benchmarks/bench_topk_gpu.py --device cuda --tune \
            2>&1 | tee "$out/topk_gpu.txt" ;;
    cuda-tests)
        # the CUDA-only tests written without a GPU at hand: tensors on the GPU read there
        # (the device fixture's CUDA cases) and the recorded step (CUDA graphs, a recording
        # beside a thread that pins memory); the whole suite is the "tests" check
        timeout "${TESTS_TIMEOUT:-150}" python3 -m pytest -q -rs -p no:cacheprovider \
            tests/test_graphs.py \
            tests/test_out_of_core.py::test_tensors_on_an_accelerator_are_read_there_batch_by_batch \
            > "$out/cuda_tests.txt" 2>&1
        tail -5 "$out/cuda_tests.txt" ;;
    rule)
        # the sparse (Triton) step against the dense one, forced, at the rule's shapes
        timeout "${RULE_TIMEOUT:-90}" python3 benchmarks/bench_kernel_rule.py --device cuda \
            --steps 30 2>&1 | tee "$out/kernel_rule_cuda.txt" ;;
    scaling)
        timeout "${SCALING_TIMEOUT:-150}" python3 benchmarks/bench_scaling.py --device cuda 2>&1 \
            | tee "$out/scaling_cuda.txt" ;;
    fusion)
        # the step's elementwise end: clip pass, clip in fused Adam's scale, torch.compile
        timeout "${FUSION_TIMEOUT:-120}" python3 benchmarks/bench_step_fusion.py --device cuda \
            2>&1 | tee "$out/step_fusion_cuda.txt" ;;
    toy)
        timeout "${TOY_TIMEOUT:-130}" python3 benchmarks/bench_toy_recovery.py --device cuda 2>&1 \
            | tee "$out/toy_recovery_cuda.txt" ;;
    toy-sae)
        timeout "${TOY_TIMEOUT:-60}" python3 benchmarks/bench_toy_recovery.py --device cuda \
            --sae-only --sae-fits 2 2>&1 | tee "$out/toy_recovery_cuda.txt" ;;
    dict|dict-quick)
        args="--sklearn-max-steps 8"; [ "$check" = dict-quick ] && args="--quick"
        timeout "${DICT_TIMEOUT:-120}" python3 benchmarks/bench_dictionary_learning.py --device cuda \
            $args 2>&1 | tee "$out/dictionary_learning_cuda.txt" ;;
    *) echo "unknown check $check" ;;
    esac
done
