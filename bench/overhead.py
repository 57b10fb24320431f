"""Proxy overhead (issue 8, target 2): requests/s and latency of WattProxy's whole stack with the
generation taken out, against a bare aiohttp handler that returns the same bytes.

    python -m bench.overhead --out bench/results      # full run (about 1.5 minutes)
    python -m bench.overhead --smoke --out DIR        # 1 s per level, times nothing

Processes, one each, so that no two share a GIL:
- the full stack: `create_app` with an instant text backend (a real `Backend` that answers a fixed
  short completion at once, no model), `auth = "keys"` with an API key stored in the ledger before
  the start, the default SQLite ledger with group commit (every request is committed before it is
  answered), the synthetic meter, metrics on, the model's batcher without a wait (`max_wait_ms 0`);
- a bare aiohttp app: one handler for `POST /v1/chat/completions` that parses the JSON body and
  answers the bytes (and `X-*` headers) the full stack answered the same request with, captured once;
- the load generator: `wrk -t1 --latency` (Debian package `wrk`) with a Lua script for the POST body
  and the Authorization header; where wrk is missing (or with `--no-wrk`), closed-loop aiohttp
  clients in a process of their own.

Both servers run on the event loop `wattproxy serve` uses by default (`run_event_loop` in
proxy/cli.py: uvloop where it is installed), so that the comparison is between the stacks, not loops.

The two servers are measured at each connection count back to back, in rotated order, over several
rounds, so that both see the same machine noise; every figure is the median over rounds, and the
ratios and differences are taken within a round first. Any answer but 200 fails the run. At the end,
the full stack's ledger (read with sqlite3 after it stopped) must hold one record per request it
answered (its own `wattproxy_requests_total`), and at least as many as the load generator counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from backends.base import BackendRequest, BackendResult, Task, TextRequest, TextResult
from bench.common import (
    REPO_ROOT,
    _create_key,
    common_args,
    fmt,
    machine_info,
    machine_markdown,
    md_table,
    median,
    percentile,
    print_flush,
    reproduce_command,
    rotated,
    status_marker,
    write_result,
)
from bench.upstream import CHAT_PATH, Measurement, Service, free_port, run_wrk, start, wait_ready

NAME = "overhead"
MODEL = "instant"
USER = "bench"
METRICS_FILE = "metrics.txt"  # the full stack's final metrics, written into its data dir when it stops
REQUEST = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "How much energy does this request use?"}],
    "max_tokens": 16,
}
ANSWER_TEXT = "About one tenth of a joule on this instant backend."
TARGETS = ("full", "bare")
LABELS = {"full": "WattProxy, full stack", "bare": "bare aiohttp handler"}
TARGET_RPS_RATIO = 0.5  # issue 8, target 2: the full stack's requests/s over the bare handler's, at least
TARGET_ADDED_P50_MS = 1.0  # issue 8, target 2: added p50 latency at low load (1 connection), below
# Both servers run on the event loop `wattproxy serve` runs on by default (`event_loop = "auto"`:
# uvloop where it is installed), through the same `run_event_loop`, so that neither has a faster loop.
EVENT_LOOP = "auto"


# --- the instant backend -----------------------------------------------------------------------------


class InstantBackend:
    """A text `Backend` that answers every request at once with the same short completion: the whole
    proxy runs (validation, queue, batcher, device worker, meter reads, attribution, ledger, metrics),
    the generation does not. Work units are prompt + completion tokens, as a real text backend's."""

    def __init__(self, name: str = MODEL, device: str = "cpu") -> None:
        self.name = name
        self.task: Task = "text"
        self.device = device
        self._completion_tokens = len(ANSWER_TEXT.split())

    def count_prompt_tokens(self, request: TextRequest) -> int:
        """Whitespace-separated words: a stand-in tokenizer, cheap and deterministic."""
        if request.messages is not None:
            return sum(len(m.content.split()) for m in request.messages)
        return len((request.prompt or "").split())

    def load(self) -> None:
        """Nothing to load."""

    def batch_key(self, request: BackendRequest) -> Hashable:
        return "instant"

    def run(self, batch: Sequence[BackendRequest]) -> list[BackendResult]:
        results: list[BackendResult] = []
        for request in batch:
            if not isinstance(request, TextRequest):
                raise TypeError(f"the instant backend serves text requests, not {type(request).__name__}")
            prompt_tokens = self.count_prompt_tokens(request)
            completion_tokens = min(self._completion_tokens, request.max_tokens)
            results.append(
                TextResult(
                    text=ANSWER_TEXT,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    finish_reason="stop" if completion_tokens == self._completion_tokens else "length",
                    work_units=float(prompt_tokens + completion_tokens),
                )
            )
        return results

    def synchronize(self) -> None:
        """Nothing runs asynchronously."""

    def close(self) -> None:
        """Nothing to release."""


