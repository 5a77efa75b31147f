#!/usr/bin/env bash
# The main job on the embedded default data: train the small eps-UNet on real MNIST digits (CPU), export it to
# ONNX (FP32, FP16, step graph) with validation, then sample 64 digits with the lean runtime and write a PNG grid.
set -euo pipefail
cd "$(dirname "$0")/.."
run="${RUN_DIR:-runs/mnist}"
if [ -e "$run/ckpt.pt" ]; then
  echo "error: $run already holds a run; remove it or set RUN_DIR to a new folder" >&2
  exit 2
fi
bash examples/setup.sh export
mkdir -p "$run"
.venv/bin/ddpm-train --dataset mnist --preset small --steps "${STEPS:-700}" --batch-size 64 --lr 2e-3 --out "$run/ckpt.pt"
.venv/bin/ddpm-export "$run/ckpt.pt" --out-dir "$run/export"
.venv/bin/ddpm-run "$run/export/model.onnx" --n 64 --sampler ddpm --steps 100 --seed 0 \
  --out "$run/samples.npz" --grid "$run/samples.png"
echo "done: samples in $run/samples.png (grid) and $run/samples.npz (arrays)"
