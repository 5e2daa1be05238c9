#!/usr/bin/env bash
# The GPU check (issues 3, 4, 6): run from the repo root on a machine with one CUDA GPU, from the source tree.
#   tests/gpu_check.sh OUT_DIR FASHION_DIR      (FASHION_DIR: the four Fashion-MNIST .gz files)
# Prints and writes: the CUDA tests (graph == eager, strategies agree), the bench table at 32-true (tutorial
# baselines, both loaders), each strategy at 16-mixed and bf16-mixed, and ddp/fabric with the CUDA graph off.
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
timeout 300 $py -m pytest tests/test_gpu.py -q -p no:cacheprovider --noconftest -k "not mixed_precision" 2>&1 \
  | tail -n 25 | tee "$out/pytest.txt"

echo "== bench, 32-true"
timeout 400 $py -m distmnist bench "${common[@]}" --precision 32-true --out "$out/fp32" 2>&1 \
  | grep -v '^bench:' | tee "$out/bench-fp32.txt"
for precision in 16-mixed bf16-mixed; do
  echo "== bench, $precision"
  timeout 300 $py -m distmnist bench "${common[@]}" --precision "$precision" --baselines tutorial \
    --loaders resident --out "$out/$precision" 2>&1 | grep -v '^bench:' | tee "$out/bench-$precision.txt"
done
echo "== bench, CUDA graph off (eager steps)"
timeout 200 $py -m distmnist bench "${common[@]}" --precision 32-true --baselines "" --strategies ddp,trainer,fabric \
  --loaders resident --out "$out/eager" train.cuda_graphs=false 2>&1 | grep -v '^bench:' | tee "$out/bench-eager.txt"
