"""Where does batch-1 serving lose time on a GPU? The device's timeline, served and direct.

    python bench/gpu_batch1.py --out DIR            # an NVIDIA GPU; about 2 minutes
    python bench/gpu_batch1.py --smoke --out DIR    # any CPU: tiny-sd, synthetic meters

bench/gpu_energy.py measured `sd15` at one client served at 0.71-0.80 of the direct calls' images/s,
while 8 clients (batches of 8) reached 0.96 and 32 chats 0.92-1.01. This benchmark records, for every
pipeline call, when it started and ended on the device worker, so the time between calls (the device
idle while a request travels, is answered and the next one arrives) is told apart from the calls
themselves running slower. Conditions, in this order: direct calls; served to 1 client with the NVML
meter; served to 1 client with a synthetic meter (no NVML read at all); served to 2 clients with
batches of 1 (the device need not wait for an answer to be sent); direct calls again.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/gpu_batch1.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import itertools
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from backends.base import Backend, BackendRequest, BackendResult
from bench.common import (
    RecordingBackend,
    ServerThread,
    common_args,
    default_cache_dir,
    drive,
    machine_info,
    machine_markdown,
    md_table,
    median,
    print_flush,
    quiet_logging,
    status_marker,
    write_result,
)

NAME = "gpu_batch1"


class TimedBackend(RecordingBackend):
    """Records (start, end) of every pipeline call (perf_counter s), device synchronized at the end."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.calls: list[tuple[float, float]] = []
        self._calls_lock = threading.Lock()

    def run(self, batch: Sequence[BackendRequest]) -> list[BackendResult]:
        t0 = time.perf_counter()
        results = self.inner.run(batch)
        self.inner.synchronize()
        with self._calls_lock:
            self.calls.append((t0, time.perf_counter()))
        return results


