"""GPU energy benchmark: NVML's counter step, J/image and J/token of full-size architectures served
through `create_app` with the NVML meter, and conservation against the script's own NVML reads.

    python bench/gpu_energy.py --out DIR            # an NVIDIA GPU (Volta or newer); about 6 minutes
    python bench/gpu_energy.py --smoke --out DIR    # any CPU: tiny presets, synthetic meter, tiny sizes

Phases:
  (a) counter step: poll nvmlDeviceGetTotalEnergyConsumption in a tight loop for ~2 s while matmuls
      load the GPU; the intervals between value changes (median, p10, p90, ms).
  (b) images: `backends.tiny` preset `sd15` (Stable Diffusion 1.5's architecture, random weights,
      fp16), 512x512, 30 steps, 1 and 8 concurrent clients, served with meter="nvml".
  (c) text: preset `gpt2-medium`, 32 concurrent chats of 128 tokens.
  (h) the same chats with the model in a process of its own (`own_process`), its NVML energy read by
      the serving process as in (c); replayed directly on the in-process copy.
  (d) every serving phase runs a server of its own; the script reads the counter through its own NVML
      handle just before the server starts and just after it stops, and checks
      sum(response joules) + idle joules == its delta (within 0.5%); it also integrates
      nvmlDeviceGetPowerUsage (trapezoid) over the measured requests and compares it with the counter.
  (e) J/image, J/token, images/s at batch 1 and 8 go to DIR/gpu_energy.md and DIR/gpu_energy.json.
  (g) proxy mode: the text model served by one WattProxy (the upstream, its own meter synthetic) and
      the same chats sent through a second one in front of it (`upstream`, devices = the GPU) that
      meters the GPU with NVML from its sampler thread (its event loop never reads NVML): conservation
      of the proxy's books against the script's counter, J/token on the request timeline against (c),
      and the latency the proxy adds over calling the upstream directly.

Models are built (random weights, no downloads) into --cache-dir on first use. Without diffusers the
image phases are skipped and say so. No network is needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/gpu_energy.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import importlib.util
import itertools
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol

from bench.common import (
    RecordingBackend,
    RecordingProcessBackend,
    ServerThread,
    batch_histogram,
    common_args,
    default_cache_dir,
    drive,
    histogram_text,
    machine_info,
    machine_markdown,
    md_table,
    median,
    percentile,
    print_flush,
    quiet_logging,
    replay,
    status_marker,
    write_result,
)

NAME = "gpu_energy"
COMMAND = "python bench/gpu_energy.py --out bench/results"
CONSERVATION_TOLERANCE = 0.005  # DESIGN.md: 0.5% against an independent NVML read on a GPU
Kind = Literal["image", "text"]


# --- the script's own view of the energy --------------------------------------------------------


class Probe(Protocol):
    """The script's independent energy reading. Units: J since an arbitrary origin, W."""

    label: str

    def energy_j(self) -> float: ...

    def power_w(self) -> float | None: ...

    def close(self) -> None: ...


