"""Served against direct pipeline calls on a GPU, in interleaved rounds (issue #8, target 5).

    python bench/gpu_served.py --out DIR            # an NVIDIA GPU; about 6 minutes
    python bench/gpu_served.py --smoke --out DIR    # any CPU: tiny-sd, a synthetic meter

An earlier run of bench/gpu_energy.py saw the same GPU's speed drift by up to 25% between minutes,
which a served phase followed by a direct one mistakes for the server's cost. Here every round runs
its conditions back to back, in an order rotated from round to round, and each served (or diagnostic)
condition is compared with the direct condition of the same batch size in the same round. By default:

  direct, batch 1        `backend.run()` on one image at a time, from this thread (no server at all)
  served, 1 client       one client, each request sent when the last is answered (max_batch_size 1):
                         the device waits for every answer, finalization included
  served, 2 clients      two clients, batches of 1: one request runs while the other is answered
  direct, batch 8        `backend.run()` on eight images at a time
  direct, batch 8, PNGs made in the call
                         the same, each call also making its eight PNGs (diagnostic: what the
                         server's device thread did until the PNGs moved after the job)
  served, 16 clients     sixteen clients, batches of 8: a batch is always queued

With `--diagnostics`, the batch-1 conditions are instead: direct; direct with a thread reading the
device's energy counter every 50 ms, as the server's sampler does (what the reads alone cost a call);
two clients; two clients with a server reading no NVML at all (a synthetic meter). With
`--own-process`, the model is served from a process of its own, two clients at batch 1 and sixteen at
batch 8. With `--cuda-graphs`, the denoiser's steps are replayed as CUDA graphs
(`cuda_graphs = true`) in every condition, direct calls with the replays turned off are added
(diagnostic: what the graphs change), so is a server whose device thread reads the NVML counter at
each job boundary (diagnostic: what those reads cost, now that the sampler's thread does them), and
before the rounds the same requests are run both ways to check that the images agree. (An earlier run
also had eight clients at batch 8, where the device waits for every answer: bench/results/profiles.md
has it.)

Each served condition is a server of its own (`create_app`, meter nvml, its sampler and finalization
as `wattproxy serve` runs them, max_wait_ms 100), started before and stopped after its requests; the
model is loaded once. The clients run in a process of their own (`bench.loadgen`), as real clients
do, so that parsing eight 1 MB answers does not take the server's interpreter lock. Every pipeline
call is timed on the thread that runs it (start to device synchronized), so the figures are:
throughput over whole cycles (call start to the next call's start; the device's idle gap between calls
counted), throughput as the clients see it, and the calls' own duration (a call slowed by the server,
e.g. by NVML reads, shows there). The script's own NVML handle reads the counter around each direct
block (J/image on the device counter) and around each server's life (conservation: responses + idle
joules against the counter's delta).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/gpu_served.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import contextlib
import itertools
import json
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from backends.base import Backend, BackendRequest, BackendResult, ImageResult
from bench.common import (
    RecordingBackend,
    ServerThread,
    batch_histogram,
    common_args,
    default_cache_dir,
    drive_elsewhere,
    histogram_text,
    machine_info,
    machine_markdown,
    md_table,
    median,
    print_flush,
    quiet_logging,
    status_marker,
    write_result,
)

NAME = "gpu_served"


def thread_switches() -> tuple[int, int]:
    """The calling thread's voluntary and involuntary context switches so far (Linux; (0, 0) elsewhere).
    Waiting for the interpreter lock, or for the device, is a voluntary switch; being preempted by
    another runnable thread or process is an involuntary one."""
    try:
        text = Path("/proc/thread-self/status").read_text(encoding="ascii")
    except OSError:
        return 0, 0
    counts = dict(line.split(":", 1) for line in text.splitlines() if "ctxt_switches" in line)
    return int(counts.get("voluntary_ctxt_switches", 0)), int(counts.get("nonvoluntary_ctxt_switches", 0))


class TimedBackend(RecordingBackend):
    """Records every pipeline call as (start, end, images, CPU s, voluntary, involuntary switches): its
    times (perf_counter s, the device synchronized before the end is taken), and the CPU time and
    context switches of the thread that ran it (with the model in a process of its own: of the thread
    that waited for that process)."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.calls: list[tuple[float, float, int, float, int, int]] = []
        self._calls_lock = threading.Lock()
        self.png_in_call = False  # make the PNGs inside the timed call, as the server did until c8ba7a0

    def run(self, batch: Sequence[BackendRequest]) -> list[BackendResult]:
        return self.run_ahead(batch)

    def run_ahead(
        self,
        batch: Sequence[BackendRequest],
        ahead: Callable[[], Sequence[BackendRequest] | None] | None = None,
        wake: Any = None,
    ) -> list[BackendResult]:
        """`run`; a model in a process of its own is sent the next batch while this one runs, as the
        server does (its call then starts in the model process before this thread's clock does: by
        the part of a millisecond the answer takes to come back, against seconds a call)."""
        v0, i0 = thread_switches()
        c0, t0 = time.thread_time(), time.perf_counter()
        if getattr(type(self.inner), "run_ahead", None) is not None:
            results = self.inner.run_ahead(batch, ahead, wake)  # type: ignore[attr-defined]
        else:
            results = self.inner.run(batch)
        self.inner.synchronize()
        if self.png_in_call:
            results = [r.encoded() if isinstance(r, ImageResult) else r for r in results]
        t1, c1 = time.perf_counter(), time.thread_time()
        v1, i1 = thread_switches()
        with self._calls_lock:
            self.calls.append((t0, t1, len(batch), c1 - c0, v1 - v0, i1 - i0))
        return results

    def take_calls(self) -> list[tuple[float, float, int, float, int, int]]:
        with self._calls_lock:
            calls, self.calls = self.calls, []
        return calls


