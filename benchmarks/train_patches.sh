#!/usr/bin/env bash
# Trains the shipped patches model (`--model patches`: 32x32 RGB patches of the photographs in scikit-image and
# scikit-learn, with mirror images) on one GPU: about 5 minutes on an H200 (training stops after 270 s), then
# samples it at a fine solve (50 dpmpp_2m steps) against the real-vs-real floor.
# Usage: benchmarks/train_patches.sh [OUT]     (default OUT: steindiff/weights/patches)
# OUT gets model.safetensors (EMA weights, float16) and config.json (architecture, data split, training record);
# the full checkpoint (training state for --resume, the fine solve's results) stays in $CKPT (default
# /tmp/steindiff-patches-ckpt). `DEVICE=cpu ITERS=3 N=16 benchmarks/train_patches.sh /tmp/p` checks the commands on
# a CPU in a few minutes. Afterwards refit the calibrations shipped with the model: benchmarks/run_results.sh patches.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-steindiff/weights/patches}"
ckpt="${CKPT:-${TMPDIR:-/tmp}/steindiff-patches-ckpt}"
device="${DEVICE:-cuda}"
precision=bf16 && [[ $device == cpu ]] && precision=fp32
python -m steindiff train --data patches:flip --out "$ckpt" --device "$device" --precision $precision \
  --channels 32 --channel-mult 1,2,2,4 --num-blocks 1 --attn-levels 2 --dropout 0.1 \
  --batch-size 256 --lr 1e-3 --warmup 500 --ema-decay 0.9995 --iters "${ITERS:-200000}" --time-limit 270 \
  --weights-dtype float16 --ckpt-every 5000 --log-every 200 --no-progress
mkdir -p "$out"
rm -rf "$out/calibrations"  # fitted for other weights: benchmarks/run_results.sh patches fits them anew
cp "$ckpt/model.safetensors" "$ckpt/config.json" "$out/"
# the fine solve, against the floor (issue 13: patch-FD within 2x the real-vs-real floor)
python -m steindiff bench --model "$out" --solvers dpmpp_2m --nfe 50 --schedules karras --coords ve \
  --stabilizers none --seeds 0 --n "${N:-500}" --device "$device" --no-progress --json-out "$ckpt/fine-solve.json" \
  --markdown "$ckpt/fine-solve.md" > /dev/null
python - "$ckpt/fine-solve.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))["rows"][0]["metrics"]
print(f"fine solve (dpmpp_2m, 50 steps, {m['n']} samples): " + ", ".join(
    f"{k} {m[k]:.4g} (floor {m[k + '_floor']:.4g})" for k in ("patch_fd", "spectrum", "spectrum_high", "pixel_sw2")))
EOF
