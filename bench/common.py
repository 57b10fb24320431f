"""Shared helpers of the benchmarks: the machine record, robust statistics, Markdown output, a server
running in its own thread, and a backend wrapper that records the batches the scheduler forms.

Every result file is Markdown that starts with a level-2 heading and a status marker line
(`<!-- bench:NAME status=ok|smoke|not-run -->`), so `bench/run_all.py` can assemble them into
`bench/RESULTS.md` and can tell a real result from a placeholder.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Hashable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from backends.base import Backend, BackendRequest, BackendResult, Task, TextRequest

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"


# --- the machine ---------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    except OSError:
        pass
    return None


def _git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{' (with uncommitted changes)' if dirty else ''}" if rev else "unknown"


def machine_info(*, gpu: bool = False) -> dict[str, str]:
    """What the figures were measured on: cores, CPU, RAM, Python, torch, load, and the GPU if asked."""
    info: dict[str, str] = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "cpu": _cpu_model(),
        "ram_gib": f"{_ram_gib():.1f}" if _ram_gib() is not None else "unknown",
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "load_average_1_5_15": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "git": _git_revision(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = str(torch.get_num_threads())
        if gpu and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = str(torch.version.cuda)
    except ImportError:
        info["torch"] = "not installed"
    return info


def machine_markdown(info: Mapping[str, str]) -> str:
    """One line that says where and when the figures were measured."""
    parts = [
        f"{info['nproc']} cores ({info['cpu']})",
        f"{info['ram_gib']} GiB RAM",
        f"Python {info['python']}",
        f"torch {info['torch']}",
    ]
    if "gpu" in info:
        parts.append(f"GPU {info['gpu']} (CUDA {info.get('cuda', '?')})")
    parts.append(f"load average at start {info['load_average_1_5_15']}")
    return f"Machine: {', '.join(parts)}. Date: {info['date_utc']}. Revision: {info['git']}."


# --- statistics ----------------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    """The median; NaN for no values."""
    xs = sorted(values)
    if not xs:
        return math.nan
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2.0


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between order statistics; NaN for none."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be within [0, 100], got {q!r}")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def rotated(items: Sequence[T], k: int) -> list[T]:
    """`items` rotated left by k: interleaves variants so that none always runs first or last."""
    if not items:
        return []
    k %= len(items)
    return [*items[k:], *items[:k]]


# --- Markdown ------------------------------------------------------------------------------------


def fmt(value: float | int | str | None, digits: int = 3) -> str:
    """A number for a table: `digits` significant digits, thousands kept whole; '-' for None/NaN."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "-"
    if value == 0 or abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:#.{digits}g}"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; cells are formatted with `fmt`."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells for {len(headers)} headers: {row!r}")
        lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
    return "\n".join(lines)


def status_marker(name: str, status: str) -> str:
    return f"<!-- bench:{name} status={status} -->"


def read_status(markdown: str, name: str) -> str | None:
    """The status a result file was written with (`ok`, `smoke`, `not-run`), or None."""
    prefix = f"<!-- bench:{name} status="
    for line in markdown.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].split()[0].rstrip("->").strip()
    return None


def reproduce_command(module: str, argv: Sequence[str]) -> str:
    """The shell command that reruns this benchmark with these arguments, from the repository root."""
    return " ".join(["python", "-m", module, *(shlex.quote(a) for a in argv)])


