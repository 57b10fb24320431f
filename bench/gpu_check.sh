#!/usr/bin/env bash
# The whole GPU check in one command, for a GPU machine without network: installs the wheels in .whl/
# (packages that machine lacks, when present), prints the versions, and runs bench/gpu_served.py
# (images, served against direct calls in interleaved rounds, the model in process; each call's
# thread CPU time and context switches recorded; about 4 minutes on an H200 at ROUNDS=3), then the same
# with the denoiser as CUDA graphs (--cuda-graphs; about 3 minutes; GRAPHS=0 skips it), so that a
# task's 15 minutes of device time leave room for a second run. PLAIN=0 skips the first (eager) run.
# Where SDXL=1, also bench/gpu_graphs.py (SDXL with CUDA graphs: images against eager ones, time,
# J/image, a capture that fails; about 3 minutes, the model's build included). Where OWN=1, also
# bench/gpu_served.py --own-process (the model in a process of its own; about 3 minutes); where
# ENERGY=1, bench/gpu_energy.py without its images (the counter step, the chats in process, in a
# model process of their own and through proxy mode; about 4 minutes); where INTERFERENCE=1,
# bench/nvml_interference.py. Results go to $OUT (default bench/results).
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
if [ "${PLAIN:-1}" = 1 ]; then
  python3 bench/gpu_served.py --rounds "${ROUNDS:-3}" --out "$OUT" --cache-dir "$CACHE" 2>&1 | tee "$OUT/gpu_served.log" || rc=1
fi
if [ "${GRAPHS:-1}" = 1 ]; then
  python3 bench/gpu_served.py --cuda-graphs --rounds "${ROUNDS:-3}" --out "$OUT" --cache-dir "$CACHE" 2>&1 | tee "$OUT/gpu_served_graphs.log" || rc=1
fi
if [ "${SDXL:-0}" = 1 ]; then
  python3 bench/gpu_graphs.py --out "$OUT" --cache-dir "$CACHE" 2>&1 | tee "$OUT/gpu_graphs.log" || rc=1
fi
if [ "${OWN:-0}" = 1 ]; then
  python3 bench/gpu_served.py --own-process --rounds 3 --out "$OUT" --cache-dir "$CACHE" 2>&1 | tee "$OUT/gpu_served_own.log" || rc=1
fi
if [ "${ENERGY:-0}" = 1 ]; then
  python3 bench/gpu_energy.py --no-images --out "$OUT" --cache-dir "$CACHE" --text-requests "${TEXT_REQUESTS:-96}" 2>&1 | tee "$OUT/gpu_energy.log" || rc=1
fi
if [ "${INTERFERENCE:-0}" = 1 ]; then
  python3 bench/nvml_interference.py --out "$OUT" --cache-dir "$CACHE" 2>&1 | tee "$OUT/nvml_interference.log" || rc=1
fi
nvidia-smi --query-gpu=name,power.draw,temperature.gpu,clocks.sm --format=csv
exit $rc