# --- the two servers (run as `python -m bench.overhead --serve full|bare ...`) -----------------------


def event_loop_name() -> str:
    """The loop `run_event_loop(..., EVENT_LOOP)` runs on here, with its version: "uvloop 0.21.0"."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    return f"uvloop {uvloop.__version__}"


def full_settings(data_dir: Path, port: int = 0) -> Any:
    """The full stack's settings: keys, the SQLite ledger in `data_dir`, synthetic meter, the instant
    model with no batching wait (nothing to wait for: the wait would be latency the bare handler
    does not have, and it is configuration, not overhead)."""
    from proxy.config import ModelSettings, Settings

    model = ModelSettings(name=MODEL, task="text", source="bench:instant", max_wait_ms=0, max_queue=1024)
    return Settings.model_validate(
        {
            "host": "127.0.0.1",
            "port": port,
            "data_dir": data_dir,
            "cache_dir": data_dir / "cache",
            "meter": "synthetic",
            "auth": "keys",
            "log_level": "WARNING",
            "models": [model],
        }
    )


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_full(data_dir: Path, port: int) -> None:
    """The full stack, as `wattproxy serve` runs it (the same runner, no `_created` series), with the
    instant backend. On SIGTERM it drains and closes, so every record is committed, then writes its
    final metrics to `data_dir/METRICS_FILE` (a scrape during the run can precede the last records)."""
    from aiohttp import web
    from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest

    from proxy.app import create_app, make_runner
    from proxy.state import SCHEDULER

    disable_created_metrics()
    settings = full_settings(data_dir, port)
    registry = CollectorRegistry()
    app = create_app(settings, backends={MODEL: InstantBackend()}, registry=registry, freeze=True)
    runner = make_runner(app)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port).start()
    print_flush(f"full stack listening on {settings.host}:{settings.port}")
    await _until_signalled()
    await app[SCHEDULER].drain(30.0)
    await runner.cleanup()
    (data_dir / METRICS_FILE).write_bytes(generate_latest(registry))


async def serve_bare(answer_file: Path, port: int) -> None:
    """One handler that parses the JSON body and answers the captured bytes and `X-*` headers."""
    from aiohttp import web

    captured = json.loads(answer_file.read_text(encoding="utf-8"))
    body = captured["body"].encode("utf-8")
    headers = captured["headers"]

    async def chat(request: web.Request) -> web.Response:
        json.loads(await request.read())
        return web.Response(body=body, headers=headers)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post(CHAT_PATH, chat)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    gc.collect()  # what `wattproxy serve` does once set up (`proxy.app.freeze_heap`), here too
    gc.freeze()
    print_flush(f"bare handler listening on 127.0.0.1:{port}")
    await _until_signalled()
    await runner.cleanup()


@contextlib.contextmanager
def servers(tmp: Path) -> Iterator[tuple[dict[str, Service], str, dict[str, Any]]]:
    """Both servers, ready: ({target: service}, the API key, the full stack's first answer)."""
    running: dict[str, Service] = {}
    data_dir = tmp / "full"
    data_dir.mkdir()
    key = asyncio.run(_create_key(full_settings(data_dir).db_url(), USER))
    me = [sys.executable, "-m", f"bench.{NAME}"]
    try:
        port = free_port()
        running["full"] = start(
            "full", [*me, "--serve", "full", "--port", str(port), "--data-dir", str(data_dir)], port, tmp
        )
        wait_ready(running["full"], "/readyz", 120)
        answer = post(running["full"].url, key)
        if answer["status"] != 200 or "energy" not in json.loads(answer["body"]).get("usage", {}):
            raise RuntimeError(f"the full stack answered {answer['status']} without usage.energy: {answer}")
        answer_file = tmp / "answer.json"
        answer_file.write_text(json.dumps(answer), encoding="utf-8")
        port = free_port()
        running["bare"] = start(
            "bare", [*me, "--serve", "bare", "--port", str(port), "--answer", str(answer_file)], port, tmp
        )
        wait_ready(running["bare"], "/healthz", 60)
        bare = post(running["bare"].url, key)
        if bare["status"] != 200 or bare["body"] != answer["body"] or bare["headers"] != answer["headers"]:
            raise RuntimeError(f"the bare handler does not answer what the full stack did: {bare}")
        yield running, key, answer
    finally:
        for service in reversed(running.values()):
            service.stop()


def post(url: str, key: str) -> dict[str, Any]:
    """One chat request: its status, body text and the `X-*` and Content-Type headers of the answer
    (the bare handler sends the same ones, so both answers are the same size)."""
    req = urllib.request.Request(
        url + CHAT_PATH, data=json.dumps(REQUEST).encode(), headers=request_headers(key)
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        kept = {
            k: v for k, v in resp.headers.items() if k.lower().startswith("x-") or k.lower() == "content-type"
        }
        # the request id differs per request; the bare handler repeats the captured one (same length)
        return {"status": resp.status, "body": resp.read().decode("utf-8"), "headers": kept}


def request_headers(key: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}


# --- load ----------------------------------------------------------------------------------------------


def wrk_script(tmp: Path, key: str) -> Path:
    """wrk's Lua script: POST the chat request with the API key."""
    path = tmp / "post.lua"
    lua = ["wrk.method = 'POST'", f"wrk.body = {_lua_string(json.dumps(REQUEST))}"]
    lua += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in request_headers(key).items()]
    path.write_text("\n".join(lua) + "\n", encoding="utf-8")
    return path


def _lua_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


async def python_load(spec: dict[str, Any]) -> Measurement:
    """The fallback load generator: `concurrency` closed-loop aiohttp clients for `seconds`; each sends
    its next request when the previous one is answered and none starts after the deadline, so every
    request sent is answered and counted."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    body = json.dumps(REQUEST).encode()
    headers = request_headers(spec["key"])
    connector = aiohttp.TCPConnector(limit=spec["concurrency"])
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + spec["seconds"]

        async def client() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with session.post(spec["url"] + CHAT_PATH, data=body, headers=headers) as resp:
                    await resp.read()
                    errors += resp.status != 200
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(spec["concurrency"])))
        wall = time.perf_counter() - t0
    return Measurement(
        spec["target"],
        spec["concurrency"],
        len(latencies),
        errors,
        len(latencies) / wall,
        percentile(latencies, 50),
        percentile(latencies, 99),
    )


def run_python_load(
    url: str, key: str, target: str, concurrency: int, seconds: float, tmp: Path
) -> Measurement:
    """`python_load` in a process of its own (`python -m bench.overhead --load SPEC`)."""
    spec = {"url": url, "key": key, "target": target, "concurrency": concurrency, "seconds": seconds}
    spec_file = tmp / "load.json"
    spec_file.write_text(json.dumps(spec), encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", f"bench.{NAME}", "--load", str(spec_file)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    return Measurement(**json.loads(out.stdout))


@dataclass
class Run:
    measurements: list[Measurement] = field(default_factory=list)
    warmup: list[Measurement] = field(default_factory=list)

    def of(self, target: str, concurrency: int) -> list[Measurement]:
        return [m for m in self.measurements if m.target == target and m.concurrency == concurrency]


def measure(
    running: dict[str, Service],
    key: str,
    concurrencies: Sequence[int],
    seconds: float,
    rounds: int,
    warmup_s: float,
    wrk: str | None,
    tmp: Path,
) -> Run:
    """Each round: at each connection count, both servers back to back, in an order rotated by round
    and level. Any answer but 200 (or a socket error) fails the run."""
    script = wrk_script(tmp, key) if wrk else None

    def load(target: str, c: int, s: float) -> Measurement:
        url = running[target].url
        if wrk and script:
            m = run_wrk(wrk, script, url, target, c, s)
        else:
            m = run_python_load(url, key, target, c, s, tmp)
        if m.errors:
            raise RuntimeError(f"{target} at {c} connections: {m.errors} answers were not 200 (or failed)")
        return m

    run = Run()
    if warmup_s > 0:
        for target in TARGETS:
            run.warmup.append(load(target, max(concurrencies), warmup_s))
    for r in range(rounds):
        for i, c in enumerate(concurrencies):
            for target in rotated(TARGETS, r + i):
                m = load(target, c, seconds)
                run.measurements.append(m)
                print_flush(
                    f"round {r + 1} {target:4} c={c:<3} {m.rps:9.1f} req/s  p50 {m.p50_s * 1e3:7.3f} ms  "
                    f"p99 {m.p99_s * 1e3:7.3f} ms"
                )
    return run


# --- the full stack's books --------------------------------------------------------------------------


def answered_by_status(metrics_file: Path) -> dict[str, int]:
    """The full stack's own count of requests by status (`wattproxy_requests_total`), from the metrics
    it wrote when it stopped."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(metrics_file.read_text(encoding="utf-8")):
        if family.name == "wattproxy_requests":
            for sample in family.samples:
                if sample.name == "wattproxy_requests_total":
                    status = sample.labels["status"]
                    counts[status] = counts.get(status, 0) + int(sample.value)
    return counts


def ledger_by_status(db_path: Path) -> dict[str, int]:
    """Records in the full stack's SQLite ledger by status (read with plain sqlite3 after it stopped)."""
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT status, COUNT(*) FROM requests GROUP BY status").fetchall()
    return {str(status): int(n) for status, n in rows}


def check_books(run: Run, recorded: dict[str, int], answered: dict[str, int], wrk: bool) -> dict[str, Any]:
    """The ledger holds exactly one record per request the full stack answered or ran, and at least one
    per answer the load generator counted. wrk stops with up to `concurrency` requests in flight,
    which the server still runs and records: at most that many more records than counted answers."""
    full = [m for m in [*run.warmup, *run.measurements] if m.target == "full"]
    counted = 1 + sum(m.requests for m in full)  # + the answer captured for the bare handler
    in_flight_bound = sum(m.concurrency for m in full) if wrk else 0
    books = {
        "client_counted": counted,
        "in_flight_bound": in_flight_bound,
        "ledger": recorded,
        "ledger_total": sum(recorded.values()),
        "server_answered": answered,
    }
    problems = []
    for status in sorted(set(recorded) | set(answered)):
        if recorded.get(status, 0) != answered.get(status, 0):
            problems.append(
                f"{recorded.get(status, 0)} {status} records for {answered.get(status, 0)} answered"
            )
    if not counted <= recorded.get("ok", 0) <= books["ledger_total"] <= counted + in_flight_bound:
        problems.append(
            f"{books['ledger_total']} records for {counted} answers counted by the load generator"
        )
    if problems:
        raise RuntimeError("the full stack's ledger does not match its answers: " + "; ".join(problems))
    return books


# --- summary and Markdown ------------------------------------------------------------------------------


def summarize(run: Run, concurrencies: Sequence[int], rounds: int) -> dict[str, Any]:
    """Medians over rounds per server and level; ratios and differences taken within a round first."""
    per_target: dict[str, Any] = {}
    for target in TARGETS:
        per_target[target] = {
            str(c): {
                "rps": median(m.rps for m in run.of(target, c)),
                "p50_ms": median(m.p50_s for m in run.of(target, c)) * 1e3,
                "p99_ms": median(m.p99_s for m in run.of(target, c)) * 1e3,
                "requests": sum(m.requests for m in run.of(target, c)),
            }
            for c in concurrencies
        }
    compare: dict[str, Any] = {}
    for c in concurrencies:
        pairs = list(zip(run.of("full", c), run.of("bare", c), strict=True))
        ratios = [f.rps / b.rps for f, b in pairs]
        compare[str(c)] = {
            "rps_ratio": median(ratios),
            "rps_ratio_min": min(ratios),
            "rps_ratio_max": max(ratios),
            "added_p50_ms": median((f.p50_s - b.p50_s) * 1e3 for f, b in pairs),
            "added_p99_ms": median((f.p99_s - b.p99_s) * 1e3 for f, b in pairs),
        }
    return {"targets": per_target, "compare": compare, "rounds": rounds}


def verdict(summary: dict[str, Any], concurrencies: Sequence[int]) -> dict[str, Any]:
    ratios = [summary["compare"][str(c)]["rps_ratio"] for c in concurrencies]
    low = str(concurrencies[0])
    added = summary["compare"][low]["added_p50_ms"]
    return {
        "rps_ratio_min": min(ratios),
        "rps_ratio_met": min(ratios) >= TARGET_RPS_RATIO,
        "added_p50_ms": added,
        "added_p50_met": added < TARGET_ADDED_P50_MS,
    }


def render(
    summary: dict[str, Any],
    books: dict[str, Any],
    answer: dict[str, Any],
    info: dict[str, str],
    command: str,
    concurrencies: Sequence[int],
    seconds: float,
    load: str,
    smoke: bool,
    event_loop: str,
) -> str:
    targets, compare = summary["targets"], summary["compare"]
    cs = [str(c) for c in concurrencies]
    rps_table = md_table(
        ["server", *(f"{c} conn." for c in cs)],
        [
            *([LABELS[t], *(targets[t][c]["rps"] for c in cs)] for t in TARGETS),
            ["**ratio full / bare**", *(compare[c]["rps_ratio"] for c in cs)],
            [
                "ratio, lowest and highest round",
                *(f"{fmt(compare[c]['rps_ratio_min'])} to {fmt(compare[c]['rps_ratio_max'])}" for c in cs),
            ],
        ],
    )
    latency_table = md_table(
        ["server", *(f"{c} conn." for c in cs)],
        [
            *(
                [LABELS[t], *(f"{fmt(targets[t][c]['p50_ms'])} / {fmt(targets[t][c]['p99_ms'])}" for c in cs)]
                for t in TARGETS
            ),
            [
                "**added (full − bare)**",
                *(f"{fmt(compare[c]['added_p50_ms'])} / {fmt(compare[c]['added_p99_ms'])}" for c in cs),
            ],
        ],
    )
    low = cs[0]
    low_table = md_table(
        ["server", "p50 ms", "p99 ms"],
        [
            *([LABELS[t], targets[t][low]["p50_ms"], targets[t][low]["p99_ms"]] for t in TARGETS),
            ["**added (full − bare)**", compare[low]["added_p50_ms"], compare[low]["added_p99_ms"]],
        ],
    )
    books_table = md_table(
        ["count", "requests"],
        [
            ["answers the load generator counted (200 only)", books["client_counted"]],
            *([f"ledger records, status {s}", n] for s, n in sorted(books["ledger"].items())),
            *(
                [f"server's wattproxy_requests_total, status {s}", n]
                for s, n in sorted(books["server_answered"].items())
            ),
        ],
    )
    v = verdict(summary, concurrencies)
    body_bytes = len(answer["body"].encode("utf-8"))
    parts = [
        f"## Proxy overhead: the full stack vs a bare aiohttp handler, no generation (bench/{NAME}.py)",
        "",
        status_marker(NAME, "smoke" if smoke else "ok"),
        "",
    ]
    if smoke:
        parts += ["**Smoke run (1 s per level): the figures prove the code path, not the speed.**", ""]
    parts += [
        f"Command: `{command}`",
        "",
        machine_markdown(info),
        "",
        "- Full stack (one process): `create_app` as `wattproxy serve` runs it, with an instant text backend "
        "(a real `Backend` answering a fixed short completion at once, with work units; no model): API key "
        "auth (a key stored in the ledger), pydantic validation and limits, budget admission, the model's "
        "queue and batcher (`max_batch_size` 8, `max_wait_ms` 0), the device worker thread with the "
        "synthetic meter's reads around each job, attribution, carbon, the SQLite ledger's group commit "
        "(committed before the answer), Prometheus metrics, `usage.energy` and the `X-Energy-*` headers.",
        "- Bare handler (one process): an aiohttp app whose one handler parses the JSON body and answers the "
        f"bytes the full stack answered the same request with ({body_bytes} bytes of JSON, the same `X-*` "
        "headers), captured from it at the start and checked identical.",
        f"- Event loop: both servers run on the one `wattproxy serve` uses by default ({event_loop} here: "
        '`run_event_loop` in proxy/cli.py with `event_loop = "auto"`, uvloop where it is installed), so '
        "that neither has a faster loop than the other. Both set their heap aside from the cyclic garbage "
        "collector once set up (`gc.freeze()`, as `wattproxy serve` does: `proxy.app.freeze_heap`).",
        f"- Load: {load}; {seconds:g} s per server and level, {summary['rounds']} round(s); at each level "
        "both servers back to back in an order rotated by round and level. Figures are medians over "
        "rounds; ratios and added latencies are taken within a round, then the median. Every answer was "
        "200 (any other fails the run).",
        f"- The machine has {info['nproc']} cores: the load generator's thread takes one, the server under "
        "test the other (its event loop; the full stack's device worker, ledger writer and meter sampler "
        "threads share that core with it). The requests/s are therefore bounded by one core per server.",
        "",
        f"### Requests per second (target: full / bare at least {TARGET_RPS_RATIO:g})",
        "",
        rps_table,
        "",
        f"### Latency at {low} connection (target: added p50 under {TARGET_ADDED_P50_MS:g} ms)",
        "",
        low_table,
        "",
        "Latency p50 / p99 (ms) at each level:",
        "",
        latency_table,
        "",
        "### The full stack's books",
        "",
        books_table,
        "",
        "Every request the full stack answered has its ledger record (read with sqlite3 after the server "
        "stopped), and there are as many records as its own `wattproxy_requests_total`. "
        + (
            f"wrk stops with requests in flight, which the server still runs and records (at most "
            f"{books['in_flight_bound']:,} here), so there may be more records than counted answers."
            if books["in_flight_bound"]
            else "The fallback load generator lets every request it sent finish, so the counts are equal."
        ),
        "",
        f"Targets (issue 8, target 2): requests/s at least {TARGET_RPS_RATIO:g}x the bare handler's at every "
        f"level: lowest ratio {fmt(v['rps_ratio_min'])}, {'met' if v['rps_ratio_met'] else 'not met'}; "
        f"added p50 under {TARGET_ADDED_P50_MS:g} ms at {low} connection: {fmt(v['added_p50_ms'])} ms, "
        f"{'met' if v['added_p50_met'] else 'not met'}.",
    ]
    return "\n".join(parts) + "\n"


# --- main ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument("--concurrency", default=None, help="comma-separated connections (default 1,8,32,64)")
    parser.add_argument(
        "--seconds", type=float, default=None, help="per server and level (default 3; whole s with wrk)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; 1 with --smoke)")
    parser.add_argument("--no-wrk", action="store_true", help="use the Python load generator even with wrk")
    parser.add_argument("--serve", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--answer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--load", type=Path, metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve == "full":
        import logging

        from proxy.cli import run_event_loop

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        run_event_loop(serve_full(args.data_dir, args.port), EVENT_LOOP)
        return 0
    if args.serve == "bare":
        from proxy.cli import run_event_loop

        run_event_loop(serve_bare(args.answer, args.port), EVENT_LOOP)
        return 0
    if args.load is not None:
        m = asyncio.run(python_load(json.loads(args.load.read_text(encoding="utf-8"))))
        print(json.dumps(asdict(m)))
        return 0

    concurrencies = [int(c) for c in (args.concurrency or ("1,4" if args.smoke else "1,8,32,64")).split(",")]
    seconds = args.seconds or (1.0 if args.smoke else 3.0)
    rounds = args.rounds or (1 if args.smoke else 3)
    warmup_s = 0.0 if args.smoke else 1.0
    wrk = None if args.no_wrk else shutil.which("wrk")
    load = (
        "`wrk -t1 --latency` (one thread; a Lua script POSTs the chat request with the API key)"
        if wrk
        else "closed-loop aiohttp clients in a process of their own (wrk "
        + ("not used: `--no-wrk`" if args.no_wrk else "not installed")
        + "); the Python client's own cost is in every figure, which narrows the differences"
    )
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="wattproxy-bench-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        with servers(tmp) as (running, key, answer):
            run = measure(running, key, concurrencies, seconds, rounds, warmup_s, wrk, tmp)
        full_dir = tmp / "full"  # the full stack has stopped: its records are committed, its metrics written
        recorded = ledger_by_status(full_dir / "wattproxy.db")
        books = check_books(run, recorded, answered_by_status(full_dir / METRICS_FILE), wrk is not None)
    summary = summarize(run, concurrencies, rounds)
    command = reproduce_command(f"bench.{NAME}", sys.argv[1:] if argv is None else argv)
    event_loop = event_loop_name()
    markdown = render(
        summary, books, answer, info, command, concurrencies, seconds, load, args.smoke, event_loop
    )
    data = {
        "benchmark": NAME,
        "smoke": args.smoke,
        "machine": info,
        "command": command,
        "settings": {
            "concurrency": concurrencies,
            "seconds": seconds,
            "rounds": rounds,
            "warmup_s": warmup_s,
            "load": load,
            "load_generator": "wrk" if wrk else "python",
            "event_loop": event_loop,
        },
        "answer_bytes": len(answer["body"].encode("utf-8")),
        "books": books,
        "summary": summary,
        "verdict": verdict(summary, concurrencies),
        "measurements": [asdict(m) for m in run.measurements],
        "warmup": [asdict(m) for m in run.warmup],
    }
    md_path, _ = write_result(args.out, NAME, markdown, data)
    print(markdown)
    print_flush(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
