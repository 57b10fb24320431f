"""Keys, authorization, the ledger behind a live server, usage reports and budgets (issue 5)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from proxy.ledger import Ledger
from proxy.state import LEDGER, SCHEDULER
from tests.conftest import LiveServer, add_key, settings_for_tests
from tests.test_lifecycle import ServeProcess


@pytest.fixture
def keyed(make_server, model_cache: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A server with auth on, an admin key and two user keys (alice with a tiny budget)."""
    db = settings_for_tests(model_cache, tmp_path).db_url()
    tmp_path.mkdir(exist_ok=True)
    keys = {
        "admin": add_key(db, "admin", admin=True),
        "bob": add_key(db, "bob"),
        "alice": add_key(db, "alice", budget_kwh=1e-12, budget_period="day"),
    }
    server = make_server(auth="keys")
    return server, keys


def _client(server: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)


def _chat(server: LiveServer, key: str, text: str = "hi") -> dict[str, float]:
    r = _client(server, key).chat.completions.create(
        model="tiny-gpt2", messages=[{"role": "user", "content": text}], max_tokens=3, temperature=0
    )
    return r.usage.model_extra["energy"]  # type: ignore[union-attr,index]


def _get(server: LiveServer, path: str, key: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.get(server.base_url + path, headers=headers, timeout=10)


def _metrics(server: LiveServer) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(_get(server, "/metrics").text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_keys_are_required_and_checked(keyed) -> None:  # type: ignore[no-untyped-def]
    server, keys = keyed
    body = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    missing = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=10)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        _chat(server, "wp-not-a-real-key")
    assert _chat(server, keys["bob"])["joules"] > 0
    assert _get(server, "/healthz").status_code == 200  # public
    users = {labels["user"] for labels, _ in _metrics(server)["wattproxy_requests_total"]}
    assert users == {"bob"}  # the label comes from the key, never from the request


def test_users_see_only_their_usage_and_cannot_manage_keys(keyed) -> None:  # type: ignore[no-untyped-def]
    server, keys = keyed
    _chat(server, keys["bob"])
    assert _get(server, "/v1/usage?user=admin", keys["bob"]).status_code == 403
    assert _get(server, "/v1/usage?group_by=user", keys["bob"]).status_code == 403
    assert _get(server, "/v1/keys", keys["bob"]).status_code == 403
    create = requests.post(
        server.base_url + "/v1/keys", json={"user": "eve"}, headers={"Authorization": f"Bearer {keys['bob']}"}
    )
    assert create.status_code == 403 and create.json()["error"]["type"] == "permission_error"
    own = _get(server, "/v1/usage", keys["bob"]).json()
    assert own["user"] == "bob" and own["total"]["requests"] == 1
    everyone = _get(server, "/v1/usage?group_by=user", keys["admin"]).json()
    assert [row["group"] for row in everyone["data"]] == ["bob"]


def test_admin_creates_and_revokes_keys_over_http_and_revocation_is_immediate(keyed) -> None:  # type: ignore[no-untyped-def]
    server, keys = keyed
    auth = {"Authorization": f"Bearer {keys['admin']}"}
    made = requests.post(
        server.base_url + "/v1/keys", json={"user": "carol", "budget_kwh": 5.0}, headers=auth
    )
    assert made.status_code == 201
    secret, key_id = made.json()["key"], made.json()["id"]
    assert _chat(server, secret)["joules"] > 0
    listed = _get(server, "/v1/keys", keys["admin"]).json()["data"]
    assert {k["user"] for k in listed} >= {"carol", "bob", "alice", "admin"}
    assert all("key" not in k and "key_hash" not in k for k in listed)
    assert requests.delete(server.base_url + f"/v1/keys/{key_id}", headers=auth).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        _chat(server, secret)


def test_usage_matches_responses_and_metrics_and_exports_csv(keyed) -> None:  # type: ignore[no-untyped-def]
    server, keys = keyed
    energies = [_chat(server, keys["bob"], f"q{i}") for i in range(3)]
    img = _client(server, keys["bob"]).images.generate(
        model="tiny-sd", prompt="x", n=2, extra_body={"steps": 2}
    )
    energies.append(img.usage.model_extra["energy"])  # type: ignore[union-attr]
    report = _get(server, "/v1/usage?group_by=model", keys["bob"]).json()
    by_model = {row["group"]: row for row in report["data"]}
    assert by_model["tiny-gpt2"]["requests"] == 3 and by_model["tiny-sd"]["images"] == 2
    total_j = sum(e["joules"] for e in energies)
    assert math.isclose(report["total"]["joules"], total_j, rel_tol=1e-9)
    assert math.isclose(report["total"]["co2_grams"], sum(e["co2_grams"] for e in energies), rel_tol=1e-9)
    assert math.isclose(report["total"]["smartphone_charges"], total_j / 3.6e6 / 0.012, rel_tol=1e-9)
    assert by_model["tiny-sd"]["j_per_image"] > 0 and by_model["tiny-gpt2"]["j_per_token"] > 0
    metric_kwh = sum(
        v for labels, v in _metrics(server)["wattproxy_energy_kwh_total"] if labels["user"] == "bob"
    )
    assert math.isclose(metric_kwh * 3.6e6, total_j, rel_tol=1e-9)
    csv_text = _get(server, "/v1/usage?format=csv&group_by=day", keys["bob"]).text
    assert csv_text.splitlines()[0].startswith("group,requests,kwh")
    assert len(csv_text.splitlines()) == 2
    # times as Unix seconds (as OpenAI's usage API takes them) or ISO 8601; [start, end)
    now_s = int(time.time()) + 1
    iso = datetime.fromtimestamp(now_s, timezone.utc).isoformat()
    by_seconds = _get(server, f"/v1/usage?start=0&end={now_s}", keys["bob"]).json()
    assert by_seconds["total"] == report["total"] and by_seconds["end"] == iso
    assert _get(server, f"/v1/usage?start={now_s}", keys["bob"]).json()["total"]["requests"] == 0
    # eight digits are ISO 8601's basic date, not Unix seconds in 1970
    yesterday = datetime.fromtimestamp(now_s - 86400, timezone.utc)
    basic = _get(server, f"/v1/usage?start={yesterday:%Y%m%d}", keys["bob"]).json()
    assert basic["start"] == f"{yesterday:%Y-%m-%d}T00:00:00+00:00" and basic["total"] == report["total"]
    for query, param in [
        ("start=yesterday", "start"),
        ("end=1e9", "end"),
        (f"start={now_s}&end={now_s}", "end"),
    ]:
        refused = _get(server, f"/v1/usage?{query}", keys["bob"])
        assert refused.status_code == 400, query
        assert (
            refused.json()["error"]["param"] == param and refused.json()["error"]["code"] == "invalid_value"
        )


def test_budget_exceeded_gets_429_naming_the_budget_and_its_reset(keyed) -> None:  # type: ignore[no-untyped-def]
    server, keys = keyed
    _chat(server, keys["alice"])  # admitted at 0 spent, takes her over 1e-12 kWh
    with pytest.raises(openai.RateLimitError) as exc:
        _chat(server, keys["alice"])
    err = exc.value.body
    assert err["type"] == "budget_exceeded"  # type: ignore[index]
    assert "daily budget 1e-12 kWh" in err["message"] and "resets at" in err["message"]  # type: ignore[index]
    assert int(exc.value.response.headers["Retry-After"]) >= 1
    remaining = dict((labels["user"], v) for labels, v in _metrics(server)["wattproxy_budget_remaining_kwh"])
    assert remaining["alice"] < 0
    assert _chat(server, keys["bob"])["joules"] > 0  # others are unaffected


def test_budget_overshoot_is_bounded_by_requests_in_flight(keyed) -> None:  # type: ignore[no-untyped-def]
    server, keys = keyed
    gate = server.app[SCHEDULER].devices["cpu"].gate  # type: ignore[index]
    gate.clear()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_chat, server, keys["alice"], f"in flight {i}") for i in range(4)]
        deadline = time.monotonic() + 10
        queue = server.app[SCHEDULER].queues["tiny-gpt2"]  # type: ignore[index]
        while queue.depth() + queue.running < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        assert all(f.result(timeout=60)["joules"] > 0 for f in futures)  # admitted under budget: all served
    with pytest.raises(openai.RateLimitError):
        _chat(server, keys["alice"])


