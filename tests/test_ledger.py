"""The ledger against real databases: SQLite files and a real PostgreSQL server (tests/pg.py).

Every test that takes `ledger` or `ledger_url` runs on both backends; PostgreSQL tests each get a
fresh database on one session-wide server. Sums use dyadic values (multiples of 1/8) so that they
are exact in floating point whatever order the database adds them in."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import inspect, text

from proxy.ledger import (
    INLINE_COMMITS_PER_CHECKPOINT,
    MIGRATIONS,
    ApiKeyRecord,
    Ledger,
    LedgerRecord,
    LedgerUnavailable,
    Migration,
    RecordRejected,
    SchemaError,
    UsageRow,
    api_keys_table,
    default_url,
    requests_table,
    sqlite_url,
)
from tests.pg import PostgresCluster, postgres_cluster

UTC = timezone.utc
Step = Callable[[], Awaitable[None]]
BASE = datetime(2025, 3, 1, 23, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One PostgreSQL server for the session (fails loudly if PostgreSQL is not installed)."""
    with postgres_cluster() as cluster:
        yield cluster


def _asyncpg_url(url: str) -> str:
    return url.replace("postgresql://", "postgres://", 1)


@asynccontextmanager
async def fresh_pg_database(cluster: PostgresCluster) -> AsyncIterator[str]:
    """A new, empty database on the session's server, dropped afterwards (sessions and all)."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(_asyncpg_url(cluster.url()))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield cluster.url(name)
    finally:
        admin = await asyncpg.connect(_asyncpg_url(cluster.url()))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database: a SQLite file in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "ledger" / "wattproxy.db")
        return
    async with fresh_pg_database(request.getfixturevalue("pg_cluster")) as url:
        yield url


@pytest.fixture
async def ledger(ledger_url: str) -> AsyncIterator[Ledger]:
    ledger = Ledger(ledger_url, timeout_s=5.0)
    await ledger.start()
    yield ledger
    await ledger.close()


def rec(request_id: str, when: datetime = BASE, **fields: object) -> LedgerRecord:
    base: dict[str, object] = {"user": "alice", "key_id": "key_a", "model": "m1", "task": "text"}
    base["status"] = "ok"
    base.update(fields)
    return LedgerRecord(request_id=request_id, time=when, **base)  # type: ignore[arg-type]


def expected_usage(records: Sequence[LedgerRecord], group: str | None = None) -> UsageRow:
    return UsageRow(
        group=group,
        requests=len(records),
        joules=sum(r.joules for r in records),
        co2_grams=sum(r.co2_grams for r in records),
        images=sum(r.images for r in records),
        prompt_tokens=sum(r.prompt_tokens for r in records),
        completion_tokens=sum(r.completion_tokens for r in records),
        image_joules=sum(r.joules for r in records if r.task == "image"),
        text_joules=sum(r.joules for r in records if r.task == "text"),
    )


# --- URLs --------------------------------------------------------------------------------------


def test_urls_map_to_async_drivers(tmp_path: Path) -> None:
    assert Ledger("sqlite:///:memory:").url.drivername == "sqlite+aiosqlite"
    assert Ledger(sqlite_url(tmp_path / "x.db")).url.database == str(tmp_path / "x.db")
    for url in ("postgresql://u@127.0.0.1:5432/db", "postgres://u@h/db", "postgresql+asyncpg://u@h/db"):
        ledger = Ledger(url)
        assert ledger.url.drivername == "postgresql+asyncpg"
        assert ledger.backend == "postgresql"
    for bad in ("mysql://u@h/db", "sqlite+pysqlite:///x.db", "not a url"):
        with pytest.raises(ValueError):
            Ledger(bad)
    assert default_url(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'wattproxy.db'}"
    assert "p4ss" not in repr(Ledger("postgresql://u:p4ss@h/db"))


# --- schema and migrations ---------------------------------------------------------------------


async def test_round_trip_keeps_every_field(ledger: Ledger) -> None:
    full = LedgerRecord(
        request_id="req-1",
        time=datetime(2025, 3, 1, 23, 59, 59, 123456, tzinfo=UTC),
        user="alice",
        key_id=None,
        model="tiny-sd",
        task="image",
        status="cancelled",
        prompt_tokens=3,
        completion_tokens=0,
        images=4,
        pixels=4 * 512 * 512 * 1000,  # beyond 32 bits
        steps=20,
        device="cuda:0",
        joules=756.125,
        idle_joules=1.5,
        uncertainty_joules=0.0625,
        measurement="measured",
        co2_grams=0.080078125,
        embodied_co2_grams=0.001953125,
        carbon_intensity_g_per_kwh=381.0,
        pue=1.2,
        carbon_source="static:DE OWID/Ember 2023",
        queue_seconds=0.015625,
        run_seconds=1.75,
    )
    await ledger.record([full])
    assert await ledger.records() == [full]
    assert await ledger.count() == 1


async def test_schema_has_its_tables_columns_and_indexes(ledger: Ledger) -> None:
    assert ledger._engine is not None
    async with ledger._engine.connect() as conn:

        def describe(sync_conn: object) -> tuple[dict[str, set[str]], set[str]]:
            insp = inspect(sync_conn)
            tables = {t: {c["name"] for c in insp.get_columns(t)} for t in insp.get_table_names()}
            indexes = {i["name"] for i in insp.get_indexes("requests")}
            return tables, indexes

        tables, indexes = await conn.run_sync(describe)
    assert tables["requests"] == {c.name for c in requests_table.columns}
    assert tables["api_keys"] == {c.name for c in api_keys_table.columns}
    assert tables["schema_version"] == {"version", "description", "applied_s"}
    assert {"ix_requests_time", "ix_requests_user_time"} <= indexes
    assert "prompt" not in " ".join(tables["requests"]).replace("prompt_tokens", "")


async def test_migrations_are_idempotent_across_restarts(ledger_url: str) -> None:
    first = Ledger(ledger_url)
    await first.start()
    await first.record([rec("a", joules=1.5), rec("b", user="bob", joules=2.25)])
    key = ApiKeyRecord("key_000000000001", "ab" * 32, "alice", admin=True, created=BASE)
    await first.add_key(key)
    before = await first.usage(group_by="user")
    assert await first.schema_version() == len(MIGRATIONS)
    await first.close()

    for _ in range(2):  # restart twice: nothing is re-applied, nothing is lost
        again = Ledger(ledger_url)
        await again.start()
        try:
            assert await again.schema_version() == len(MIGRATIONS)
            assert await _version_rows(again) == len(MIGRATIONS)
            assert await again.usage(group_by="user") == before
            assert await again.count() == 2
            assert await again.keys() == [key]
        finally:
            await again.close()


async def _version_rows(ledger: Ledger) -> int:
    assert ledger._engine is not None
    async with ledger._engine.connect() as conn:
        return int(await conn.scalar(text("SELECT count(*) FROM schema_version")))


async def test_a_new_migration_upgrades_in_place_and_a_failed_one_changes_nothing(ledger_url: str) -> None:
    v1 = Ledger(ledger_url)
    await v1.start()
    await v1.record([rec("a", joules=4.0)])
    await v1.close()

    add_note = Migration(2, "a note per request", ("ALTER TABLE requests ADD COLUMN note TEXT",))
    v2 = Ledger(ledger_url, migrations=(*MIGRATIONS, add_note))
    await v2.start()
    assert await v2.schema_version() == 2
    assert (await v2.usage())[0].joules == 4.0
    await v2.close()

    broken = Migration(3, "half good", ("CREATE TABLE extra (x INTEGER)", "CREATE TABLE nonsense ("))
    v3 = Ledger(ledger_url, migrations=(*MIGRATIONS, add_note, broken))
    with pytest.raises(SchemaError, match="migration 3"):
        await v3.start()

    v2 = Ledger(ledger_url, migrations=(*MIGRATIONS, add_note))
    await v2.start()
    try:
        assert await v2.schema_version() == 2
        assert v2._engine is not None
        async with v2._engine.connect() as conn:
            names = await conn.run_sync(lambda c: inspect(c).get_table_names())
        assert "extra" not in names  # the failed migration's first step was rolled back with it
        assert await v2.count() == 1
    finally:
        await v2.close()

    # An older WattProxy refuses a database migrated by a newer one.
    with pytest.raises(SchemaError, match="newer"):
        await Ledger(ledger_url).start()


def test_migration_versions_are_checked() -> None:
    with pytest.raises(ValueError):
        Ledger("sqlite:///:memory:", migrations=(Migration(2, "gap", ()),))


async def test_sqlite_runs_in_wal_with_full_sync(tmp_path: Path) -> None:
    ledger = Ledger(sqlite_url(tmp_path / "w.db"), timeout_s=2.5)
    await ledger.start()
    try:
        assert ledger._engine is not None
        async with ledger._engine.connect() as conn:
            assert await conn.scalar(text("PRAGMA journal_mode")) == "wal"
            assert await conn.scalar(text("PRAGMA synchronous")) == 2  # FULL
            assert await conn.scalar(text("PRAGMA busy_timeout")) == 2500
    finally:
        await ledger.close()


async def test_inline_commits_are_durable_and_skip_the_writer_thread(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "i.db")
    ledger, reader = Ledger(url, timeout_s=2.5), Ledger(url)
    await ledger.start()
    await reader.start()
    try:
        inline = ledger._inline[0]
        assert inline is not None
        # The same durable settings as the writer's; it neither waits for a lock nor checkpoints.
        assert inline.execute("PRAGMA synchronous").fetchone() == (2,)
        assert inline.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert inline.execute("PRAGMA busy_timeout").fetchone() == (0,)
        assert inline.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        alone = True
        ledger.inline_when = lambda: alone
        for i in range(5):
            await ledger.record([rec(f"r{i}", joules=float(i))])
            assert await reader.count() == i + 1  # committed before record() returned
        assert (ledger.inline_commits, ledger.commits, ledger.recorded) == (5, 5, 5)
        # Refused data fails its caller and leaves the connection usable.
        with pytest.raises(RecordRejected, match="r0"):
            await ledger.record([rec("r0")])
        await ledger.record([rec("r5")])
        assert ledger.inline_commits == 6
        # Where the server says others are in flight, the writer thread commits as before.
        alone = False
        await asyncio.gather(*(ledger.record([rec(f"g{i}")]) for i in range(20)))
        assert ledger.inline_commits == 6
        assert ledger.commits < 6 + 20  # grouped
        assert await reader.count() == 26
    finally:
        await ledger.close()
        await reader.close()


async def test_inline_commit_gives_way_to_another_writer_without_waiting(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    ledger = Ledger(sqlite_url(path), timeout_s=5.0)
    await ledger.start()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        ledger.inline_when = lambda: True
        await ledger.record([rec("before")])
        holder.execute("BEGIN IMMEDIATE")  # another process's writer holds the lock
        call = asyncio.create_task(ledger.record([rec("while-held")]))
        # The event loop is not held up: the record waits in the writer thread, not on this thread.
        await asyncio.sleep(0.2)
        assert not call.done()
        holder.execute("ROLLBACK")
        await call
        assert ledger.inline_commits == 1
        assert ledger.commits == 2
        # The writer thread holds its turn: an inline commit meanwhile goes to the thread's queue.
        with ledger._commit_lock:
            call = asyncio.create_task(ledger.record([rec("while-writing")]))
            await asyncio.sleep(0.05)
            assert not call.done()
        await call
        assert ledger.inline_commits == 1
        await ledger.record([rec("after")])
        assert ledger.inline_commits == 2
        assert {r.request_id for r in await ledger.records()} == {
            "before",
            "while-held",
            "while-writing",
            "after",
        }
    finally:
        holder.close()
        await ledger.close()


def _wal_frames(db: Path) -> int:
    wal = db.with_name(db.name + "-wal")
    return max((wal.stat().st_size - 32) // (4096 + 24), 0) if wal.exists() else 0


async def test_inline_commits_have_the_writer_thread_checkpoint_the_wal(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    ledger = Ledger(sqlite_url(db))
    await ledger.start()
    try:
        ledger.inline_when = lambda: True
        n = 6 * INLINE_COMMITS_PER_CHECKPOINT
        for i in range(n):
            await ledger.record([rec(f"r{i:04d}")])
            if i % 64 == 0:
                await asyncio.sleep(0.001)  # the writer thread's turn (a server's loop sleeps too)
            if i == 99:
                per_commit = _wal_frames(db) / 100  # pages a one-record commit appends (3-5)
        assert ledger.recorded == n
        assert ledger.inline_commits > n // 2
        # Never checkpointed, the WAL would hold n x per_commit frames; checkpointed every
        # INLINE_COMMITS_PER_CHECKPOINT commits, it restarts from its start after each.
        assert 0 < _wal_frames(db) < 2 * INLINE_COMMITS_PER_CHECKPOINT * per_commit, _wal_frames(db)
    finally:
        await ledger.close()
    assert len(await _count_rows(db)) == n


async def _count_rows(db: Path) -> list[tuple[str]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT request_id FROM requests").fetchall()
    finally:
        conn.close()


async def test_concurrent_startups_migrate_once(ledger_url: str) -> None:
    replicas = [Ledger(ledger_url) for _ in range(3)]
    await asyncio.gather(*(r.start() for r in replicas))
    try:
        assert await _version_rows(replicas[0]) == len(MIGRATIONS)
        # Replicas write into the same database at the same time.
        await asyncio.gather(
            *(r.record([rec(f"{i}-{j}")]) for i, r in enumerate(replicas) for j in range(20))
        )
        assert await replicas[1].count() == 60
    finally:
        await asyncio.gather(*(r.close() for r in replicas))


# --- group commit ------------------------------------------------------------------------------


async def test_group_commit_many_callers_few_transactions(ledger: Ledger) -> None:
    records = [rec(f"r{i:03d}", BASE + timedelta(seconds=i), joules=0.5) for i in range(200)]
    readers = [ledger.usage() for _ in range(5)]  # reads run beside the writer
    await asyncio.gather(*(ledger.record([r]) for r in records), *readers)
    assert await ledger.count() == 200
    assert ledger.recorded == 200
    assert 1 <= ledger.commits <= 10, ledger.commits
    assert (await ledger.usage())[0].joules == 100.0

    # Staggered waves of callers: a wave arriving while a commit is in flight joins the next one.
    async def wave(w: int) -> None:
        await asyncio.sleep(0.002 * w)
        await asyncio.gather(*(ledger.record([rec(f"w{w}-{i}")]) for i in range(50)))

    commits = ledger.commits
    await asyncio.gather(*(wave(w) for w in range(4)))
    assert await ledger.count() == 400
    assert ledger.commits - commits <= 8


async def test_record_returns_only_once_committed(ledger_url: str) -> None:
    writer, reader = Ledger(ledger_url), Ledger(ledger_url)
    await writer.start()
    await reader.start()
    try:
        for i in range(5):
            await writer.record([rec(f"r{i}")])
            # Another connection (another replica) sees it as soon as record() has returned.
            assert await reader.count() == i + 1
    finally:
        await writer.close()
        await reader.close()


async def test_close_commits_everything_queued(ledger_url: str) -> None:
    ledger = Ledger(ledger_url)
    await ledger.start()
    calls = [asyncio.create_task(ledger.record([rec(f"r{i}")])) for i in range(50)]
    await asyncio.sleep(0)  # they are queued, not yet committed
    await ledger.close()
    await asyncio.gather(*calls)
    with pytest.raises(LedgerUnavailable):
        await ledger.record([rec("late")])

    again = Ledger(ledger_url)
    await again.start()
    try:
        assert await again.count() == 50
    finally:
        await again.close()


async def test_a_cancelled_caller_is_still_recorded(ledger: Ledger) -> None:
    call = asyncio.create_task(ledger.record([rec("gone")]))
    await asyncio.sleep(0)
    call.cancel()
    await ledger.record([rec("next")])  # committed after (or with) the cancelled one's group
    assert {r.request_id for r in await ledger.records()} == {"gone", "next"}


async def test_a_duplicate_fails_only_its_own_caller(ledger: Ledger) -> None:
    await ledger.record([rec("taken", joules=1.0)])
    good = [ledger.record([rec(f"g{i}", joules=2.0)]) for i in range(10)]
    dup_alone = ledger.record([rec("taken", joules=100.0)])
    dup_in_batch = ledger.record([rec("fresh-but-with-a-dup", joules=100.0), rec("taken")])
    dup_within = ledger.record([rec("twice"), rec("twice")])
    results = await asyncio.gather(*good, dup_alone, dup_in_batch, dup_within, return_exceptions=True)

    assert results[:10] == [None] * 10
    assert all(isinstance(r, RecordRejected) for r in results[10:]), results[10:]
    assert "taken" in str(results[10])
    ids = {r.request_id for r in await ledger.records()}
    # Every good caller's records are in; a refused caller's batch is all-or-nothing.
    assert ids == {"taken", *(f"g{i}" for i in range(10))}
    assert (await ledger.usage())[0].joules == 21.0
    # The writer keeps going.
    await ledger.record([rec("after")])
    assert await ledger.count() == 12


async def test_bad_data_fails_only_its_own_caller(ledger: Ledger) -> None:
    with pytest.raises(ValueError):  # a type slip is caught before it can reach the group
        await ledger.record([rec("slip", joules="lots")])  # type: ignore[arg-type]
    # A NUL byte: PostgreSQL refuses it (a data error), SQLite stores it. Either way it is the
    # caller's own business: the callers beside it in the group are committed.
    results = await asyncio.gather(
        *(ledger.record([rec(f"g{i}")]) for i in range(5)),
        ledger.record([rec("nul", user="a\x00b")]),
        return_exceptions=True,
    )
    assert results[:5] == [None] * 5
    stored = {r.request_id for r in await ledger.records()}
    assert {f"g{i}" for i in range(5)} <= stored
    if ledger.backend == "postgresql":
        assert isinstance(results[5], RecordRejected)
        assert "nul" not in stored
    else:
        assert results[5] is None and "nul" in stored


async def test_naive_times_are_refused(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await ledger.record([rec("naive", datetime(2025, 1, 1))])
    with pytest.raises(ValueError, match="timezone-aware"):
        await ledger.usage(start=datetime(2025, 1, 1))
    assert await ledger.count() == 0


async def test_memory_database_serves_concurrent_reads_and_writes() -> None:
    ledger = Ledger("sqlite:///:memory:")
    await ledger.start()
    try:
        await asyncio.gather(
            *(ledger.record([rec(f"r{i}", joules=1.0)]) for i in range(100)),
            *(ledger.usage(group_by="model") for _ in range(10)),
        )
        assert (await ledger.usage())[0].joules == 100.0
    finally:
        await ledger.close()


# --- usage -------------------------------------------------------------------------------------

PLUS_TWO = timezone(timedelta(hours=2))
DATASET = [
    rec("a", BASE, user="alice", model="m1", task="text", joules=1.0, co2_grams=0.5,
        prompt_tokens=10, completion_tokens=20),
    # 01:30 at +02:00 is 23:30 UTC on March 1st: the day is UTC's.
    rec("b", datetime(2025, 3, 2, 1, 30, tzinfo=PLUS_TWO), user="alice", model="m2", task="image",
        joules=8.0, co2_grams=4.0, images=2, pixels=2 * 64 * 64, steps=4),
    rec("c", BASE + timedelta(hours=1), user="bob", model="m1", task="text", joules=2.5,
        co2_grams=1.25, prompt_tokens=5, completion_tokens=7),
    rec("d", BASE + timedelta(hours=2), user="bob", model="m2", task="image", joules=16.0,
        co2_grams=8.0, images=4),
    rec("e", BASE + timedelta(hours=25), user="carol", model="m1", task="text", status="error",
        joules=0.75, co2_grams=0.375, prompt_tokens=3),
]  # fmt: skip


def _by(attr: str) -> dict[str, list[LedgerRecord]]:
    groups: dict[str, list[LedgerRecord]] = {}
    for r in DATASET:
        key = r.time.astimezone(UTC).strftime("%Y-%m-%d") if attr == "day" else getattr(r, attr)
        groups.setdefault(key, []).append(r)
    return groups


async def test_usage_sums_and_groups(ledger: Ledger) -> None:
    await ledger.record(DATASET)

    total = await ledger.usage()
    assert total == [expected_usage(DATASET)]
    assert total[0].joules == 28.25 and total[0].images == 6 and total[0].prompt_tokens == 18

    for group_by, attr in (("model", "model"), ("task", "task"), ("day", "day"), ("user", "user")):
        rows = await ledger.usage(group_by=group_by)  # type: ignore[arg-type]
        want = [expected_usage(rs, key) for key, rs in sorted(_by(attr).items())]
        assert rows == want, group_by
    days = [row.group for row in await ledger.usage(group_by="day")]
    assert days == ["2025-03-01", "2025-03-02", "2025-03-03"]

    alice = await ledger.usage(user="alice", group_by="task")
    assert alice == [
        expected_usage([DATASET[1]], "image"),
        expected_usage([DATASET[0]], "text"),
    ]


async def test_usage_window_is_start_inclusive_end_exclusive(ledger: Ledger) -> None:
    await ledger.record(DATASET)
    start, end = DATASET[2].time, DATASET[4].time  # c exactly at start, e exactly at end
    assert await ledger.usage(start=start, end=end) == [expected_usage(DATASET[2:4])]
    assert await ledger.usage(start=start) == [expected_usage(DATASET[2:])]
    assert await ledger.usage(end=start) == [expected_usage(DATASET[:2])]
    just_after = start + timedelta(microseconds=1)
    assert (await ledger.usage(start=just_after, end=end))[0].requests == 1
    assert await ledger.usage(start=start, end=end, group_by="user") == [expected_usage(DATASET[2:4], "bob")]
    picked = await ledger.records(start=start, end=end)
    assert [r.request_id for r in picked] == ["c", "d"]


async def test_usage_of_nothing(ledger: Ledger) -> None:
    assert await ledger.usage() == [expected_usage([])]
    assert await ledger.usage(group_by="model") == []
    await ledger.record(DATASET)
    assert await ledger.usage(user="nobody") == [expected_usage([])]


async def test_spent_per_user_and_in_bulk(ledger: Ledger) -> None:
    await ledger.record(DATASET)
    assert await ledger.spent("alice", None) == (9.0, 4.5)
    assert await ledger.spent("bob", BASE + timedelta(hours=2)) == (16.0, 8.0)  # inclusive
    assert await ledger.spent("bob", BASE + timedelta(hours=3)) == (0.0, 0.0)
    assert await ledger.spent("nobody", None) == (0.0, 0.0)

    bulk = await ledger.spent_by_user(
        {"alice": BASE + timedelta(minutes=1), "bob": None, "carol": BASE, "dave": None}
    )
    assert bulk == {"alice": (8.0, 4.0), "bob": (18.5, 9.25), "carol": (0.75, 0.375), "dave": (0.0, 0.0)}
    assert await ledger.spent_by_user({}) == {}


# --- keys --------------------------------------------------------------------------------------


async def test_keys_add_list_lookup_revoke(ledger: Ledger) -> None:
    admin = ApiKeyRecord("key_00000000000a", "a" * 64, "root", admin=True, created=BASE)
    user = ApiKeyRecord(
        "key_00000000000b",
        "b" * 64,
        "alice",
        admin=False,
        created=BASE + timedelta(seconds=1),
        budget_kwh=0.5,
        budget_co2_grams=125.0,
        budget_period="month",
    )
    await ledger.add_key(admin)
    await ledger.add_key(user)
    assert await ledger.keys() == [admin, user]
    assert await ledger.key_by_hash("b" * 64) == user
    assert await ledger.key_by_hash("c" * 64) is None

    when = BASE + timedelta(days=1)
    assert await ledger.revoke_key(user.key_id, when) is True
    assert await ledger.revoke_key(user.key_id) is False  # already revoked
    assert await ledger.revoke_key("key_unknown") is False
    revoked = replace(user, revoked=when)
    assert await ledger.key_by_hash("b" * 64) == revoked  # still found: the caller checks `revoked`
    assert await ledger.keys() == [admin, revoked]
    assert await ledger.keys(include_revoked=False) == [admin]

    with pytest.raises(RecordRejected):
        await ledger.add_key(replace(admin, key_hash="d" * 64))  # same id
    with pytest.raises(RecordRejected):
        await ledger.add_key(replace(admin, key_id="key_00000000000c"))  # same secret
    assert len(await ledger.keys()) == 2


# --- the database gone -------------------------------------------------------------------------


async def test_unreachable_database_is_unavailable_not_a_hang(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    t0 = time.monotonic()
    with pytest.raises(LedgerUnavailable):
        await Ledger(sqlite_url(blocker / "sub" / "x.db"), timeout_s=1.0).start()
    with pytest.raises(LedgerUnavailable):
        await Ledger("postgresql://postgres@127.0.0.1:1/none", timeout_s=1.0).start()
    assert time.monotonic() - t0 < 5.0

    never_started = Ledger("sqlite:///:memory:")
    with pytest.raises(LedgerUnavailable):
        await never_started.record([rec("x")])
    with pytest.raises(LedgerUnavailable):
        await never_started.count()


@pytest.fixture
async def lock_holder(ledger_url: str) -> AsyncIterator[tuple[Step, Step]]:
    """Takes the write lock on the ledger's database from another connection: (take, release)."""
    if ledger_url.startswith("sqlite"):
        conns: list[sqlite3.Connection] = []

        async def take_sqlite() -> None:
            conn = sqlite3.connect(ledger_url.removeprefix("sqlite:///"), isolation_level=None)
            conns.append(conn)
            conn.execute("BEGIN EXCLUSIVE")

        async def release_sqlite() -> None:
            conns[-1].execute("ROLLBACK")

        yield take_sqlite, release_sqlite
        for conn in conns:
            conn.close()
        return
    pg = await asyncpg.connect(_asyncpg_url(ledger_url))

    async def take_pg() -> None:
        await pg.execute("BEGIN; LOCK TABLE requests IN ACCESS EXCLUSIVE MODE")

    async def release_pg() -> None:
        await pg.execute("ROLLBACK")

    yield take_pg, release_pg
    await pg.close()


