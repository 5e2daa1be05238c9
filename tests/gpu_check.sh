#!/usr/bin/env bash
# The GPU check: run from the repo root on a machine with one CUDA GPU, from the source tree (~4 minutes).
#   tests/gpu_check.sh OUT_DIR FASHION_DIR      (FASHION_DIR: the four Fashion-MNIST .gz files)
# Prints and writes: the CUDA tests (graph == eager for each strategy, strategies agree, mixed precision trains),
# the bench at 32-true (tutorial baseline, both loaders, CUDA graphs on), each strategy at 16-mixed and bf16-mixed,
# each strategy sharded (train.parallel=fsdp, bf16-mixed: runs, agreement, bench rows), each strategy with the
# CUDA graph off, and the time to 88% Fashion-MNIST test accuracy (configs/fast.yaml).
set -uo pipefail
out=${1:-gpu-check}
gz=${2:-.device_data/fashion}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
py=${PYTHON:-python3}
mkdir -p "$out"
{
  nvidia-smi -L
  $py -c "import torch, lightning, torchmetrics; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/env.txt"
$py -m distmnist data prepare --name fashion-mnist --from "$gz" --root /tmp/data || exit 1
common=(--data fashion-mnist --data-root /tmp/data --accelerator cuda --epochs 1 --warmup-epochs 1)

echo "== CUDA tests"
xdist=$($py -c "import xdist" 2>/dev/null && echo "-n 4")
timeout 240 $py -m pytest tests/test_gpu.py -q -p no:cacheprovider --noconftest $xdist 2>&1 \
  | tail -n 25 | tee "$out/pytest.txt"

echo "== bench, 32-true"
timeout 200 $py -m distmnist bench "${common[@]}" --precision 32-true --baselines tutorial --out "$out/fp32" 2>&1 \
  | grep -v '^bench:' | tee "$out/bench-fp32.txt"
for precision in 16-mixed bf16-mixed; do
  echo "== bench, $precision"
  timeout 90 $py -m distmnist bench "${common[@]}" --precision "$precision" --baselines "" \
    --loaders resident --out "$out/$precision" 2>&1 | grep -v '^bench:' | tee "$out/bench-$precision.txt"
done
echo "== FSDP (train.parallel=fsdp), bf16-mixed: one GPU, NCCL, torchrun world size 1, each strategy"
for strategy in ddp fabric trainer; do
  timeout 120 $py -m torch.distributed.run --standalone --nproc_per_node=1 -m "distmnist.$strategy" -c fashion \
    data.root=/tmp/data train.accelerator=cuda train.precision=bf16-mixed train.parallel=fsdp train.epochs=1 \
    train.progress=false run.dir="$out/fsdp-$strategy" 2>&1 | grep -E '^\[|error|Error' | tee "$out/fsdp-$strategy.txt"
done
$py - "$out" <<'PY' 2>&1 | tee "$out/fsdp-agree.txt"
import sys, torch
runs = {s: torch.load(f"{sys.argv[1]}/fsdp-{s}/model.pt", weights_only=True) for s in ("ddp", "fabric", "trainer")}
for s in ("fabric", "trainer"):
    d = max((runs[s][k] - runs["ddp"][k]).abs().max().item() for k in runs["ddp"])
    print(f"fsdp bf16-mixed {s} vs ddp.py: max abs {d:.3g}" + (" (bit-identical)" if d == 0 else ""))
PY
echo "== bench, FSDP vs DDP rows, bf16-mixed, 1 process"
timeout 150 $py -m distmnist bench "${common[@]}" --precision bf16-mixed --baselines "" --loaders resident \
  --parallel ddp,fsdp --out "$out/fsdp" 2>&1 | grep -v '^bench:' | tee "$out/bench-fsdp.txt"
echo "== bench, CUDA graph off (eager steps)"
timeout 90 $py -m distmnist bench "${common[@]}" --precision 32-true --baselines "" --loaders resident \
  --out "$out/eager" train.cuda_graphs=false 2>&1 | grep -v '^bench:' | tee "$out/bench-eager.txt"
echo "== time to 88% test accuracy (configs/fast.yaml, 1 process)"
timeout 120 $py -m distmnist bench -c fast --data fashion-mnist --data-root /tmp/data --accelerator cuda \
  --time-to-acc 0.88 --out "$out/tta" 2>&1 | grep -v '^bench:' | tee "$out/tta.txt"