def write_result(out_dir: Path, name: str, markdown: str, data: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write `name.md` and `name.json` into `out_dir` (created); returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md_path.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    json_path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return md_path, json_path


def common_args(parser: argparse.ArgumentParser) -> None:
    """Arguments every benchmark takes."""
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for NAME.md and NAME.json")
    parser.add_argument(
        "--smoke", action="store_true", help="a few requests only: proves the code path works, times nothing"
    )


# --- a server in its own thread ------------------------------------------------------------------


def new_serve_loop(choice: str) -> asyncio.AbstractEventLoop:
    """A new event loop of the kind `wattproxy serve` runs on for the setting `event_loop` (see
    `proxy.cli.run_event_loop`): uvloop for "uvloop", and for "auto" where it is installed."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class ServerThread:
    """`create_app(settings, **app_kwargs)` behind a real localhost socket, in a background thread with
    its own event loop, so that the benchmark's clients (another loop) reach it over TCP."""

    def __init__(self, settings: Any, **app_kwargs: Any) -> None:
        self.settings = settings
        self.app_kwargs = app_kwargs
        self.loop = new_serve_loop(getattr(settings, "event_loop", "asyncio"))
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-server", daemon=True)
        self.app: web.Application | None = None
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 600.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    @property
    def headers(self) -> dict[str, str]:
        """What a client sends: the API key made for the benchmark (when the server checks keys)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(
        self, ready_timeout_s: float = 600.0, before_app: Callable[[], object] | None = None
    ) -> ServerThread:
        """Start serving; `before_app` is called just before the app is built (after the API key is
        made), for a caller that brackets the app's life with readings of its own."""
        from proxy.app import create_app

        self.thread.start()
        if getattr(self.settings, "auth", "none") == "keys":
            self.api_key = self.call(_create_key(self.settings.db_url(), "bench"))
        if before_app is not None:
            before_app()

        async def up() -> None:
            self.app = create_app(self.settings, **self.app_kwargs)
            self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = self.runner.addresses[0][1]

        self.call(up())
        self._wait_ready(ready_timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        from proxy.state import SERVICE

        assert self.app is not None
        service = self.app[SERVICE]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            failed = [m.load_error for m in service.models.values() if m.load_error]
            if failed:
                raise RuntimeError(f"a model failed to load: {failed}")
            ready = all(m.queue is not None or m.upstream for m in service.models.values())
            if ready and service.upstream in (None, "ready"):  # proxy mode: its upstream's models known
                return
            time.sleep(0.02)
        raise TimeoutError("the models did not load in time")

    def stop(self) -> None:
        """Shut the app down (its monitors take their last reading and commit everything)."""
        if self.runner is not None:
            self.call(self.runner.cleanup())
            self.runner = None
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
        self.loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _create_key(db_url: str, user: str) -> str:
    """Store a fresh API key for `user` in the ledger at `db_url` (before the app opens it, so that
    the app starts with a key and prints no bootstrap admin key); returns the secret."""
    from proxy.auth import new_key
    from proxy.ledger import Ledger

    ledger = Ledger(db_url)
    await ledger.start()
    try:
        secret, record = new_key(user)
        await ledger.add_key(record)
    finally:
        await ledger.close()
    return secret


# --- closed-loop clients ---------------------------------------------------------------------------


async def read_stream(resp: Any) -> dict[str, Any]:
    """A streamed answer read to its end: {"usage": the last chunk's usage, "events": chunks before
    [DONE]}; an error event raises."""
    usage, events = None, 0
    async for line in resp.content:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(f"the stream failed: {chunk['error']}")
        events += 1
        usage = chunk.get("usage") or usage
    return {"usage": usage, "events": events}


async def drive(
    session: Any,
    base_url: str,
    make_request: Callable[[int], tuple[str, dict[str, Any]]],
    indices: range,
    concurrency: int,
) -> tuple[float, list[tuple[float, dict[str, Any]]]]:
    """Send one request per index from `concurrency` clients (an `aiohttp.ClientSession`), each sending
    its next request when the previous one is answered. Returns (wall s, [(latency s, JSON answer)])
    in completion order; any status but 200 raises."""
    pending = iter(indices)
    answers: list[tuple[float, dict[str, Any]]] = []

    async def client() -> None:
        for i in pending:
            path, body = make_request(i)
            t0 = time.perf_counter()
            async with session.post(base_url + path, json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"{path} answered {resp.status}: {await resp.text()}")
                payload = await (read_stream(resp) if body.get("stream") else resp.json())
            answers.append((time.perf_counter() - t0, payload))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - t0, answers


# --- a backend that records its batches ----------------------------------------------------------


class RecordingBackend:
    """Wraps a loaded backend: records every batch the scheduler runs (while recording) and keeps the
    wrapped model loaded when the app closes it, so one load serves several server lifetimes and the
    same pipeline can be called directly for comparison. Everything else is the wrapped backend's."""

    def __init__(self, inner: Backend, direct: Backend | None = None) -> None:
        self.inner = inner
        # what the benchmark calls directly: the wrapped backend, or the same model loaded in this
        # process where the wrapped one runs it elsewhere (a model process of its own)
        self.direct = direct if direct is not None else inner
        self.name: str = inner.name
        self.task: Task = inner.task
        self.device: str = inner.device
        self._batches: list[list[BackendRequest]] | None = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:  # count_prompt_tokens, max_context_tokens, ...
        return getattr(self.inner, name)

    def start_recording(self) -> None:
        with self._lock:
            self._batches = []

    def stop_recording(self) -> list[list[BackendRequest]]:
        with self._lock:
            batches, self._batches = self._batches or [], None
        return batches

    def load(self) -> None:
        """Already loaded (the wrapped backend was)."""

    def batch_key(self, request: BackendRequest) -> Hashable:
        return self.inner.batch_key(request)

    def run(self, batch: Sequence[BackendRequest]) -> list[BackendResult]:
        self._record(batch)
        return self.inner.run(batch)

    def _record(self, batch: Sequence[BackendRequest]) -> None:
        with self._lock:
            if self._batches is not None:
                self._batches.append(list(batch))

    def synchronize(self) -> None:
        self.inner.synchronize()

    def close(self) -> None:
        """Kept open: the benchmark closes the wrapped backend itself (`inner.close()`)."""


class RecordingProcessBackend(RecordingBackend):
    """A `RecordingBackend` around a model in a process of its own (`ProcessBackend`), which the server
    runs as it runs one unwrapped: sending the next batch ahead (`run_ahead`)."""

    def run_ahead(
        self,
        batch: Sequence[BackendRequest],
        ahead: Callable[[], Sequence[BackendRequest] | None] | None = None,
        wake: Any = None,
    ) -> list[BackendResult]:
        self._record(batch)
        return self.inner.run_ahead(batch, ahead, wake)  # type: ignore[attr-defined, no-any-return]


def batch_histogram(sizes: Iterable[int]) -> dict[int, int]:
    """{batch size: number of batches}, sizes ascending."""
    counts: dict[int, int] = {}
    for size in sizes:
        counts[size] = counts.get(size, 0) + 1
    return dict(sorted(counts.items()))


def histogram_text(hist: Mapping[int, int]) -> str:
    """'8x12, 7x1': batch size x how many batches."""
    return ", ".join(f"{size}x{n}" for size, n in sorted(hist.items(), reverse=True)) or "-"


def quiet_logging() -> None:
    """Benchmarks print their own summary; the service's INFO logs would drown it."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("proxy", "backends", "codecarbon", "diffusers", "transformers", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def default_cache_dir() -> Path:
    """Where the service keeps built models by default (the same place `wattproxy serve` uses)."""
    from proxy.config import Settings

    return Settings.model_validate({}).cache_dir


def print_flush(*args: object) -> None:
    print(*args, flush=True, file=sys.stderr)


def _as_text(request: BackendRequest) -> BackendRequest:
    if not isinstance(request, TextRequest):
        return request
    # a streamed member's pieces go to a list of the replay's own (the server's consumer is done)
    streamed: list[str] = []
    return dataclasses.replace(request, prompt_ids=None, on_text=streamed.append if request.on_text else None)


def replay(backend: Backend, batches: Sequence[Sequence[BackendRequest]]) -> tuple[float, list[float], int]:
    """Run the recorded batches directly, one after another. Returns (wall s, per-request latency s,
    units): a request's latency is its batch's run time (every member finishes with its batch).
    Text requests are replayed as a caller hands them to the pipeline, as text: the token ids that the
    server's length check left on them are dropped, so that the direct path tokenizes its prompts; a
    streamed one hands its pieces to a list."""
    batches = [[_as_text(r) for r in batch] for batch in batches]
    latencies: list[float] = []
    units = 0
    t0 = time.perf_counter()
    for batch in batches:
        s = time.perf_counter()
        results = backend.run(batch)
        backend.synchronize()
        d = time.perf_counter() - s
        latencies.extend([d] * len(batch))
        for r in results:
            units += getattr(r, "completion_tokens", 0) or len(getattr(r, "seeds", ()))
    return time.perf_counter() - t0, latencies, units


async def drive_elsewhere(
    base_url: str,
    headers: Mapping[str, str],
    make_request: Callable[[int], tuple[str, dict[str, Any]]],
    indices: range,
    concurrency: int,
    client: str = "raw",
) -> tuple[float, list[tuple[float, dict[str, Any]]], float]:
    """`drive`, with the clients in a process of their own (`bench.loadgen`): a benchmark whose server
    runs in this process then measures the server, not the clients' share of its GIL. Payloads come
    back trimmed to `usage`, the length of `data` and a stream's `events`. `client`: "raw" (lean
    keep-alive connections) or "aiohttp" (`drive`'s `aiohttp.ClientSession`), see `bench.loadgen`.
    Returns (wall s, [(latency s, payload)], the clients' CPU s over the wall time)."""
    job = {
        "base_url": base_url,
        "headers": dict(headers),
        "requests": [make_request(i) for i in indices],
        "concurrency": concurrency,
        "client": client,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate(json.dumps(job).encode())
    if proc.returncode != 0:
        detail = err.decode(errors="replace")[-2000:]
        raise RuntimeError(f"bench.loadgen failed ({proc.returncode}): {detail}")
    result = json.loads(out)
    answers = [(float(lat), payload) for lat, payload in result["answers"]]
    return float(result["wall_s"]), answers, float(result["cpu_s"])
