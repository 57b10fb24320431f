"""Ledger benchmark: group-commit throughput (records/s) and the latency each `record()` call adds
to a request before its response can be sent, on SQLite and PostgreSQL, at several concurrencies.

Each concurrency level runs C callers for a fixed time; every caller loops on
`await ledger.record([one record])` (the worst case: the proxy records a whole batch per call).
Durable settings throughout: SQLite in WAL with synchronous=FULL on a real file, PostgreSQL with
fsync and synchronous_commit on (a throwaway server from tests/pg.py unless --pg-url is given).

    python -m bench.ledger_bench [--seconds 3] [--concurrency 1,16,64,256] [--pg-url URL] [--dir DIR]
                                 [--grown 300000]

Records carry the ids the server gives requests (`proxy.app.new_request_id`: time-ordered UUIDs,
version 7). A second table compares them with random ids (uuid4) on SQLite ledgers that already hold
`--grown` records, side by side (alternating, two rounds each): a random key's insert lands on a
random page of the primary-key index, a time-ordered one on its last page.

Prints a Markdown table and writes it to bench/results/ledger.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sqlite3
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy

from proxy.app import new_request_id
from proxy.ledger import Ledger, LedgerRecord, sqlite_url

RESULTS = Path(__file__).parent / "results" / "ledger.md"


@dataclass(frozen=True)
class Result:
    backend: str
    concurrency: int
    records: int
    seconds: float
    commits: int
    latencies_s: list[float]

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds

    def latency_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return 1000.0 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def row(self) -> str:
        return (
            f"| {self.backend} | {self.concurrency} | {self.records_per_s:,.0f} | "
            f"{self.commits / self.seconds:,.0f} | {self.records / max(1, self.commits):.1f} | "
            f"{1000.0 * statistics.fmean(self.latencies_s):.2f} | {self.latency_ms(0.5):.2f} | "
            f"{self.latency_ms(0.99):.2f} | {1000.0 * max(self.latencies_s):.2f} |"
        )


HEADER = (
    "| backend | concurrent callers | records/s | commits/s | records per commit | "
    "record() mean ms | p50 ms | p99 ms | max ms |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def _record(request_id: str) -> LedgerRecord:
    return LedgerRecord(
        request_id=request_id,
        time=datetime.now(timezone.utc),
        user=f"user{hash(request_id) % 16}",
        key_id="key_0123456789ab",
        model="tiny-sd",
        task="image",
        status="ok",
        prompt_tokens=12,
        images=1,
        pixels=512 * 512,
        steps=20,
        device="cuda:0",
        joules=412.5,
        idle_joules=0.0,
        uncertainty_joules=1.25,
        measurement="measured",
        co2_grams=0.0437,
        carbon_intensity_g_per_kwh=381.0,
        pue=1.2,
        carbon_source="static:DE",
        queue_seconds=0.012,
        run_seconds=0.93,
    )


def _uuid4_id() -> str:
    return uuid.uuid4().hex


async def _level(
    ledger: Ledger,
    backend: str,
    concurrency: int,
    seconds: float,
    make_id: Callable[[], str] = new_request_id,
) -> Result:
    latencies: list[float] = []
    commits0, recorded0 = ledger.commits, ledger.recorded
    start = time.perf_counter()
    deadline = start + seconds

    async def caller(c: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            record = _record(make_id())
            t0 = time.perf_counter()
            await ledger.record([record])
            latencies.append(time.perf_counter() - t0)
            i += 1

    await asyncio.gather(*(caller(c) for c in range(concurrency)))
    elapsed = time.perf_counter() - start
    return Result(
        backend,
        concurrency,
        ledger.recorded - recorded0,
        elapsed,
        ledger.commits - commits0,
        latencies,
    )


async def _run_backend(url: str, backend: str, levels: list[int], seconds: float) -> list[Result]:
    ledger = Ledger(url)
    await ledger.start()
    try:
        await _level(ledger, backend, 4, min(0.5, seconds))  # warm-up: connections, caches
        results = []
        for concurrency in levels:
            result = await _level(ledger, backend, concurrency, seconds)
            print(result.row(), flush=True)
            results.append(result)
        return results
    finally:
        await ledger.close()


async def _grown(
    directory: Path, grown: int, concurrency: int, seconds: float
) -> list[tuple[str, Result, float]]:
    """SQLite ledgers that already hold `grown` records (of the ids under test), then `concurrency`
    callers for `seconds` each: the server's ids and uuid4, alternating, two rounds. Returns (ids,
    result, CPU µs a record of this process) per run."""
    kinds = {"time-ordered (the server's, UUID v7)": new_request_id, "random (uuid4)": _uuid4_id}
    ledgers = {}
    for name, make_id in kinds.items():
        ledger = Ledger(sqlite_url(directory / f"grown-{uuid.uuid4().hex[:8]}.db"))
        await ledger.start()
        for _ in range(grown // 10_000):
            await ledger.record([_record(make_id()) for _ in range(10_000)])
        ledgers[name] = ledger
    runs = []
    try:
        for name in [*kinds, *reversed(kinds)]:
            cpu0 = time.process_time()
            result = await _level(ledgers[name], "SQLite", concurrency, seconds, kinds[name])
            cpu_us = 1e6 * (time.process_time() - cpu0) / max(1, result.records)
            print(f"{name}: {result.records_per_s:,.0f} records/s, {cpu_us:.1f} µs CPU a record", flush=True)
            runs.append((name, result, cpu_us))
    finally:
        for ledger in ledgers.values():
            await ledger.close()
    return runs


def _filesystem(path: Path) -> str:
    try:
        out = subprocess.run(
            ["df", "-T", str(path)], capture_output=True, text=True, check=True, timeout=10
        ).stdout.splitlines()[-1]
        return out.split()[1]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def _raw_sqlite_commit_ms(directory: Path, commits: int = 200) -> float:
    """The disk's floor: median ms of a one-row commit in plain sqlite3 (WAL, synchronous=FULL)
    in `directory`. Virtual disks vary between runs; the ledger's figures scale with it."""
    path = directory / f"fsync-probe-{uuid.uuid4().hex[:8]}.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (x INTEGER)")
        times = []
        for i in range(commits):
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t VALUES (?)", (i,))
            conn.execute("COMMIT")
            times.append(time.perf_counter() - t0)
        return 1000.0 * statistics.median(times)
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each level, s")
    parser.add_argument("--concurrency", default="1,16,64,256", help="comma-separated caller counts")
    parser.add_argument("--pg-url", help="an existing PostgreSQL database (default: a throwaway server)")
    parser.add_argument("--dir", type=Path, help="directory for the SQLite file (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--grown",
        type=int,
        default=300_000,
        help="records already in the ledgers of the id comparison (0: skip)",
    )
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    with ExitStack() as stack:
        sqlite_dir = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ledger-")))
        pg_url = args.pg_url
        pg_version = "given by --pg-url"
        if pg_url is None:
            from tests.pg import postgres_cluster

            cluster = stack.enter_context(postgres_cluster(durable=True))
            pg_url, pg_version = cluster.url(), cluster.version

        fsync_ms = _raw_sqlite_commit_ms(sqlite_dir)
        print(f"plain sqlite3 one-row commit (WAL, FULL): {fsync_ms:.2f} ms\n", flush=True)
        print(HEADER, flush=True)
        db = sqlite_dir / f"ledger-bench-{uuid.uuid4().hex[:8]}.db"
        results = asyncio.run(_run_backend(sqlite_url(db), "SQLite", levels, args.seconds))
        results += asyncio.run(_run_backend(pg_url, "PostgreSQL", levels, args.seconds))
        grown = asyncio.run(_grown(sqlite_dir, args.grown, 16, args.seconds)) if args.grown else []
        fs = _filesystem(sqlite_dir)

    table = "\n".join([HEADER, *(r.row() for r in results)])
    notes = [
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} with `python -m bench.ledger_bench "
        f"--seconds {args.seconds:g} --concurrency {args.concurrency}`.",
        "",
        f"- Machine: {_cpu()}, {os.cpu_count()} CPUs; Python {platform.python_version()}, "
        f"SQLAlchemy {sqlalchemy.__version__}.",
        f"- SQLite {sqlite3.sqlite_version} (aiosqlite), WAL, synchronous=FULL, file on {fs}; the "
        f"disk's floor, a one-row commit in plain sqlite3, was {fsync_ms:.2f} ms (median).",
        f"- PostgreSQL {pg_version} (asyncpg) on 127.0.0.1, fsync on, synchronous_commit on.",
        "- Each caller loops on `await ledger.record([one record])` for the level's duration; "
        "`record()` returns once its group is committed, so its latency is what the ledger adds to "
        "a request before the response is sent. Records per commit is the group size that formed.",
    ]
    text = (
        "# Ledger: group-commit throughput and added latency\n\n" + "\n".join(notes) + "\n\n" + table + "\n"
    )
    if grown:
        rows = [
            f"| {name} | {r.records_per_s:,.0f} | {r.records / max(1, r.commits):.1f} | {cpu_us:.1f} | "
            f"{r.latency_ms(0.5):.2f} | {r.latency_ms(0.99):.2f} |"
            for name, r, cpu_us in grown
        ]
        text += (
            f"\n## Request ids on a grown ledger (SQLite, {args.grown:,} records already in, 16 callers)\n\n"
            "The same records under two kinds of id, each on a ledger of its own that already holds "
            f"{args.grown:,} records of that kind; the runs alternate (A, B, B, A). CPU is this "
            "process's (the callers, the event loop and the writer thread) a record.\n\n"
            "| ids | records/s | records per commit | CPU µs a record | record() p50 ms | p99 ms |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(rows) + "\n"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
