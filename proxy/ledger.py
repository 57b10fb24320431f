"""The durable per-request ledger: one row per answered request, usage queries, API keys.

SQLAlchemy Core (async) over SQLite (aiosqlite, the embedded default) or PostgreSQL (asyncpg, for
deployments with several replicas), chosen by a database URL.

Durability contract: `Ledger.record` returns only after the records are committed, so a request
whose response is sent after `record` returned is never missing from the ledger. Records are
committed in groups: one writer takes everything queued since its last commit and inserts it in one
transaction (one executemany), so throughput grows with concurrency while each caller waits for at
most about two commits. On a SQLite file the writer is a thread of its own with one plain sqlite3
connection (BEGIN IMMEDIATE, executemany, COMMIT: three calls, no hop per statement), which wakes the
waiting callers once the COMMIT has returned; elsewhere it is an asyncio task over SQLAlchemy. Reads,
keys and migrations always go through SQLAlchemy.

A SQLite file's records may also be committed inline, on the caller's thread, where the server says
nothing else is in flight (`inline_when`): the same three calls, durable the same way, on a second
connection, without the two thread hand-overs (about 150 µs of one client's round trip on a 2-core
VM). Only while the writer thread is idle and nobody else holds the database's write lock (the
inline connection does not wait for it); otherwise the records go to the writer thread as before.

Times are stored as UTC epoch seconds (DOUBLE PRECISION, microsecond round trip) plus the UTC day
('YYYY-MM-DD') written at insert, so that grouping by day is the same plain GROUP BY on both
backends. No prompt text is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

import platformdirs
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    case,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, RowMapping, make_url
from sqlalchemy.exc import ArgumentError, DataError, DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util import await_only

log = logging.getLogger(__name__)

T = TypeVar("T")

GroupBy = Literal["model", "task", "day", "user"]


@dataclass(slots=True)  # not frozen: built per request, and a frozen __init__ is twice as slow
class LedgerRecord:
    """One answered request. Units: J, g CO2e, g/kWh, s; `time` is timezone-aware (UTC)."""

    request_id: str
    time: datetime  # UTC, when the request was answered
    user: str
    key_id: str | None
    model: str
    task: str  # "text" | "image"
    status: str  # "ok" | "error" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0
    pixels: int = 0
    steps: int = 0
    device: str = ""
    joules: float = 0.0
    idle_joules: float = 0.0
    uncertainty_joules: float = 0.0
    measurement: str = ""
    co2_grams: float = 0.0
    embodied_co2_grams: float = 0.0
    carbon_intensity_g_per_kwh: float = 0.0
    pue: float = 1.0
    carbon_source: str = ""
    queue_seconds: float = 0.0
    run_seconds: float = 0.0


@dataclass(frozen=True)
class ApiKeyRecord:
    """A stored API key. Only the SHA-256 of the secret is kept. Budgets: kWh and g CO2e per period."""

    key_id: str  # short public id, e.g. "key_" + 12 hex chars
    key_hash: str  # SHA-256 hex of the secret; the secret itself is never stored
    user: str
    admin: bool
    created: datetime
    revoked: datetime | None = None
    budget_kwh: float | None = None
    budget_co2_grams: float | None = None
    budget_period: str = "total"  # "day" | "month" | "total"


@dataclass(frozen=True)
class UsageRow:
    """Sums over a set of records. Units: J, g CO2e."""

    group: str | None  # the model / task / day (YYYY-MM-DD) / user value, None when not grouped
    requests: int
    joules: float
    co2_grams: float
    images: int
    prompt_tokens: int
    completion_tokens: int
    image_joules: float  # energy of image requests (for J per image)
    text_joules: float  # energy of text requests (for J per token)


class LedgerUnavailable(Exception):
    """The database cannot be reached or written (or the ledger is not open)."""


class RecordRejected(ValueError):
    """The database refused a caller's records or key: a duplicate id or a violated constraint.

    A bug in the caller, never a transient condition: retrying the same records fails again."""


class SchemaError(RuntimeError):
    """The database schema cannot be brought to this version's (failed or unknown migration)."""


# --- schema ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One schema version: SQL steps applied in order, in one transaction, with its version row.

    Steps are frozen once released (a released database ran them); change the schema by appending
    a migration. They must be valid on both SQLite and PostgreSQL."""

    version: int
    description: str
    steps: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "requests and api_keys",
        (
            """CREATE TABLE requests (
                request_id TEXT PRIMARY KEY,
                time_s DOUBLE PRECISION NOT NULL,
                day TEXT NOT NULL,
                user_name TEXT NOT NULL,
                key_id TEXT,
                model TEXT NOT NULL,
                task TEXT NOT NULL,
                status TEXT NOT NULL,
                prompt_tokens BIGINT NOT NULL DEFAULT 0,
                completion_tokens BIGINT NOT NULL DEFAULT 0,
                images BIGINT NOT NULL DEFAULT 0,
                pixels BIGINT NOT NULL DEFAULT 0,
                steps BIGINT NOT NULL DEFAULT 0,
                device TEXT NOT NULL DEFAULT '',
                joules DOUBLE PRECISION NOT NULL DEFAULT 0,
                idle_joules DOUBLE PRECISION NOT NULL DEFAULT 0,
                uncertainty_joules DOUBLE PRECISION NOT NULL DEFAULT 0,
                measurement TEXT NOT NULL DEFAULT '',
                co2_grams DOUBLE PRECISION NOT NULL DEFAULT 0,
                embodied_co2_grams DOUBLE PRECISION NOT NULL DEFAULT 0,
                carbon_intensity_g_per_kwh DOUBLE PRECISION NOT NULL DEFAULT 0,
                pue DOUBLE PRECISION NOT NULL DEFAULT 1,
                carbon_source TEXT NOT NULL DEFAULT '',
                queue_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
                run_seconds DOUBLE PRECISION NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX ix_requests_time ON requests (time_s)",
            "CREATE INDEX ix_requests_user_time ON requests (user_name, time_s)",
            """CREATE TABLE api_keys (
                key_id TEXT PRIMARY KEY,
                key_hash TEXT NOT NULL UNIQUE,
                user_name TEXT NOT NULL,
                admin BOOLEAN NOT NULL,
                created_s DOUBLE PRECISION NOT NULL,
                revoked_s DOUBLE PRECISION,
                budget_kwh DOUBLE PRECISION,
                budget_co2_grams DOUBLE PRECISION,
                budget_period TEXT NOT NULL DEFAULT 'total'
            )""",
        ),
    ),
)

