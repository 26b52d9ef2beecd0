#!/usr/bin/env bash
# The prepared GPU run of the benchmark harness (one call on the lent device machine, which has its own torch,
# torchvision, timm and matplotlib): the CPU default models at batch 1, 32 and 128, bf16 autocast,
# channels-last, eager methods and fxfeat + torch.compile (compiled with dynamic shapes, once per setting).
# Run from the repository root:  PYTHONPATH=. bash benchmarks/gpu.sh   (results land in $OUT, default docs/)
set -euo pipefail
OUT=${OUT:-docs}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m benchmarks.run --device cuda --dtype bf16 --channels-last --batch-sizes 1 32 128 --compile \
    --quiet --out "$OUT/benchmarks-gpu.json" --markdown "$OUT/benchmarks-gpu.md" --plot "$OUT/benchmarks-gpu.png"
