#!/usr/bin/env bash
# One pass over everything that needs a CUDA GPU: the Triton kernels' tests compiled for the GPU, a tile-size
# sweep of the forward kernel, and the layer / whole-encoder benchmark against SDPA. Needs only torch, triton,
# transformers and pytest (pytest-xdist if present). Results go to $OUT (default: benchmarks/results/cuda).
#   bash benchmarks/cuda_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/cuda}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest tests/ops/test_triton_backend.py tests/patching/test_apply.py \
    -k "${TEST_FILTER:-triton_backend or backends_agree}" -q -p no:cacheprovider $xdist 2>&1 \
    | tee "$out/pytest.log" | tail -n 15

timeout "${TUNE_TIMEOUT:-150}" python3 benchmarks/tune_triton.py --lengths ${TUNE_LENGTHS:-4096 32768} \
    ${TUNE_CONFIGS:+--configs $TUNE_CONFIGS} --best "$out/best_config.txt" 2>&1 | tee "$out/tune.md"
# The benchmark runs the fastest configuration of the sweep (empty file: the default).
if [ -s "$out/best_config.txt" ]; then export TOPK_LIGHTNING_TRITON_FWD="$(cat "$out/best_config.txt")"; fi

timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/attention.py --device cuda --dtype bfloat16 \
    --lengths ${LENGTHS:-4096 16384 32768 65536 131072} --impls sdpa eager topk_torch topk_triton \
    --eager-max 16384 --torch-max 32768 --repeats 5 \
    --encoder-lengths ${ENCODER_LENGTHS:-4096 16384 32768} --encoder-impls sdpa topk topk_ff_chunked \
    --json "$out/attention_cuda.json" 2>&1 | tee "$out/attention_cuda.log"

# The main recipe's shape (batch 16 x 2,048 tokens of MiniLM) and forward-only inference.
timeout "${EXTRA_TIMEOUT:-120}" python3 benchmarks/attention.py --device cuda --dtype bfloat16 --lengths \
    --encoder-lengths 2048 --encoder-batch 16 --encoder-impls sdpa topk topk_ff_chunked --repeats 5 \
    --json "$out/encoder_b16_cuda.json" 2>&1 | tail -n 6 | tee "$out/encoder_b16_cuda.log"
timeout "${EXTRA_TIMEOUT:-120}" python3 benchmarks/attention.py --device cuda --dtype bfloat16 --forward-only \
    --batch 4 --head-dim 32 --lengths 2048 16384 --impls sdpa topk_torch topk_triton --repeats 5 \
    --json "$out/inference_cuda.json" 2>&1 | tail -n 8 | tee "$out/inference_cuda.log"
