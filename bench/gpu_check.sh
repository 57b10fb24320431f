#!/usr/bin/env bash
# The whole GPU check in one command, for a GPU machine without network: installs the wheels in .whl/
# (packages that machine lacks, when present), prints the versions, runs bench/nvml_interference.py and
# bench/gpu_energy.py; results
# go to $OUT (default bench/results).
#
#     bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,power.limit,power.draw,temperature.gpu --format=csv
python3 -c "import torch, transformers, diffusers, pynvml; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
python3 bench/nvml_interference.py --out "$OUT" --cache-dir /tmp/wattproxy-gpu-cache 2>&1 | tee "$OUT/nvml_interference.log"
python3 bench/gpu_energy.py --out "$OUT" --cache-dir /tmp/wattproxy-gpu-cache 2>&1 | tee "$OUT/gpu_energy.log"