_SCHEMA_VERSION_DDL = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_s DOUBLE PRECISION NOT NULL
)"""

# PostgreSQL: replicas starting together migrate one at a time (SQLite: BEGIN IMMEDIATE does it).
_PG_MIGRATION_LOCK = 0x57A77C0DE

_Double = Float(precision=53, asdecimal=False)

metadata = MetaData()

requests_table = Table(
    "requests",
    metadata,
    Column("request_id", String, primary_key=True),
    Column("time_s", _Double, nullable=False),
    Column("day", String, nullable=False),
    Column("user_name", String, nullable=False),
    Column("key_id", String),
    Column("model", String, nullable=False),
    Column("task", String, nullable=False),
    Column("status", String, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("images", BigInteger, nullable=False),
    Column("pixels", BigInteger, nullable=False),
    Column("steps", BigInteger, nullable=False),
    Column("device", String, nullable=False),
    Column("joules", _Double, nullable=False),
    Column("idle_joules", _Double, nullable=False),
    Column("uncertainty_joules", _Double, nullable=False),
    Column("measurement", String, nullable=False),
    Column("co2_grams", _Double, nullable=False),
    Column("embodied_co2_grams", _Double, nullable=False),
    Column("carbon_intensity_g_per_kwh", _Double, nullable=False),
    Column("pue", _Double, nullable=False),
    Column("carbon_source", String, nullable=False),
    Column("queue_seconds", _Double, nullable=False),
    Column("run_seconds", _Double, nullable=False),
)

api_keys_table = Table(
    "api_keys",
    metadata,
    Column("key_id", String, primary_key=True),
    Column("key_hash", String, nullable=False, unique=True),
    Column("user_name", String, nullable=False),
    Column("admin", Boolean, nullable=False),
    Column("created_s", _Double, nullable=False),
    Column("revoked_s", _Double),
    Column("budget_kwh", _Double),
    Column("budget_co2_grams", _Double),
    Column("budget_period", String, nullable=False),
)

schema_version_table = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("description", String, nullable=False),
    Column("applied_s", _Double, nullable=False),
)


# --- URLs --------------------------------------------------------------------------------------


def sqlite_url(path: Path | str) -> str:
    """The `--db` URL of a SQLite file (absolute: "sqlite:////abs/path.db")."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def default_url(data_dir: Path | None = None) -> str:
    """The embedded default: wattproxy.db in `data_dir`, else in the user's data directory."""
    base = data_dir if data_dir is not None else platformdirs.user_data_path("wattproxy")
    return sqlite_url(Path(base) / "wattproxy.db")


def _driver_url(url: str) -> URL:
    """Map a user URL to its async driver: sqlite -> sqlite+aiosqlite, postgresql -> +asyncpg."""
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise ValueError(f"not a database URL: {url!r}") from e
    scheme = parsed.drivername
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        return parsed.set(drivername="sqlite+aiosqlite")
    if scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        return parsed.set(drivername="postgresql+asyncpg")
    raise ValueError(f"unsupported database URL scheme {scheme!r}: use sqlite:/// or postgresql://")


def _is_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


# --- conversions -------------------------------------------------------------------------------


def _epoch_s(when: datetime, what: str) -> float:
    """UTC epoch seconds of a timezone-aware datetime (a naive one is ambiguous: refused)."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (UTC), got naive {when.isoformat()}")
    return when.timestamp()


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc)


Row = tuple[Any, ...]  # one record's insert parameters, in `requests_table` column order

# The UTC day last computed by `_day`: (from, until, "YYYY-MM-DD"), a millisecond inside the day's
# bounds, so that no rounding of a time within them can fall on another day. One tuple, replaced whole:
# safe to share between threads.
_day_memo: tuple[float, float, str] = (0.0, 0.0, "")


def _day(time_s: float) -> str:
    """`_utc(time_s).strftime("%Y-%m-%d")`, computed once per day (the requests of a day share it)."""
    global _day_memo
    lo, hi, day = _day_memo
    if lo < time_s < hi:
        return day
    when = _utc(time_s)
    day = when.strftime("%Y-%m-%d")
    start_s = datetime(when.year, when.month, when.day, tzinfo=timezone.utc).timestamp()
    _day_memo = (start_s + 0.001, start_s + 86_400 - 0.001, day)
    return day


def _row(r: LedgerRecord) -> Row:
    """The insert parameters of one record: the hot path, so a plain tuple that goes to the driver
    as is. Numbers are coerced here so that a caller's type slip fails that caller (TypeError,
    ValueError) instead of the whole group's transaction."""
    time_s = _epoch_s(r.time, "LedgerRecord.time")
    return (
        r.request_id,
        time_s,
        _day(time_s),
        r.user,
        r.key_id,
        r.model,
        r.task,
        r.status,
        int(r.prompt_tokens),
        int(r.completion_tokens),
        int(r.images),
        int(r.pixels),
        int(r.steps),
        r.device,
        float(r.joules),
        float(r.idle_joules),
        float(r.uncertainty_joules),
        r.measurement,
        float(r.co2_grams),
        float(r.embodied_co2_grams),
        float(r.carbon_intensity_g_per_kwh),
        float(r.pue),
        r.carbon_source,
        float(r.queue_seconds),
        float(r.run_seconds),
    )


_ROW_COLUMNS = (
    "request_id",
    "time_s",
    "day",
    "user_name",
    "key_id",
    "model",
    "task",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "images",
    "pixels",
    "steps",
    "device",
    "joules",
    "idle_joules",
    "uncertainty_joules",
    "measurement",
    "co2_grams",
    "embodied_co2_grams",
    "carbon_intensity_g_per_kwh",
    "pue",
    "carbon_source",
    "queue_seconds",
    "run_seconds",
)


