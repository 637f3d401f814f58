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
source benchmarks/remote_gpu/prepare.sh
timeout "$budget" python3 benchmarks/recipe_study.py --out /tmp/study --data-root /tmp/data "${args[@]}" 2>&1 \
    | tee "$results/log.txt"
python3 benchmarks/recipe_study.py --out /tmp/study --data-root /tmp/data "${args[@]}" --tables-only \
    > "$results/results.md"
results=$(cd "$results" && pwd)
(cd /tmp/study && tar czf "$results/results.tgz" --exclude='*.pt' --exclude='*.tmp' .)
ls -la "$results"
cat "$results/results.md"
