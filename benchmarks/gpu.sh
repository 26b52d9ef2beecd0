#!/usr/bin/env bash
# The prepared GPU run of the benchmark harness: one call on the lent device machine, which has its own torch,
# torchvision, timm and matplotlib. Issue 13's comparison: bf16, channels-last, batch 1, 32 and 128, timm's
# resnet50, efficientnet_b0, convnext_tiny and regnety_032 (all levels): the eager methods, fxfeat+optimize
# (bf16 weights) and its NCHW twin (the layout rule), timm features_only + torch.compile(mode="reduce-overhead") and
# fxfeat.optimize_for_inference(compile=True). Each model runs in its own process under a time limit, batch 32
# and 128 (the targets) before batch 1, and the harness writes its JSON after every configuration, so a slow
# compilation costs the configurations left, not the run; the per-model results are then merged into one report.
# Then (issue 21) `fxfeat extract` on the GPU: images/s against the hand-written timm loop and the model and
# decode limits (benchmarks/extract.py, EXTRACT_S seconds at most, default 150; pyarrow and pandas are on the image).
# Run from the repository root:  PYTHONPATH=. bash benchmarks/gpu.sh   (results land in $OUT, default docs/)
# Sized for one 10-minute call: PER_MODEL seconds per model (default 105), four models, then the extraction.
# STEPS selects the parts ("bench extract" by default).
# DEVICE, DTYPE, MODELS, BATCHES and INPUT override the settings (a smoke run on a CPU:
# DEVICE=cpu DTYPE=fp32 MODELS=resnet10t BATCHES="2 1" INPUT="3 64 64" OUT=/tmp bash benchmarks/gpu.sh).
set -uo pipefail
OUT=${OUT:-docs}
PER_MODEL=${PER_MODEL:-105}
STEPS=${STEPS:-bench extract}
EXTRACT_S=${EXTRACT_S:-150}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
MODELS=${MODELS:-resnet50 efficientnet_b0 convnext_tiny regnety_032}
BATCHES=${BATCHES:-32 128 1}
INPUT=${INPUT:-3 224 224}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
case " $STEPS " in *" bench "*) ;; *) MODELS="" ;; esac
for model in $MODELS; do
    start=$(date +%s)
    # shellcheck disable=SC2086  # BATCHES and INPUT are lists
    timeout "$PER_MODEL" python3 -m benchmarks.run --device "$DEVICE" --dtype "$DTYPE" --channels-last \
        --batch-sizes $BATCHES --input-size $INPUT --out-indices all --compile --skip fxfeat+compile --rounds 2 \
        --quiet --models "timm:$model" --out "$OUT/gpu-$model.json" --markdown /dev/null \
        || echo "timm:$model stopped (exit $?): the merged report has the configurations it finished"
    echo "timm:$model: $(( $(date +%s) - start )) s"
done
if [ -n "$MODELS" ]; then
    python3 -m benchmarks.report "$OUT"/gpu-*.json --out "$OUT/benchmarks-gpu.json" \
        --markdown "$OUT/benchmarks-gpu.md" --plot "$OUT/benchmarks-gpu.png" | head -40
fi
case " $STEPS " in
    *" extract "*)
        start=$(date +%s)
        timeout "$EXTRACT_S" python3 -m benchmarks.extract --device "$DEVICE" --models resnet50 vit_base_patch16_224 \
            --images "${EXTRACT_IMAGES:-1536}" --workers "${EXTRACT_WORKERS:-12}" --batch-size 128 --rounds 1 \
            --rss-images --out "$OUT/extract-gpu.json" --markdown "$OUT/extract-gpu.md" \
            || echo "extract benchmark stopped (exit $?)"
        echo "extract: $(( $(date +%s) - start )) s" ;;
esac
