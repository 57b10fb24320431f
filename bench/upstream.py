"""Proxy mode's overhead: added latency and requests/s through WattProxy in front of an OpenAI-shaped
upstream that answers at once, side by side in one run with LiteLLM's proxy in front of the same one;
then streamed chats through both (the stub streaming as fast as it can), and through WattProxy in front
of a second stub that streams at a decoding server's pace (its CPU per event sent on).

    python -m bench.upstream --out bench/results      # full run (about 11 minutes)
    python -m bench.upstream --smoke                  # a few requests, times nothing

Processes: the stub upstream (aiohttp; a fixed chat completion with usage, built once), an aiohttp
forwarder in front of it that does nothing but forward (the floor of a proxy built on aiohttp's server
and client, as issue 9 asks: what no accounting can be measured against), WattProxy
(`python -m proxy serve --upstream ...`: auth none, synthetic meter on cuda:0, the default SQLite
ledger in a temporary directory, so every request is accounted and durably committed before it is
answered), the same with its ledger on /dev/shm where there is one (a commit without a disk fsync:
the difference is the durable commit's cost), LiteLLM's proxy (`litellm --model openai/... --api_base
...`, no database, no master key), and the load generator: `wrk` (one thread; `apt-get install wrk`)
where it is installed, else closed-loop aiohttp clients. The targets (the stub called directly, the
forwarder, WattProxy, LiteLLM) are measured in rounds, in rotated order; each figure is the median over
rounds.
Added latency = a proxy's percentile minus the direct call's percentile in the same round.

LiteLLM pins many packages, so it lives in a virtual environment of its own, found on PATH or at
bench/_work/litellm (ignored by git), or named with `--litellm`:

    python3 -m venv bench/_work/litellm && bench/_work/litellm/bin/pip install 'litellm[proxy]'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    REPO_ROOT,
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

NAME = "upstream"
MODEL = "stub-model"
CHAT_PATH = "/v1/chat/completions"
REQUEST = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "How much energy does this request use?"}],
    "max_tokens": 16,
}
ANSWER = {
    "id": "chatcmpl-stub",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": MODEL,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "About one tenth of a joule on this stub."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22},
}
TARGETS = ("direct", "forwarder", "wattproxy", "wattproxy_shm", "litellm")
# Streaming: the stub streams token chunks (a role chunk first, then a finish chunk, a usage chunk and
# [DONE]), each written on its own: STREAM_TOKENS as fast as it can ("burst": the proxy is the
# bottleneck), or one every PACE_MS ("paced": a decoding upstream; then what counts is the proxy's CPU),
# STREAM_TOKENS / 2 to 3 x STREAM_TOKENS / 2 of them (streams of one length would end together).
STREAM_TOKENS = 64
STREAM_EVENTS = STREAM_TOKENS + 4  # what a client receives: role, tokens, finish, usage, [DONE]
STATS_PATH = "/stub/stats"  # the stub's count of the events it has written
PACE_MS = 10.0  # 100 tokens/s a stream
STREAM_REQUEST = {
    **REQUEST,
    "max_tokens": STREAM_TOKENS,
    "stream": True,
    "stream_options": {"include_usage": True},
}
STREAM_TARGETS = ("direct", "wattproxy", "litellm")
PACED_TARGETS = ("direct_paced", "wattproxy_paced")
PACED_CONCURRENCY = 64
TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")  # the resolution of /proc's CPU times
IDLE_S = 2.0  # how long the paced WattProxy's CPU is measured with nothing to do, each round
TARGET_ADDED_MS = 1.0  # issue 9: WattProxy's added latency at one connection (p50), ms
TARGET_RPS_RATIO = 20.0  # issue 9: WattProxy's requests/s over LiteLLM's
SHM = Path("/dev/shm")  # a RAM disk where there is one: a ledger there commits without a disk fsync
# Where LiteLLM is looked for when `--litellm` is not given and none is on PATH (bench/_work is ignored
# by git): python3 -m venv bench/_work/litellm && bench/_work/litellm/bin/pip install 'litellm[proxy]'
LITELLM_VENV = REPO_ROOT / "bench" / "_work" / "litellm"


# --- the stub upstream (run as `python -m bench.upstream --serve-stub PORT`) ---------------------------


def stream_events(tokens: int) -> tuple[bytes, bytes, bytes, bytes]:
    """The stub's stream, as server-sent events: the role chunk, a token chunk, the finish chunk and
    the usage chunk (of `tokens` tokens), in vLLM's shape."""

    def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice]}

    base = {
        "id": "chatcmpl-stub",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
    }
    usage = {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}
    return tuple(  # type: ignore[return-value]
        b"data: " + json.dumps(c).encode() + b"\n\n"
        for c in (
            chunk({"role": "assistant", "content": ""}, None),
            chunk({"content": " word"}, None),
            chunk({}, "length"),
            {**base, "choices": [], "usage": usage},
        )
    )