def test_usage_survives_a_restart(make_server, model_cache: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = make_server()
    energies = [_chat(first, "unused", f"r{i}") for i in range(3)]
    first.stop()
    second = make_server()
    report = _get(second, "/v1/usage").json()
    assert report["total"]["requests"] == 3
    assert math.isclose(report["total"]["joules"], sum(e["joules"] for e in energies), rel_tol=1e-9)


def test_every_answered_request_is_in_the_ledger_after_sigkill(model_cache: Path, tmp_path: Path) -> None:
    env = dict(os.environ)
    env.update({"WATTPROXY_CACHE_DIR": str(model_cache), "WATTPROXY_DATA_DIR": str(tmp_path)})
    server = ServeProcess(["--meter", "synthetic", "--auth", "none"], env)
    answered = []
    try:
        server.wait_ready()
        body = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}

        def ask(_: int) -> str | None:
            try:
                r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=30)
            except requests.ConnectionError:
                return None
            return r.headers.get("X-Request-Id") if r.status_code == 200 else None

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ask, i) for i in range(40)]
            for n, _done in enumerate(as_completed(futures)):
                if n == 5:  # killed with some requests answered and others queued or running
                    server.proc.send_signal(signal.SIGKILL)
                    break
            answered = [rid for f in futures if (rid := f.result()) is not None]
    finally:
        server.proc.kill()
        server.proc.wait(timeout=30)
    assert answered, "no request was answered before the kill"

    async def stored() -> set[str]:
        ledger = Ledger(f"sqlite:///{tmp_path / 'wattproxy.db'}")
        await ledger.start()
        ids = {r.request_id for r in await ledger.records()}
        await ledger.close()
        return ids

    assert set(answered) <= asyncio.run(stored())


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_keys_and_usage(keyed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, _ = keyed
    env = dict(os.environ, WATTPROXY_DATA_DIR=str(tmp_path))
    made = _cli("keys", "create", "--user", "dave", "--budget-kwh", "2", "--period", "month", env=env)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"wp-[A-Za-z0-9_-]{43}", secret)
    energy = _chat(server, secret)
    listed = [json.loads(line) for line in _cli("keys", "list", env=env).stdout.splitlines()]
    # the ledger's flags after the subcommand too
    after = _cli(
        "keys", "list", "--data-dir", str(tmp_path), env=dict(os.environ, WATTPROXY_DATA_DIR="/nonexistent")
    )
    assert [json.loads(line) for line in after.stdout.splitlines()] == listed, after.stderr
    dave = next(k for k in listed if k["user"] == "dave")
    assert dave["budget_kwh"] == 2.0 and dave["budget_period"] == "month"
    usage = json.loads(_cli("usage", "--user", "dave", "--format", "json", env=env).stdout)
    assert usage["total"]["requests"] == 1
    assert math.isclose(usage["total"]["joules"], energy["joules"], rel_tol=1e-9)
    table = _cli("usage", "--by", "user", env=env).stdout
    assert "dave" in table and "kWh" in table
    since_epoch = json.loads(
        _cli("usage", "--user", "dave", "--since", "0", "--format", "json", env=env).stdout
    )
    assert since_epoch["total"] == usage["total"]
    backwards = _cli("usage", "--since", "2026-11-28", "--until", "2026-11-27", env=env)
    assert (
        backwards.returncode == 2 and "--until (2026-11-27T00:00:00+00:00) must be after" in backwards.stderr
    )
    assert _cli("keys", "revoke", dave["id"], env=env).returncode == 0
    time.sleep(1.1)  # another process revoked it: the server's key cache trusts a verdict for 1 s
    with pytest.raises(openai.AuthenticationError):
        _chat(server, secret)
    assert server.app[LEDGER] is not None  # type: ignore[index]


