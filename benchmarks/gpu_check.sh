#!/usr/bin/env bash
# The GPU issue's measurements in ONE device call, after onnxruntime-gpu was carried and installed into /tmp/site
# with the calls that `bash ../shared/gpu/carry-onnxruntime-gpu.sh` prints (make them back to back, then this one):
#   run(command="bash benchmarks/gpu_check.sh [STAGE ...]", timeout_s=590)
# STAGEs, most important first: benchmark (~380 s before the torch.compile rows; they add their compile time), parity (~60 s), pytest (~55 s), mnist (~20 s), train (~30 s);
# default all of them, which fits one call only just: name the ones still to measure. Each runs under its own
# timeout and writes under $OUT: device.txt, benchmark.txt, parity.txt, pytest_gpu.txt, mnist.txt (+ mnist_fp32.npz,
# mnist_fp16.npz), train.txt. The mnist stage samples a carried quickstart export (MNIST_EXPORT, default
# .gpu-carry/qs: model.onnx and model.fp16.onnx) on CUDA in FP32 and FP16; classify the two npz here with
# evaluation.digit_quality.classify. Copy the figures into docs/benchmarks.md with the device name.
set -uo pipefail
export PYTHONPATH="/tmp/site:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
out="${OUT:-gpu-out}"
mnist="${MNIST_EXPORT:-.gpu-carry/qs}"
stages="${*:-benchmark parity pytest mnist train}"
want() { [[ " $stages " == *" $1 "* ]]; }
mkdir -p "$out" /tmp/gpu
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  python3 -c "import torch, numpy, onnx, onnxruntime as o; o.preload_dlls(); print('torch', torch.__version__, 'cuda', torch.version.cuda, '| numpy', numpy.__version__, '| onnx', onnx.__version__, '| onnxruntime', o.__version__, o.get_available_providers())"; } 2>&1 | tee "$out/device.txt"
# Throughput: the paper's CIFAR-10 UNet, full 1000-step chain, batch 64 first (the target); 256 x 256 next.
want benchmark && timeout 560 python3 benchmarks/gpu.py --steps 1000 --batches 64,8,1 --work /tmp/gpu/bench \
  2>&1 | tr '\r' '\n' | grep -v "^export:\|^fusion:\|plugin EP device" | tee "$out/benchmark.txt"
# Parity: ORT CUDA FP32 vs torch CUDA FP32 (TF32 off), 1000 steps; FP16 vs FP32 figures.
want parity && timeout 120 python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; import gpu as b; b.prepare(Path('/tmp/gpu/bench'))" \
  2>&1 | tr '\r' '\n' | grep -v "^export:" | tail -3
want parity && timeout 90 python3 benchmarks/gpu_parity.py /tmp/gpu/bench/cifar10.pt /tmp/gpu/bench/export --n 8 2>&1 \
  | grep -v "plugin EP device\|cudnn_fe_call" | tee "$out/parity.txt"
# The GPU tests.
want pytest && timeout 70 python3 -m pytest -m gpu -q -p no:cacheprovider tests/runtime/test_runtime_backends.py 2>&1 \
  | tail -25 | tee "$out/pytest_gpu.txt"
# FP16 vs FP32 on the quickstart MNIST model: 256 samples each on CUDA (default sampler), same seed.
if want mnist && [ -f "$mnist/model.onnx" ]; then
  for p in fp32 fp16; do
    timeout 30 python3 -m runtime.run.cli "$mnist/model.onnx" --provider cuda --precision "$p" --n 256 --seed 0 \
      --out "$out/mnist_$p.npz" --force 2>&1 | tr '\r' '\n' | grep -v "^sampling:\|plugin EP device" | tee -a "$out/mnist.txt"
  done
fi
# Training throughput of the cifar10 preset at batch 128 through ddpm-train itself (its speed line), on a folder of
# random 32 x 32 pictures (steps/s does not depend on what the pictures show).
if want train; then
  python3 -c "import numpy as np; from PIL import Image; import os; os.makedirs('/tmp/gpu/pics', exist_ok=True)
[Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(f'/tmp/gpu/pics/{i}.png') for i in range(256)]"
  timeout 60 python3 -m train.cli --dataset folder --data-dir /tmp/gpu/pics --preset cifar10 --steps 60 --batch-size 128 \
    --device cuda --no-preview --out /tmp/gpu/train.pt --force 2>&1 | tr '\r' '\n' | grep -v "^train:" | tee "$out/train.txt"
fi
exit 0