def serve_stub(port: int, pace_s: float = 0.0) -> None:
    """An OpenAI-shaped upstream that answers every chat completion at once with the same bytes, and a
    streamed one with `STREAM_TOKENS` token chunks as fast as it can, or, with `pace_s`, from half to one
    and a half times as many, paced as a continuous-batching server's decode steps: every `pace_s`, each
    stream in flight gets its next token at once. GET `STATS_PATH` counts the events written."""
    from aiohttp import web

    answer = json.dumps(ANSWER).encode()
    models = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode()
    role, token, finish, _ = stream_events(STREAM_TOKENS)
    lengths = random.Random(port)  # paced streams' lengths: reproducible for a port
    written = [0]  # events written, for the benchmark's CPU per event

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if b'"stream": true' not in body and b'"stream":true' not in body:  # no JSON parse on this path
            return web.Response(body=answer, content_type="application/json")
        tokens = lengths.randint(STREAM_TOKENS // 2, 3 * STREAM_TOKENS // 2) if pace_s else STREAM_TOKENS
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(role)
        for _ in range(tokens):
            if pace_s:
                await step[0]  # the next decode step
            await resp.write(token)
        await resp.write(finish)
        written[0] += tokens + 3
        if b'"include_usage": true' in body or b'"include_usage":true' in body:
            await resp.write(stream_events(tokens)[3])
            written[0] += 1
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"events": written[0]})

    async def list_models(request: web.Request) -> web.Response:
        return web.Response(body=models, content_type="application/json")

    step: list[asyncio.Future[None]] = []  # done at the next decode step

    async def steps(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        step.append(loop.create_future())

        async def tick() -> None:
            while True:
                await asyncio.sleep(pace_s)
                done, step[0] = step[0], loop.create_future()
                done.set_result(None)

        ticker = asyncio.create_task(tick())
        yield
        ticker.cancel()

    app = web.Application()
    app.router.add_post(CHAT_PATH, chat)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get(STATS_PATH, stats)
    if pace_s:
        app.cleanup_ctx.append(steps)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, handle_signals=True)