async def test_a_locked_database_times_out_then_recovers(
    ledger_url: str, lock_holder: tuple[Step, Step]
) -> None:
    take, release = lock_holder
    ledger = Ledger(ledger_url, timeout_s=0.5)
    await ledger.start()
    try:
        await ledger.record([rec("before")])
        await take()
        t0 = time.monotonic()
        with pytest.raises(LedgerUnavailable):
            await ledger.record([rec("blocked-1"), rec("blocked-2")])
        assert time.monotonic() - t0 < 3.0
        await release()
        await ledger.record([rec("after")])
        assert {r.request_id for r in await ledger.records()} == {"before", "after"}
    finally:
        await ledger.close()


async def test_postgres_server_restart(pg_cluster: PostgresCluster) -> None:
    async with fresh_pg_database(pg_cluster) as url:
        ledger = Ledger(url, timeout_s=1.0)
        await ledger.start()
        try:
            await ledger.record([rec("r1", joules=1.0)])
            # A restart while idle: the pooled connections are dead, the next caller must not notice.
            pg_cluster.stop()
            pg_cluster.start()
            await ledger.record([rec("r1b", joules=0.5)])
            pg_cluster.stop()
            try:
                t0 = time.monotonic()
                with pytest.raises(LedgerUnavailable):
                    await ledger.record([rec("r2", joules=2.0)])
                with pytest.raises(LedgerUnavailable):
                    await ledger.usage()
                assert time.monotonic() - t0 < 5.0
            finally:
                pg_cluster.start()
            await ledger.record([rec("r3", joules=4.0)])
            assert (await ledger.usage())[0].joules == 5.5
        finally:
            await ledger.close()