@dataclass(frozen=True)
class Condition:
    label: str
    batch: int  # images per pipeline call (the server's max_batch_size)
    clients: int  # 0: direct calls, no server
    calls: int  # pipeline calls per block
    poll_s: float = 0.0  # direct calls: a thread reads the device's counter this often (0: none)
    # served: the server's meter ("synthetic": no NVML read at all; "nvml-boundary-reads": NVML, read by
    # the device thread at each job boundary, as before the boundaries took the clock's time)
    meter: str = "nvml"
    png: bool = False  # direct calls: the PNGs made inside each call, on its thread
    eager: bool = False  # direct calls, with --cuda-graphs: the denoiser run eagerly (no graph replays)

    @property
    def served(self) -> bool:
        return self.clients > 0

    @property
    def diagnostic(self) -> bool:
        """A variant that takes one part of the server's work apart (compared with direct, not counted
        for the target)."""
        return self.poll_s > 0 or self.meter != "nvml" or self.png or self.eager

    @property
    def images(self) -> int:
        return self.batch * self.calls


def cycle_rate(calls: Sequence[tuple[float, float, int]]) -> float:
    """Images per second over whole cycles, the block's first call left out (it runs cold: after the
    idle between blocks, and in a server on a device thread that has not run a call yet): from the
    second call's start to the last call's start, the images of the calls in between (each cycle is a
    call and the gap after it)."""
    if len(calls) < 3:
        return float("nan")
    span = calls[-1][0] - calls[1][0]
    return sum(n for _, _, n in calls[1:-1]) / span


def gaps(calls: Sequence[tuple[float, float, int]]) -> list[float]:
    return [b0 - a1 for (_, a1, _), (b0, _, _) in itertools.pairwise(calls)]


def block_figures(calls: Sequence[Sequence[float]], client_wall_s: float) -> dict[str, Any]:
    """One block's figures from its calls [(start s, end s, images)], the first (cold) call apart."""
    ordered = sorted(calls)
    timed = [(float(c[0]), float(c[1]), int(c[2])) for c in ordered]
    images = sum(n for _, _, n in timed)
    warm = timed[1:]
    # runs before this script kept no CPU time or switches: their figures are None
    extra = [c[3:] for c in ordered[1:] if len(c) >= 6]
    return {
        "images": images,
        "batches": [n for _, _, n in timed],
        "cycle_images_per_s": cycle_rate(timed),
        "client_images_per_s": images / client_wall_s,
        "first_call_s": timed[0][1] - timed[0][0],
        "call_s_median": median([b - a for a, b, _ in warm]),
        "cpu_s_median": median([float(e[0]) for e in extra]) if extra else None,
        "voluntary_median": median([float(e[1]) for e in extra]) if extra else None,
        "involuntary_median": median([float(e[2]) for e in extra]) if extra else None,
        "gap_s_median": median(gaps(warm)),
        "gap_share": sum(gaps(warm)) / (warm[-1][1] - warm[0][0]),
        "calls": [list(c) for c in ordered],
    }