def test_first_start_prints_one_admin_key_once(model_cache: Path, tmp_path: Path) -> None:
    env = dict(os.environ, WATTPROXY_CACHE_DIR=str(model_cache), WATTPROXY_DATA_DIR=str(tmp_path))
    printed = []
    for _ in range(2):
        server = ServeProcess(["--meter", "synthetic"], env)
        try:
            server.wait_ready()
            keys = [m.group(0) for line in server.stdout if (m := re.search(r"wp-[A-Za-z0-9_-]{43}", line))]
            printed.append(keys)
            if keys:
                usage = requests.get(
                    server.url + "/v1/usage", headers={"Authorization": f"Bearer {keys[0]}"}, timeout=10
                )
                assert usage.status_code == 200
                assert not any(keys[0] in line for line in server.lines)  # never in the logs
        finally:
            server.proc.send_signal(signal.SIGTERM)
            server.proc.wait(timeout=60)
    assert len(printed[0]) == 1 and printed[1] == []


def test_concurrent_requests_with_an_expired_key_share_one_lookup(tmp_path: Path) -> None:
    from proxy.auth import KeyCache, new_key
    from proxy.ledger import LedgerUnavailable, sqlite_url

    async def main() -> None:
        ledger = Ledger(sqlite_url(tmp_path / "keys.db"))
        await ledger.start()
        try:
            secret, record = new_key("ada")
            await ledger.add_key(record)
            lookups = 0
            real = ledger.key_by_hash

            async def counted(key_hash: str):  # type: ignore[no-untyped-def]
                nonlocal lookups
                lookups += 1
                await asyncio.sleep(0.05)  # the database is slow: everyone arrives meanwhile
                return await real(key_hash)

            ledger.key_by_hash = counted  # type: ignore[method-assign]
            cache = KeyCache(ledger, ttl_s=60.0)
            found = await asyncio.gather(*(cache.lookup(secret) for _ in range(20)))
            assert lookups == 1 and all(r is not None and r.user == "ada" for r in found)
            assert await cache.lookup("wp-" + "0" * 40) is None and lookups == 2  # another key: its own

            # a waiter that leaves does not take the lookup down with it
            cache.forget()
            leaver = asyncio.ensure_future(cache.lookup(secret))
            stayer = asyncio.ensure_future(cache.lookup(secret))
            await asyncio.sleep(0.01)
            leaver.cancel()
            assert (await stayer) is not None and lookups == 3

            # a failure reaches every waiter, and the next request tries again
            async def down(key_hash: str):  # type: ignore[no-untyped-def]
                await asyncio.sleep(0.02)
                raise LedgerUnavailable("down")

            cache.forget()
            ledger.key_by_hash = down  # type: ignore[method-assign]
            failed = await asyncio.gather(*(cache.lookup(secret) for _ in range(3)), return_exceptions=True)
            assert all(isinstance(f, LedgerUnavailable) for f in failed)
            ledger.key_by_hash = counted  # type: ignore[method-assign]
            assert await cache.lookup(secret) is not None and lookups == 4
        finally:
            await ledger.close()

    asyncio.run(main())


