#!/usr/bin/env bash
# The GPU check: run from the repo root on a machine with one CUDA GPU, from the source tree (~4 minutes).
#   tests/gpu_check.sh OUT_DIR FASHION_DIR      (FASHION_DIR: the four Fashion-MNIST .gz files)
# Prints and writes: the CUDA tests (graph == eager for each strategy, strategies agree, mixed precision trains),
# the bench at 32-true (tutorial baseline, both loaders, CUDA graphs on), each strategy at 16-mixed and bf16-mixed,
# each strategy with the CUDA graph off, and the time to 88% Fashion-MNIST test accuracy (configs/fast.yaml).
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
echo "== bench, CUDA graph off (eager steps)"
timeout 90 $py -m distmnist bench "${common[@]}" --precision 32-true --baselines "" --loaders resident \
  --out "$out/eager" train.cuda_graphs=false 2>&1 | grep -v '^bench:' | tee "$out/bench-eager.txt"
echo "== time to 88% test accuracy (configs/fast.yaml, 1 process)"
timeout 120 $py -m distmnist bench -c fast --data fashion-mnist --data-root /tmp/data --accelerator cuda \
  --time-to-acc 0.88 --out "$out/tta" 2>&1 | grep -v '^bench:' | tee "$out/tta.txt"
