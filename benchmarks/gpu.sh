#!/usr/bin/env bash
# The prepared GPU run: one call on the lent device machine, which has its own torch, torchvision, timm, matplotlib,
# pyarrow and pandas. Run from the repository root:  PYTHONPATH=. bash benchmarks/gpu.sh   (results in $OUT,
# default docs/). STEPS chooses the parts, in this order:
#
# bench   (issues 13 and 22) bf16, channels-last, batch 32, 128 and 1, timm's resnet50, efficientnet_b0,
#         convnext_tiny, regnety_032 (all levels) and vit_base_patch16_224 (its last three blocks, as NCHW maps):
#         the eager methods, the plain extractor, fxfeat+optimize (bf16 weights) and its NCHW twin (the layout rule),
#         timm features_only + torch.compile(mode="reduce-overhead") under autocast and with bf16 weights (the
#         peers), and fxfeat.optimize_for_inference(compile=True). Each model runs in its own process under
#         PER_MODEL seconds, batch 32 and 128 (the targets) first; the harness writes its JSON after every
#         configuration, so a slow compilation costs the configurations left, not the run. Merged into
#         benchmarks-gpu.{json,md,png}, whose Targets section says where issue 22's goal is met.
# levers  (issue 22) the compile levers (benchmarks.methods.LEVERS: Inductor freezing, static shapes, both,
#         max-autotune) against the default compile, batch 32 and 1, resnet50 and convnext_tiny, LEVERS_S seconds
#         each: gpu-levers-*.json and levers-gpu.md. Not in the default STEPS: it decides the default, then
#         `bench` measures it.
# extract (issue 21) `fxfeat extract` on the GPU against the hand-written timm loop and the model and decode limits
#         (benchmarks/extract.py, EXTRACT_S seconds at most): extract-gpu.{json,md}.
#
# Sized for one 10-minute call with the default STEPS ("bench extract"): 5 x PER_MODEL (default 95 s) + EXTRACT_S
# (default 90 s). Inductor's caches are off (TORCHINDUCTOR_FX_GRAPH_CACHE=0...), so that each compiled method's
# first call is its own compilation, not a cache hit of the one before.
# DEVICE, DTYPE, MODELS, BATCHES and INPUT override the settings (a smoke run on a CPU:
# DEVICE=cpu DTYPE=fp32 MODELS=resnet10t BATCHES="2 1" INPUT="3 64 64" EXTRACT_MODELS=resnet10t EXTRACT_IMAGES=8
# EXTRACT_WORKERS=1 OUT=/tmp bash benchmarks/gpu.sh; tests/test_benchmarks.py runs it so).
set -uo pipefail
OUT=${OUT:-docs}
STEPS=${STEPS:-bench extract}
PER_MODEL=${PER_MODEL:-95}
LEVERS_S=${LEVERS_S:-240}
EXTRACT_S=${EXTRACT_S:-90}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
MODELS=${MODELS:-resnet50 efficientnet_b0 convnext_tiny regnety_032 vit_base_patch16_224}
BATCHES=${BATCHES:-32 128 1}
INPUT=${INPUT:-3 224 224}
export TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0 TORCHINDUCTOR_AUTOTUNE_REMOTE_CACHE=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__)"

run_model() {  # run_model SECONDS OUTPUT MODEL [harness options...]
    local seconds=$1 output=$2 model=$3 start
    shift 3
    start=$(date +%s)
    local fmt=native
    case $model in vit*) fmt=NCHW ;; esac  # a ViT's blocks as maps, as timm's features_only returns them
    # shellcheck disable=SC2086  # INPUT is a list
    timeout "$seconds" python3 -m benchmarks.run --device "$DEVICE" --dtype "$DTYPE" --channels-last \
        --input-size $INPUT --out-indices all --output-fmt "$fmt" --compile --rounds 2 --quiet \
        --models "timm:$model" --out "$output" --markdown /dev/null "$@" \
        || echo "timm:$model stopped (exit $?): the report has the configurations it finished"
    echo "timm:$model: $(( $(date +%s) - start )) s"
}

report() {  # report MARKDOWN JSON-or-"" FILES...: merge the runs that wrote a file
    local markdown=$1 merged=$2 present=()
    shift 2
    for file in "$@"; do [ -s "$file" ] && present+=("$file"); done
    [ ${#present[@]} -gt 0 ] || { echo "no results for $markdown"; return; }
    python3 -m benchmarks.report "${present[@]}" --markdown "$markdown" \
        ${merged:+--out "$merged" --plot "${merged%.json}.png"} | head -40
}

case " $STEPS " in *" bench "*)
    files=()
    for model in $MODELS; do
        # shellcheck disable=SC2086  # BATCHES is a list
        run_model "$PER_MODEL" "$OUT/gpu-$model.json" "$model" --batch-sizes $BATCHES --skip fxfeat+compile
        files+=("$OUT/gpu-$model.json")
    done
    report "$OUT/benchmarks-gpu.md" "$OUT/benchmarks-gpu.json" "${files[@]}" ;;
esac
case " $STEPS " in *" levers "*)
    files=()
    for model in ${LEVER_MODELS:-resnet50 convnext_tiny}; do
        run_model "$LEVERS_S" "$OUT/gpu-levers-$model.json" "$model" --batch-sizes 32 1 \
            --skip fxfeat+compile fxfeat+optimize-nchw --levers frozen static frozen-static autotune
        files+=("$OUT/gpu-levers-$model.json")
    done
    report "$OUT/levers-gpu.md" "" "${files[@]}" ;;
esac
case " $STEPS " in *" extract "*)
    start=$(date +%s)
    # shellcheck disable=SC2086  # EXTRACT_MODELS is a list
    timeout "$EXTRACT_S" python3 -m benchmarks.extract --device "$DEVICE" \
        --models ${EXTRACT_MODELS:-resnet50 vit_base_patch16_224} \
        --images "${EXTRACT_IMAGES:-1024}" --workers "${EXTRACT_WORKERS:-12}" --batch-size 128 --rounds 1 \
        --rss-images --out "$OUT/extract-gpu.json" --markdown "$OUT/extract-gpu.md" \
        || echo "extract benchmark stopped (exit $?)"
    echo "extract: $(( $(date +%s) - start )) s" ;;
esac