def _record(m: RowMapping) -> LedgerRecord:
    return LedgerRecord(
        request_id=m["request_id"],
        time=_utc(m["time_s"]),
        user=m["user_name"],
        key_id=m["key_id"],
        model=m["model"],
        task=m["task"],
        status=m["status"],
        prompt_tokens=int(m["prompt_tokens"]),
        completion_tokens=int(m["completion_tokens"]),
        images=int(m["images"]),
        pixels=int(m["pixels"]),
        steps=int(m["steps"]),
        device=m["device"],
        joules=m["joules"],
        idle_joules=m["idle_joules"],
        uncertainty_joules=m["uncertainty_joules"],
        measurement=m["measurement"],
        co2_grams=m["co2_grams"],
        embodied_co2_grams=m["embodied_co2_grams"],
        carbon_intensity_g_per_kwh=m["carbon_intensity_g_per_kwh"],
        pue=m["pue"],
        carbon_source=m["carbon_source"],
        queue_seconds=m["queue_seconds"],
        run_seconds=m["run_seconds"],
    )


def _key(m: RowMapping) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=m["key_id"],
        key_hash=m["key_hash"],
        user=m["user_name"],
        admin=bool(m["admin"]),
        created=_utc(m["created_s"]),
        revoked=None if m["revoked_s"] is None else _utc(m["revoked_s"]),
        budget_kwh=m["budget_kwh"],
        budget_co2_grams=m["budget_co2_grams"],
        budget_period=m["budget_period"],
    )


def _cause(e: BaseException) -> str:
    orig = e.orig if isinstance(e, DBAPIError) and e.orig is not None else e
    return f"{type(orig).__name__}: {orig}".strip().rstrip(":")


@dataclass(eq=False)
class _Pending:
    rows: list[Row]
    done: asyncio.Future[None]


_Outcome = tuple[_Pending, BaseException | None]


class _Checkpoint:
    """Queued for the writer thread: checkpoint the WAL (the inline connection never does)."""


_CHECKPOINT = _Checkpoint()
# Inline commits between two checkpoints asked of the writer thread. A one-record commit appends 3-5
# pages to the WAL: about 1,000 pages, SQLite's own automatic checkpoint's threshold.
INLINE_COMMITS_PER_CHECKPOINT = 256

# SQLite errors caused by a caller's values (a constraint, a value SQLite cannot bind), not the database.
_SQLITE_DATA_ERRORS = (sqlite3.IntegrityError, sqlite3.DataError, OverflowError, UnicodeEncodeError)


class _Uncertain(Exception):
    """COMMIT was sent but not acknowledged: the group may or may not be in the database."""


# --- the ledger --------------------------------------------------------------------------------