def test_budgets_of_different_periods_each_hold(tmp_path: Path) -> None:
    """A daily key and a total key are two budgets: the total one keeps refusing day after day, and the
    daily one refuses only until its day ends (never one daily budget with the total's limit)."""
    from datetime import datetime, timedelta, timezone

    from proxy.auth import new_key
    from proxy.budgets import TOTAL_RETRY_AFTER_S, Budgets
    from proxy.errors import BudgetExceeded
    from proxy.ledger import LedgerRecord

    now = [datetime(2026, 11, 26, 12, tzinfo=timezone.utc)]
    joules_a_kwh = 3.6e6

    def spend(budgets: Budgets, joules: float) -> LedgerRecord:
        budgets.add("erin", joules, 0.0)
        return LedgerRecord(
            f"r{now[0].timestamp()}-{joules}", now[0], "erin", None, "m", "text", "ok", joules=joules
        )

    async def scenario() -> None:
        ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path}/budgets.db")
        await ledger.start()
        _, daily = new_key("erin", budget_kwh=100 / joules_a_kwh, budget_period="day")  # 100 J a day
        _, total = new_key("erin", budget_kwh=250 / joules_a_kwh, budget_period="total")  # 250 J in all
        _, monthly = new_key("erin", budget_co2_grams=5.0, budget_period="month")
        budgets = Budgets(clock=lambda: now[0])
        budgets.set_keys([daily, total, monthly])
        await budgets.refresh(ledger)
        assert [b.period for b in budgets.budgets("erin")] == ["day", "month", "total"]
        await ledger.record([spend(budgets, 120.0)])  # over the daily budget, under the total
        with pytest.raises(BudgetExceeded) as exc:
            budgets.check("erin")
        assert "daily budget" in exc.value.message and exc.value.retry_after_s == 12 * 3600
        assert budgets.remaining_kwh()["erin"] == pytest.approx(-20 / joules_a_kwh)
        now[0] += timedelta(days=1)
        budgets.check("erin")  # a new day: the daily budget is fresh, the total has 130 J left
        assert budgets.remaining_kwh()["erin"] == pytest.approx(100 / joules_a_kwh)
        await ledger.record([spend(budgets, 90.0)])
        now[0] += timedelta(days=1)
        await budgets.refresh(ledger)  # from the ledger: 210 J in all, none today
        assert budgets.remaining_kwh()["erin"] == pytest.approx(40 / joules_a_kwh)
        await ledger.record([spend(budgets, 50.0)])  # 260 J in all: the total is spent
        for _ in range(2):
            now[0] += timedelta(days=1)
            await budgets.refresh(ledger)
            with pytest.raises(BudgetExceeded) as exc:
                budgets.check("erin")
            assert "total budget" in exc.value.message and exc.value.retry_after_s == TOTAL_RETRY_AFTER_S
        await ledger.close()

    asyncio.run(scenario())


