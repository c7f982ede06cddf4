#!/usr/bin/env bash
# The GPU rows of the datacenter profile, PyTorch on CUDA: dense vs per-layer slice vs uniform slice (+ refit) of the
# built-in SmolLM2-135M at 25 %, fp16 and bf16, prefill 512/2048, decode batch 1/8/32/64 (both recipes'
# pipelines), plus the uniform slice's fp32 perplexity on the first 16,384 evaluation tokens (the refit figure the
# README quotes from CPU runs) and, when benchmarks/recovery.py is present, recovery at a GPU token budget.
# Writes OUT/{per-layer,uniform}/report/, OUT/versions.txt, OUT/gpu.csv, OUT/uniform_refit_fp32.json.
#   benchmarks/datacenter_gpu.sh out/datacenter-gpu [RECOVERY_TOKENS]
set -uo pipefail
OUT="${1:-out/datacenter-gpu}"
RECOVERY_TOKENS="${2:-}"
PYTHON="${PYTHON:-python3}"
S2D=("$PYTHON" -m slice2deploy.cli)
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv > "$OUT/gpu.csv" 2>&1
"$PYTHON" - > "$OUT/versions.txt" <<'PY'
import platform, torch, transformers
print(f"python {platform.python_version()}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"transformers {transformers.__version__}; GPU {torch.cuda.get_device_name(0)}")
PY
status=0
"${S2D[@]}" pipeline recipes/smollm2-datacenter-pytorch.yaml -o "$OUT/per-layer" || status=1
"${S2D[@]}" pipeline recipes/smollm2-datacenter-uniform.yaml -o "$OUT/uniform" || status=1
uniform="$(dirname "$(ls -d "$OUT"/uniform/slice-*/model/config.json | head -1)")"
"${S2D[@]}" eval "$uniform" --max-tokens 16384 --device cuda --json > "$OUT/uniform_refit_fp32.json" || status=1
if [ -n "$RECOVERY_TOKENS" ]; then  # distillation of the uniform slice at GPU token budgets (bf16 autocast)
    "$PYTHON" -m benchmarks.recovery --slice "uniform=$uniform" --methods kd --tokens "$RECOVERY_TOKENS" \
        --device cuda --dtype bfloat16 --batch-size 16 --seqlen 512 --work "$OUT/recovered" || status=1
fi
exit $status
