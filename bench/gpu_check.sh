#!/usr/bin/env bash
# GPU-ready measurement in one short script (about 8 minutes at most on one GPU):
#   1. ViT-B/32 training clips/s, FLOPs per step and MFU (batch 128 x 12 frames, bf16; then with
#      the reference's fp16 CLIP, clip_dtype=fp16), peak memory;
#   2. evaluation of the 1k x 1k block matrix, batched vs the reference loop;
#   3. loader clips/s, decoding with decord and reading the decoded-frame cache;
#   4. the augmented data path (frame cache + RandAugment in the loader vs on the device) beside
#      the training step's clips/s: the share of each step the GPU would wait for data.
# Without CUDA it runs small CPU presets instead, says so, and takes a minute or two.
#
#   bash bench/gpu_check.sh                        # uses $PYTHON, else .venv/bin/python, else python
#   GPU_CHECK_RESULTS=docs/results bash bench/gpu_check.sh   # GPU only: also write the training JSON there
#   GPU_CHECK_COMPILE=1 bash bench/gpu_check.sh    # GPU only: also time training with compile=true (adds minutes)
#   GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh      # smallest settings (the unit test's CPU run)
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export PYTHONPATH="${PYTHONPATH:-$PWD}"
failed=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# step TITLE SECONDS COMMAND...: run one measurement under a time limit; a failure is reported, not fatal.
step() {
    local title=$1 limit=$2
    shift 2
    echo
    echo "== $title"
    echo "\$ $*"
    timeout "$limit" "$@"
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        echo "!! $title failed (exit $rc$([[ $rc -eq 124 ]] && echo ", over its ${limit}s limit"))"
        failed=1
    fi
}

if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    gpu=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name())")
    echo "CUDA device: $gpu"
    json=(--json "${GPU_CHECK_RESULTS:-$tmp}/train_step-vit-b32-gpu.json")
    step "ViT-B/32 training, batch 128 x 12 frames, bf16 (clips/s, MFU, peak memory)" 240 \
        "$PYTHON" bench/train_step.py --preset vit-b32 --device cuda --set precision=bf16 \
        --warmup 3 --steps 10 --repeats 3 --flops "${json[@]}"
    step "ViT-B/32 training as above in the reference's regime: CLIP stored and updated in fp16 (clip_dtype=fp16)" 240 \
        "$PYTHON" bench/train_step.py --preset vit-b32 --device cuda --set clip_dtype=fp16 \
        --warmup 3 --steps 10 --repeats 3 --flops
    if [[ -n "${GPU_CHECK_COMPILE:-}" ]]; then
        step "ViT-B/32 training as above with compile=true (first step: compile time)" 300 \
            "$PYTHON" bench/train_step.py --preset vit-b32 --device cuda --set precision=bf16 compile=true \
            --warmup 3 --steps 10 --repeats 3
    fi
    step "1k x 1k evaluation, batched vs loop (K 32, 9 stages, D 512)" 120 \
        "$PYTHON" bench/similarity.py --device cuda --n 1000
    loader=(--videos 48 --clips 320 --workers 8 --batch 32)
    rounds=(--rounds 3)
    train_json="${GPU_CHECK_RESULTS:-$tmp}/train_step-vit-b32-gpu.json"
else
    echo "No CUDA device: running the small CPU presets instead. These are CPU figures, not GPU ones."
    if [[ -n "${GPU_CHECK_SMOKE:-}" ]]; then
        train=(--set batch_size=4 max_frames=2 image_size=32 tiny_patch=16 tiny_width=64 tiny_layers=1)
        similarity=(--n 32 --dim 64 --frames 4 --bases 4 --stages 2)
        loader=(--videos 2 --clips 4 --seconds 0 --workers 0 --batch 2)
        rounds=(--rounds 1)
    else
        train=()
        similarity=(--n 256)
        loader=(--videos 8 --clips 32 --workers 2 --batch 8)
        rounds=(--rounds 2)
    fi
    train_json="$tmp/train_step-tiny-cpu.json"
    step "Tiny CLIP training on CPU (clips/s, FLOPs, peak memory)" 120 \
        "$PYTHON" bench/train_step.py --preset tiny --warmup 1 --steps 2 --flops "${train[@]}" --json "$train_json"
    step "Evaluation, batched vs loop (CPU, small)" 120 \
        "$PYTHON" bench/similarity.py --device cpu "${similarity[@]}"
fi

# Loader clips/s with and without the cache: `--cache` times the decord path and the cache alternately.
step "Loader: decord vs the decoded-frame cache" 240 \
    "$PYTHON" bench/data_loading.py --cache "${loader[@]}" "${rounds[@]}"

# The augmented data path (device augmentation on the GPU where there is one) against the step.
step "Augmented data path: RandAugment in the loader vs on the device (frame cache)" 300 \
    "$PYTHON" bench/data_loading.py --cache --augment "${loader[@]}" "${rounds[@]}" --json "$tmp/augment.json"
step "Data path against the training step" 30 \
    "$PYTHON" bench/data_wait.py "$train_json" "$tmp/augment.json"
exit $failed