POLL_LABEL = ", NVML read every 50 ms"
SYNTHETIC_LABEL = ", synthetic meter"
BOUNDARY_READS_LABEL = ", NVML read at each job boundary"
PNG_LABEL = ", PNGs made in the call"
EAGER_LABEL = ", eager (no CUDA graphs)"


def condition_of(label: str, images: int) -> Condition:
    """A stored block's condition from its label ("served, 16 clients, ...", "direct, batch 8")."""
    batch = 1 if "batch 1" in label or "batches of 1" in label else 8
    clients = 0 if label.startswith("direct") else int(label.split(", ")[1].split()[0])
    poll_s = 0.05 if label.endswith(POLL_LABEL) else 0.0
    meter = (
        "synthetic"
        if label.endswith(SYNTHETIC_LABEL)
        else "nvml-boundary-reads"
        if label.endswith(BOUNDARY_READS_LABEL)
        else "nvml"
    )
    png, eager = label.endswith(PNG_LABEL), label.endswith(EAGER_LABEL)
    return Condition(label, batch, clients, images // batch, poll_s, meter, png, eager)


def after_next_step(read: Callable[[], float], limit_s: float = 0.25, poll_s: float = 0.005) -> None:
    """Wait until the counter `read` gives has moved once (at most `limit_s`): the step that holds the
    previous block's last stretch of work is then read, and does not land inside the next server's
    life as energy that server never saw (up to 40 J at a batch of 8's power on an H200)."""
    first, until = read(), time.perf_counter() + limit_s
    while read() == first and time.perf_counter() < until:
        time.sleep(poll_s)


class Poller:
    """Reads the device's counter every `period_s` from a thread of this process, as the server's
    sampler does (wait, then read), while direct calls run."""

    def __init__(self, read: Callable[[], object], period_s: float) -> None:
        self.reads = 0
        self._read, self._period_s = read, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-poller", daemon=True)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            self._read()
            self.reads += 1


def reanalyse(path: Path, out: Path) -> int:
    """Rewrite a stored run's results from its raw calls with this version's analysis (no GPU needed)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    blocks = data["blocks"]
    for block in blocks:
        block.update(block_figures(block["calls"], block["client_wall_s"]))
    by_label = {b["condition"]: condition_of(b["condition"], b["images"]) for b in blocks}
    conditions = sorted(by_label.values(), key=lambda c: (c.batch, c.clients))
    rounds = 1 + max(b["round"] for b in blocks)
    data.update(summarize(conditions, blocks, rounds))
    data["reanalysed"] = f"python bench/gpu_served.py --from-json {path.name}"
    name = data.get("benchmark", NAME)
    md_path, _ = write_result(out, name, render(data), data)
    print_flush(f"wrote {md_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_served.py", description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: the service's)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the conditions (default 4)")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="only re-analyse a stored run's raw calls (its JSON)"
    )
    parser.add_argument(
        "--diagnostics",
        action="store_true",
        help="in process: add the diagnostic conditions at batch 1 (direct calls with a counter poller, a "
        "server with a synthetic meter) in place of the one-client condition",
    )
    parser.add_argument(
        "--own-process",
        action="store_true",
        help="serve the model from a process of its own (own_process = true); direct calls stay in this "
        "process; only the conditions with a request always queued (2 clients at batch 1, 16 at batch 8)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="the denoiser's steps replayed as CUDA graphs (cuda_graphs = true), direct and served alike; "
        "adds direct calls run eagerly (diagnostic) and checks that graphs and eager calls give the same "
        "images",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        return reanalyse(args.from_json, args.out)
    smoke = args.smoke
    if smoke and args.cuda_graphs:
        parser.error("--cuda-graphs needs a CUDA GPU: not with --smoke")
    graphs = args.cuda_graphs
    name = NAME + ("_own" if args.own_process else "") + ("_graphs" if graphs else "")
    device, dtype, preset, side, steps = (
        ("cpu", "float32", "tiny-sd", 64, 2) if smoke else ("cuda:0", "float16", "sd15", 512, 30)
    )
    rounds = args.rounds or (2 if smoke else 4)
    b1_calls, b8_calls = (3, 3) if smoke else (8, 4)
    own = " (own process)" if args.own_process else ""
    conditions = [
        Condition("direct, batch 1", 1, 0, b1_calls),
        Condition(f"served, 2 clients, batches of 1{own}", 1, 2, b1_calls),
        Condition("direct, batch 8", 8, 0, b8_calls),
        Condition(f"served, 16 clients, batches of 8{own}", 8, 16, b8_calls),
    ]
    conditions = (
        conditions
        if args.own_process
        else [
            Condition("direct, batch 1", 1, 0, b1_calls),
            Condition("direct, batch 1" + POLL_LABEL, 1, 0, b1_calls, poll_s=0.05),
            Condition("served, 2 clients, batches of 1", 1, 2, b1_calls),
            Condition("served, 2 clients, batches of 1" + SYNTHETIC_LABEL, 1, 2, b1_calls, meter="synthetic"),
            Condition("direct, batch 8", 8, 0, b8_calls),
            Condition("served, 16 clients, batches of 8", 8, 16, b8_calls),
        ]
        if args.diagnostics
        else [
            Condition("direct, batch 1", 1, 0, b1_calls),
            Condition("served, 1 client, batch 1", 1, 1, b1_calls),
            Condition("served, 2 clients, batches of 1", 1, 2, b1_calls),
            Condition("direct, batch 8", 8, 0, b8_calls),
            Condition("served, 16 clients, batches of 8", 8, 16, b8_calls),
            Condition("direct, batch 1" + EAGER_LABEL, 1, 0, b1_calls, eager=True),
            Condition("direct, batch 8" + EAGER_LABEL, 8, 0, b8_calls, eager=True),
            Condition(
                "served, 2 clients, batches of 1" + BOUNDARY_READS_LABEL,
                1,
                2,
                b1_calls,
                meter="nvml-boundary-reads",
            ),
        ]
        if graphs
        else [
            Condition("direct, batch 1", 1, 0, b1_calls),
            Condition("served, 1 client, batch 1", 1, 1, b1_calls),
            Condition("served, 2 clients, batches of 1", 1, 2, b1_calls),
            Condition("direct, batch 8", 8, 0, b8_calls),
            Condition("direct, batch 8" + PNG_LABEL, 8, 0, b8_calls, png=True),
            Condition("served, 16 clients, batches of 8", 8, 16, b8_calls),
        ]
    )

    from backends import load_backend
    from backends.base import ImageRequest
    from backends.tiny import ensure_model
    from bench.gpu_energy import MeterProbe, NvmlProbe, Probe
    from proxy.config import ModelSettings, Settings
    from proxy.energy.meter import EnergyMeter, SyntheticMeter
    from proxy.state import MONITORS

    cache = (args.cache_dir or default_cache_dir()) / "models"
    info = machine_info(gpu=not smoke)
    print_flush(f"building/loading {preset} ...")
    path = ensure_model(preset, cache, dtype=dtype)
    backend = TimedBackend(
        load_backend("image", preset, path, device=device, dtype=dtype, cuda_graphs=graphs)
    )
    serving = backend
    if args.own_process:
        print_flush(f"loading {preset} in a model process of its own ...")
        serving = TimedBackend(
            load_backend(
                "image", preset, path, device=device, dtype=dtype, own_process=True, cuda_graphs=graphs
            )
        )
    size = f"{side}x{side}"
    meters: dict[str, Any] | None = None
    probe: Probe
    if smoke:
        # no idle power: what the device draws between a server's life and the script's reads around
        # it (one counter step of idle at either end, longer when a loaded machine is slow to stop a
        # server) would otherwise blur the smoke run's conservation check
        meter = SyntheticMeter(device, idle_watts=0.0, update_period_s=0.1)
        meters, probe = {device: meter}, MeterProbe(meter)
    else:
        nvml_probe = NvmlProbe(device)
        info["gpu"] = nvml_probe.name
        probe = nvml_probe
    prompt = "an oil painting of a lighthouse on a rocky coast at sunset, number {}"

    def image(i: int) -> ImageRequest:
        return ImageRequest(prompt=prompt.format(i), width=side, height=side, steps=steps, seed=i)

    def body(i: int) -> tuple[str, dict[str, Any]]:
        return "/v1/images/generations", {
            "model": preset,
            "prompt": prompt.format(i),
            "size": size,
            "steps": steps,
            "seed": i,
        }

    def set_graphs(on: bool) -> None:
        denoiser = getattr(backend.inner, "graphs", None)
        if denoiser is not None:
            denoiser.enabled = on

    def graphs_check() -> dict[str, Any]:
        """The same requests with graphs and eagerly: how far apart their images are (8-bit levels)."""
        import numpy as np

        check: dict[str, Any] = {}
        for batch in (1, 8):
            requests = [image(10_000 + j) for j in range(batch)]
            outputs = []
            for on in (True, False):
                set_graphs(on)
                t0 = time.perf_counter()
                results = backend.inner.run(requests)
                backend.inner.synchronize()
                outputs.append(
                    (
                        time.perf_counter() - t0,
                        [np.asarray(im, dtype=np.int16) for r in results for im in r.images],
                    )
                )
            set_graphs(True)
            (graph_s, with_graphs), (eager_s, eager) = outputs
            diffs = [np.abs(a - b) for a, b in zip(with_graphs, eager, strict=True)]
            check[f"batch {batch}"] = {
                "images": len(diffs),
                "max_abs_level_diff": int(max(int(d.max()) for d in diffs)),
                "differing_values_share": float(
                    sum(int((d > 0).sum()) for d in diffs) / sum(d.size for d in diffs)
                ),
                "graphs_call_s": graph_s,
                "eager_call_s": eager_s,
            }
        denoiser = backend.inner.graphs
        check["captured_shapes"] = denoiser.shapes
        check["captures"] = denoiser.captures
        return check

    def direct(c: Condition, first: int) -> dict[str, Any]:
        backend.take_calls()
        poller = Poller(probe.energy_j, c.poll_s) if c.poll_s else contextlib.nullcontext()
        backend.png_in_call = c.png
        set_graphs(not c.eager)
        e0, t0 = probe.energy_j(), time.perf_counter()
        with poller:
            for k in range(c.calls):
                backend.run([image(first + k * c.batch + j) for j in range(c.batch)])
        wall, joules = time.perf_counter() - t0, probe.energy_j() - e0
        backend.png_in_call = False
        set_graphs(True)
        reads = poller.reads if isinstance(poller, Poller) else 0
        return {
            "calls": backend.take_calls(),
            "client_wall_s": wall,
            "counter_j": joules,
            "poll_reads": reads,
        }

    def served(c: Condition, first: int, data_dir: str) -> dict[str, Any]:
        block_meters = meters
        if c.meter == "synthetic" and not smoke:  # the server reads no NVML; the script's probe still does
            block_meters = {device: SyntheticMeter(device, update_period_s=0.1)}
        boundary_meter = None  # smoke: the synthetic meter, which the device thread reads anyway
        if c.meter == "nvml-boundary-reads" and not smoke:
            from proxy.energy.nvml import NvmlMeter

            boundary_meter = NvmlMeter(device)
            boundary_meter.blocking_reads = False  # the device thread reads it at each job boundary
            block_meters = {device: boundary_meter}
        same_counter = block_meters is meters or c.meter == "nvml-boundary-reads"
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
                "max_batch_size": c.batch,
                # a first run with 10 ms split the 8 clients' batches (5 + 3, ...) for good: their
                # answers (1 MB each) came back over more than 10 ms; 100 ms is 5% of a batch of 8
                "max_wait_ms": 100,
                "max_n": 1,
                "max_queue": 64,
                # the first call on a server's device thread runs cold, as in the runs recorded before
                # warm-ups (bench/results): it is shown apart ("first call s")
                "warmup": False,
            }
        )
        settings = Settings.model_validate(
            {
                "port": 0,
                "cache_dir": str(cache.parent),
                "data_dir": data_dir,
                "auth": "none",
                "meter": "synthetic"
                if block_meters and not isinstance(boundary_meter, EnergyMeter)
                else "nvml",
                "models": [model],
                "log_level": "WARNING",
            }
        )
        server = ServerThread(
            settings, backends={preset: serving}, **({"meters": block_meters} if block_meters else {})
        )
        life: list[float] = []
        serving.take_calls()
        try:
            after_next_step(probe.energy_j)
            server.start(before_app=lambda: life.append(probe.energy_j()))

            wall, answers, _ = asyncio.run(
                drive_elsewhere(
                    server.base_url, server.headers, body, range(first, first + c.images), c.clients
                )
            )
        finally:
            server.stop()
        life_j = probe.energy_j() - life[0]
        assert server.app is not None
        monitor = server.app[MONITORS][device]
        energies = [p["usage"]["energy"] for _, p in answers]
        responses_j = sum(float(e["joules"]) for e in energies)
        return {
            "calls": serving.take_calls(),
            "client_wall_s": wall,
            "counter_j": None,  # the clients' process starts inside the block: see life_j
            "responses_j": responses_j,
            "latency_s_median": median([t for t, _ in answers]),
            "measurement": str(energies[0]["measurement"]),
            "life_j": life_j,
            "idle_j": monitor.committed_idle_j,
            # what the script's counter showed before the server's first read or after its last (a step of
            # a stepped counter landing between the two reads at either end): not the server's to see
            "outside_j": life_j - monitor.meter_delta_j if same_counter else None,
            # against the script's counter: meaningless for a synthetic meter on a GPU
            "conservation_error": (responses_j + monitor.committed_idle_j - life_j) / life_j
            if same_counter
            else None,
        }

    blocks: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wattproxy-gpu-served-") as tmp:
        print_flush("warming up (one call of 1 and one of 8) ...")
        backend.inner.run([image(0)])
        backend.inner.run([image(j) for j in range(8)])
        backend.inner.synchronize()
        if serving is not backend:
            serving.inner.run([image(0)])
            serving.inner.run([image(j) for j in range(8)])
        check = graphs_check() if graphs else None
        if check is not None:
            print_flush(f"graphs against eager: {json.dumps(check)}")
        first = 100
        for r in range(rounds):
            order = conditions[r % len(conditions) :] + conditions[: r % len(conditions)]
            for c in order:
                block = direct(c, first) if not c.served else served(c, first, f"{tmp}/{r}-{c.clients}")
                first += c.images
                figures = block_figures(block["calls"], block["client_wall_s"])
                block.update({"round": r, "condition": c.label, **figures})
                if block["images"] != c.images:
                    raise RuntimeError(f"{c.label}: {block['images']} images in calls, {c.images} expected")
                blocks.append(block)
                print_flush(
                    f"round {r} {c.label}: cycle {block['cycle_images_per_s']:.3f} images/s, "
                    f"call {block['call_s_median']:.3f} s, gap {block['gap_s_median'] * 1000:.1f} ms"
                )
    backend.inner.close()
    if serving is not backend:
        serving.inner.close()
    probe.close()

    data = summarize(conditions, blocks, rounds)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    data.update(
        {
            "benchmark": name,
            "smoke": smoke,
            "machine": info,
            "command": " ".join(["python", "bench/gpu_served.py", *argv_list]),
            "model": {"preset": preset, "dtype": dtype, "size": size, "steps": steps, "device": device},
            "blocks": blocks,
            "cuda_graphs": graphs,
            "graphs_check": check,
        }
    )
    markdown = render(data)
    md_path, _ = write_result(args.out, name, markdown, data)
    print(markdown)
    print_flush(f"wrote {md_path}")
    return 0


def summarize(
    conditions: Sequence[Condition], blocks: Sequence[dict[str, Any]], rounds: int
) -> dict[str, Any]:
    """Per condition: medians over its blocks; per served condition, the ratios to the direct condition
    of its batch size in the same round (median, min, max over rounds)."""
    by: dict[tuple[str, int], dict[str, Any]] = {(b["condition"], b["round"]): b for b in blocks}

    def over(label: str, key: str) -> list[float]:
        return [by[(label, r)][key] for r in range(rounds)]

    rows = []
    for c in conditions:
        base = next(d for d in conditions if not d.served and d.batch == c.batch and not d.diagnostic)
        row: dict[str, Any] = {
            "condition": c.label,
            "images_per_block": c.images,
            "cycle_images_per_s": median(over(c.label, "cycle_images_per_s")),
            "client_images_per_s": median(over(c.label, "client_images_per_s")),
            "first_call_s": median(over(c.label, "first_call_s")),
            "call_s_median": median(over(c.label, "call_s_median")),
            **{key: _median_or_none(over(c.label, key)) for key in SWITCH_KEYS},
            "gap_s_median": median(over(c.label, "gap_s_median")),
            "gap_share": median(over(c.label, "gap_share")),
            "counter_j_per_image": None
            if c.served
            else median([b["counter_j"] / b["images"] for b in blocks if b["condition"] == c.label]),
        }
        if c.served or c.diagnostic:
            pairs = {
                key: [by[(c.label, r)][key] / by[(base.label, r)][key] for r in range(rounds)]
                for key in ("cycle_images_per_s", "client_images_per_s", "call_s_median")
            }
            row.update(
                {
                    "vs": base.label,
                    "diagnostic": c.diagnostic,
                    "cycle_ratio": pairs["cycle_images_per_s"],
                    "client_ratio": pairs["client_images_per_s"],
                    "call_ratio": pairs["call_s_median"],
                }
            )
        if c.served:
            row.update(
                {
                    "batches": histogram_text(
                        batch_histogram(n for b in blocks if b["condition"] == c.label for n in b["batches"])
                    ),
                    "responses_j_per_image": median(
                        [b["responses_j"] / b["images"] for b in blocks if b["condition"] == c.label]
                    ),
                    "latency_s_median": median(over(c.label, "latency_s_median")),
                    "conservation_errors": over(c.label, "conservation_error"),
                    # runs recorded before this figure was kept have none
                    "outside_j": [by[(c.label, r)].get("outside_j") for r in range(rounds)],
                    "measurement": by[(c.label, 0)]["measurement"],
                }
            )
        rows.append(row)
    # batch 8 against batch 1 where the device always has a request queued (2 and 16 clients)
    b1, b8 = (
        next(r for r, c in zip(rows, conditions, strict=True) if c.clients == n and not c.diagnostic)
        for n in (2, 16)
    )
    return {
        "rounds": rounds,
        "conditions": rows,
        "batch8_over_batch1": [b8["condition"], b1["condition"]],
        "batch8_over_batch1_responses_j_per_image": b8["responses_j_per_image"] / b1["responses_j_per_image"],
        "batch8_over_batch1_images_per_s": b8["cycle_images_per_s"] / b1["cycle_images_per_s"],
    }


SWITCH_KEYS = ("cpu_s_median", "voluntary_median", "involuntary_median")


def _median_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return median(known) if known else None


def _spread(values: Sequence[float]) -> str:
    return f"{median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def graphs_note(data: dict[str, Any]) -> str:
    """With --cuda-graphs: what the graphs are, and how far their images are from eager calls'."""
    check = data.get("graphs_check")
    if not data.get("cuda_graphs") or not check:
        return ""
    rows = md_table(
        [
            "batch",
            "images",
            "max abs difference (8-bit levels)",
            "values that differ",
            "call s with graphs (capture done)",
            "call s eager",
        ],
        [
            [
                key,
                v["images"],
                v["max_abs_level_diff"],
                f"{v['differing_values_share']:.4%}",
                v["graphs_call_s"],
                v["eager_call_s"],
            ]
            for key, v in check.items()
            if key.startswith("batch")
        ],
    )
    return f"""
CUDA graphs (`cuda_graphs = true`, backends/cuda_graphs.py): every condition, direct and served, replays
the UNet's forward pass as one graph per input shape ({check["captured_shapes"]} shapes captured in the
warm-up); the text encoder, scheduler and VAE run eagerly. The conditions marked "eager" are direct calls
with the replays turned off (the same pipeline, the same process). Before the rounds, the same requests
(seeds 10000 on) were run both ways:

{rows}
"""


def render(data: dict[str, Any]) -> str:
    m, smoke = data["model"], data["smoke"]
    rows = data["conditions"]
    timing = md_table(
        [
            "condition",
            "images per block",
            "images/s, whole cycles",
            "images/s, clients' view",
            "first call s",
            "call s (median)",
            "calling thread's CPU s per call",
            "its voluntary / involuntary switches per call",
            "gap between calls ms (median)",
            "device idle share",
            "J/image (device counter)",
        ],
        [
            [
                r["condition"],
                r["images_per_block"],
                r["cycle_images_per_s"],
                r["client_images_per_s"],
                r["first_call_s"],
                r["call_s_median"],
                "-" if r.get("cpu_s_median") is None else r["cpu_s_median"],
                "-"
                if r.get("voluntary_median") is None
                else f"{r['voluntary_median']:.0f} / {r['involuntary_median']:.0f}",
                r["gap_s_median"] * 1000,
                f"{r['gap_share']:.1%}",
                r["counter_j_per_image"] if r["counter_j_per_image"] is not None else "-",
            ]
            for r in rows
        ],
    )
    served = [r for r in rows if "vs" in r]
    label = next(r["measurement"] for r in served if "measurement" in r)
    ratios = md_table(
        [
            "served condition",
            "against",
            "batches formed",
            "whole cycles: served / direct",
            "clients' view: served / direct",
            "call duration: served / direct",
            "within 3% (whole cycles)",
            "J/image (responses)",
            "client latency s (median)",
            "conservation error, each server's life",
            "of which outside the server's first and last reads, J",
        ],
        [
            [
                r["condition"],
                r["vs"],
                r.get("batches", "-"),
                _spread(r["cycle_ratio"]),
                _spread(r["client_ratio"]),
                _spread(r["call_ratio"]),
                "(diagnostic)"
                if r.get("diagnostic")
                else "yes"
                if median(r["cycle_ratio"]) >= 0.97
                else "no",
                r.get("responses_j_per_image", "-"),
                r.get("latency_s_median", "-"),
                ", ".join("-" if e is None else f"{e:+.3%}" for e in r.get("conservation_errors", [])) or "-",
                ", ".join("-" if j is None else f"{j:.1f}" for j in r.get("outside_j", [])) or "-",
            ]
            for r in served
        ],
    )
    smoke_note = "\n**Smoke run on a CPU: tiny-sd and a synthetic meter; it proves the code path only.**\n"
    name = data["benchmark"]
    own = "_own" in name
    title = (
        ", the model in a process of its own"
        if own
        else ", diagnostic conditions"
        if name.endswith("_diagnostics")
        else ""
    ) + (", the denoiser's steps as CUDA graphs" if data.get("cuda_graphs") else "")
    where = (
        " in this process for the direct calls, and once in a model process of its own\n"
        "  (`own_process = true`) for the servers"
        if own
        else ""
    )
    reanalysed = (
        f"\nRe-analysed from the run's raw call times by `{data['reanalysed']}` (the first call of each "
        "block set apart).\n"
        if data.get("reanalysed")
        else ""
    )
    return f"""## Served against direct pipeline calls on a GPU, interleaved{title} (bench/gpu_served.py)

{status_marker(name, "smoke" if smoke else "ok")}
{smoke_note if smoke else ""}
Command: `{data["command"]}`
{reanalysed}
{machine_markdown(data["machine"])}

- `{m["preset"]}` ({m["dtype"]}, {m["size"]}, {m["steps"]} steps, random weights of the real architecture) on
  `{m["device"]}`, loaded once{where}. {data["rounds"]} rounds; each runs the
  {len(rows)} conditions back to back, in an order rotated from round to round; each served condition is
  a server of its own (meter `{"synthetic" if smoke else "nvml"}`, labelled `{label}`,
  max_wait_ms 100), its clients in a process of their own.
- Each block's first call runs cold (after the idle between blocks; in a server, on a device thread
  that has run no call yet) and is shown apart ("first call s"); the other columns leave it out.
- "Whole cycles": images over the time from the second call's start to the last call's start, so the
  device's idle gap after each call counts (the steady state); "clients' view": images over the
  clients' wall time (first request sent to last answer, the cold call included). Ratios are against
  the direct condition of the same batch size in the same round: median (min-max) over the rounds.
- "Call duration" compares the pipeline calls themselves: above 1, the calls ran slower in the server.
  The thread that ran each call reports its CPU time and context switches over the call (medians of
  the block's calls, then over the rounds): voluntary ones are waits (for the device, or for the
  interpreter lock while another thread of the process holds it), involuntary ones preemptions.
  With the model in a process of its own, the thread is the server's, waiting for that process.
- Diagnostic conditions (where run) take the server's work apart, and do not count for the target:
  direct calls with a thread of this process reading the NVML counter every 50 ms (as the server's
  sampler does), a server whose meter is synthetic (it reads no NVML at all; conservation is then
  not comparable with the device counter, "-"), direct calls that make their PNGs inside the
  call (as the server's device thread did until the PNGs moved to a worker thread after the job),
  and a server whose device thread reads the NVML counter at each job boundary (as it did until
  the boundaries took the clock's time and left the reads to the sampler thread).
- J/image (responses): the joules the server attributed to its answers (idle excluded); J/image (device
  counter, direct calls only): the script's own counter delta over the block, over its images.
- Conservation error: the server's response and idle joules against the script's counter delta over
  the server's life (read before the app is made and after it has stopped). The part of that delta
  the counter showed before the server's first read or after its last is listed apart: an update of
  the counter landing between two reads at either end brings a whole step's energy with it. (Before
  each server's life the script waits for the counter's next step, so that the previous block's last
  step is not among them: `after_next_step`, added after the runs of 2026-11-27 16:50-17:00.)

{graphs_note(data)}
{timing}

{ratios}

{data["batch8_over_batch1"][0]} against {data["batch8_over_batch1"][1]}: J/image (responses)
**{data["batch8_over_batch1_responses_j_per_image"]:.2f}x**, images/s (whole cycles)
**{data["batch8_over_batch1_images_per_s"]:.2f}x**.
"""


if __name__ == "__main__":
    quiet_logging()
    raise SystemExit(main())