def test_a_budget_must_be_a_finite_number() -> None:
    """An infinite budget (which `float()` makes of "inf" or "1e999" on the command line) is refused:
    it would limit nothing and make the usage and key listings invalid JSON (`Infinity`)."""
    from proxy.auth import new_key

    for value in (math.inf, float("nan"), 0.0, -1.0):
        with pytest.raises(ValueError, match="finite number > 0"):
            new_key("erin", budget_kwh=value)
        with pytest.raises(ValueError, match="finite number > 0"):
            new_key("erin", budget_co2_grams=value)


def test_a_budget_refresh_loses_no_request_recorded_while_it_reads(tmp_path: Path) -> None:
    """A request recorded while a refresh's query runs (after it read the ledger) still counts: the
    refresh must not put back the spending it read before that record."""
    from proxy.auth import new_key
    from proxy.budgets import Budgets
    from proxy.errors import BudgetExceeded
    from proxy.ledger import LedgerRecord

    joules_a_kwh = 3.6e6

    class SlowReads(Ledger):
        """Its spending query returns only once `go` is set, with what it read before that."""

        go: asyncio.Event

        async def spent_by_user(self, starts):  # type: ignore[no-untyped-def]
            spent = await super().spent_by_user(starts)
            await self.go.wait()
            return spent

    async def scenario() -> None:
        ledger = SlowReads(f"sqlite+aiosqlite:///{tmp_path}/refresh.db")
        ledger.go = asyncio.Event()
        await ledger.start()
        _, key = new_key("erin", budget_kwh=1.0, budget_period="day")
        budgets = Budgets()
        budgets.set_keys([key])
        refresh = asyncio.create_task(budgets.refresh(ledger))
        await asyncio.sleep(0.05)  # the query has read the ledger, and waits
        joules = 2 * joules_a_kwh  # twice the budget, recorded as the recorder does: commit, then add
        await ledger.record(
            [LedgerRecord("r1", datetime.now(timezone.utc), "erin", None, "m", "text", "ok", joules=joules)]
        )
        budgets.add("erin", joules, 0.0)
        ledger.go.set()
        await refresh
        with pytest.raises(BudgetExceeded):
            budgets.check("erin")
        assert budgets.remaining_kwh()["erin"] == pytest.approx(-1.0)
        await budgets.refresh(ledger)  # the next refresh reads the same from the ledger
        assert budgets.remaining_kwh()["erin"] == pytest.approx(-1.0)
        await ledger.close()

    asyncio.run(scenario())


def test_cli_reading_a_ledger_that_is_not_there_says_so(tmp_path: Path) -> None:
    """A wrong data directory is an error, not a report of no usage (and leaves no empty ledger)."""
    env = dict(os.environ, WATTPROXY_DATA_DIR=str(tmp_path / "typo"))
    for args in (("usage", "--by", "user"), ("keys", "list"), ("keys", "revoke", "key_0123456789ab")):
        done = _cli(*args, env=env)
        assert done.returncode == 1 and "no ledger at" in done.stderr, (args, done.stderr)
        assert done.stdout == ""
    assert not (tmp_path / "typo").exists()