class NvmlProbe:
    """The device's NVML counter and power through a handle of the script's own (not the server's)."""

    label = "the script's own NVML handle (nvmlDeviceGetTotalEnergyConsumption)"

    def __init__(self, device: str) -> None:
        import pynvml

        from proxy.energy.nvml import visible_device_selector

        self._nvml = pynvml
        pynvml.nvmlInit()  # reference-counted by NVML: the server's meter holds its own
        selector = visible_device_selector(device, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if isinstance(selector, str):
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(selector)
        else:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(selector)
        name = pynvml.nvmlDeviceGetName(self._handle)
        self.name = name.decode() if isinstance(name, bytes) else str(name)

    def energy_mj(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def energy_j(self) -> float:
        return self.energy_mj() / 1000.0

    def power_w(self) -> float | None:
        return int(self._nvml.nvmlDeviceGetPowerUsage(self._handle)) / 1000.0

    def close(self) -> None:
        self._nvml.nvmlShutdown()


class MeterProbe:
    """Smoke mode: the synthetic meter the server is given, read by the script (thread-safe)."""

    label = "the synthetic meter given to the server, read by the script (smoke mode)"

    def __init__(self, meter: Any) -> None:
        self.meter = meter

    def energy_j(self) -> float:
        return float(self.meter.read().energy_j)

    def power_w(self) -> float | None:
        watts = self.meter.power_watts()
        return None if watts is None else float(watts)

    def close(self) -> None:
        """The meter belongs to the caller."""


# --- (a) the counter's update step ---------------------------------------------------------------


def counter_steps(
    read: Callable[[], float], load: Callable[[threading.Event], None], duration_s: float
) -> dict[str, Any]:
    """Poll `read` in a tight loop for `duration_s` while `load` runs in a thread; the intervals between
    the counter's value changes. Units: ms, µs."""
    stop = threading.Event()
    loader = threading.Thread(target=load, args=(stop,), name="bench-load", daemon=True)
    loader.start()
    time.sleep(min(0.5, duration_s / 4))  # let the load ramp up
    changes: list[float] = []
    polls = 0
    last = read()
    t_end = time.perf_counter() + duration_s
    t0 = time.perf_counter()
    while (now := time.perf_counter()) < t_end:
        value = read()
        polls += 1
        if value != last:
            changes.append(now)
            last = value
    elapsed = time.perf_counter() - t0
    stop.set()
    loader.join(timeout=30)
    steps_ms = [(b - a) * 1e3 for a, b in itertools.pairwise(changes)]
    return {
        "duration_s": elapsed,
        "polls": polls,
        "poll_us": elapsed / max(polls, 1) * 1e6,
        "changes": len(changes),
        "step_median_ms": median(steps_ms),
        "step_p10_ms": percentile(steps_ms, 10),
        "step_p90_ms": percentile(steps_ms, 90),
        "step_min_ms": min(steps_ms, default=float("nan")),
        "step_max_ms": max(steps_ms, default=float("nan")),
    }


def gpu_matmul_load(device: str) -> Callable[[threading.Event], None]:
    def load(stop: threading.Event) -> None:
        import torch

        a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
        b = torch.randn(8192, 8192, device=device, dtype=torch.float16)
        while not stop.is_set():
            for _ in range(8):
                torch.mm(a, b)
            torch.cuda.synchronize(device)

    return load


def synthetic_busy_load(meter: Any) -> Callable[[threading.Event], None]:
    def load(stop: threading.Event) -> None:
        meter.job_started()
        stop.wait()
        meter.job_finished()

    return load


# --- (b, c) serving phases -----------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    name: str
    kind: Kind
    concurrency: int
    requests: int  # measured
    warmup: int  # sent first, in the server's life (so in conservation), not in the per-unit figures
    make_request: Callable[[int], tuple[str, dict[str, Any]]] = field(repr=False)


@dataclass
class PhaseResult:
    name: str
    kind: str
    concurrency: int
    requests: int
    wall_s: float
    images: int
    prompt_tokens: int
    completion_tokens: int
    measured_j: float  # sum of the measured responses' joules
    batch_sizes: list[int]
    latency_p50_s: float
    latency_p95_s: float
    measurement: str
    # conservation over the server's whole life
    probe_delta_j: float
    responses_j: float  # every response, warm-up included
    idle_j: float
    monitor_attributed_j: float
    monitor_delta_j: float
    # counter vs integrated power over the measured requests
    window_counter_j: float
    window_power_integral_j: float
    power_samples: int
    # the same batches run again directly (backend.run, no server), right after the server stopped
    units: int  # images or completion tokens of the measured requests
    direct_wall_s: float
    direct_units: int
    direct_counter_j: float  # the probe's delta over the replay (the whole device, idle included)

    @property
    def served_over_direct(self) -> float:
        """Served units/s over direct units/s, on the same batches."""
        return (self.units / self.wall_s) / (self.direct_units / self.direct_wall_s)

    @property
    def conservation_error(self) -> float:
        return (self.responses_j + self.idle_j - self.probe_delta_j) / self.probe_delta_j

    @property
    def power_over_counter(self) -> float:
        return self.window_power_integral_j / self.window_counter_j if self.window_counter_j else float("nan")


class PowerSampler:
    """Samples the probe's power every `period_s` in a thread; the trapezoid integral (J) and the
    counter's delta over the same window."""

    def __init__(self, probe: Probe, period_s: float = 0.01) -> None:
        self.probe = probe
        self.period_s = period_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-power", daemon=True)
        self.counter_j = 0.0

    def _run(self) -> None:
        while True:
            watts = self.probe.power_w()
            if watts is not None:
                self.samples.append((time.perf_counter(), watts))
            if self._stop.wait(self.period_s):
                return

    def __enter__(self) -> PowerSampler:
        self._e0 = self.probe.energy_j()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.counter_j = self.probe.energy_j() - self._e0

    def integral_j(self) -> float:
        return sum((t1 - t0) * (p0 + p1) / 2.0 for (t0, p0), (t1, p1) in itertools.pairwise(self.samples))


async def _client_phase(
    server: ServerThread, phase: Phase, probe: Probe, settle_s: float, power_period_s: float
) -> tuple[float, list[tuple[float, dict[str, Any]]], list[dict[str, Any]], PowerSampler]:
    import aiohttp

    base_url = server.base_url
    timeout = aiohttp.ClientTimeout(total=900)
    connector = aiohttp.TCPConnector(limit=phase.concurrency * 2)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, headers=server.headers) as session:
        await asyncio.sleep(settle_s)
        _, warm = await drive(session, base_url, phase.make_request, range(phase.warmup), phase.concurrency)
        await asyncio.sleep(settle_s)
        indices = range(phase.warmup, phase.warmup + phase.requests)
        with PowerSampler(probe, power_period_s) as sampler:
            wall, answers = await drive(session, base_url, phase.make_request, indices, phase.concurrency)
        await asyncio.sleep(settle_s)
    return wall, answers, [a for _, a in warm], sampler


def run_phase(
    phase: Phase,
    settings: Any,
    backend: RecordingBackend,
    probe: Probe,
    meters: dict[str, Any] | None,
    plan: Plan,
) -> PhaseResult:
    """One server's life around one phase; the probe reads bracket it."""
    from proxy.state import MONITORS

    device = settings.models[0].device
    app_kwargs: dict[str, Any] = {"backends": {settings.models[0].name: backend}}
    if meters:
        app_kwargs["meters"] = meters
    server = ServerThread(settings, **app_kwargs)
    start_j: list[float] = []
    try:
        server.start(before_app=lambda: start_j.append(probe.energy_j()))
        backend.start_recording()
        wall, answers, warm, sampler = asyncio.run(
            _client_phase(server, phase, probe, plan.settle_s, plan.power_period_s)
        )
        batches = backend.stop_recording()
    finally:
        server.stop()
    e1 = probe.energy_j()
    measured_batches = batches[-_batches_for(batches, phase.requests) :] if batches else []
    direct_e0 = probe.energy_j()
    direct_wall, _, direct_units = replay(backend.direct, measured_batches)
    direct_j = probe.energy_j() - direct_e0
    assert server.app is not None
    monitor = server.app[MONITORS][device]
    payloads = [a for _, a in answers]
    energies = [p["usage"]["energy"] for p in payloads]
    warm_energies = [p["usage"]["energy"] for p in warm]
    latencies = [latency for latency, _ in answers]
    images = sum(len(p.get("data", [])) for p in payloads)
    completion_tokens = sum(int(p["usage"].get("completion_tokens", 0)) for p in payloads)
    return PhaseResult(
        name=phase.name,
        kind=phase.kind,
        concurrency=phase.concurrency,
        requests=phase.requests,
        wall_s=wall,
        images=images,
        prompt_tokens=sum(int(p["usage"].get("prompt_tokens", 0)) for p in payloads),
        completion_tokens=completion_tokens,
        measured_j=sum(float(e["joules"]) for e in energies),
        batch_sizes=[len(b) for b in measured_batches],
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        measurement=str(energies[0]["measurement"]) if energies else "-",
        probe_delta_j=e1 - start_j[0],
        responses_j=sum(float(e["joules"]) for e in [*energies, *warm_energies]),
        idle_j=monitor.committed_idle_j,
        monitor_attributed_j=monitor.committed_attributed_j,
        monitor_delta_j=monitor.meter_delta_j,
        window_counter_j=sampler.counter_j,
        window_power_integral_j=sampler.integral_j(),
        power_samples=len(sampler.samples),
        units=images if phase.kind == "image" else completion_tokens,
        direct_wall_s=direct_wall,
        direct_units=direct_units,
        direct_counter_j=direct_j,
    )


def run_proxy_phase(
    phase: Phase,
    upstream_settings: Any,
    proxy_settings: Callable[[str], Any],
    backend: RecordingBackend,
    probe: Probe,
    proxy_meters: dict[str, Any] | None,
    plan: Plan,
) -> dict[str, Any]:
    """(g) The phase's chats through a proxy-mode WattProxy in front of a WattProxy serving `backend`,
    the probe's reads bracketing the proxy's life; then the same chats straight at the upstream."""
    from proxy.state import MONITORS

    upstream = ServerThread(upstream_settings, backends={upstream_settings.models[0].name: backend})
    start_j: list[float] = []
    try:
        upstream.start()
        proxy = ServerThread(
            proxy_settings(upstream.base_url), **({"meters": proxy_meters} if proxy_meters else {})
        )
        try:
            proxy.start(before_app=lambda: start_j.append(probe.energy_j()))
            wall, answers, warm, _ = asyncio.run(
                _client_phase(proxy, phase, probe, plan.settle_s, plan.power_period_s)
            )
        finally:
            proxy.stop()
        end_j = probe.energy_j()
        direct_wall, direct, _, _ = asyncio.run(
            _client_phase(upstream, phase, probe, plan.settle_s, plan.power_period_s)
        )
    finally:
        upstream.stop()
    assert proxy.app is not None
    (monitor,) = proxy.app[MONITORS].values()
    energies = [p["usage"]["energy"] for _, p in answers]
    responses_j = sum(float(e["joules"]) for e in [*energies, *(p["usage"]["energy"] for p in warm)])
    tokens = sum(int(p["usage"].get("completion_tokens", 0)) for _, p in answers)
    direct_tokens = sum(int(p["usage"].get("completion_tokens", 0)) for _, p in direct)
    measured_j = sum(float(e["joules"]) for e in energies)
    delta_j = end_j - start_j[0]
    p50, direct_p50 = percentile([t for t, _ in answers], 50), percentile([t for t, _ in direct], 50)
    return {
        "name": phase.name,
        "requests": phase.requests,
        "concurrency": phase.concurrency,
        "measurement": str(energies[0]["measurement"]) if energies else "-",
        "usage_source": str(energies[0].get("usage_source")) if energies else "-",
        "completion_tokens": tokens,
        "measured_j": measured_j,
        "j_per_token": measured_j / tokens if tokens else None,
        "uncertainty_j": sum(float(e["uncertainty_kwh"]) for e in energies) * 3.6e6,
        "probe_delta_j": delta_j,
        "responses_j": responses_j,
        "idle_j": monitor.committed_idle_j,
        "monitor_attributed_j": monitor.committed_attributed_j,
        "monitor_delta_j": monitor.meter_delta_j,
        "conservation_error": (responses_j + monitor.committed_idle_j - delta_j) / delta_j
        if delta_j
        else None,
        "tokens_per_s": tokens / wall,
        "direct_tokens_per_s": direct_tokens / direct_wall,
        "latency_p50_s": p50,
        "latency_p95_s": percentile([t for t, _ in answers], 95),
        "direct_latency_p50_s": direct_p50,
        "direct_latency_p95_s": percentile([t for t, _ in direct], 95),
        "added_p50_s": p50 - direct_p50,
    }


def _batches_for(batches: Sequence[Sequence[object]], requests: int) -> int:
    """How many of the last batches hold the last `requests` requests (the measured ones)."""
    n = total = 0
    for b in reversed(batches):
        if total >= requests:
            break
        total += len(b)
        n += 1
    return n


# --- configuration ---------------------------------------------------------------------------------


Dtype = Literal["float16", "float32"]


@dataclass(frozen=True)
class Plan:
    device: str
    dtype: Dtype
    image_preset: str
    text_preset: str
    image_side: int
    image_steps: int
    image_requests: tuple[int, int]  # measured at 1 and 8 clients
    text_clients: int
    text_tokens: int
    text_requests: int
    counter_poll_s: float
    settle_s: float
    # The script's own power sampling during the measured requests. Every NVML call took ~4.6 ms on an
    # H200 VM and slowed the GPU work (bench/nvml_interference.py), so not faster than the counter's step.
    power_period_s: float


# Each server's life must hold enough energy that the few milliseconds between the script's reads and
# the server's own (at start and stop), plus one counter step at each end, stay well under 0.5%.
FULL = Plan("cuda:0", "float16", "sd15", "gpt2-medium", 512, 30, (8, 24), 32, 128, 128, 2.0, 2.0, 0.1)
SMOKE = Plan("cpu", "float32", "tiny-sd", "tiny-gpt2", 64, 2, (2, 8), 8, 8, 8, 0.3, 0.05, 0.01)


def image_request(plan: Plan, model: str) -> Callable[[int], tuple[str, dict[str, Any]]]:
    def make(i: int) -> tuple[str, dict[str, Any]]:
        side = plan.image_side
        return "/v1/images/generations", {
            "model": model,
            "prompt": f"an oil painting of a lighthouse on a rocky coast at sunset, number {i}",
            "size": f"{side}x{side}",
            "n": 1,
            "steps": plan.image_steps,
            "seed": i,
        }

    return make


def chat_request(plan: Plan, model: str) -> Callable[[int], tuple[str, dict[str, Any]]]:
    def make(i: int) -> tuple[str, dict[str, Any]]:
        return "/v1/chat/completions", {
            "model": model,
            "messages": [
                {"role": "user", "content": f"Write a story about a robot who paints the sea, part {i}."}
            ],
            "max_tokens": plan.text_tokens,
            "temperature": 0,
        }

    return make


def settings_for(plan: Plan, model: Any, cache: Path, data_dir: str, smoke: bool) -> Any:
    from proxy.config import Settings

    return Settings.model_validate(
        {
            "port": 0,
            "cache_dir": str(cache),
            "data_dir": data_dir,
            "meter": "synthetic" if smoke else "nvml",
            "models": [model],
            "log_level": "WARNING",
        }
    )


def load_text_backend(name: str, path: Path, *, device: str, dtype: Dtype) -> Any:
    """`load_backend("text", ...)`; where diffusers is missing (a GPU host may lack it), the text
    backend's own class, because `load_backend` also quiets diffusers' progress bars."""
    if installed("diffusers"):
        from backends import load_backend

        return load_backend("text", name, path, device=device, dtype=dtype)
    from backends.text_transformers import TransformersTextBackend

    backend = TransformersTextBackend(name, path, device=device, dtype=dtype)
    backend.load()
    return backend


def installed(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: present in sys.modules as None (blocked)
        return False


def gpu_visible() -> bool:
    """True where torch sees a CUDA device and NVML a GPU (what the full run needs)."""
    try:
        import torch
    except ImportError:
        return False
    if not torch.cuda.is_available():
        return False
    from proxy.energy.nvml import nvml_available

    return nvml_available()


# --- report ----------------------------------------------------------------------------------------


def render(data: dict[str, Any]) -> str:
    info, plan, smoke = data["machine"], data["plan"], data["smoke"]
    steps = data["counter"]
    counter_table = md_table(
        ["polls", "µs per poll", "value changes", "step median ms", "p10 ms", "p90 ms", "min ms", "max ms"],
        [
            [
                steps["polls"],
                steps["poll_us"],
                steps["changes"],
                steps["step_median_ms"],
                steps["step_p10_ms"],
                steps["step_p90_ms"],
                steps["step_min_ms"],
                steps["step_max_ms"],
            ]
        ],
    )
    phases: list[dict[str, Any]] = data["phases"]
    energy_rows = []
    for p in phases:
        per_unit = p["j_per_image"] if p["kind"] == "image" else p["j_per_token"]
        rate = p["images_per_s"] if p["kind"] == "image" else p["tokens_per_s"]
        energy_rows.append(
            [
                p["name"],
                p["concurrency"],
                p["requests"],
                histogram_text(batch_histogram(p["batch_sizes"])),
                rate,
                "images/s" if p["kind"] == "image" else "completion tokens/s",
                per_unit,
                "J/image" if p["kind"] == "image" else "J/completion token",
                p["measured_j"] / p["wall_s"],
                p["latency_p50_s"],
                p["latency_p95_s"],
                p["measurement"],
            ]
        )
    energy_table = md_table(
        [
            "phase",
            "clients",
            "requests",
            "batches",
            "rate",
            "unit",
            "energy",
            "unit",
            "mean W (requests)",
            "p50 s",
            "p95 s",
            "label",
        ],
        energy_rows,
    )
    cons_table = md_table(
        [
            "phase",
            "script's counter delta J",
            "responses J",
            "idle J",
            "responses + idle J",
            "error",
            "within 0.5%",
        ],
        [
            [
                p["name"],
                p["probe_delta_j"],
                p["responses_j"],
                p["idle_j"],
                p["responses_j"] + p["idle_j"],
                f"{p['conservation_error'] * 100:+.3f}%",
                "yes" if abs(p["conservation_error"]) <= CONSERVATION_TOLERANCE else "**no**",
            ]
            for p in phases
        ],
    )
    power_table = md_table(
        ["phase", "counter J (measured requests)", "integrated power J", "power / counter", "power samples"],
        [
            [
                p["name"],
                p["window_counter_j"],
                p["window_power_integral_j"],
                f"{p['power_over_counter']:.3f}",
                p["power_samples"],
            ]
            for p in phases
        ],
    )
    direct_table = md_table(
        [
            "phase",
            "unit",
            "served units/s",
            "direct units/s",
            "served / direct",
            "served J/unit (device counter)",
            "direct J/unit (device counter)",
        ],
        [
            [
                p["name"],
                "image" if p["kind"] == "image" else "completion token",
                p["units"] / p["wall_s"],
                p["direct_units"] / p["direct_wall_s"],
                f"{p['served_over_direct']:.3f}",
                p["window_counter_j"] / p["units"],
                p["direct_counter_j"] / p["direct_units"],
            ]
            for p in phases
        ],
    )
    ratio = data.get("batch8_over_batch1_images_per_s")
    batching = (
        f"Images/s at batch 8 over batch 1: **{ratio:.2f}x**; J/image at batch 8 over batch 1: "
        f"**{data['batch8_over_batch1_j_per_image']:.2f}x**."
        if ratio is not None
        else "Image phases skipped: " + data.get("image_skipped", "") + "."
    )
    proxy_section = ""
    px = data.get("proxy")
    if px:
        in_process = next((p for p in phases if p["kind"] == "text"), None)
        own = in_process["j_per_token"] if in_process else None
        proxy_table = md_table(
            ["", "through the proxy", "in-process (c); the upstream called directly"],
            [
                ["label", px["measurement"], in_process["measurement"] if in_process else "-"],
                ["J/completion token", px["j_per_token"], own],
                ["uncertainty J (measured requests)", px["uncertainty_j"], None],
                [
                    "completion tokens/s (proxy / upstream direct)",
                    px["tokens_per_s"],
                    px["direct_tokens_per_s"],
                ],
                ["latency p50 s (proxy / upstream direct)", px["latency_p50_s"], px["direct_latency_p50_s"]],
                ["latency p95 s (proxy / upstream direct)", px["latency_p95_s"], px["direct_latency_p95_s"]],
            ],
        )
        verdict = "yes" if abs(px["conservation_error"]) <= CONSERVATION_TOLERANCE else "**no**"
        proxy_section = f"""
### (g) Proxy mode: the same chats through a WattProxy in front of one serving the model

The upstream is a WattProxy serving `{plan["text_preset"]}` (its own meter synthetic, so that only the
proxy reads the device); the proxy (`upstream` = it, devices = the GPU) meters the GPU from its sampler
thread and places each request on the timeline by the clock (its event loop never reads the meter).
The same {px["requests"]} chats from {px["concurrency"]} clients go through the proxy, then straight to
the upstream. Usage source: `{px["usage_source"]}`.

{proxy_table}

Added latency p50: {px["added_p50_s"] * 1e3:.1f} ms (the wait for a counter step after each answer's end,
and the proxy's own work). Conservation over the proxy's life: responses {px["responses_j"]:.1f} J +
idle {px["idle_j"]:.1f} J against the script's counter delta {px["probe_delta_j"]:.1f} J:
{px["conservation_error"] * 100:+.3f}% (within 0.5%: {verdict}).
"""
    load = "a synthetic stepped meter, 20 ms updates, kept busy" if smoke else "under fp16 matmul load"
    power = "the synthetic meter's power" if smoke else "`nvmlDeviceGetPowerUsage`"
    status = "smoke" if smoke else "ok"
    period_ms = f"{plan['power_period_s'] * 1e3:.0f} ms"
    smoke_note = (
        "\n**Smoke run on a CPU: tiny presets, the synthetic meter instead of NVML, tiny sizes. The figures "
        "prove the code path; they are not GPU energy.**\n"
        if smoke
        else ""
    )
    return f"""## GPU energy: NVML counter step, J/image, J/token, conservation (bench/gpu_energy.py)

{status_marker(NAME, status)}
{smoke_note}
Command: `{data["command"]}`

{machine_markdown(info)}

- Models: random weights of real architectures (`backends.tiny`), {plan["dtype"]} on `{plan["device"]}`:
  `{plan["image_preset"]}` at {plan["image_side"]}x{plan["image_side"]}, {plan["image_steps"]} steps,
  guidance 7.5; `{plan["text_preset"]}` with {plan["text_clients"]} concurrent chats of {plan["text_tokens"]}
  tokens at most (greedy).
- Served by `create_app` with meter `{data["meter"]}`; each phase runs a server of its own. Warm-up requests
  come first: they count in conservation, not in the per-unit figures.
- The script's independent reading: {data["probe"]}.
- NVML's sensor has a gain error of about +-5%, which no conservation check can see.

### (a) Energy counter update step ({load})

{counter_table}

### (b, c, e) Energy per image and per token

{energy_table}

{batching}

### (d) Conservation: sum of response joules + idle joules vs the script's own counter delta

Over each server's whole life: the script reads its counter just before the app is built and just after
it has shut down, so the few milliseconds between those reads and the server's first and last ones
(plus up to one counter step at each end) count in the script's delta only.

{cons_table}

### (f) Served vs direct pipeline calls on the same batches

After each server has stopped, the script runs the batches that server formed for the measured requests
again, one after another, straight through `backend.run()` (no HTTP, queue, accounting or metrics), and
reads its own counter around them. Served throughput is over the clients' wall time (so it includes
HTTP, queueing and the batcher's wait); both J/unit columns are the whole device's counter delta (idle
power included) over the measured stretch divided by its units.

{direct_table}

### (d) Energy counter vs integrated power ({power}, trapezoid, {period_ms} sampling, measured requests)

{power_table}
{proxy_section}"""


def not_run_markdown(info: dict[str, str]) -> str:
    """The section written where no GPU is visible (`bench/run_all.py`)."""
    return f"""## GPU energy: NVML counter step, J/image, J/token, conservation (bench/gpu_energy.py)

{status_marker(NAME, "not-run")}

**Not run here: no GPU.** This benchmark needs an NVIDIA GPU (Volta or newer) and NVML; it measures the
energy counter's update step, J/image for Stable Diffusion 1.5's architecture at 512x512 x 30 steps
(batch 1 and 8), J/token for GPT-2 medium's architecture (32 concurrent chats of 128 tokens), and checks
conservation against the script's own NVML reads (0.5%). Run it on a GPU machine with:

    {COMMAND}

Checked on: {machine_markdown(info)}
"""


# --- main ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_energy.py", description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: the service's)")
    parser.add_argument("--device", default=None, help="CUDA device (default cuda:0; cpu with --smoke)")
    parser.add_argument(
        "--no-images", action="store_true", help="skip (b), the images (bench/gpu_served.py measures them)"
    )
    parser.add_argument("--text-requests", type=int, default=None, help="measured chats per text phase")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if args.device:
        plan = replace(plan, device=args.device)
    if args.text_requests:
        plan = replace(plan, text_requests=args.text_requests)
    if not args.smoke and not gpu_visible():
        print_flush("no CUDA GPU visible to torch and NVML: run with --smoke on a CPU")
        return 2

    import torch

    from backends import load_backend
    from backends.tiny import ensure_model
    from proxy.config import ModelSettings
    from proxy.energy.meter import SyntheticMeter

    cache = (args.cache_dir or default_cache_dir()) / "models"
    info = machine_info(gpu=not args.smoke)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python", "bench/gpu_energy.py", *argv_list])
    data: dict[str, Any] = {
        "benchmark": NAME,
        "smoke": args.smoke,
        "machine": info,
        "command": command,
        "plan": asdict(plan),
        "meter": "synthetic" if args.smoke else "nvml",
    }

    # (a)
    print_flush("(a) energy counter step ...")
    meters: dict[str, Any] | None = None
    probe: Probe
    if args.smoke:
        stepped = SyntheticMeter(plan.device, update_period_s=0.02)
        data["counter"] = counter_steps(
            lambda: stepped.read().energy_j, synthetic_busy_load(stepped), plan.counter_poll_s
        )
        server_meter = SyntheticMeter(plan.device)
        meters = {plan.device: server_meter}
        probe = MeterProbe(server_meter)
    else:
        nvml_probe = NvmlProbe(plan.device)
        data["counter"] = counter_steps(
            nvml_probe.energy_mj, gpu_matmul_load(plan.device), plan.counter_poll_s
        )
        torch.cuda.empty_cache()
        probe = nvml_probe
        info["gpu"] = nvml_probe.name
    data["probe"] = probe.label

    results: list[PhaseResult] = []
    with tempfile.TemporaryDirectory(prefix="wattproxy-gpu-bench-") as tmp:
        # (b) images
        if args.no_images:
            data["image_skipped"] = "not run (`--no-images`); `bench/gpu_served.py` measures them"
        elif not installed("diffusers"):
            data["image_skipped"] = "diffusers is not installed"
        else:
            print_flush(f"(b) building/loading {plan.image_preset} ...")
            path = ensure_model(plan.image_preset, cache, dtype=plan.dtype)
            image = RecordingBackend(
                load_backend("image", plan.image_preset, path, device=plan.device, dtype=plan.dtype)
            )
            side = f"{plan.image_side}x{plan.image_side}"
            model = ModelSettings.model_validate(
                {
                    "name": plan.image_preset,
                    "task": "image",
                    "source": str(path),
                    "device": plan.device,
                    "dtype": plan.dtype,
                    "sizes": [side],
                    "default_size": side,
                    "default_steps": plan.image_steps,
                    "max_steps": max(50, plan.image_steps),
                    "max_batch_size": 8,
                    "max_wait_ms": 10,
                    "max_n": 8,
                    "max_queue": 256,
                }
            )
            settings = settings_for(plan, model, cache.parent, tmp, args.smoke)
            try:
                for clients, n in zip((1, 8), plan.image_requests, strict=True):
                    phase = Phase(
                        f"{plan.image_preset} x{clients}",
                        "image",
                        clients,
                        n,
                        clients,
                        image_request(plan, plan.image_preset),
                    )
                    print_flush(f"(b) {phase.name}: {n} images from {clients} client(s) ...")
                    results.append(run_phase(phase, settings, image, probe, meters, plan))
            finally:
                image.inner.close()
        # (c) text
        print_flush(f"(c) building/loading {plan.text_preset} ...")
        path = ensure_model(plan.text_preset, cache, dtype=plan.dtype)
        text = RecordingBackend(
            load_text_backend(plan.text_preset, path, device=plan.device, dtype=plan.dtype)
        )
        model = ModelSettings.model_validate(
            {
                "name": plan.text_preset,
                "task": "text",
                "source": str(path),
                "device": plan.device,
                "dtype": plan.dtype,
                "max_tokens": plan.text_tokens,
                "default_max_tokens": plan.text_tokens,
                "max_batch_size": plan.text_clients,
                "max_wait_ms": 10,
                "max_queue": 1024,
            }
        )
        settings = settings_for(plan, model, cache.parent, tmp, args.smoke)
        try:
            phase = Phase(
                f"{plan.text_preset} x{plan.text_clients}",
                "text",
                plan.text_clients,
                plan.text_requests,
                plan.text_clients,
                chat_request(plan, plan.text_preset),
            )
            print_flush(f"(c) {phase.name}: {phase.requests} chats ...")
            results.append(run_phase(phase, settings, text, probe, meters, plan))
            # (h) the same chats with the model in a process of its own; replayed on the in-process copy
            print_flush(f"(h) loading {plan.text_preset} in a model process of its own ...")
            own = RecordingProcessBackend(  # the next batch sent ahead, as the server does
                load_backend(
                    "text", plan.text_preset, path, device=plan.device, dtype=plan.dtype, own_process=True
                ),
                direct=text.inner,
            )
            try:
                owned = replace(phase, name=f"{phase.name} own process")
                print_flush(f"(h) {owned.name}: {owned.requests} chats ...")
                own_settings = settings.model_copy(update={"data_dir": Path(tmp) / "own"})
                results.append(run_phase(owned, own_settings, own, probe, meters, plan))
            finally:
                own.inner.close()
            # (g) the same chats through a proxy-mode WattProxy in front of one serving the model
            upstream_settings = settings.model_copy(
                update={"meter": "synthetic", "auth": "none", "data_dir": Path(tmp) / "upstream"}
            )
            index = int(plan.device.partition(":")[2] or 0)
            proxy_meters: dict[str, Any] | None = None
            proxy_probe = probe
            if args.smoke:  # the proxy meters `cuda:<index>`: a synthetic meter of that name
                proxy_meter = SyntheticMeter(f"cuda:{index}")
                proxy_meters = {f"cuda:{index}": proxy_meter}
                proxy_probe = MeterProbe(proxy_meter)

            def proxy_settings(url: str) -> Any:
                from proxy.config import Settings

                return Settings.model_validate(
                    {
                        "port": 0,
                        "cache_dir": str(cache.parent),
                        "data_dir": str(Path(tmp) / "proxy"),
                        "meter": "synthetic" if args.smoke else "nvml",
                        "upstream": {"url": url, "devices": [index]},
                        "log_level": "WARNING",
                    }
                )

            proxied = replace(phase, name=f"{phase.name} via proxy mode")
            print_flush(f"(g) {proxied.name}: {proxied.requests} chats ...")
            data["proxy"] = run_proxy_phase(
                proxied, upstream_settings, proxy_settings, text, proxy_probe, proxy_meters, plan
            )
        finally:
            text.inner.close()
    probe.close()

    phases = []
    for r in results:
        d = asdict(r)
        d["conservation_error"] = r.conservation_error
        d["power_over_counter"] = r.power_over_counter
        d["served_over_direct"] = r.served_over_direct
        d["j_per_image"] = r.measured_j / r.images if r.images else None
        d["images_per_s"] = r.images / r.wall_s if r.images else None
        d["j_per_token"] = r.measured_j / r.completion_tokens if r.completion_tokens else None
        d["tokens_per_s"] = r.completion_tokens / r.wall_s if r.completion_tokens else None
        phases.append(d)
    data["phases"] = phases
    images = [p for p in phases if p["kind"] == "image"]
    if len(images) == 2 and images[0]["images_per_s"] and images[1]["images_per_s"]:
        data["batch8_over_batch1_images_per_s"] = images[1]["images_per_s"] / images[0]["images_per_s"]
        data["batch8_over_batch1_j_per_image"] = images[1]["j_per_image"] / images[0]["j_per_image"]
    markdown = render(data)
    md_path, _ = write_result(args.out, NAME, markdown, data)
    print(markdown)
    print_flush(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    quiet_logging()
    raise SystemExit(main())
