#!/usr/bin/env bash
# The full CIFAR-100-LT protocol in one call on a lent GPU machine (see benchmarks/README.md).
# Carries .whl (pydantic wheels for the machine's Python 3.12) and .gpu/cifar100_lt.xz (pack_cifar100_lt.py).
# Usage: gpu_repro.sh BUDGET_SECONDS [reproduce_cifar100_lt.py arguments]
set -u
budget=${1:-520}   # seconds for training; the rest of the call packs the results
shift
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--precision fp32 --rho-sweep --jobs 8 --threads-per-job 2)
if [ -z "${SKIP_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt 2>&1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" >> $OUT/gpu.txt
cat $OUT/gpu.txt
python3 benchmarks/device/pack_cifar100_lt.py unpack .gpu/cifar100_lt.xz /tmp/data || exit 1
timeout $budget python3 benchmarks/reproduce_cifar100_lt.py --out /tmp/repro --data-root /tmp/data "${args[@]}" 2>&1 | tee $OUT/log.txt
python3 benchmarks/reproduce_cifar100_lt.py --out /tmp/repro --data-root /tmp/data "${args[@]}" --tables-only > $OUT/results.md
cd /tmp/repro && tar czf $OUT/results.tgz --exclude='*.pt' --exclude='*.tmp' . \
    && tar czf $OUT/stage1_checkpoints.tgz ir*/dr_s0/stage1/checkpoint.pt
ls -la $OUT
cat $OUT/results.md
