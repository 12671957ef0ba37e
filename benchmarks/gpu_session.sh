#!/usr/bin/env bash
# Everything a borrowed GPU should measure, in one call of under 10 minutes, results in $OUT:
#   1. the Triton kernels: CUDA tests, tile sweep (the bound, buffer and stacks forward layouts), layer / encoder /
#      inference tables (benchmarks/cuda_check.sh with shorter limits, ~6 min);
#   2. task accuracy: benchmarks/accuracy.py's GPU plan for the time left (resumable: the committed
#      benchmarks/results/accuracy.json is copied first, so finished runs are skipped and the next call goes on).
# Needs only torch, triton, transformers and lightning. Prepare the model and data here, then carry them:
#   python benchmarks/accuracy.py --export-fp16 .gpu/minilm-fp16 && cp -r ../shared/data/boolq .gpu/boolq
#   device: bash benchmarks/gpu_session.sh        (carry: .gpu; .gpu/ is git-ignored)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/cuda}"
mkdir -p "$out"
start=$(date +%s)

TEST_TIMEOUT="${TEST_TIMEOUT:-120}" TUNE_TIMEOUT="${TUNE_TIMEOUT:-140}" BENCH_TIMEOUT="${BENCH_TIMEOUT:-150}" \
    EXTRA_TIMEOUT="${EXTRA_TIMEOUT:-60}" OUT="$out" bash benchmarks/cuda_check.sh

left=$(( ${SESSION_SECONDS:-560} - ($(date +%s) - start) ))
if [ -d .gpu/minilm-fp16 ] && [ -d .gpu/boolq ] && [ "$left" -gt 60 ]; then
    [ -f benchmarks/results/accuracy.json ] && cp benchmarks/results/accuracy.json "$out/accuracy.json"
    timeout "$left" python3 benchmarks/accuracy.py --plan gpu --device cuda --time-budget $(( left - 20 )) \
        --model-dir .gpu/minilm-fp16 --data-dir .gpu/boolq --out "$out/accuracy.json" 2>&1 | tail -n 30
else
    echo "accuracy: skipped (no .gpu/minilm-fp16 and .gpu/boolq, or only ${left} s left)"
fi