def serve_forwarder(port: int, upstream: str) -> None:
    """The floor of a proxy built as issue 9 asks (an aiohttp server, one shared aiohttp client session):
    each chat is read, POSTed to `upstream` as it came, and its answer's bytes sent back. No validation,
    no accounting, no ledger. On the event loop `wattproxy serve` picks (uvloop where installed)."""
    from aiohttp import ClientSession, ClientTimeout, DummyCookieJar, TCPConnector, web

    from proxy.cli import run_event_loop

    async def main() -> None:
        session = ClientSession(
            connector=TCPConnector(limit=0),
            cookie_jar=DummyCookieJar(),
            timeout=ClientTimeout(total=None, sock_read=60),
        )

        async def forward(request: web.Request) -> web.Response:
            body = await request.read()
            async with session.post(
                upstream + request.path, data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                answer = await resp.read()
                return web.Response(body=answer, status=resp.status, content_type="application/json")

        async def list_models(request: web.Request) -> web.Response:
            async with session.get(upstream + request.path) as resp:
                return web.Response(
                    body=await resp.read(), status=resp.status, content_type="application/json"
                )

        app = web.Application()
        app.router.add_post(CHAT_PATH, forward)
        app.router.add_get("/v1/models", list_models)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()
        await session.close()

    run_event_loop(main(), "auto")


# --- processes -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    """A server process on a localhost port."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start(name: str, cmd: Sequence[str], port: int, logs: Path, env: dict[str, str] | None = None) -> Service:
    log_path = logs / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(cmd), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    return Service(name, port, process, log_path)


def wait_ready(service: Service, path: str, timeout_s: float) -> None:
    """Poll `path` until it answers 200 (the process must stay alive meanwhile)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            tail = service.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{service.name} exited with {service.process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(service.url + path, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{service.name} was not ready within {timeout_s:.0f} s")


def find_litellm() -> Path | None:
    """LiteLLM's `litellm` executable: on PATH, else in `LITELLM_VENV`; None where there is none."""
    if found := shutil.which("litellm"):
        return Path(found)
    candidate = LITELLM_VENV / "bin" / "litellm"
    return candidate if candidate.exists() else None


def litellm_version(executable: Path) -> str:
    python = executable.parent / "python"
    try:
        out = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


@contextlib.contextmanager
def services(litellm: Path | None, tmp: Path, shm: Path | None) -> Iterator[dict[str, Service]]:
    """The stub, WattProxy in front of it, and (when given) LiteLLM in front of it; all ready. With
    `shm` (a directory on a RAM disk), a second WattProxy keeps its ledger there."""
    running: dict[str, Service] = {}
    try:
        stub_port = free_port()
        running["direct"] = start(
            "stub", [sys.executable, "-m", "bench.upstream", "--serve-stub", str(stub_port)], stub_port, tmp
        )
        wait_ready(running["direct"], "/v1/models", 60)
        stub_url = running["direct"].url
        paced_port = free_port()
        paced_cmd = [sys.executable, "-m", "bench.upstream", "--serve-stub", str(paced_port)]
        running["direct_paced"] = start(
            "stub_paced", [*paced_cmd, "--pace-ms", str(PACE_MS)], paced_port, tmp
        )
        wait_ready(running["direct_paced"], "/v1/models", 60)
        forwarder_port = free_port()
        running["forwarder"] = start(
            "forwarder",
            [sys.executable, "-m", "bench.upstream", "--serve-forwarder", str(forwarder_port), stub_url],
            forwarder_port,
            tmp,
        )
        wait_ready(running["forwarder"], "/v1/models", 60)
        for target, data_dir, upstream_url in (
            ("wattproxy", tmp / "wattproxy", stub_url),
            ("wattproxy_shm", shm, stub_url),
            ("wattproxy_paced", tmp / "wattproxy_paced", running["direct_paced"].url),
        ):
            if data_dir is None:
                continue
            port = free_port()
            wattproxy_cmd = [
                *(
                    sys.executable,
                    "-m",
                    "proxy",
                    "serve",
                    "--upstream",
                    upstream_url,
                    "--upstream-devices",
                    "0",
                ),
                *("--auth", "none", "--meter", "synthetic", "--port", str(port), "--data-dir", str(data_dir)),
                *("--cache-dir", str(tmp / "cache"), "--log-level", "WARNING"),
            ]
            running[target] = start(target, wattproxy_cmd, port, tmp)
            wait_ready(running[target], "/readyz", 120)
        if litellm is not None:
            port = free_port()
            litellm_cmd = [
                *(str(litellm), "--model", f"openai/{MODEL}", "--api_base", stub_url + "/v1"),
                *("--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"),
            ]
            env = {
                "OPENAI_API_KEY": "sk-bench",
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "LITELLM_LOG": "ERROR",
                # no master key, so no auth: like WattProxy's --auth none here
                "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
            }
            running["litellm"] = start("litellm", litellm_cmd, port, tmp, env)
            wait_ready(running["litellm"], "/health/liveliness", 180)
        yield running
    finally:
        for service in reversed(running.values()):
            service.stop()


# --- load --------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One target at one concurrency for one stretch of time. Units: s, requests/s."""

    target: str
    concurrency: int
    requests: int
    errors: int
    rps: float
    p50_s: float
    p99_s: float
    cpu_s: float = math.nan  # the target's processes' CPU over the measurement (streams only)
    events: int = 0  # stream events the stub wrote over the measurement (streams only)


_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _duration_s(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS_S[m.group(2)]


def parse_wrk(output: str, target: str, concurrency: int) -> Measurement:
    """Requests/s, the 50th and 99th latency percentiles and errors from `wrk --latency` output."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    p50 = _duration_s(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    p99 = _duration_s(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output):
        errors += sum(int(x) for x in m.groups())
    return Measurement(target, concurrency, requests, errors, rps, p50, p99)


def wrk_script(tmp: Path, request: dict[str, Any] = REQUEST, name: str = "post.lua") -> Path:
    """A wrk Lua script that POSTs `request` as JSON."""
    path = tmp / name
    body = json.dumps(request).replace("\\", "\\\\").replace("'", "\\'")
    path.write_text(
        f"wrk.method = 'POST'\nwrk.body = '{body}'\nwrk.headers['Content-Type'] = 'application/json'\n"
        "wrk.headers['Authorization'] = 'Bearer sk-bench'\n",
        encoding="utf-8",
    )
    return path


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants, from /proc (NaN where there is none)."""
    proc = Path("/proc")
    if not (proc / str(pid)).is_dir():
        return math.nan
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        child = int(stat.parent.name)
        parents[child] = int(fields[1])
        ticks[child] = int(fields[11]) + int(fields[12])  # utime, stime
    tree, grew = {pid}, True
    while grew:
        more = {c for c, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(ticks.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


def run_wrk(wrk: str, script: Path, url: str, target: str, concurrency: int, seconds: float) -> Measurement:
    cmd = [
        wrk,
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(script),
    ]
    out = subprocess.run(
        [*cmd, url + CHAT_PATH], capture_output=True, text=True, timeout=seconds + 60, check=True
    )
    return parse_wrk(out.stdout, target, concurrency)


async def run_aiohttp(
    url: str, target: str, concurrency: int, seconds: float, request: dict[str, Any] = REQUEST
) -> Measurement:
    """The fallback load generator: `concurrency` closed-loop clients for `seconds` (each answer read
    to its end)."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    body = json.dumps(request).encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with session.post(url + CHAT_PATH, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return Measurement(
        target,
        concurrency,
        len(latencies),
        errors,
        len(latencies) / wall,
        percentile(latencies, 50),
        percentile(latencies, 99),
    )


def check_answers(running: dict[str, Service]) -> dict[str, Any]:
    """One request to each target: every one answers 200 with a choice; WattProxy adds usage.energy."""
    import urllib.request

    seen: dict[str, Any] = {}
    for target, service in running.items():
        req = urllib.request.Request(
            service.url + CHAT_PATH,
            data=json.dumps(REQUEST).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer sk-bench"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = json.loads(resp.read())
        if not body.get("choices"):
            raise RuntimeError(f"{target} answered without choices: {body}")
        seen[target] = body.get("usage")
    for target in ("wattproxy", "wattproxy_shm"):
        energy = (seen.get(target) or {}).get("energy") or {}
        if target in seen and (energy.get("measurement") != "synthetic-timeline" or not energy["joules"] > 0):
            raise RuntimeError(f"WattProxy's answer has no usage.energy: {seen[target]}")
    return seen


def ledger_requests(data_dir: Path) -> int:
    """The number of requests WattProxy's ledger holds (read with `wattproxy usage` after it stopped)."""
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "usage", "--data-dir", str(data_dir), "--format", "json"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(json.loads(out.stdout)["total"]["requests"])


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class Run:
    measurements: list[Measurement] = field(default_factory=list)
    idle_cpu_s_per_s: list[float] = field(default_factory=list)  # a WattProxy's CPU with no request

    def of(self, target: str, concurrency: int) -> list[Measurement]:
        return [m for m in self.measurements if m.target == target and m.concurrency == concurrency]


def measure(
    running: dict[str, Service],
    concurrencies: Sequence[int],
    seconds: float,
    rounds: int,
    wrk: str | None,
    tmp: Path,
) -> Run:
    run = Run()
    script = wrk_script(tmp) if wrk else None
    targets = [t for t in TARGETS if t in running]
    for r in range(rounds):
        for target in rotated(targets, r):
            url = running[target].url
            for c in concurrencies:
                if wrk and script:
                    m = run_wrk(wrk, script, url, target, c, seconds)
                else:
                    m = asyncio.run(run_aiohttp(url, target, c, seconds))
                run.measurements.append(m)
                print_flush(
                    f"round {r + 1} {target:9} c={c:<3} {m.rps:9.1f} req/s  p50 {m.p50_s * 1e3:7.3f} ms  "
                    f"p99 {m.p99_s * 1e3:7.3f} ms  errors {m.errors}"
                )
    return run


def measure_streams(
    running: dict[str, Service],
    concurrencies: Sequence[int],
    paced_concurrency: int,
    seconds: float,
    rounds: int,
    wrk: str | None,
    tmp: Path,
) -> Run:
    """Streamed chats: the burst stub at each concurrency (direct, WattProxy, LiteLLM), and the paced
    stub at `paced_concurrency` (direct, WattProxy); with the CPU each proxy's processes used."""
    import urllib.request

    def written(stub: Service) -> int:
        with urllib.request.urlopen(stub.url + STATS_PATH, timeout=10) as resp:
            return int(json.loads(resp.read())["events"])

    run = Run()
    script = wrk_script(tmp, STREAM_REQUEST, "stream.lua") if wrk else None
    plan = [(t, c) for t in STREAM_TARGETS if t in running for c in concurrencies]
    plan += [(t, paced_concurrency) for t in PACED_TARGETS if t in running]
    for r in range(rounds):
        for target, c in rotated(plan, r):
            service = running[target]
            if target == "wattproxy_paced":  # its CPU with nothing to do (the sampler's ticks), first
                cpu0 = cpu_seconds(service.process.pid)
                time.sleep(IDLE_S)
                run.idle_cpu_s_per_s.append((cpu_seconds(service.process.pid) - cpu0) / IDLE_S)
            stub = running["direct_paced" if target in PACED_TARGETS else "direct"]
            events0, cpu0 = written(stub), cpu_seconds(service.process.pid)
            if wrk and script:
                m = run_wrk(wrk, script, service.url, target, c, seconds)
            else:
                m = asyncio.run(run_aiohttp(service.url, target, c, seconds, STREAM_REQUEST))
            if not target.startswith("direct"):
                m.cpu_s = cpu_seconds(service.process.pid) - cpu0
            m.events = written(stub) - events0
            run.measurements.append(m)
            print_flush(
                f"round {r + 1} stream {target:15} c={c:<3} {m.rps:8.1f} streams/s  "
                f"p50 {m.p50_s * 1e3:8.3f} ms  cpu {m.cpu_s:6.2f} s  errors {m.errors}"
            )
    return run


def summarize_streams(run: Run, concurrencies: Sequence[int], paced_concurrency: int) -> dict[str, Any]:
    """Medians over rounds: streams/s, events/s, time to the last byte, CPU µs per event sent on."""
    out: dict[str, Any] = {"burst": {}, "paced": {}}
    for kind, targets, cs in (
        ("burst", STREAM_TARGETS, concurrencies),
        ("paced", PACED_TARGETS, [paced_concurrency]),
    ):
        for target in targets:
            per_c: dict[str, Any] = {}
            for c in cs:
                ms = run.of(target, c)
                if not ms:
                    continue
                direct = run.of("direct" if kind == "burst" else "direct_paced", c)
                row: dict[str, Any] = {
                    "streams_per_s": median(m.rps for m in ms),
                    "events_per_s": median(m.events * m.rps / m.requests for m in ms if m.requests),
                    "p50_ms": median(m.p50_s for m in ms) * 1e3,
                    "p99_ms": median(m.p99_s for m in ms) * 1e3,
                    "streams": sum(m.requests for m in ms),
                    "errors": sum(m.errors for m in ms),
                }
                if not target.startswith("direct"):
                    row["cpu_us_per_event"] = median(m.cpu_s / m.events * 1e6 for m in ms if m.events)
                    row["added_p50_ms"] = median(
                        (m.p50_s - d.p50_s) * 1e3 for m, d in zip(ms, direct, strict=True)
                    )
                per_c[str(c)] = row
            if per_c:
                out[kind][target] = per_c
    if run.idle_cpu_s_per_s:
        out["idle_cpu_ms_per_s"] = median(run.idle_cpu_s_per_s) * 1e3
    burst = out["burst"]
    if "litellm" in burst and "wattproxy" in burst:
        out["ratios"] = {
            str(c): median(
                a.rps / b.rps
                for a, b in zip(run.of("wattproxy", c), run.of("litellm", c), strict=True)
                if b.rps > 0
            )
            for c in concurrencies
        }
    return out


def summarize(run: Run, concurrencies: Sequence[int], rounds: int) -> dict[str, Any]:
    """Medians over rounds per target and concurrency; added latency taken within each round first."""
    targets = sorted({m.target for m in run.measurements}, key=TARGETS.index)
    out: dict[str, Any] = {"targets": {}, "ratios": {}}
    for target in targets:
        per_c: dict[str, Any] = {}
        for c in concurrencies:
            ms = run.of(target, c)
            direct = run.of("direct", c)
            row: dict[str, Any] = {
                "rps": median(m.rps for m in ms),
                "p50_ms": median(m.p50_s for m in ms) * 1e3,
                "p99_ms": median(m.p99_s for m in ms) * 1e3,
                "requests": sum(m.requests for m in ms),
                "errors": sum(m.errors for m in ms),
            }
            if target != "direct":
                row["added_p50_ms"] = median(
                    (m.p50_s - d.p50_s) * 1e3 for m, d in zip(ms, direct, strict=True)
                )
                row["added_p99_ms"] = median(
                    (m.p99_s - d.p99_s) * 1e3 for m, d in zip(ms, direct, strict=True)
                )
            per_c[str(c)] = row
        out["targets"][target] = per_c
    if "litellm" in out["targets"]:
        for c in concurrencies:
            w, lite = run.of("wattproxy", c), run.of("litellm", c)
            out["ratios"][str(c)] = {
                "rps_wattproxy_over_litellm": median(
                    a.rps / b.rps for a, b in zip(w, lite, strict=True) if b.rps > 0
                ),
                "added_p50_litellm_over_wattproxy": None,
            }
            if "forwarder" in out["targets"]:
                f = run.of("forwarder", c)
                out["ratios"][str(c)]["rps_forwarder_over_litellm"] = median(
                    a.rps / b.rps for a, b in zip(f, lite, strict=True) if b.rps > 0
                )
            added_w = out["targets"]["wattproxy"][str(c)]["added_p50_ms"]
            added_l = out["targets"]["litellm"][str(c)]["added_p50_ms"]
            if added_w > 0:
                out["ratios"][str(c)]["added_p50_litellm_over_wattproxy"] = added_l / added_w
    out["rounds"] = rounds
    return out


LABELS = {
    "direct": "stub, called directly",
    "forwarder": "aiohttp forwarder, no accounting (the floor)",
    "wattproxy": "WattProxy",
    "wattproxy_shm": "WattProxy, ledger on /dev/shm",
    "litellm": "LiteLLM proxy",
    "direct_paced": "paced stub, called directly",
    "wattproxy_paced": "WattProxy in front of the paced stub",
}


def render_streams(
    streams: dict[str, Any], concurrencies: Sequence[int], paced_concurrency: int
) -> list[str]:
    burst_rows = [
        [
            LABELS[t],
            *(
                f"{fmt(per_c[str(c)]['streams_per_s'])} / {fmt(per_c[str(c)]['p50_ms'])}"
                + (
                    f" / {fmt(per_c[str(c)]['cpu_us_per_event'])}"
                    if "cpu_us_per_event" in per_c[str(c)]
                    else ""
                )
                for c in concurrencies
            ),
        ]
        for t in STREAM_TARGETS
        if (per_c := streams["burst"].get(t))
    ]
    paced_rows = [
        [
            LABELS[t],
            row["streams"],
            row["p50_ms"],
            row["p99_ms"],
            row.get("added_p50_ms", "-"),
            row.get("cpu_us_per_event", "-"),
            row["errors"],
        ]
        for t in PACED_TARGETS
        if (row := streams["paced"].get(t, {}).get(str(paced_concurrency)))
    ]
    parts = [
        "",
        "### Streaming",
        "",
        f"Each streamed chat (`stream: true`, usage included) is {STREAM_EVENTS} events: a role chunk, "
        f"{STREAM_TOKENS} token chunks, a finish chunk, a usage chunk and [DONE], about 200 bytes each. "
        "WattProxy reads every event (tokens counted, usage held and sent on with its energy) and sends "
        "it on; the ledger records each stream. CPU is the proxy's processes' (user + system, from "
        "/proc) over the measurement, per event sent on.",
        "",
        "Burst: the stub writes its events as fast as it can, so the proxy is the bottleneck. Where "
        "events arrive faster than WattProxy sends them on, it sends on all that are waiting in one "
        "write; with a decoding upstream (below) that rarely happens. Streams/s / p50 ms to the last "
        "byte / CPU µs per event:",
        "",
        md_table(["target", *(f"{c} conn." for c in concurrencies)], burst_rows),
    ]
    if streams.get("ratios"):
        ratios = ", ".join(f"{fmt(r)}x at {c}" for c, r in streams["ratios"].items())
        parts += ["", f"WattProxy / LiteLLM, streams/s: {ratios}."]
    if paced_rows:
        parts += [
            "",
            f"Paced: a second stub paces its streams as a continuous-batching server's decode steps: every "
            f"{PACE_MS:g} ms each stream in flight gets its next token chunk ({1000 / PACE_MS:g} tokens/s a "
            f"stream), {STREAM_TOKENS // 2} to {3 * STREAM_TOKENS // 2} of them a stream ({STREAM_TOKENS} on "
            f"average, so that streams end at different times), {paced_concurrency} streams at once; a "
            "second WattProxy in front of it. The "
            "throughput is the stub's; what the proxy costs is its added time to the last byte and its CPU:",
            "",
            md_table(
                ["target", "streams", "p50 ms", "p99 ms", "added p50 ms", "CPU µs per event", "errors"],
                paced_rows,
            ),
        ]
        if "idle_cpu_ms_per_s" in streams:
            parts += [
                "",
                "The CPU per event includes what the proxy spends with nothing to do (its meter's "
                f"sampler): {fmt(streams['idle_cpu_ms_per_s'])} ms of CPU a second, measured for "
                f"{IDLE_S:g} s before each paced run (/proc counts CPU in ticks of {TICK_MS:g} ms).",
                "",
                "The added time to the last byte is the stream's settlement: token chunks are sent on as "
                "they come, and the usage chunk and [DONE] once the stream's energy is final and recorded. "
                "Its last piece is final once the other streams' pieces open across its end have closed "
                "(each closes within `split_interval_s` x 1.5, 0.15 s; where streams end together, as "
                "streams of one length started together do, the wait is shorter).",
            ]
    return parts


def render(
    summary: dict[str, Any],
    info: dict[str, str],
    command: str,
    concurrencies: Sequence[int],
    seconds: float,
    load: str,
    litellm: str,
    ledger: dict[str, int],
    smoke: bool,
    streams: dict[str, Any] | None = None,
    paced_concurrency: int = PACED_CONCURRENCY,
) -> str:
    # in the fixed orders (a summary read back from JSON has its keys sorted)
    targets = {t: summary["targets"][t] for t in TARGETS if t in summary["targets"]}
    ratios = {str(c): summary["ratios"][str(c)] for c in concurrencies if str(c) in summary["ratios"]}
    latency_rows = []
    for target, per_c in targets.items():
        row = per_c[str(concurrencies[0])]
        latency_rows.append(
            [
                LABELS[target],
                row["p50_ms"],
                row["p99_ms"],
                row.get("added_p50_ms", "-"),
                row.get("added_p99_ms", "-"),
                row["errors"],
            ]
        )
    latency_table = md_table(
        ["target", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "errors"], latency_rows
    )
    rps_headers = ["target", *(f"req/s at {c} conn." for c in concurrencies)]
    rps_rows = [[LABELS[t], *(per_c[str(c)]["rps"] for c in concurrencies)] for t, per_c in targets.items()]
    added_rows = [
        [
            LABELS[t],
            *(
                f"{fmt(per_c[str(c)]['added_p50_ms'])} / {fmt(per_c[str(c)]['added_p99_ms'])}"
                for c in concurrencies
            ),
        ]
        for t, per_c in targets.items()
        if t != "direct"
    ]
    parts = [
        f"## Proxy mode: added latency and requests/s, WattProxy vs LiteLLM (bench/{NAME}.py)",
        "",
        status_marker(NAME, "smoke" if smoke else "ok"),
        "",
    ]
    if smoke:
        parts += ["**Smoke run (a few requests): the figures prove the code path, not the speed.**", ""]
    parts += [
        f"Command: `{command}`",
        "",
        machine_markdown(info),
        "",
        "- Upstream: an aiohttp stub on localhost that answers every chat completion at once with the same "
        "fixed body (with usage). Both proxies forward to it; the stub is also called directly.",
        *(
            [
                "- aiohttp forwarder (the floor): `python -m bench.upstream --serve-forwarder`, an aiohttp "
                "server on the same event loop as WattProxy's whose one handler reads the request, POSTs it "
                "to the stub with one shared aiohttp client session (as issue 9 asks of the upstream "
                "backend) and sends the answer's bytes back: no validation, accounting, ledger or metrics. "
                "No proxy built that way answers faster here."
            ]
            if "forwarder" in summary["targets"]
            else []
        ),
        "- WattProxy: `python -m proxy serve --upstream <stub> --auth none --meter synthetic` (one process, "
        "on the event loop `wattproxy serve` picks: uvloop where it is installed): each request is "
        "forwarded (through its own HTTP/1.1 client, `backends/http1.py`, plain answers and streams "
        "alike), accounted on the upstream device's timeline, and committed to the "
        f"SQLite ledger before it is answered. Its ledger held {ledger['recorded']:,} records; the load "
        f"generator counted {ledger['sent']:,} answers (requests still in flight when a measurement "
        "stopped are recorded but not counted)"
        f"{'' if ledger['recorded'] >= ledger['sent'] else ' (RECORDS MISSING)'}.",
        *(
            [
                "- WattProxy, ledger on /dev/shm: the same, with its SQLite ledger on a RAM disk, so that "
                "a commit costs no disk fsync: the difference to the row above is the durable commit's."
            ]
            if "wattproxy_shm" in summary["targets"]
            else []
        ),
        f"- LiteLLM: {litellm}.",
        f"- Load: {load}; {seconds:g} s per target and concurrency, {summary['rounds']} round(s), targets in "
        "rotated order; every figure is the median over rounds. Added latency is the proxy's percentile "
        "minus the direct call's, taken within a round.",
        "",
        f"### Latency at {concurrencies[0]} connection",
        "",
        latency_table,
        "",
        "### Requests per second",
        "",
        md_table(rps_headers, rps_rows),
        "",
        "Added latency (p50 / p99, ms) at each concurrency:",
        "",
        md_table(["target", *(f"{c} conn." for c in concurrencies)], added_rows),
    ]
    if "forwarder" in summary["targets"]:
        parts += ["", floor_note(summary, concurrencies[0])]
    if ratios:
        with_floor = all("rps_forwarder_over_litellm" in r for r in ratios.values())
        ratio_rows = [
            [
                c,
                f"{r['rps_wattproxy_over_litellm']:.1f}x",
                *([f"{r['rps_forwarder_over_litellm']:.1f}x"] if with_floor else []),
                f"{r['added_p50_litellm_over_wattproxy']:.1f}x"
                if r["added_p50_litellm_over_wattproxy"]
                else "-",
            ]
            for c, r in ratios.items()
        ]
        parts += [
            "",
            "### WattProxy vs LiteLLM",
            "",
            md_table(
                [
                    "connections",
                    "req/s: WattProxy / LiteLLM",
                    *(["req/s: forwarder / LiteLLM"] if with_floor else []),
                    "added p50: LiteLLM / WattProxy",
                ],
                ratio_rows,
            ),
        ]
    if streams is not None:
        parts += render_streams(streams, concurrencies, paced_concurrency)
    parts += ["", targets_verdict(summary, concurrencies[0])]
    return "\n".join(parts) + "\n"


def floor_note(summary: dict[str, Any], c: int) -> str:
    """What the forwarder (no accounting) and the durable commit take of a round trip at `c` connections
    in this run, against what 20 times LiteLLM's requests/s asks of it (where LiteLLM was measured)."""
    t = summary["targets"]
    floor, wattproxy = t["forwarder"][str(c)], t["wattproxy"][str(c)]
    text = (
        f"The floor at {c} connection: the aiohttp forwarder, which only reads a request, POSTs it with one "
        f"aiohttp client session and sends the answer back, did {floor['rps']:,.0f} requests/s (p50 "
        f"{fmt(floor['p50_ms'])} ms, {fmt(floor['added_p50_ms'])} ms added to the stub's); WattProxy did "
        f"{wattproxy['rps'] / floor['rps']:.2f} of that (p50 {fmt(wattproxy['p50_ms'])} ms)"
    )
    if "wattproxy_shm" in t:
        shm = t["wattproxy_shm"][str(c)]
        text += (
            f", of which the durable commit (its ledger on disk against on /dev/shm) took "
            f"{fmt(wattproxy['p50_ms'] - shm['p50_ms'])} ms p50"
        )
    text += "."
    if "litellm" in t:
        need_rps = TARGET_RPS_RATIO * t["litellm"][str(c)]["rps"]
        text += (
            f" {TARGET_RPS_RATIO:g}x LiteLLM's requests/s is {need_rps:,.0f} requests/s, a round trip of "
            f"{fmt(c * 1e3 / need_rps)} ms: the forwarder reached {floor['rps'] / need_rps:.2f} of it, and "
            "whatever WattProxy does beyond forwarding (validation, the timeline, attribution, carbon, the "
            "ledger's commit before the answer, metrics) would have to fit in "
            f"{fmt(max(c * 1e3 / need_rps - c * 1e3 / floor['rps'], 0.0))} ms."
        )
    return text


def targets_verdict(summary: dict[str, Any], first_concurrency: int) -> str:
    """Issue 9's targets against this run: at most 1 ms added (p50, one connection), and at least 20
    times LiteLLM's requests/s (at every concurrency measured)."""
    added = summary["targets"]["wattproxy"][str(first_concurrency)]["added_p50_ms"]
    lines = [
        f"Targets: at most {TARGET_ADDED_MS:g} ms added at {first_concurrency} connection: "
        f"{fmt(added)} ms, {'met' if added <= TARGET_ADDED_MS else 'not met'}"
    ]
    ratios = [r["rps_wattproxy_over_litellm"] for r in summary["ratios"].values()]
    if ratios:
        met = min(ratios) >= TARGET_RPS_RATIO
        floors = [
            r["rps_forwarder_over_litellm"]
            for r in summary["ratios"].values()
            if "rps_forwarder_over_litellm" in r
        ]
        lines.append(
            f"at least {TARGET_RPS_RATIO:g}x LiteLLM's requests/s: {min(ratios):.1f}x to {max(ratios):.1f}x, "
            f"{'met' if met else 'not met'}"
            + (
                f" (the aiohttp forwarder with no accounting: {min(floors):.1f}x to {max(floors):.1f}x)"
                if floors
                else ""
            )
        )
    return "; ".join(lines) + "."


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument(
        "--litellm",
        type=Path,
        default=None,
        help="the `litellm` executable (default: on PATH, else bench/_work/litellm/bin/litellm)",
    )
    parser.add_argument("--no-litellm", action="store_true", help="measure WattProxy and the stub only")
    parser.add_argument("--concurrency", default=None, help="comma-separated connections (default 1,8,32,64)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="per target and concurrency (default 5; whole seconds with wrk)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; 1 with --smoke)")
    parser.add_argument("--no-wrk", action="store_true", help="use the aiohttp load generator even with wrk")
    parser.add_argument(
        "--shm",
        choices=("auto", "no"),
        default="auto",
        help="also measure a WattProxy whose ledger is on /dev/shm (auto: where it exists, not with --smoke)",
    )
    parser.add_argument("--no-streams", action="store_true", help="leave out the streaming measurements")
    parser.add_argument("--serve-stub", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--pace-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--serve-forwarder", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_stub is not None:
        serve_stub(args.serve_stub, args.pace_ms / 1000)
        return 0
    if args.serve_forwarder is not None:
        serve_forwarder(int(args.serve_forwarder[0]), args.serve_forwarder[1])
        return 0
    concurrencies = [int(c) for c in (args.concurrency or ("1,4" if args.smoke else "1,8,32,64")).split(",")]
    seconds = args.seconds or (1.0 if args.smoke else 5.0)
    rounds = args.rounds or (1 if args.smoke else 3)
    wrk = None if args.no_wrk else shutil.which("wrk")
    litellm = None if args.no_litellm else (args.litellm or find_litellm())
    if litellm is not None and not litellm.exists():
        parser.error(f"--litellm {litellm}: no such file")
    litellm_note = (
        f"`litellm[proxy]` {litellm_version(litellm)}, `litellm --model openai/{MODEL} --api_base <stub>/v1 "
        "--num_workers 1`, no database, no master key (no auth), started alongside"
        if litellm
        else (
            "not measured in this run (install it with `python3 -m venv bench/_work/litellm && "
            "bench/_work/litellm/bin/pip install 'litellm[proxy]'`, or pass `--litellm`)"
        )
    )
    load = (
        "`wrk -t1 --latency` (a Lua script POSTs the chat request)" if wrk else "closed-loop aiohttp clients"
    )
    info = machine_info()
    use_shm = args.shm == "auto" and not args.smoke and SHM.is_dir()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wattproxy-bench-upstream-")))
        shm = (
            Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wattproxy-bench-", dir=SHM)))
            if use_shm
            else None
        )
        paced_concurrency = min(PACED_CONCURRENCY, max(concurrencies))
        with services(litellm, tmp, shm) as running:
            check_answers(running)
            run = measure(running, concurrencies, seconds, rounds, wrk, tmp)
            stream_run = (
                Run()
                if args.no_streams
                else measure_streams(running, concurrencies, paced_concurrency, seconds, rounds, wrk, tmp)
            )
        sent = 1 + sum(
            m.requests for m in [*run.measurements, *stream_run.measurements] if m.target == "wattproxy"
        )
        ledger = {"sent": sent, "recorded": ledger_requests(tmp / "wattproxy")}
    summary = summarize(run, concurrencies, rounds)
    streams = None if args.no_streams else summarize_streams(stream_run, concurrencies, paced_concurrency)
    command = reproduce_command(f"bench.{NAME}", sys.argv[1:] if argv is None else argv)
    markdown = render(
        summary,
        info,
        command,
        concurrencies,
        seconds,
        load,
        litellm_note,
        ledger,
        args.smoke,
        streams,
        paced_concurrency,
    )
    data = {
        "benchmark": NAME,
        "smoke": args.smoke,
        "machine": info,
        "command": command,
        "settings": {"concurrency": concurrencies, "seconds": seconds, "rounds": rounds, "load": load},
        "litellm": litellm_note,
        "ledger": ledger,
        "summary": summary,
        "streams": streams,
        "measurements": [m.__dict__ for m in run.measurements],
        "stream_measurements": [m.__dict__ for m in stream_run.measurements],
    }
    md_path, _ = write_result(args.out, NAME, markdown, data)
    print(markdown)
    print_flush(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