class Ledger:
    """The ledger on one database. `start()` before use, `close()` at the end.

    `timeout_s` bounds each database wait (connecting, a lock held by another writer, a query):
    past it the operation fails with `LedgerUnavailable` instead of hanging."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 10.0,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        versions = [m.version for m in migrations]
        if versions != list(range(1, len(versions) + 1)):
            raise ValueError(f"migration versions must be 1, 2, 3, ... in order, got {versions}")
        self.url = _driver_url(url)
        self.backend: Literal["sqlite", "postgresql"] = (
            "sqlite" if self.url.get_backend_name() == "sqlite" else "postgresql"
        )
        self.timeout_s = timeout_s
        self.migrations = tuple(migrations)
        self.commits = 0  # transactions that committed records (a group, or one caller on retry)
        self.recorded = 0  # records committed
        self.inline_commits = 0  # of `commits`, those made on the caller's thread (`inline_when`)
        # Set by the server: True where committing on the event loop's thread holds nobody up (no
        # other request in flight). None: always through the writer thread.
        self.inline_when: Callable[[], bool] | None = None
        self._inline: list[sqlite3.Connection | None] = [None]  # made and remade by the writer thread
        self._inline_since_checkpoint = 0
        # Held by whoever commits through the writer's or the inline connection: one at a time.
        self._commit_lock = threading.Lock()
        self._engine: AsyncEngine | None = None
        self._insert_sql = ""
        self._writer: asyncio.Task[None] | None = None
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._closing = False
        # A SQLite file: the writer thread, its queue (None: stop) and its connection (thread-owned).
        self._thread: threading.Thread | None = None
        self._queue: queue.SimpleQueue[_Pending | _Checkpoint | None] = queue.SimpleQueue()
        self._thread_stopped = False
        # A :memory: database is one shared connection (StaticPool): take turns on it.
        self._serial: asyncio.Lock | None = asyncio.Lock() if _is_memory(self.url) else None

    def __repr__(self) -> str:
        return f"Ledger({self.url.render_as_string(hide_password=True)!r})"

    # lifecycle

    def missing(self) -> str | None:
        """Where an SQLite ledger's file is expected, if it does not exist (nothing was ever recorded
        there: a command that only reads should say so, not report an empty ledger); else None."""
        if self.backend != "sqlite" or _is_memory(self.url):
            return None
        path = Path(str(self.url.database))
        return None if path.exists() else str(path)

    async def start(self) -> None:
        """Connect, migrate to the latest schema version, start the group-commit writer."""
        if self._engine is not None:
            return
        if self.backend == "sqlite" and not _is_memory(self.url):
            path = Path(str(self.url.database))
            try:
                # owner only where it is made: the ledger holds every user's usage and the keys' hashes
                await asyncio.to_thread(path.parent.mkdir, mode=0o700, parents=True, exist_ok=True)
            except OSError as e:
                raise LedgerUnavailable(f"cannot create the ledger directory {path.parent}: {e}") from e
        self._engine = self._create_engine()
        self._insert_sql = _insert_sql(self._engine)
        try:
            await self._migrate()
            if self.backend == "postgresql":
                await self._check_postgres_durability()
        except BaseException:
            engine, self._engine = self._engine, None
            await engine.dispose()
            raise
        self._closing = False
        if self._threaded():
            try:
                conn = await asyncio.to_thread(self._sqlite_connect)
                try:
                    self._inline = [await asyncio.to_thread(self._sqlite_connect, inline=True)]
                except BaseException:
                    conn.close()
                    raise
            except (sqlite3.Error, OSError) as e:
                engine, self._engine = self._engine, None
                await engine.dispose()
                raise LedgerUnavailable(f"the ledger database failed: {_cause(e)}") from e
            self._queue = queue.SimpleQueue()
            self._thread_stopped = False
            self._thread = threading.Thread(
                target=self._thread_main, args=(self._queue, [conn]), name="ledger-writer", daemon=True
            )
            self._thread.start()
        else:
            self._writer = asyncio.create_task(self._write_loop(), name="ledger-writer")

    async def close(self) -> None:
        """Commit everything queued, stop the writer, release the connections."""
        if self._engine is None:
            return
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            thread, self._thread = self._thread, None
            self._queue.put(None)  # after everything already queued: that is committed first
            await asyncio.to_thread(thread.join, self._record_limit_s())
            if thread.is_alive():
                log.warning("ledger: the writer thread did not stop within %g s", self._record_limit_s())
            else:
                _close_inline(self._inline)
        if self._writer is not None:
            await self._writer
            self._writer = None
        engine, self._engine = self._engine, None
        await engine.dispose()

    def _create_engine(self) -> AsyncEngine:
        t = self.timeout_s
        if self.backend == "sqlite":
            engine = create_async_engine(self.url, **({} if self._serial else {"pool_timeout": t}))
            busy_ms = int(t * 1000)

            @event.listens_for(engine.sync_engine, "connect")
            def _on_connect(dbapi_connection: Any, _record: Any) -> None:
                # We emit BEGIN ourselves (below): sqlite3's legacy mode would autocommit DDL, which
                # would make a migration non-atomic.
                dbapi_connection.isolation_level = None
                cursor = dbapi_connection.cursor()
                # busy_timeout first: switching to WAL takes a lock another process may hold.
                # WAL: readers never block the writer. synchronous=FULL: each commit fsyncs the WAL,
                # so an acknowledged record survives power loss (NORMAL would only survive a crash).
                cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
                # on the event loop (SQLAlchemy's greenlet): waits between tries are awaited, not slept
                _enable_wal(cursor, t, sleep=lambda s: await_only(asyncio.sleep(s)))
                cursor.execute("PRAGMA synchronous=FULL")
                cursor.close()

            @event.listens_for(engine.sync_engine, "begin")
            def _on_begin(conn: Any) -> None:
                # Writers take the write lock up front, so a lock held by another process is waited
                # for (busy_timeout) instead of failing at the first write of a read transaction.
                write = conn.get_execution_options().get("ledger_write", False)
                conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

            return engine
        return create_async_engine(
            self.url,
            pool_size=5,
            max_overflow=5,
            pool_timeout=t,
            pool_recycle=3600,
            connect_args={
                "timeout": t,  # connecting, s
                "command_timeout": t,  # every statement, s
                "server_settings": {"application_name": "wattproxy-ledger"},
            },
        )

    def _threaded(self) -> bool:
        """Whether records go through the writer thread: a SQLite file named by a plain URL."""
        return self.backend == "sqlite" and not _is_memory(self.url) and not self.url.query

    def _record_limit_s(self) -> float:
        """How long a threaded `record()` waits: its group may queue behind one commit, and each
        commit waits up to `timeout_s` for the lock, plus its own work (as `_run`'s 3 x timeout_s)."""
        return 6 * self.timeout_s

    def _sqlite_connect(self, *, inline: bool = False) -> sqlite3.Connection:
        """The writer thread's connection, with the durable settings (see `_create_engine`). The
        inline one does not wait for a lock held elsewhere (its caller is the event loop: the writer
        thread waits instead) and leaves the WAL's checkpoints to the writer thread."""
        conn = sqlite3.connect(
            str(self.url.database), timeout=self.timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            mode = _enable_wal(conn.cursor(), self.timeout_s)
            conn.execute(f"PRAGMA busy_timeout={0 if inline else int(self.timeout_s * 1000)}")
            if inline:
                conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute("PRAGMA synchronous=FULL")
            sync = conn.execute("PRAGMA synchronous").fetchone()
            if mode is None or str(mode[0]).lower() != "wal" or sync is None or sync[0] != 2:
                raise sqlite3.OperationalError(f"cannot set WAL and synchronous=FULL (got {mode}, {sync})")
        except BaseException:
            conn.close()
            raise
        return conn

    async def _check_postgres_durability(self) -> None:
        setting = await self._read(lambda c: c.scalar(text("SHOW synchronous_commit")))
        if setting == "off":
            log.warning(
                "PostgreSQL synchronous_commit is off: an acknowledged ledger record can be lost "
                "in a server crash"
            )

    # the database, with bounded waits and one typed error

    async def _run(
        self, work: Callable[[AsyncConnection], Awaitable[T]], *, write: bool, retry: bool = True
    ) -> T:
        """Run `work` in one transaction and commit it. Raises RecordRejected (the data was refused:
        a constraint, a value the database cannot store), _Uncertain (COMMIT sent, unacknowledged)
        or LedgerUnavailable (anything else: unreachable, timed out, failed).

        A connection found dead (a server restart) is replaced and the work retried once, but only
        when it failed before COMMIT was sent: retrying an unacknowledged COMMIT could insert twice."""
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            committing = False
            try:

                async def transaction() -> T:
                    nonlocal committing
                    assert self._engine is not None
                    async with self._engine.connect() as conn:
                        if write and self.backend == "sqlite":
                            await conn.execution_options(ledger_write=True)
                        result = await work(conn)
                        committing = True
                        await conn.commit()
                        return result

                if self._serial is None:
                    return await asyncio.wait_for(transaction(), 3 * self.timeout_s)
                async with self._serial:
                    return await asyncio.wait_for(transaction(), 3 * self.timeout_s)
            except (SchemaError, LedgerUnavailable, RecordRejected, asyncio.CancelledError):
                raise
            except Exception as e:
                if isinstance(e, DBAPIError) and _about_the_data(e):
                    raise RecordRejected(_cause(e)) from e
                if committing:
                    raise _Uncertain(_cause(e)) from e
                if attempt + 1 < attempts and isinstance(e, DBAPIError) and e.connection_invalidated:
                    log.info("ledger connection lost (%s); retrying on a new one", _cause(e))
                    continue
                if isinstance(e, asyncio.TimeoutError | TimeoutError):
                    raise LedgerUnavailable(
                        f"the ledger database did not answer within {3 * self.timeout_s:g} s"
                    ) from e
                raise LedgerUnavailable(f"the ledger database failed: {_cause(e)}") from e
        raise AssertionError("unreachable")

    async def _read(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        if self._engine is None:
            raise LedgerUnavailable("the ledger is not open")
        try:
            return await self._run(work, write=False)
        except _Uncertain as e:  # a read-only transaction: nothing was at stake in its COMMIT
            raise LedgerUnavailable(f"the ledger database failed: {e}") from e

    async def _write(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        if self._engine is None:
            raise LedgerUnavailable("the ledger is not open")
        try:
            return await self._run(work, write=True)
        except _Uncertain as e:
            raise LedgerUnavailable(f"the ledger database did not confirm the commit: {e}") from e

    # migrations

    async def _migrate(self) -> None:
        latest = len(self.migrations)
        for migration in self.migrations:

            async def step(conn: AsyncConnection, m: Migration = migration) -> bool:
                if self.backend == "postgresql":
                    await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
                await conn.execute(text(_SCHEMA_VERSION_DDL))
                current = await self._current_version(conn)
                if current > latest:
                    raise SchemaError(
                        f"the ledger database is at schema version {current}, newer than this "
                        f"WattProxy's {latest}: upgrade WattProxy"
                    )
                if current >= m.version:
                    return False
                for i, sql in enumerate(m.steps, 1):
                    try:
                        await conn.execute(text(sql))
                    except DBAPIError as e:
                        if e.connection_invalidated:
                            raise
                        raise SchemaError(
                            f"migration {m.version} ({m.description}) failed at step {i}: {_cause(e)}"
                        ) from e
                await conn.execute(
                    schema_version_table.insert(),
                    {"version": m.version, "description": m.description, "applied_s": time.time()},
                )
                return True

            applied = await self._write(step)
            if applied:
                log.info("ledger schema at version %d: %s", migration.version, migration.description)

    @staticmethod
    async def _current_version(conn: AsyncConnection) -> int:
        return await _scalar_int(conn, select(func.max(schema_version_table.c.version)))

    async def schema_version(self) -> int:
        """The schema version the database is at."""
        return await self._read(self._current_version)

    # group commit

    async def record(self, records: Sequence[LedgerRecord]) -> None:
        """Commit `records`; return only once they are durable.

        Concurrent calls share one transaction (group commit). Raises LedgerUnavailable when the
        group cannot be committed, RecordRejected when this caller's own records are refused (a
        duplicate request_id): other callers' records in the same group are committed regardless."""
        if not records:
            return
        if self._thread is not None and not self._closing and not self._thread_stopped:
            rows = [_row(r) for r in records]
            if self.inline_when is not None and self.inline_when() and self._commit_inline(rows):
                return
            await self._record_threaded(rows)
            return
        if self._writer is None or self._closing:
            raise LedgerUnavailable("the ledger is not open")
        rows = [_row(r) for r in records]
        pending = _Pending(rows, asyncio.get_running_loop().create_future())
        self._pending.append(pending)
        self._wake.set()
        # A caller cancelled here (client gone) leaves its rows queued: they are still committed.
        await pending.done

    async def _record_threaded(self, rows: list[Row]) -> None:
        loop = asyncio.get_running_loop()
        pending = _Pending(rows, loop.create_future())
        self._queue.put(pending)
        # Bounded like `_run`: a writer stuck in the database (a hung disk) fails its callers
        # instead of hanging them; their rows stay queued and may still be committed later.
        timer = loop.call_later(self._record_limit_s(), _expire, pending.done, self._record_limit_s())
        try:
            # A caller cancelled here (client gone) leaves its rows queued: they are still committed.
            await pending.done
        finally:
            timer.cancel()

    def _commit_inline(self, rows: list[Row]) -> bool:
        """Commit `rows` on this thread, if the writer thread is idle and the database's write lock
        free (neither is waited for). True once committed; False where they must go to the writer
        thread (nothing was written); raises as `record` does where the commit failed."""
        if not self._queue.empty() or not self._commit_lock.acquire(blocking=False):
            return False
        try:
            conn = self._inline[0]
            if conn is None:  # dropped after a failure: the writer thread makes a new one
                return False
            try:
                conn.execute("BEGIN IMMEDIATE")
            except (sqlite3.Error, OSError) as e:
                if not _busy(e):  # not merely another writer's turn: let the writer thread make anew
                    _close_inline(self._inline)
                return False
            error = self._sqlite_write(self._inline, conn, rows)
            if error is None:  # counted under the lock, as the writer thread counts its commits
                self.commits += 1
                self.inline_commits += 1
                self.recorded += len(rows)
        finally:
            self._commit_lock.release()
        if isinstance(error, RecordRejected):
            raise _refused_rows(rows, error)
        if error is not None:
            _log_lost(len(rows), 1, error)
            raise error
        self._inline_since_checkpoint += 1
        if self._inline_since_checkpoint >= INLINE_COMMITS_PER_CHECKPOINT:
            self._inline_since_checkpoint = 0
            self._queue.put(_CHECKPOINT)
        return True

    def _thread_main(
        self, q: queue.SimpleQueue[_Pending | _Checkpoint | None], conn: list[sqlite3.Connection | None]
    ) -> None:
        """The writer thread: take everything queued on `q`, commit it as one group on its own
        connection (`conn[0]`; None once dropped after a failure), wake the group's callers. Between
        groups it checkpoints the WAL where asked and remakes a dropped inline connection."""
        group: list[_Pending] = []
        stopping = False
        checkpoint = False
        try:
            while not stopping:
                item = q.get()
                while True:
                    if item is None:
                        stopping = True
                    elif isinstance(item, _Checkpoint):
                        checkpoint = True
                    else:
                        group.append(item)
                    try:
                        item = q.get_nowait()
                    except queue.Empty:
                        break
                if group:
                    with self._commit_lock:
                        outcomes = self._sqlite_commit_group(conn, group)
                    _wake(outcomes)  # the lock let go first: a woken caller's next commit may be inline
                    group = []
                if checkpoint or (self._inline[0] is None and not stopping):
                    with self._commit_lock:
                        if checkpoint:
                            checkpoint = False
                            _checkpoint(conn)
                        if self._inline[0] is None and not stopping:
                            self._reconnect_inline()
        except BaseException:
            log.exception("ledger: the writer thread failed")
            raise
        finally:
            self._thread_stopped = True
            # Only reached with callers waiting when the thread failed: none may wait forever.
            while True:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    group.append(item)
            _wake([(p, LedgerUnavailable("the ledger writer stopped")) for p in group])
            if conn[0] is not None:
                conn[0].close()
                conn[0] = None

    def _sqlite_commit_group(
        self, conn: list[sqlite3.Connection | None], group: list[_Pending]
    ) -> list[_Outcome]:
        rows = group[0].rows if len(group) == 1 else [row for p in group for row in p.rows]
        error = self._sqlite_insert(conn, rows)
        if error is None:
            self.commits += 1
            self.recorded += len(rows)
            return [(p, None) for p in group]
        if isinstance(error, RecordRejected):
            # Some caller's records were refused and the group's transaction rolled back: commit
            # each caller on its own, so that only the offending caller fails.
            if len(group) == 1:
                return [(group[0], _refused(group[0], error))]
            return self._sqlite_commit_each(conn, group)
        _log_failure(group, error)
        return [(p, error) for p in group]

    def _sqlite_commit_each(
        self, conn: list[sqlite3.Connection | None], group: list[_Pending]
    ) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        for i, p in enumerate(group):
            error = self._sqlite_insert(conn, p.rows)
            if error is None:
                self.commits += 1
                self.recorded += len(p.rows)
                outcomes.append((p, None))
            elif isinstance(error, RecordRejected):
                outcomes.append((p, _refused(p, error)))
            else:
                # The database itself failed: the rest of the group would only wait out more timeouts.
                _log_failure(group[i:], error)
                outcomes.extend((q, error) for q in group[i:])
                break
        return outcomes

    def _reconnect_inline(self) -> None:
        try:
            self._inline[0] = self._sqlite_connect(inline=True)
        except (sqlite3.Error, OSError) as e:
            log.warning("ledger: the inline connection could not be made again: %s", _cause(e))

    def _sqlite_insert(self, box: list[sqlite3.Connection | None], rows: list[Row]) -> Exception | None:
        """Insert `rows` in one transaction on the writer's connection, in the writer thread. Returns
        None once committed, else the error: RecordRejected (the data was refused, rolled back) or
        LedgerUnavailable (the database failed; or COMMIT did: then the rows may be in)."""
        conn = box[0]
        try:
            if conn is None:  # dropped after a failure that left it unusable: reconnect
                conn = box[0] = self._sqlite_connect()
            conn.execute("BEGIN IMMEDIATE")  # waits up to busy_timeout for another writer
        except (sqlite3.Error, OSError) as e:
            return LedgerUnavailable(f"the ledger database failed: {_cause(e)}")
        return self._sqlite_write(box, conn, rows)

    def _sqlite_write(
        self, box: list[sqlite3.Connection | None], conn: sqlite3.Connection, rows: list[Row]
    ) -> Exception | None:
        """The rest of `_sqlite_insert`'s transaction, once BEGIN IMMEDIATE has returned on `conn`."""
        try:
            conn.executemany(self._insert_sql, rows)
        except Exception as e:
            _sqlite_rollback(box)
            if isinstance(e, _SQLITE_DATA_ERRORS):
                return RecordRejected(_cause(e))
            return LedgerUnavailable(f"the ledger database failed: {_cause(e)}")
        try:
            conn.execute("COMMIT")  # synchronous=FULL: returns once the WAL is fsynced
        except Exception as e:
            _sqlite_rollback(box)
            return LedgerUnavailable(f"the ledger database did not confirm the commit: {_cause(e)}")
        return None

    async def _write_loop(self) -> None:
        group: list[_Pending] = []
        try:
            while True:
                if not self._pending and not self._closing:
                    await self._wake.wait()
                self._wake.clear()
                # Everything queued while the previous group was committing forms the next group.
                group, self._pending = self._pending, []
                if group:
                    await self._commit_group(group)
                elif self._closing:
                    return
        finally:
            # Only reached with callers waiting when the writer is cancelled: none may wait forever.
            for p in (*group, *self._pending):
                _settle(p, LedgerUnavailable("the ledger writer stopped"))
            self._pending = []

    async def _commit_group(self, group: list[_Pending]) -> None:
        rows = group[0].rows if len(group) == 1 else [row for p in group for row in p.rows]
        try:
            await self._insert(rows)
        except RecordRejected:
            # Some caller's records were refused and the group's transaction rolled back: commit
            # each caller on its own, so that only the offending caller fails.
            await self._commit_each(group)
            return
        except Exception as e:
            self._fail(group, e)
            return
        self.commits += 1
        self.recorded += len(rows)
        for p in group:
            _settle(p, None)

    async def _commit_each(self, group: list[_Pending]) -> None:
        for i, p in enumerate(group):
            try:
                await self._insert(p.rows)
            except RecordRejected as e:
                _settle(p, _refused(p, e))
                continue
            except Exception as e:
                # The database itself failed: the rest of the group would only wait out more timeouts.
                self._fail(group[i:], e)
                return
            self.commits += 1
            self.recorded += len(p.rows)
            _settle(p, None)

    def _fail(self, group: list[_Pending], e: Exception) -> None:
        error = e if isinstance(e, LedgerUnavailable) else LedgerUnavailable(_cause(e))
        _log_failure(group, error)
        for p in group:
            _settle(p, _fresh(error))

    async def _insert(self, rows: list[Row]) -> None:
        sql = self._insert_sql

        async def insert(conn: AsyncConnection) -> None:
            # Straight to the driver's executemany: no per-row parameter processing (every column
            # is a plain str, int, float or None).
            await conn.exec_driver_sql(sql, rows)

        await self._write(insert)

    # queries

    async def usage(
        self,
        *,
        user: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        group_by: GroupBy | None = None,
    ) -> list[UsageRow]:
        """Sums over the records answered in [start, end) (None: unbounded), of `user` (None:
        everyone), one row per group sorted by group; ungrouped: exactly one row (zeros when empty)."""
        r = requests_table.c
        group_col = {"model": r.model, "task": r.task, "day": r.day, "user": r.user_name}.get(group_by or "")
        if group_by is not None and group_col is None:
            raise ValueError(f"group_by must be model, task, day or user, got {group_by!r}")
        sums = (
            func.count().label("requests"),
            func.coalesce(func.sum(r.joules), 0.0).label("joules"),
            func.coalesce(func.sum(r.co2_grams), 0.0).label("co2_grams"),
            func.coalesce(func.sum(r.images), 0).label("images"),
            func.coalesce(func.sum(r.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(r.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(case((r.task == "image", r.joules), else_=0.0)), 0.0).label("image_j"),
            func.coalesce(func.sum(case((r.task == "text", r.joules), else_=0.0)), 0.0).label("text_j"),
        )
        stmt = select(*sums) if group_col is None else select(group_col.label("grp"), *sums)
        if user is not None:
            stmt = stmt.where(r.user_name == user)
        if start is not None:
            stmt = stmt.where(r.time_s >= _epoch_s(start, "start"))
        if end is not None:
            stmt = stmt.where(r.time_s < _epoch_s(end, "end"))
        if group_col is not None:
            stmt = stmt.group_by(group_col).order_by(group_col)

        async def query(conn: AsyncConnection) -> list[UsageRow]:
            result = await conn.execute(stmt)
            return [
                UsageRow(
                    group=m["grp"] if group_col is not None else None,
                    requests=int(m["requests"]),
                    joules=float(m["joules"]),
                    co2_grams=float(m["co2_grams"]),
                    images=int(m["images"]),
                    prompt_tokens=int(m["prompt_tokens"]),
                    completion_tokens=int(m["completion_tokens"]),
                    image_joules=float(m["image_j"]),
                    text_joules=float(m["text_j"]),
                )
                for m in result.mappings()
            ]

        return await self._read(query)

    async def spent(self, user: str, since: datetime | None) -> tuple[float, float]:
        """(J, g CO2e) charged to `user` since `since` (inclusive; None: all time)."""
        return (await self.spent_by_user({user: since}))[user]

    async def spent_by_user(
        self, since_by_user: Mapping[str, datetime | None]
    ) -> dict[str, tuple[float, float]]:
        """(J, g CO2e) per user since each user's own start (None: all time); every user asked for
        is in the answer, (0.0, 0.0) when they have no records. One query per distinct start."""
        by_since: dict[float | None, list[str]] = {}
        for user, since in since_by_user.items():
            key = None if since is None else _epoch_s(since, "since")
            by_since.setdefault(key, []).append(user)
        r = requests_table.c

        async def query(conn: AsyncConnection) -> dict[str, tuple[float, float]]:
            out = {user: (0.0, 0.0) for user in since_by_user}
            for since_s, users in by_since.items():
                for chunk in _chunks(users, 500):
                    stmt = (
                        select(r.user_name, func.sum(r.joules), func.sum(r.co2_grams))
                        .where(r.user_name.in_(chunk))
                        .group_by(r.user_name)
                    )
                    if since_s is not None:
                        stmt = stmt.where(r.time_s >= since_s)
                    for user, joules, co2 in await conn.execute(stmt):
                        out[user] = (float(joules or 0.0), float(co2 or 0.0))
            return out

        return await self._read(query)

    async def count(self) -> int:
        """The number of records."""
        return await self._read(lambda c: _scalar_int(c, select(func.count()).select_from(requests_table)))

    async def records(
        self,
        *,
        user: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int | None = None,
    ) -> list[LedgerRecord]:
        """The records answered in [start, end) of `user` (None: everyone), oldest first."""
        r = requests_table.c
        stmt = select(requests_table).order_by(r.time_s, r.request_id)
        if user is not None:
            stmt = stmt.where(r.user_name == user)
        if start is not None:
            stmt = stmt.where(r.time_s >= _epoch_s(start, "start"))
        if end is not None:
            stmt = stmt.where(r.time_s < _epoch_s(end, "end"))
        if limit is not None:
            stmt = stmt.limit(limit)

        async def query(conn: AsyncConnection) -> list[LedgerRecord]:
            return [_record(m) for m in (await conn.execute(stmt)).mappings()]

        return await self._read(query)

    # API keys

    async def add_key(self, key: ApiKeyRecord) -> None:
        """Store a key. RecordRejected when its id or hash is already stored."""
        values = {
            "key_id": key.key_id,
            "key_hash": key.key_hash,
            "user_name": key.user,
            "admin": key.admin,
            "created_s": _epoch_s(key.created, "created"),
            "revoked_s": None if key.revoked is None else _epoch_s(key.revoked, "revoked"),
            "budget_kwh": key.budget_kwh,
            "budget_co2_grams": key.budget_co2_grams,
            "budget_period": key.budget_period,
        }

        async def insert(conn: AsyncConnection) -> None:
            await conn.execute(api_keys_table.insert(), values)

        try:
            await self._write(insert)
        except RecordRejected as e:
            raise RecordRejected(f"key {key.key_id!r} (or its hash) is already stored") from e

    async def keys(self, *, include_revoked: bool = True) -> list[ApiKeyRecord]:
        """All keys, oldest first."""
        k = api_keys_table.c
        stmt = select(api_keys_table).order_by(k.created_s, k.key_id)
        if not include_revoked:
            stmt = stmt.where(k.revoked_s.is_(None))

        async def query(conn: AsyncConnection) -> list[ApiKeyRecord]:
            return [_key(m) for m in (await conn.execute(stmt)).mappings()]

        return await self._read(query)

    async def key_by_hash(self, key_hash: str) -> ApiKeyRecord | None:
        """The key with this SHA-256 hex, revoked or not (the caller checks `revoked`)."""
        stmt = select(api_keys_table).where(api_keys_table.c.key_hash == key_hash)

        async def query(conn: AsyncConnection) -> ApiKeyRecord | None:
            m = (await conn.execute(stmt)).mappings().first()
            return None if m is None else _key(m)

        return await self._read(query)

    async def revoke_key(self, key_id: str, when: datetime | None = None) -> bool:
        """Revoke a key at `when` (default now). True if it was active, False if unknown or revoked."""
        revoked_s = time.time() if when is None else _epoch_s(when, "when")
        k = api_keys_table.c
        stmt = (
            update(api_keys_table)
            .where(k.key_id == key_id, k.revoked_s.is_(None))
            .values(revoked_s=revoked_s)
        )

        async def revoke(conn: AsyncConnection) -> bool:
            return (await conn.execute(stmt)).rowcount == 1

        return await self._write(revoke)


def _about_the_data(e: DBAPIError) -> bool:
    """An error caused by the values written (SQLSTATE classes 22 and 23), not by the database."""
    if isinstance(e, IntegrityError | DataError):
        return True
    sqlstate = getattr(e.orig, "sqlstate", None) or ""
    return sqlstate.startswith(("22", "23"))


def _insert_sql(engine: AsyncEngine) -> str:
    """The record INSERT in the engine's own SQL and parameter style, positional in _row order."""
    compiled = requests_table.insert().compile(dialect=engine.dialect)
    if tuple(compiled.positiontup or ()) != _ROW_COLUMNS:
        raise AssertionError(f"unexpected parameter order {compiled.positiontup}")
    return str(compiled)


async def _scalar_int(conn: AsyncConnection, stmt: Any) -> int:
    """An integer aggregate; 0 for NULL (MAX of no rows)."""
    return int(await conn.scalar(stmt) or 0)


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _sqlite_rollback(box: list[sqlite3.Connection | None]) -> None:
    """Roll the writer's failed transaction back; a connection that cannot is dropped (reopened
    by the next group)."""
    conn = box[0]
    if conn is None or not conn.in_transaction:
        return
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error as e:
        log.warning("ledger: rollback failed (%s); reconnecting", _cause(e))
        conn.close()
        box[0] = None


def _log_failure(group: list[_Pending], error: Exception) -> None:
    _log_lost(sum(len(p.rows) for p in group), len(group), error)


def _log_lost(records: int, callers: int, error: Exception) -> None:
    log.warning("ledger: %d records of %d callers were not committed: %s", records, callers, error)


def _refused(p: _Pending, error: RecordRejected) -> RecordRejected:
    return _refused_rows(p.rows, error)


def _refused_rows(rows: list[Row], error: RecordRejected) -> RecordRejected:
    ids = ", ".join(str(row[0]) for row in rows[:5])
    more = ", ..." if len(rows) > 5 else ""
    return RecordRejected(f"the ledger refused records {ids}{more}: {error}")


def _enable_wal(
    cursor: Any, timeout_s: float, sleep: Callable[[float], object] = time.sleep
) -> tuple[Any, ...] | None:
    """Put the database in WAL mode (it stays so, in the file); the row `PRAGMA journal_mode` gives.

    Switching needs the database to itself, and SQLite refuses it at once, without its busy wait,
    while another connection holds it (replicas starting together on a new file): retried until
    `timeout_s`. A database already in WAL mode is not switched again."""
    deadline = time.monotonic() + timeout_s
    delay_s = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode")
            mode = cursor.fetchone()
            if mode is not None and str(mode[0]).lower() == "wal":
                return tuple(mode)
            cursor.execute("PRAGMA journal_mode=WAL")
            row = cursor.fetchone()
            return tuple(row) if row is not None else None
        except Exception as e:  # sqlite3's, or SQLAlchemy's adapted copy of it
            if "locked" not in str(e) or time.monotonic() + delay_s > deadline:
                raise
        sleep(delay_s)  # start-up only; the write lock is held for a migration's few statements
        delay_s = min(delay_s * 2, 0.1)


def _busy(e: BaseException) -> bool:
    """SQLite refused at once because another connection holds the lock (busy_timeout 0)."""
    code = getattr(e, "sqlite_errorcode", None)  # Python 3.11+
    return code in (5, 6) if code is not None else "locked" in str(e)  # SQLITE_BUSY, SQLITE_LOCKED


def _close_inline(box: list[sqlite3.Connection | None]) -> None:
    conn, box[0] = box[0], None
    if conn is not None:
        with contextlib.suppress(sqlite3.Error):
            conn.close()


def _checkpoint(box: list[sqlite3.Connection | None]) -> None:
    """A passive checkpoint of the WAL on the writer's connection (it waits for nobody)."""
    conn = box[0]
    if conn is None:
        return
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except sqlite3.Error as e:
        log.warning("ledger: a checkpoint of the WAL failed: %s", _cause(e))


def _wake(outcomes: list[_Outcome]) -> None:
    """From the writer thread: settle the callers' futures, in their event loops (one wake-up per
    loop and group)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].done.get_loop(), []).append(outcome)
    for loop, some in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there any more
            loop.call_soon_threadsafe(_settle_all, some)


def _settle_all(outcomes: list[_Outcome]) -> None:
    shared = sum(1 for _, error in outcomes if error is not None) > 1
    for p, error in outcomes:
        _settle(p, _fresh(error) if shared and isinstance(error, Exception) else error)


def _expire(done: asyncio.Future[None], limit_s: float) -> None:
    if not done.done():
        done.set_exception(
            LedgerUnavailable(f"the ledger database did not confirm the commit within {limit_s:g} s")
        )


def _settle(p: _Pending, error: BaseException | None) -> None:
    if p.done.done():  # its caller was cancelled
        return
    if error is None:
        p.done.set_result(None)
    else:
        p.done.set_exception(error)


def _fresh(error: Exception) -> Exception:
    """A copy per caller: one exception object raised in many tasks would share its traceback."""
    copy = type(error)(*error.args)
    copy.__cause__ = error.__cause__
    return copy
