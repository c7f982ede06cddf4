#!/usr/bin/env bash
# Recovery after slicing on a CUDA GPU (bf16 autocast, fp32 master weights), 10x+ the CPU token budgets, offline.
#
# The same recovery as the CPU benchmark (benchmarks/recovery.py), sized for one GPU:
#   - slices SmolLM2 at sparsity 0.25 in both modes (uniform basis + refit, 128 x 512 calibration; per-layer with
#     --incoherence, round-to 32, 32 x 512 calibration: the default pipeline's slice), on the GPU;
#   - recovers each with kd, kd+lora and lora at every budget in $TOKENS (default 0, 200k, 500k, 2M tokens);
#   - evaluates on the first 16,384 built-in evaluation tokens and writes
#     benchmarks/results/recovery_cuda_smollm2.{jsonl,md} (device name and versions in every record).
#
# The machine needs no network if it gets, beforehand:
#   - torch with CUDA, and this repository installed with its deps (pip install --no-index --find-links WHEELS -e .
#     plus peft and accelerate);
#   - a copy of the slice2deploy cache holding the built-in model and corpus (run any slice2deploy command once on a
#     connected machine, then ship ~/.cache/slice2deploy: models/smollm2-135m, converted/, corpus/builtin-v1/) and
#     SLICE2DEPLOY_CACHE pointing at it.
#
# Usage:  SLICE2DEPLOY_CACHE=/path/to/cache bash benchmarks/recovery_gpu.sh
#         TOKENS=0,500000 METHODS=kd bash benchmarks/recovery_gpu.sh      # a shorter run
# Wall time on an H100/H200 class GPU: roughly a minute per million recovery tokens per run (not yet measured).
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TOKENS=${TOKENS:-0,200000,500000,2000000}
METHODS=${METHODS:-kd,kd+lora,lora}
OUT=${OUT:-out/recovery-gpu}
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."

"$PYTHON" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible to PyTorch"
print("GPU:", torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported(), "torch", torch.__version__)
import peft, slice2deploy  # noqa: F401  (fail early when a dependency was not shipped)
PY

mkdir -p "$OUT"
if [ ! -f "$OUT/uniform-s25/config.json" ]; then
  "$PYTHON" -m slice2deploy.cli slice smollm2-135m --mode uniform --refit --sparsity 0.25 --round-to 16 \
    --calib-samples 128 --calib-seqlen 512 --device cuda -o "$OUT/uniform-s25" --overwrite
fi
if [ ! -f "$OUT/perlayer-s25/config.json" ]; then
  "$PYTHON" -m slice2deploy.cli slice smollm2-135m --sparsity 0.25 --round-to 32 --incoherence \
    --calib-samples 32 --calib-seqlen 512 --device cuda -o "$OUT/perlayer-s25" --overwrite
fi
"$PYTHON" -m benchmarks.recovery --slice "uniform=$OUT/uniform-s25" --slice "per-layer=$OUT/perlayer-s25" \
  --methods "$METHODS" --tokens "$TOKENS" --device cuda --dtype bfloat16 --batch-size 16 --seqlen 512 \
  --work "$OUT/recovered"
"$PYTHON" -m benchmarks.recovery --device cuda --report
