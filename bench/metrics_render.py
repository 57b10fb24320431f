"""Time to render /metrics with many label combinations: the app's `Metrics` catalogue on its own registry,
populated as a busy deployment would leave it (every user has used every model), rendered in the
Prometheus text format and in OpenMetrics (what Prometheus asks for, exemplars included), by
prometheus_client's `generate_latest` and by `proxy.exposition.Exposition` (what GET /metrics serves),
side by side on the same registry, alternating render by render. Each row also checks that the two
bodies are byte-identical.

    python -m bench.metrics_render                   # 100 and 1,000 users x 4 models
    python -m bench.metrics_render --users 5000 --repeats 10
    python -m bench.metrics_render --smoke           # proves the code path, times nothing

Prints a Markdown table and writes bench/results/metrics_render.md (and .json) for `make bench`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version

from prometheus_client import CollectorRegistry, disable_created_metrics, enable_created_metrics
from prometheus_client import metrics as prom_metrics
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from bench.common import (
    common_args,
    machine_info,
    machine_markdown,
    md_table,
    median,
    percentile,
    reproduce_command,
    status_marker,
    write_result,
)
from proxy.exposition import Exposition
from proxy.metrics import JOULES_PER_KWH, EnergyBook, EnergyEntry, Metrics

NAME = "metrics_render"
STATUSES_EVERY = {"error": 20, "cancelled": 50}  # every 20th user also has errors, every 50th cancellations
WARMUP = 2
# format -> (prometheus_client's encoder, the Exposition method that replaces it)
FORMATS: dict[str, tuple[Callable[[CollectorRegistry], bytes], Callable[[Exposition], bytes]]] = {
    "text 0.0.4": (generate_latest, Exposition.text),
    "OpenMetrics 1.0": (generate_openmetrics, Exposition.openmetrics),
}


@dataclass(frozen=True)
class Timing:
    users: int
    models: int
    fmt: str
    created: bool
    sample_lines: int
    body_bytes: int
    identical: bool  # Exposition's body == generate_latest's, byte for byte
    baseline_ms: list[float]  # prometheus_client's generate_latest
    exposition_ms: list[float]  # proxy.exposition.Exposition (GET /metrics)

    @property
    def speedup(self) -> float:
        return median(self.baseline_ms) / median(self.exposition_ms)


def populate(users: int, models: int) -> CollectorRegistry:
    """A registry with the app's catalogue, every (user, model) combination present. Half the models
    serve text and half images, each on a device of its own."""
    registry = CollectorRegistry()
    book = EnergyBook()
    metrics = Metrics(registry, book)
    served = [(f"model-{i}", "text" if i % 2 == 0 else "image", f"cuda:{i}") for i in range(models)]
    names = [f"user-{u:05d}" for u in range(users)]
    for model, task, device in served:
        book.add_device(device)
        entries = [
            EnergyEntry(model, task, user, 100.0 + n, 0.01 * (1 + n % 7)) for n, user in enumerate(names)
        ]
        book.commit(device, idle_j=50.0, entries=entries)
        for n, user in enumerate(names):
            metrics.requests.labels(model, task, user, "ok").inc(1 + n % 5)
            for status, every in STATUSES_EVERY.items():
                if n % every == 0:
                    metrics.requests.labels(model, task, user, status).inc()
            if task == "text":
                metrics.tokens.labels(model, user, "prompt").inc(10 + n % 30)
                metrics.tokens.labels(model, user, "completion").inc(5 + n % 60)
            else:
                metrics.images.labels(model, user).inc(1 + n % 4)
        for n in range(50):
            kwh = (100.0 + n) / JOULES_PER_KWH
            metrics.request_energy.labels(model, task).observe(kwh, exemplar={"request_id": f"{n:032x}"})
            metrics.request_co2.labels(model, task).observe(kwh * 475.0)
            metrics.request_duration.labels(model, task).observe(0.05 * (1 + n % 9))
            metrics.queue_wait.labels(model, task).observe(0.002 * (1 + n % 9))
            metrics.batch_size.labels(model).observe(1 + n % 8)
    metrics.attach(
        power=lambda: {device: 300.0 for _, _, device in served},
        queue_depths=lambda: {model: 3 for model, _, _ in served},
        intensity=lambda: ("DE", "static", 381.0),
    )
    return registry


def time_render(users: int, models: int, fmt: str, repeats: int, *, created: bool) -> Timing:
    """`repeats` timed renders of each renderer, alternating, after warm-ups (the first Exposition render
    fills its label caches; a server pays that once). `created=False` leaves out the `*_created` series
    (one per counter child), as `wattproxy serve` does: prometheus_client's process-wide switch,
    restored afterwards."""
    before = prom_metrics._use_created
    (enable_created_metrics if created else disable_created_metrics)()
    try:
        registry = populate(users, models)
        baseline, method = FORMATS[fmt]
        exposition = Exposition(registry)
        body = baseline(registry)
        identical = method(exposition) == body
        for _ in range(WARMUP):
            baseline(registry)
            method(exposition)
        baseline_ms, exposition_ms = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            baseline(registry)
            t1 = time.perf_counter()
            method(exposition)
            t2 = time.perf_counter()
            baseline_ms.append((t1 - t0) * 1000.0)
            exposition_ms.append((t2 - t1) * 1000.0)
    finally:
        (enable_created_metrics if before else disable_created_metrics)()
    lines = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    return Timing(users, models, fmt, created, lines, len(body), identical, baseline_ms, exposition_ms)


def report(timings: Sequence[Timing], repeats: int, argv: Sequence[str], status: str) -> str:
    rows = [
        (
            f"{t.users:,} x {t.models}",
            t.fmt,
            "yes" if t.created else "no (served)",
            t.sample_lines,
            round(t.body_bytes / 1024),
            median(t.baseline_ms),
            percentile(t.baseline_ms, 95),
            median(t.exposition_ms),
            percentile(t.exposition_ms, 95),
            f"{t.speedup:.1f}",
            "yes" if t.identical else "**NO**",
        )
        for t in timings
    ]
    headers = [
        "users x models",
        "format",
        "`_created`",
        "sample lines",
        "body (KiB)",
        "generate_latest median (ms)",
        "generate_latest p95 (ms)",
        "Exposition median (ms)",
        "Exposition p95 (ms)",
        "speed-up (x)",
        "identical bytes",
    ]
    return "\n".join(
        [
            "## /metrics render time",
            status_marker(NAME, status),
            "",
            "The app's `Metrics` catalogue on one registry, every user having used every model (half text, "
            "half image, each model on a device of its own), rendered by prometheus_client's "
            "`generate_latest` and by `proxy.exposition.Exposition`, which GET /metrics serves (same "
            f"registry, one thread, {repeats} timed renders of each, alternating, after {WARMUP} warm-ups). "
            "`wattproxy serve` turns the `*_created` series off (one per counter child); the rows with them "
            'show prometheus_client\'s default. Prometheus asks for OpenMetrics. "identical bytes": the two '
            "bodies compared, byte for byte.",
            "",
            f"Command: `{reproduce_command('bench.metrics_render', argv)}`. "
            f"prometheus-client {version('prometheus-client')}.",
            "",
            machine_markdown(machine_info()),
            "",
            md_table(headers, rows),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_render", description=__doc__)
    common_args(parser)
    parser.add_argument("--users", type=int, nargs="+", default=[100, 1000], help="users per scenario")
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30, help="timed renders per row")
    args = parser.parse_args(argv)
    users, repeats = (args.users, args.repeats) if not args.smoke else ([10], 2)
    timings = [
        time_render(n, args.models, fmt, repeats, created=created)
        for n in users
        for created in (False, True)
        for fmt in FORMATS
    ]
    markdown = report(timings, repeats, argv, "smoke" if args.smoke else "ok")
    data = {"timings": [{**asdict(t), "speedup": t.speedup} for t in timings]}
    write_result(args.out, NAME, markdown, data)
    if not all(t.identical for t in timings):
        sys.stderr.write("Exposition's body differs from generate_latest's: see the table\n")
        return 1
    sys.stdout.write(markdown + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
