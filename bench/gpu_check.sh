#!/usr/bin/env bash
# The whole GPU check in one command, for a GPU machine without network: installs the wheels in .whl/
# (packages that machine lacks, when present), prints the versions, runs bench/gpu_served.py (images,
# served against direct calls in interleaved rounds; the model in process, then in a process of its
# own) and bench/gpu_energy.py without its images (the counter step, the chats in process, in a model
# process of their own and through proxy mode), and bench/nvml_interference.py where INTERFERENCE=1;
# results go to $OUT (default bench/results). About 10 minutes on an H200 (the
# device time a task gets is 15).
#
#     make gpu-wheels           # here, with network: the wheels into .whl/
#     bash bench/gpu_check.sh   # there
set -uo pipefail
OUT=${OUT:-bench/results}
CACHE=/tmp/wattproxy-gpu-cache
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,power.limit,power.draw,temperature.gpu,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, transformers, diffusers, pynvml; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
rc=0
python3 bench/gpu_served.py --out "$OUT" --cache-dir "$CACHE" 2>&1 | tee "$OUT/gpu_served.log" || rc=1
python3 bench/gpu_served.py --own-process --rounds 3 --out "$OUT" --cache-dir "$CACHE" 2>&1 | tee "$OUT/gpu_served_own.log" || rc=1
python3 bench/gpu_energy.py --no-images --out "$OUT" --cache-dir "$CACHE" --text-requests "${TEXT_REQUESTS:-96}" 2>&1 | tee "$OUT/gpu_energy.log" || rc=1
if [ "${INTERFERENCE:-0}" = 1 ]; then
  python3 bench/nvml_interference.py --out "$OUT" --cache-dir "$CACHE" 2>&1 | tee "$OUT/nvml_interference.log" || rc=1
fi
nvidia-smi --query-gpu=name,power.draw,temperature.gpu,clocks.sm --format=csv
exit $rc
