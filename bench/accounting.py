"""Accounting benchmark: the CPU cost of accounting one request, WattProxy vs CodeCarbon's per-task
tracking, with no model running (the bookkeeping itself).

WattProxy's path per request is what the device worker and the batcher do around a job: meter reads,
`DeviceMonitor.begin`/`end`, attribution and commit (with the app's `Accountant`: carbon arithmetic
and `EnergyBook.commit`), the `Outcome`, the app's metric recorder, and the response's energy fields.
CodeCarbon's is `tracker.start_task(name)` / `tracker.stop_task()` per request on an
`OfflineEmissionsTracker` (no network, no output files). Each variant runs a block of iterations timed
with `time.process_time` (all threads of the process: CodeCarbon measures from a helper thread),
`time.thread_time` and `time.perf_counter`; rounds interleave the variants in rotated order and the
tables give medians over rounds, ratios taken within a round first.

    python -m bench.accounting --out bench/results          # full: about 40 s
    python -m bench.accounting --smoke --out /tmp/bench     # a few iterations
    python -m bench.accounting --profile /tmp/prof.txt      # also profile WattProxy's path
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import logging
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry

from backends.base import ChatMessage, TextRequest, TextResult
from bench.common import (
    common_args,
    machine_info,
    machine_markdown,
    md_table,
    median,
    print_flush,
    quiet_logging,
    reproduce_command,
    rotated,
    status_marker,
    write_result,
)
from proxy.api import _energy_fields, energy_headers
from proxy.app import Accountant, _recorder, ledger_record
from proxy.auth import new_key
from proxy.budgets import Budgets
from proxy.carbon import CarbonSettings, build_carbon
from proxy.energy.meter import EnergyMeter, EstimatedMeter, SyntheticMeter
from proxy.energy.monitor import Charge, DeviceMonitor
from proxy.ledger import Ledger, LedgerRecord
from proxy.metrics import EnergyBook, Metrics
from proxy.scheduler import Outcome, RequestTag

NAME = "accounting"
MODEL, TASK, USER = "tiny-gpt2", "text", "bench"
REQUEST = TextRequest(messages=(ChatMessage("user", "Tell me about energy."),), max_tokens=16, temperature=0)
RESULT = TextResult(
    text="a sixteen token answer",
    prompt_tokens=12,
    completion_tokens=16,
    finish_reason="length",
    work_units=28.0,
)


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    step: Callable[[], object]
    requests_per_step: int = 1
    in_total: bool = False  # a component of WattProxy's total (shown indented under it)


@dataclass(frozen=True)
class Sample:
    """One timed block. Units: µs per request."""

    cpu_us: float  # time.process_time: every thread of the process
    thread_us: float  # time.thread_time: the calling thread only
    wall_us: float


def run_to_end(awaitable: Awaitable[None]) -> None:
    """Run a coroutine that never suspends (the app's recorder here), without an event loop."""
    coro = cast(Coroutine[Any, Any, None], awaitable)
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise RuntimeError("the coroutine suspended; it needs an event loop")


class NullLedger:
    """Takes the app's ledger records and writes nothing: the database write is the ledger
    benchmark's subject (group commit); building the records stays in the measured path."""

    def __init__(self) -> None:
        self.recorded = 0

    async def record(self, records: Sequence[LedgerRecord]) -> None:
        self.recorded += len(records)


class WattProxyPath:
    """The app's accounting objects, wired as `create_app` wires them, with no sampler thread."""

    def __init__(self, meter: EnergyMeter) -> None:
        carbon = build_carbon(CarbonSettings())
        asyncio.run(carbon.start())  # the static table: no I/O
        self.book = EnergyBook()
        self.book.add_device(meter.device)
        self.metrics = Metrics(CollectorRegistry(), self.book)
        self.accountant = Accountant(self.book, carbon, time.monotonic)
        self.monitor = DeviceMonitor(meter, on_commit=self.accountant.on_commit)
        self.monitor.sample()  # the first reading (what `start` takes before its thread)
        self.ledger = NullLedger()
        self.budgets = Budgets()
        self.budgets.set_keys([new_key(USER, budget_kwh=1.0)[1]])  # a user with a budget to count against
        self.record = _recorder(self.metrics, cast(Ledger, self.ledger), self.budgets)
        self._ids = itertools.count()

    def tag(self) -> RequestTag:
        # positional, as the service builds it: request_id, model, task, user, key_id
        return RequestTag(f"{next(self._ids):032x}", MODEL, TASK, USER, "key_bench")

    def job(self, tags: Sequence[RequestTag]) -> dict[Any, Charge]:
        """One job: begin, end with its members, attribution and commit; the charges."""
        handle = self.monitor.begin()
        self.monitor.end(handle, [(t, RESULT.work_units) for t in tags])
        # as the scheduler does: a job final at its end needs no future
        return handle.charges if handle.charges is not None else handle.result.result(timeout=5)

    def outcome(self, tag: RequestTag, charge: Charge, batch_size: int) -> Outcome:
        # positional, as the batcher builds it: tag, request, result, error, charge, status,
        # queue_wait_s, run_s, batch_size, duration_s
        return Outcome(tag, REQUEST, RESULT, None, charge, "ok", 0.001, 0.01, batch_size, 0.011)

    def requests(self, n: int) -> None:
        """n requests served as one job: everything the service does for their energy and metrics."""
        tags = [self.tag() for _ in range(n)]
        charges = self.job(tags)
        outcomes = [self.outcome(t, charges[t], n) for t in tags]
        run_to_end(self.record(outcomes))
        for o in outcomes:
            energy_headers(_energy_fields([o]), o.tag.request_id)  # as a text answer builds them


IN_FLIGHT = (1, 8, 64, 256)
TARGET_CPU_US = 50.0  # issue 8, target 1
TARGET_CODECARBON_RATIO = 20.0


class InFlight:
    """Proxy mode's shape: `n` requests in flight on one device, their boundaries placed from the event
    loop; each step ends the oldest and sends a new one. Per step: one request's two boundaries, its
    share of the attribution and its commit (the monitor alone: the commit hook does nothing)."""

    def __init__(self, n: int) -> None:
        self.monitor = DeviceMonitor(SyntheticMeter("cuda:0"), on_commit=lambda *_: None)
        self.monitor.sample()
        self.handles = collections.deque(self.monitor.begin(on_loop=True) for _ in range(n))
        self.members = itertools.count()

    def step(self) -> None:
        handle = self.handles.popleft()
        self.monitor.end(handle, [(next(self.members), 20.0)], 20.0)
        self.handles.append(self.monitor.begin(on_loop=True))


def codecarbon_tracker() -> tuple[Any, dict[str, str]] | None:
    """An offline CodeCarbon tracker that writes nothing and measures power rarely; None if absent."""
    try:
        import codecarbon
        from codecarbon import OfflineEmissionsTracker
    except ImportError:
        return None
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = OfflineEmissionsTracker(
            project_name="wattproxy-bench",
            country_iso_code="USA",
            measure_power_secs=3600,  # its periodic thread must not dominate
            save_to_file=False,
            log_level="error",
            allow_multiple_runs=True,
        )
    tracker.start_task("probe")
    tracker.stop_task()
    hardware = ", ".join(str(h) for h in getattr(tracker, "_hardware", []))
    return tracker, {"version": codecarbon.__version__, "hardware": hardware, "country": "USA"}


def variants(codecarbon: Any | None) -> list[Variant]:
    synthetic = WattProxyPath(SyntheticMeter("cpu"))
    estimated = WattProxyPath(EstimatedMeter("cpu"))
    parts = WattProxyPath(SyntheticMeter("cpu"))
    tag = parts.tag()
    charge = parts.job([tag])[tag]
    outcome = parts.outcome(tag, charge, 1)
    out = [
        Variant(
            "wattproxy_b1",
            "WattProxy, whole path, 1 request per job (synthetic meter)",
            lambda: synthetic.requests(1),
        ),
        Variant(
            "wattproxy_b1_estimated",
            "WattProxy, whole path, 1 request per job (estimated meter)",
            lambda: estimated.requests(1),
        ),
        Variant(
            "wattproxy_b8",
            "WattProxy, whole path, 8 requests per job (per request)",
            lambda: synthetic.requests(8),
            requests_per_step=8,
        ),
        Variant("read_synthetic", "synthetic meter read()", synthetic.monitor.meter.read, in_total=True),
        Variant("read_estimated", "estimated meter read()", estimated.monitor.meter.read, in_total=True),
        Variant(
            "job",
            "begin + end + attribution + commit (carbon + book) + result",
            lambda: parts.job([parts.tag()]),
            in_total=True,
        ),
        Variant(
            "commit_hook",
            "Accountant.on_commit alone (carbon + EnergyBook.commit)",
            lambda: parts.accountant.on_commit("cpu", 0.0, [(tag, charge)]),
            in_total=True,
        ),
        Variant(
            "recorder",
            "the app's recorder, 1 outcome: ledger row built (not written), budget, metrics",
            lambda: run_to_end(parts.record([outcome])),
            in_total=True,
        ),
        Variant(
            "ledger_row",
            "of which: ledger_record() (build the row)",
            lambda: ledger_record(outcome),
            in_total=True,
        ),
        Variant(
            "response",
            "response energy fields (_energy_fields + headers, as a text answer)",
            lambda: energy_headers(_energy_fields([outcome]), tag.request_id),
            in_total=True,
        ),
        Variant(
            "sampler_tick", "sampler tick while idle (sample + advance), per tick", synthetic.monitor.sample
        ),
    ]
    out += [Variant(f"inflight_{n}", f"{n} in flight", InFlight(n).step) for n in IN_FLIGHT]
    if codecarbon is not None:
        names = itertools.count()

        def task() -> None:
            codecarbon.start_task(f"request-{next(names)}")
            codecarbon.stop_task()

        out.append(Variant("codecarbon", "CodeCarbon start_task + stop_task", task))
    return out


def time_block(variant: Variant, n: int) -> Sample:
    step = variant.step
    c0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
    for _ in range(n):
        step()
    c1, t1, w1 = time.process_time(), time.thread_time(), time.perf_counter()
    per = 1e6 / (n * variant.requests_per_step)
    return Sample((c1 - c0) * per, (t1 - t0) * per, (w1 - w0) * per)


def calibrate(variant: Variant, target_s: float, warmup_s: float) -> int:
    """Warm the variant up, then the iterations that take about `target_s` of CPU."""
    n, spent = 0, 0.0
    start = time.process_time()
    while spent < warmup_s or n < 3:
        variant.step()
        n += 1
        spent = time.process_time() - start
    return max(3, round(target_s / (spent / n)))


def measure(vs: Sequence[Variant], rounds: int, target_s: float, warmup_s: float) -> dict[str, list[Sample]]:
    iterations = {v.key: calibrate(v, target_s, warmup_s) for v in vs}
    samples: dict[str, list[Sample]] = {v.key: [] for v in vs}
    for r in range(rounds):
        for v in rotated(vs, r):
            samples[v.key].append(time_block(v, iterations[v.key]))
        cells = "  ".join(f"{k}={s[-1].cpu_us:.1f}" for k, s in samples.items())
        print_flush(f"round {r + 1}/{rounds} µs/request (CPU): {cells}")
    return samples


def summarize(vs: Sequence[Variant], samples: dict[str, list[Sample]]) -> dict[str, Any]:
    out: dict[str, Any] = {"variants": {}}
    for v in vs:
        ss = samples[v.key]
        out["variants"][v.key] = {
            "label": v.label,
            "cpu_us": median(s.cpu_us for s in ss),
            "thread_us": median(s.thread_us for s in ss),
            "wall_us": median(s.wall_us for s in ss),
            "rounds_cpu_us": [s.cpu_us for s in ss],
        }
    if "codecarbon" in samples:
        pairs = list(zip(samples["codecarbon"], samples["wattproxy_b1"], strict=True))
        out["codecarbon_over_wattproxy_cpu"] = median(c.cpu_us / w.cpu_us for c, w in pairs)
        out["codecarbon_over_wattproxy_wall"] = median(c.wall_us / w.wall_us for c, w in pairs)
        batched = list(zip(samples["codecarbon"], samples["wattproxy_b8"], strict=True))
        out["codecarbon_over_wattproxy_b8_cpu"] = median(c.cpu_us / w.cpu_us for c, w in batched)
    return out


def targets_line(v: dict[str, Any], summary: dict[str, Any] | None) -> str:
    """Issue 8's target 1, judged on the request in its own job with the synthetic meter (the headline)."""
    us = v["wattproxy_b1"]["cpu_us"]
    out = f"Targets (issue 8, target 1): at most {TARGET_CPU_US:g} µs of CPU a request: {us:.1f} µs, " + (
        "met" if us <= TARGET_CPU_US else "not met"
    )
    if summary is None:
        return out + "; against CodeCarbon: not measured (not installed)."
    ratio = summary["codecarbon_over_wattproxy_cpu"]
    per_round = [
        c / w
        for c, w in zip(v["codecarbon"]["rounds_cpu_us"], v["wattproxy_b1"]["rounds_cpu_us"], strict=True)
    ]
    return (
        out + f"; at least {TARGET_CODECARBON_RATIO:g}x less than CodeCarbon: {ratio:.1f}x "
        f"(rounds {min(per_round):.1f}x to {max(per_round):.1f}x), "
        + ("met." if ratio >= TARGET_CODECARBON_RATIO else "not met.")
    )


def render(
    vs: Sequence[Variant],
    summary: dict[str, Any],
    info: dict[str, str],
    command: str,
    cc_info: dict[str, str] | None,
    rounds: int,
    smoke: bool,
    sample_period_s: float,
) -> str:
    v = summary["variants"]

    def row(key: str, label: str) -> list[Any]:
        s = v[key]
        return [label, s["cpu_us"], s["thread_us"], s["wall_us"]]

    main_rows = [row("wattproxy_b1", "**WattProxy**: one request, its own job (synthetic meter)")]
    main_rows.append(row("wattproxy_b1_estimated", "WattProxy: one request, its own job (estimated meter)"))
    main_rows.append(row("wattproxy_b8", "WattProxy: per request, in a job of 8"))
    if cc_info is not None:
        main_rows.append(row("codecarbon", f"**CodeCarbon {cc_info['version']}**: start_task + stop_task"))
    else:
        main_rows.append(["CodeCarbon: not installed (`pip install -e '.[bench]'`)", None, None, None])
    table = md_table(["per request", "CPU µs (process)", "CPU µs (this thread)", "wall µs"], main_rows)
    parts = md_table(
        ["component of WattProxy's path", "CPU µs", "wall µs"],
        [[x.label, v[x.key]["cpu_us"], v[x.key]["wall_us"]] for x in vs if x.in_total],
    )
    inflight = md_table(
        ["requests in flight on the device", *(str(n) for n in IN_FLIGHT)],
        [["monitor CPU µs per request", *(v[f"inflight_{n}"]["cpu_us"] for n in IN_FLIGHT)]],
    )
    tick = v["sampler_tick"]["cpu_us"]
    per_s = tick / sample_period_s
    if cc_info is not None:
        ratio = summary["codecarbon_over_wattproxy_cpu"]
        verdict = (
            f"**Ratio: CodeCarbon costs {ratio:.1f}x WattProxy's CPU per request** "
            f"(wall: {summary['codecarbon_over_wattproxy_wall']:.1f}x); "
            f"{summary['codecarbon_over_wattproxy_b8_cpu']:.1f}x per request in a job of 8 (the job's "
            "meter reads and attribution are shared by its members). CodeCarbon configuration: "
            f"`OfflineEmissionsTracker(country_iso_code='USA', measure_power_secs=3600, save_to_file=False, "
            f"log_level='error', allow_multiple_runs=True)`; hardware it tracks here: {cc_info['hardware']}."
        )
    else:
        verdict = "CodeCarbon is not installed here, so there is no ratio."
    verdict += "\n\n" + targets_line(v, summary if cc_info is not None else None)
    status = "smoke" if smoke else "ok"
    smoke_note = "\n**Smoke run (a few iterations): the figures prove the code path, not the cost.**\n"
    return f"""## Accounting: CPU cost per request, WattProxy vs CodeCarbon (bench/accounting.py)

{status_marker(NAME, status)}
{smoke_note if smoke else ""}
Command: `{command}`

{machine_markdown(info)}

No model runs: this is the bookkeeping alone. WattProxy's path is the device worker's and batcher's
work around a job: meter reads, `DeviceMonitor.begin`/`end`, attribution, the commit through the app's
`Accountant` into carbon and the `EnergyBook`, the `Outcome`, the app's recorder (it builds the ledger
row, counts the user's budget and updates the metrics; the database write itself is left out: group
commit is the ledger benchmark's subject), and the response's energy fields; the sampler thread is not
running. CodeCarbon's path is `start_task` + `stop_task`. {rounds} round(s), variants interleaved in
rotated order, medians over rounds; each block runs for about the same CPU time.

{table}

{verdict}

Where WattProxy's time goes (each part timed on its own; they overlap, so they do not add up exactly):

{parts}

Proxy mode keeps every request in flight to the upstream open on the device's monitor at once. The
monitor's cost per request (its two boundaries, attribution, commit; synthetic meter, each request
ending while the others run, one member each, the commit hook empty) as that number grows:

{inflight}

Background, not per request: the sampler thread's idle tick costs {tick:.1f} µs; at the default
`sample_period_s` of {sample_period_s:g} s that is {per_s:.0f} µs of CPU per second
({per_s / 1e4:.3f}% of one core), whatever the request rate.
"""


def profile(path: Path, seconds: float) -> None:
    """Profile WattProxy's per-request path for `seconds` (pyinstrument if installed, else cProfile)."""
    wp = WattProxyPath(SyntheticMeter("cpu"))
    try:
        from pyinstrument import Profiler
    except ImportError:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        deadline = time.process_time() + seconds
        prof.enable()
        while time.process_time() < deadline:
            wp.requests(1)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(40)
        path.write_text(buf.getvalue(), encoding="utf-8")
        return
    profiler = Profiler(interval=0.00005)
    deadline = time.process_time() + seconds
    profiler.start()
    while time.process_time() < deadline:
        wp.requests(1)
    profiler.stop()
    path.write_text(profiler.output_text(unicode=True, show_all=False), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.accounting", description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 7; 1 with --smoke)")
    parser.add_argument("--block-s", type=float, default=None, help="CPU seconds per timed block")
    parser.add_argument("--profile", type=Path, default=None, help="also write a profile of WattProxy's path")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.smoke else 7)
    block_s = args.block_s or (0.005 if args.smoke else 0.25)
    warmup_s = 0.002 if args.smoke else 0.05

    cc = codecarbon_tracker()
    tracker, cc_info = (cc[0], cc[1]) if cc is not None else (None, None)
    if cc is None:
        print_flush("codecarbon is not installed: measuring WattProxy only (pip install -e '.[bench]')")
    vs = variants(tracker)
    info = machine_info()
    samples = measure(vs, rounds, block_s, warmup_s)
    summary = summarize(vs, samples)
    sample_period_s = 0.05  # EnergySettings' default
    command = reproduce_command("bench.accounting", sys.argv[1:] if argv is None else argv)
    markdown = render(vs, summary, info, command, cc_info, rounds, args.smoke, sample_period_s)
    data = {
        "benchmark": NAME,
        "smoke": args.smoke,
        "machine": info,
        "command": command,
        "rounds": rounds,
        "block_cpu_s": block_s,
        "codecarbon": cc_info,
        **summary,
    }
    md_path, _ = write_result(args.out, NAME, markdown, data)
    print(markdown)
    if args.profile is not None:
        profile(args.profile, 0.5 if args.smoke else 3.0)
        print_flush(f"wrote {args.profile}")
    print_flush(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    quiet_logging()
    raise SystemExit(main())
