#!/usr/bin/env bash
# The recipe study (benchmarks/recipe_study.py) in one command on a remote GPU host without internet access.
#
# Carry the project with WORK/cifar100_lt.xz (pack_cifar100_lt.py: it includes the validation images) and
# optionally WORK/wheels/*.whl, as for reproduce.sh. Results (results.md, log.txt, gpu.txt, results.tgz) land
# in RESULTS.
#
# Usage: recipe_study.sh BUDGET_SECONDS [recipe_study.py arguments]
#   WORK (default .remote-gpu) holds the carried files; RESULTS (default WORK/results) receives the outputs.
set -u
budget=${1:-3600}   # seconds of training; what is finished by then is tabulated
shift
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--irs 100 --seeds 3 --rho-check --jobs 8 --threads-per-job 2)
work=${WORK:-.remote-gpu}
results=${RESULTS:-$work/results}
mkdir -p "$results"
if compgen -G "$work/wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$work"/wheels/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$results/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
    >> "$results/gpu.txt"
cat "$results/gpu.txt"
python3 benchmarks/remote_gpu/pack_cifar100_lt.py unpack "$work/cifar100_lt.xz" /tmp/data || exit 1
timeout "$budget" python3 benchmarks/recipe_study.py --out /tmp/study --data-root /tmp/data "${args[@]}" 2>&1 \
    | tee "$results/log.txt"
python3 benchmarks/recipe_study.py --out /tmp/study --data-root /tmp/data "${args[@]}" --tables-only \
    > "$results/results.md"
results=$(cd "$results" && pwd)
(cd /tmp/study && tar czf "$results/results.tgz" --exclude='*.pt' --exclude='*.tmp' .)
ls -la "$results"
cat "$results/results.md"