def test_switching_to_wal_waits_for_another_connection_holding_the_file(tmp_path: Path) -> None:
    """Replicas starting together on a new file: SQLite refuses a journal-mode switch at once while
    another connection holds the database (no busy wait), so the switch is retried, not failed."""
    import sqlite3
    import threading

    from proxy.ledger import _enable_wal

    path = tmp_path / "fresh.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.2, holder.execute, ["COMMIT"]).start()
    other = sqlite3.connect(path, isolation_level=None, timeout=0.0)  # no busy wait of SQLite's own
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            _enable_wal(other.cursor(), 0.05)  # gives up before the holder lets go
        assert _enable_wal(other.cursor(), 5.0) == ("wal",)
        assert _enable_wal(other.cursor(), 0.0) == ("wal",)  # already WAL: nothing to wait for
    finally:
        other.close()
        holder.close()


async def test_a_ledger_starts_once_another_connection_lets_go_of_a_new_file(tmp_path: Path) -> None:
    """Start-up against a new SQLite file that another connection holds: the ledger waits for it
    without stalling the event loop, then starts (in WAL mode)."""
    path = tmp_path / "held.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, holder.execute, "COMMIT")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    ledger = Ledger(sqlite_url(path), timeout_s=5.0)
    try:
        t0 = time.monotonic()
        await ledger.start()
        waited_s = time.monotonic() - t0
        await ledger.record([rec("after-the-wait")])
        assert await ledger.count() == 1
    finally:
        ticker.cancel()
        await ledger.close()
        holder.close()
    assert waited_s >= 0.25  # it did wait for the holder
    assert ticks >= 10  # and the loop went on meanwhile
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_the_data_directory_is_made_owner_only(tmp_path: Path) -> None:
    """The ledger holds every user's usage and the keys' hashes: a directory it makes is 0700."""

    async def start() -> None:
        ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path}/made/here/wattproxy.db")
        await ledger.start()
        await ledger.close()

    asyncio.run(start())
    assert (tmp_path / "made" / "here").stat().st_mode & 0o777 == 0o700
