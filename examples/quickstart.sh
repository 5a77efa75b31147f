#!/usr/bin/env bash
# The main job on the embedded default data: train the `fast` eps-UNet on real 28 x 28 MNIST digits (CPU), export it
# to ONNX (FP32, FP16, step graph) with validation, then sample 64 digits with the lean runtime and write a PNG grid
# (SDE-DPM-Solver++(2M) at 20 steps, the sampler ddpm-run picks by default; docs/sweep.md compares the samplers).
# One line per stage with its time; ddpm-train also prints this machine's measured steps/s after its first steps.
set -euo pipefail
cd "$(dirname "$0")/.."
run="${RUN_DIR:-runs/mnist}"
steps="${STEPS:-2000}"
if [ -e "$run/ckpt.pt" ]; then
  echo "error: $run already holds a run; remove it or set RUN_DIR to a new folder" >&2
  exit 2
fi
start=$SECONDS
stage() {  # stage NAME COMMAND...: run it, then say how long it took
  local name=$1 t0=$SECONDS
  shift
  "$@"
  echo "quickstart: $name took $((SECONDS - t0)) s" >&2
}
stage "set-up (.venv, pip)" bash examples/setup.sh train,export
mkdir -p "$run"
# The paper's objective and linear schedule; a 10x learning rate with cosine decay suits a short CPU run, and the
# `fast` preset (2 x 2 pixel patches folded into channels) takes many more steps per second than `small`.
stage "training ($steps steps)" .venv/bin/ddpm-train --dataset mnist --preset fast --steps "$steps" \
  --batch-size 64 --lr 2e-3 --lr-schedule cosine --warmup 50 --no-preview --out "$run/ckpt.pt"
stage "export + validation" .venv/bin/ddpm-export "$run/ckpt.pt" --out-dir "$run/export"
stage "sampling 64 digits" .venv/bin/ddpm-run "$run/export/model.onnx" --n 64 --sampler sde-dpm++2m --steps 20 \
  --seed 0 --out "$run/samples.npz" --grid "$run/samples.png"
total=$((SECONDS - start))
echo "quickstart: done in $((total / 60)) min $((total % 60)) s; the digits are in $run/samples.png (grid) and" \
  "$run/samples.npz (arrays), the model in $run/ckpt.pt and $run/export/" >&2
