"""Does reading NVML slow the GPU work down? Direct pipeline calls with and without an NVML poller.

    python bench/nvml_interference.py --out DIR            # an NVIDIA GPU; about 2 minutes
    python bench/nvml_interference.py --smoke --out DIR    # any CPU: tiny-sd, a no-op "read"

The served-vs-direct comparison of bench/gpu_energy.py showed Stable Diffusion at batch 1 served at 0.71
of the direct calls' images/s while the script polled the power every 10 ms; on that machine one NVML
call took about 4.6 ms. This benchmark isolates the question: the same pipeline (`sd15`, fp16, 512x512,
30 steps, batch 1) is called directly while a thread of the same process polls NVML at a given period
(or, in one condition, a separate process does). Conditions are interleaved over rounds; the figures
are medians of seconds per image, and each NVML call's duration is recorded.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/nvml_interference.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.common import (
    common_args,
    default_cache_dir,
    machine_info,
    machine_markdown,
    md_table,
    median,
    percentile,
    print_flush,
    quiet_logging,
    rotated,
    status_marker,
    write_result,
)

NAME = "nvml_interference"


@dataclass(frozen=True)
class Condition:
    name: str
    call: str | None  # "energy" or "power"; None: no poller
    period_s: float = 0.0
    separate_process: bool = False


CONDITIONS = (
    Condition("no poller", None),
    Condition("energy counter every 10 ms (thread)", "energy", 0.010),
    Condition("energy counter every 50 ms (thread)", "energy", 0.050),
    Condition("energy counter every 100 ms (thread)", "energy", 0.100),
    Condition("power every 10 ms (thread)", "power", 0.010),
    Condition("energy counter every 10 ms (another process)", "energy", 0.010, separate_process=True),
)

POLLER_PROCESS = """
import sys, time, pynvml
pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(int(sys.argv[1]))
period = float(sys.argv[2])
while True:
    pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    time.sleep(period)
"""


class Poller:
    """Calls `read` every `period_s` in a thread; records each call's duration (s)."""

    def __init__(self, read: Callable[[], object], period_s: float) -> None:
        self.read = read
        self.period_s = period_s
        self.durations_s: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-poller", daemon=True)

    def _run(self) -> None:
        while True:
            t0 = time.perf_counter()
            self.read()
            self.durations_s.append(time.perf_counter() - t0)
            if self._stop.wait(self.period_s):
                return

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/nvml_interference.py", description=__doc__.splitlines()[0]
    )
    common_args(parser)
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: the service's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=3, help="images per condition per round")
    args = parser.parse_args(argv)
    smoke = args.smoke
    device, dtype, preset, side, steps = (
        ("cpu", "float32", "tiny-sd", 64, 2) if smoke else ("cuda:0", "float16", "sd15", 512, 30)
    )
    rounds, per_round = (1, 1) if smoke else (args.rounds, args.images)

    from backends import load_backend
    from backends.base import ImageRequest
    from backends.tiny import ensure_model

    reads: dict[str, Callable[[], object]]
    if smoke:
        reads = {"energy": lambda: None, "power": lambda: None}
        conditions = [c for c in CONDITIONS if not c.separate_process]
    else:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        reads = {
            "energy": lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle),
            "power": lambda: pynvml.nvmlDeviceGetPowerUsage(handle),
        }
        conditions = list(CONDITIONS)

    cache = (args.cache_dir or default_cache_dir()) / "models"
    print_flush(f"building/loading {preset} ...")
    path = ensure_model(preset, cache, dtype=dtype)
    backend = load_backend("image", preset, path, device=device, dtype=dtype)
    prompt = "a lighthouse on a rocky coast at sunset"
    request = ImageRequest(prompt=prompt, width=side, height=side, steps=steps)

    def one_image(seed: int) -> float:
        t0 = time.perf_counter()
        backend.run([ImageRequest(**{**request.__dict__, "seed": seed})])
        backend.synchronize()
        return time.perf_counter() - t0

    one_image(0)  # warm-up
    seconds: dict[str, list[float]] = {c.name: [] for c in conditions}
    call_s: dict[str, list[float]] = {c.name: [] for c in conditions}
    seed = 1
    for r in range(rounds):
        for cond in rotated(conditions, r):
            proc: subprocess.Popen[bytes] | None = None
            poller: Poller | None = None
            if cond.separate_process:
                proc = subprocess.Popen([sys.executable, "-c", POLLER_PROCESS, "0", str(cond.period_s)])
                time.sleep(1.0)  # let it start polling
            elif cond.call is not None:
                poller = Poller(reads[cond.call], cond.period_s).__enter__()
            try:
                for _ in range(per_round):
                    seconds[cond.name].append(one_image(seed))
                    seed += 1
            finally:
                if poller is not None:
                    poller.__exit__(None, None, None)
                    call_s[cond.name].extend(poller.durations_s)
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=10)
            print_flush(f"round {r + 1} {cond.name}: {median(seconds[cond.name]):.3f} s/image so far")
    backend.close()

    base = median(seconds[conditions[0].name])
    rows = []
    summary: list[dict[str, Any]] = []
    for cond in conditions:
        s = median(seconds[cond.name])
        calls = call_s[cond.name]
        row = {
            "condition": cond.name,
            "images": len(seconds[cond.name]),
            "s_per_image_median": s,
            "s_per_image_p90": percentile(seconds[cond.name], 90),
            "slowdown": s / base,
            "nvml_calls": len(calls),
            "call_ms_median": median(calls) * 1e3 if calls else None,
            "call_ms_p90": percentile(calls, 90) * 1e3 if calls else None,
        }
        summary.append(row)
        rows.append(
            [
                row["condition"],
                row["images"],
                row["s_per_image_median"],
                row["s_per_image_p90"],
                f"{row['slowdown']:.3f}",
                row["nvml_calls"] or "-",
                row["call_ms_median"] if calls else "-",
                row["call_ms_p90"] if calls else "-",
            ]
        )
    info = machine_info(gpu=not smoke)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python", "bench/nvml_interference.py", *argv_list])
    data = {"benchmark": NAME, "smoke": smoke, "machine": info, "command": command, "conditions": summary}
    table = md_table(
        [
            "condition",
            "images",
            "s/image median",
            "s/image p90",
            "vs no poller",
            "NVML calls",
            "call ms median",
            "call ms p90",
        ],
        rows,
    )
    smoke_note = "\n**Smoke run on a CPU: tiny-sd and a no-op read; it proves the code path only.**\n"
    if not smoke:
        smoke_note = ""
    markdown = f"""## NVML reads vs GPU work: calls with and without a poller (bench/nvml_interference.py)

{status_marker(NAME, "smoke" if smoke else "ok")}
{smoke_note}
Command: `{command}`

{machine_markdown(info)}

- `{preset}` ({dtype}, {side}x{side}, {steps} steps, batch 1) called directly (`backend.run()`, then a device
  synchronize), {per_round} image(s) per condition per round, {rounds} round(s), conditions in rotated order.
- A poller calls `nvmlDeviceGetTotalEnergyConsumption` (or `nvmlDeviceGetPowerUsage`) every period from a
  thread of the same process, or from another process; "call ms" is the duration of each NVML call.

{table}
"""
    md_path, _ = write_result(args.out, NAME, markdown, data)
    print(markdown)
    print_flush(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    quiet_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
