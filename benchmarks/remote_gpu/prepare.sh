# Sourced by the remote-GPU scripts, with `work` (the carried files) and `results` set: installs the carried
# wheels, records the GPU and torch in results/gpu.txt, and unpacks the carried CIFAR-100 images to /tmp/data.
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
