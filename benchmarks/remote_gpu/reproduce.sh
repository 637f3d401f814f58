#!/usr/bin/env bash
# The full CIFAR-100-LT protocol in one command on a remote GPU host that has no internet access.
#
# Copy the project there together with what it cannot download:
#   - the images the protocol reads, packed by pack_cifar100_lt.py (WORK/cifar100_lt.xz, about 60 MiB);
#   - optionally, wheels (WORK/wheels/*.whl) of Python packages the host's interpreter lacks
#     (`pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d wheels NAME==VERSION`).
# Results (results.md, log.txt, gpu.txt, results.tgz, stage1_checkpoints.tgz) land in RESULTS.
#
# Usage: reproduce.sh BUDGET_SECONDS [reproduce_cifar100_lt.py arguments]
#   WORK (default .remote-gpu) holds the carried files; RESULTS (default WORK/results) receives the outputs.
set -u
budget=${1:-520}   # seconds of training; what is finished by then is tabulated
shift
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--precision fp32 --rho-sweep --jobs 8 --threads-per-job 2)
work=${WORK:-.remote-gpu}
results=${RESULTS:-$work/results}
source benchmarks/remote_gpu/prepare.sh
timeout "$budget" python3 benchmarks/reproduce_cifar100_lt.py --out /tmp/repro --data-root /tmp/data "${args[@]}" 2>&1 \
    | tee "$results/log.txt"
python3 benchmarks/reproduce_cifar100_lt.py --out /tmp/repro --data-root /tmp/data "${args[@]}" --tables-only \
    > "$results/results.md"
results=$(cd "$results" && pwd)
(cd /tmp/repro && tar czf "$results/results.tgz" --exclude='*.pt' --exclude='*.tmp' . \
    && tar czf "$results/stage1_checkpoints.tgz" ir*/dr_s0/stage1/checkpoint.pt)
ls -la "$results"
cat "$results/results.md"