def timeline(calls: Sequence[tuple[float, float]], images: int) -> dict[str, float]:
    """Per-image figures of one condition: wall over the calls, call time, gap between calls. Units: s."""
    calls = sorted(calls)
    run = [b - a for a, b in calls]
    gaps = [b0 - a1 for (_, a1), (b0, _) in itertools.pairwise(calls)]
    wall = calls[-1][1] - calls[0][0]
    return {
        "calls": len(calls),
        "images": images,
        "images_per_s": images / wall,
        "call_s_median": median(run),
        "gap_s_median": median(gaps) if gaps else 0.0,
        "gap_s_total": sum(gaps),
        "wall_s": wall,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_batch1.py", description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: the service's)")
    parser.add_argument("--images", type=int, default=6, help="measured images per condition")
    args = parser.parse_args(argv)
    smoke = args.smoke
    device, dtype, preset, side, steps = (
        ("cpu", "float32", "tiny-sd", 64, 2) if smoke else ("cuda:0", "float16", "sd15", 512, 30)
    )
    n = 2 if smoke else args.images

    from backends import load_backend
    from backends.base import ImageRequest
    from backends.tiny import ensure_model
    from proxy.config import ModelSettings, Settings
    from proxy.energy.meter import SyntheticMeter

    cache = (args.cache_dir or default_cache_dir()) / "models"
    print_flush(f"building/loading {preset} ...")
    path = ensure_model(preset, cache, dtype=dtype)
    backend = TimedBackend(load_backend("image", preset, path, device=device, dtype=dtype))
    size = f"{side}x{side}"

    def body(i: int) -> tuple[str, dict[str, Any]]:
        prompt = f"an oil painting of a lighthouse on a rocky coast at sunset, number {i}"
        return "/v1/images/generations", {
            "model": preset,
            "prompt": prompt,
            "size": size,
            "steps": steps,
            "seed": i,
        }

    def direct(label: str, first: int) -> dict[str, Any]:
        backend.inner.run([ImageRequest(prompt="warm-up", width=side, height=side, steps=steps, seed=0)])
        backend.calls = []
        for i in range(first, first + n):
            prompt = body(i)[1]["prompt"]
            backend.run([ImageRequest(prompt=prompt, width=side, height=side, steps=steps, seed=i)])
        return {"condition": label, **timeline(backend.calls, n), "latency_s_median": None}

    def served(label: str, meter: str, clients: int, first: int, tmp: str) -> dict[str, Any]:
        model = ModelSettings.model_validate(
            {
                "name": preset,
                "task": "image",
                "source": str(path),
                "device": device,
                "dtype": dtype,
                "sizes": [size],
                "default_size": size,
                "default_steps": steps,
                "max_batch_size": 1,
                "max_wait_ms": 10,
                "max_queue": 64,
            }
        )
        settings = Settings.model_validate(
            {
                "port": 0,
                "cache_dir": str(cache.parent),
                "data_dir": tmp,
                "auth": "none",
                "meter": "synthetic" if meter != "nvml" else "nvml",
                "models": [model],
                "log_level": "WARNING",
            }
        )
        meters = {device: SyntheticMeter(device, update_period_s=0.1)} if smoke and meter == "nvml" else None
        server = ServerThread(settings, backends={preset: backend}, **({"meters": meters} if meters else {}))
        server.start()
        try:

            async def go() -> list[float]:
                import aiohttp

                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
                    await drive(session, server.base_url, body, range(first - clients, first), clients)
                    backend.calls = []
                    _, answers = await drive(
                        session, server.base_url, body, range(first, first + n * clients), clients
                    )
                return [latency for latency, _ in answers]

            latencies = asyncio.run(go())
        finally:
            server.stop()
        return {
            "condition": label,
            **timeline(backend.calls, n * clients),
            "latency_s_median": median(latencies),
        }

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wattproxy-batch1-") as tmp:
        steps_plan = [
            ("direct calls", lambda i: direct("direct calls", i)),
            (
                "served, 1 client, NVML meter",
                lambda i: served("served, 1 client, NVML meter", "nvml", 1, i, tmp),
            ),
            (
                "served, 1 client, synthetic meter",
                lambda i: served("served, 1 client, synthetic meter", "synthetic", 1, i, tmp),
            ),
            (
                "served, 2 clients, batches of 1, NVML meter",
                lambda i: served("served, 2 clients, batches of 1, NVML meter", "nvml", 2, i, tmp),
            ),
            ("direct calls (again)", lambda i: direct("direct calls (again)", i)),
        ]
        for k, (label, fn) in enumerate(steps_plan):
            print_flush(f"{label} ...")
            rows.append(fn(1000 * (k + 1)))
            print_flush(f"  {rows[-1]}")
    backend.inner.close()

    info = machine_info(gpu=not smoke)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python", "bench/gpu_batch1.py", *argv_list])
    base = median([r["images_per_s"] for r in rows if r["condition"].startswith("direct")])
    table = md_table(
        [
            "condition",
            "images",
            "images/s (first call start to last call end)",
            "vs direct",
            "call s median",
            "gap between calls s median",
            "client latency s median",
        ],
        [
            [
                r["condition"],
                r["images"],
                r["images_per_s"],
                f"{r['images_per_s'] / base:.3f}",
                r["call_s_median"],
                r["gap_s_median"],
                r["latency_s_median"] if r["latency_s_median"] is not None else "-",
            ]
            for r in rows
        ],
    )
    smoke_note = "\n**Smoke run on a CPU: tiny-sd and synthetic meters; it proves the code path only.**\n"
    markdown = f"""## Batch-1 serving on a GPU: pipeline calls and the gaps between them (bench/gpu_batch1.py)

{status_marker(NAME, "smoke" if smoke else "ok")}
{smoke_note if smoke else ""}
Command: `{command}`

{machine_markdown(info)}

- `{preset}` ({dtype}, {size}, {steps} steps), one image per request, batches of 1 (max_wait_ms 10).
- Each pipeline call is timed on the device worker (start to device synchronized); "gap" is the time from
  one call's end to the next call's start, when the device has nothing to do. "vs direct" divides by the
  median of the two direct conditions.

{table}
"""
    data = {"benchmark": NAME, "smoke": smoke, "machine": info, "command": command, "conditions": rows}
    md_path, _ = write_result(args.out, NAME, markdown, data)
    print(markdown)
    print_flush(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    quiet_logging()
    raise SystemExit(main())
