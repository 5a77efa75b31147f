#!/usr/bin/env bash
# The GPU issue's measurements in ONE device call, after onnxruntime-gpu was carried and installed into /tmp/site
# with the calls that `bash ../shared/gpu/carry-onnxruntime-gpu.sh` prints (make them back to back, then this one):
#   run(command="bash examples/gpu_check.sh", timeout_s=540)
# Everything it measures is written under $OUT (device.txt, benchmark.txt, parity.txt, pytest_gpu.txt, train.txt);
# copy the figures into docs/benchmarks.md with the device name.
set -uo pipefail
export PYTHONPATH="/tmp/site:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
out="${OUT:-gpu-out}"
mkdir -p "$out" /tmp/gpu
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  python3 -c "import torch, onnxruntime as o; o.preload_dlls(); print('torch', torch.__version__, 'cuda', torch.version.cuda, '| onnxruntime', o.__version__, o.get_available_providers())"; } 2>&1 | tee "$out/device.txt"
# 1. Throughput: the paper's CIFAR-10 UNet, full 1000-step chain, batch 1/8/64; + the 256 x 256 row.
timeout 300 python3 examples/benchmark_gpu.py --steps 1000 --batches 1,8,64 --work /tmp/gpu/bench 2>&1 | tee "$out/benchmark.txt"
# 2. Parity: ORT CUDA FP32 vs torch CUDA FP32 (TF32 off), 1000 steps; FP16 vs FP32 figures.
timeout 120 python3 examples/gpu_parity.py /tmp/gpu/bench/cifar10.pt /tmp/gpu/bench/export --n 8 2>&1 | tee "$out/parity.txt"
# 3. The GPU tests.
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tail -25 | tee "$out/pytest_gpu.txt"
# 4. Training throughput of the cifar10 preset at batch 128 (random data is enough for steps/s: the folder dataset).
python3 - <<'PY' 2>&1 | tee "$out/train.txt"
import time, torch
from train.model import UNet, preset_config
from runtime.schedule import DiffusionConfig
torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
model = UNet(preset_config("cifar10", 32, 3)).cuda().train()
opt = torch.optim.Adam(model.parameters(), lr=2e-4)
x = torch.randn(128, 3, 32, 32, device="cuda")
for amp in (False, True):
    for i in range(25):
        if i == 5:
            torch.cuda.synchronize(); start = time.perf_counter()
        t = torch.randint(0, 1000, (128,), device="cuda")
        with torch.autocast("cuda", torch.bfloat16, enabled=amp):
            loss = (model(x, t) - x).square().mean()
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    torch.cuda.synchronize()
    print(f"cifar10 preset, batch 128, {'bf16 autocast' if amp else 'fp32 (TF32 on)'}: "
          f"{20 / (time.perf_counter() - start):.2f} steps/s")
PY
