#!/usr/bin/env bash
# GPU checks in one go (for a machine with CUDA; CI has none): the test suite with
# device="auto" resolving to CUDA, then the benchmarks on the GPU.
# Usage: bash benchmarks/run_gpu_checks.sh [OUTDIR]   (run from the repository root)
set -u
out=${1:-gpu_results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$out/env.txt"
import sklearn, torch
print("torch", torch.__version__, "| sklearn", sklearn.__version__, "|",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
PY
timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest tests -q -p no:cacheprovider \
    --deselect tests/test_examples.py --durations=10 2>&1 | tail -60 > "$out/tests.txt"
tail -3 "$out/tests.txt"
timeout 120 python3 benchmarks/bench_throughput.py --device cuda 2>&1 | tee "$out/throughput_cuda.txt"
timeout 150 python3 benchmarks/bench_toy_recovery.py --device cuda 2>&1 | tee "$out/toy_recovery_cuda.txt"
timeout 120 python3 benchmarks/bench_dictionary_learning.py --device cuda --quick 2>&1 \
    | tee "$out/dictionary_learning_cuda.txt"
