#!/usr/bin/env bash
# Single-GPU speed of one run, on a GPU host (no internet needed), in one command:
#   1. stage-1 images/s of our loop against the model step alone (bf16), benchmarks/train_throughput.py;
#   2. the wall time of the full CIFAR-100-LT IR-100 protocol (200 + 10 epochs of ResNet-32, evaluated
#      every epoch) as ONE run of `h2t train`, bf16;
#   3. stage-1 images/s of 1 rank and of every GPU as ranks of one run, benchmarks/data_parallel_throughput.py.
# Carry the images as reproduce.sh does (WORK/cifar100_lt.xz; wheels in WORK/wheels if the host lacks any).
# Usage: single_gpu_speed.sh [RESULTS]
set -u
work=${WORK:-.remote-gpu}
results=${1:-$work/results}
source benchmarks/remote_gpu/prepare.sh
gpus=$(nvidia-smi -L | wc -l)

python3 benchmarks/train_throughput.py --data-root /tmp/data --device cuda --precision bf16 --workers 4 --variants \
    --steps 80 --rounds 3 2>&1 | tee "$results/train_throughput.txt"

started=$(date +%s.%N)
python3 -m h2t train --config configs/cifar100_lt_ir100.yaml --data-root /tmp/data --out /tmp/ir100_one_run \
    --device cuda --set precision=bf16 2>&1 | tee "$results/ir100_one_run.txt"
ended=$(date +%s.%N)
echo "full IR-100 protocol as one run: $(python3 -c "print(f'{$ended - $started:.1f}')") s wall" \
    | tee -a "$results/ir100_one_run.txt"

ranks=1; [ "$gpus" -gt 1 ] && ranks="1 $gpus"
python3 benchmarks/data_parallel_throughput.py --data-root /tmp/data --device cuda --precision bf16 \
    --ranks $ranks --rounds 3 2>&1 | tee "$results/data_parallel_throughput.txt"
