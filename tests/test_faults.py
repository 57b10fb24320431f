"""Faults injected on purpose (issue 7): a backend that fails some batches, a meter that fails for a
while, a ledger database that is unavailable for a while, clients that leave mid-stream or send their
body too slowly, SIGTERM under load. The server keeps serving, answers each with a clear error, and
no answered request is missing from the ledger; no joule is invented."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from backends import load_backend
from backends.base import Backend, BackendRequest, BackendResult
from backends.tiny import ensure_model
from proxy.config import ModelSettings
from proxy.energy.meter import MeterError, Reading, SyntheticMeter
from proxy.ledger import Ledger, LedgerRecord, LedgerUnavailable
from proxy.state import LEDGER, MONITORS, SCHEDULER
from tests.conftest import BackendWrapper, LiveServer, settings_for_tests
from tests.test_lifecycle import ServeProcess

CHAT = "/v1/chat/completions"
BODY = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}


class FlakyBackend(BackendWrapper):
    """Test-only fault switch: the wrapped backend raises in every `every`-th batch."""

    def __init__(self, inner: Backend, every: int) -> None:
        super().__init__(inner)
        self.every, self.batches = every, 0

    def run(self, batch: Sequence[BackendRequest]) -> list[BackendResult]:
        self.batches += 1
        if self.batches % self.every == 0:
            raise RuntimeError("injected fault: CUDA error: an illegal memory access was encountered")
        return self.inner.run(batch)


class FailingMeter(SyntheticMeter):
    """A synthetic meter whose reads fail while `failing` is set (an NVML outage)."""

    def __init__(self) -> None:
        super().__init__("cpu", idle_watts=40.0, busy_watts=240.0)
        self.failing = threading.Event()

    def read(self) -> Reading:
        if self.failing.is_set():
            raise MeterError("cpu: injected meter failure")
        return super().read()


class FlakyLedger(Ledger):
    """A real SQLite ledger whose writes fail while `down` is set (the database unreachable)."""

    down = False

    async def record(self, records: Sequence[LedgerRecord]) -> None:
        if self.down:
            raise LedgerUnavailable("injected: database unreachable")
        await super().record(records)


def _records(server: LiveServer) -> list[LedgerRecord]:
    return server.call(server.app[LEDGER].records())  # type: ignore[index]


def test_a_backend_failing_some_batches(make_server, model_cache: Path) -> None:  # type: ignore[no-untyped-def]
    path = ensure_model("tiny-gpt2", model_cache / "models")
    flaky = FlakyBackend(load_backend("text", "tiny-gpt2", path), every=2)
    server = make_server(app_kwargs={"backends": {"tiny-gpt2": flaky}})
    statuses = []
    for _ in range(6):
        r = requests.post(server.base_url + CHAT, json=BODY, timeout=30)
        statuses.append(r.status_code)
        if r.status_code == 500:
            err = r.json()["error"]
            assert err["type"] == "server_error" and "illegal memory" not in err["message"]
    assert statuses == [200, 500] * 3
    assert requests.get(server.base_url + "/healthz", timeout=5).status_code == 200
    records = _records(server)
    failed = [r for r in records if r.status == "error"]
    assert len(failed) == 3 and all(r.joules > 0 for r in failed)  # the device worked: energy is charged
    assert sum(r.status == "ok" for r in records) == 3
    # each failed request counted once, as recorded ("error"), not again as the 500 it was answered with
    statuses_counted: dict[str, float] = {}
    for family in text_string_to_metric_families(requests.get(server.base_url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "wattproxy_requests_total":
                status = sample.labels["status"]
                statuses_counted[status] = statuses_counted.get(status, 0) + sample.value
    assert statuses_counted == {"ok": 3, "error": 3}


def test_a_meter_failing_for_a_while_invents_no_joule(make_server) -> None:  # type: ignore[no-untyped-def]
    meter = FailingMeter()
    server = make_server(
        app_kwargs={"meters": {"cpu": meter}},
        energy={"sample_period_s": 0.01, "max_finalize_delay_s": 0.3},
        models=[ModelSettings(name="tiny-gpt2", task="text", source="tiny:tiny-gpt2")],
    )
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)

    def ask() -> dict[str, float]:
        r = c.chat.completions.create(
            model="tiny-gpt2", messages=[{"role": "user", "content": "x"}], max_tokens=3
        )
        return r.usage.model_extra["energy"]  # type: ignore[union-attr,index]

    energies = [ask()]
    meter.failing.set()
    during = [ask() for _ in range(3)]  # answered within max_finalize_delay, not hung
    meter.failing.clear()
    energies += during + [ask() for _ in range(2)]
    assert energies[0]["measurement"] == "synthetic" and energies[-1]["measurement"] == "synthetic"
    assert all(e["measurement"] == "unavailable" for e in during)
    monitor = server.app[MONITORS]["cpu"]  # type: ignore[index]
    assert monitor.read_errors > 0
    server.stop()
    total = sum(e["joules"] for e in energies)
    # what the meter showed across the outage went to idle (or to work still open): not invented, not lost
    assert math.isclose(total + monitor.committed_idle_j, monitor.meter_delta_j, rel_tol=1e-9)


def test_ledger_unavailable_refuses_with_503_and_loses_no_answered_record(
    make_server, model_cache: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    url = settings_for_tests(model_cache, tmp_path).db_url()
    ledger = FlakyLedger(url)
    server = make_server(app_kwargs={"ledger": ledger})  # started and migrated by the app
    answered: list[str] = []

    def ask() -> requests.Response:
        r = requests.post(server.base_url + CHAT, json=BODY, timeout=30)
        if r.status_code == 200:
            answered.append(r.headers["X-Request-Id"])
        return r

    assert ask().status_code == 200
    FlakyLedger.down = True
    try:
        refused = ask()
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "ledger_unavailable"
        assert int(refused.headers["Retry-After"]) >= 1
        stream = requests.post(server.base_url + CHAT, json=BODY | {"stream": True}, timeout=30)
        events = [
            line.removeprefix("data: ") for line in stream.text.splitlines() if line.startswith("data: ")
        ]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "ledger_unavailable"
        # no usage (its energy was never recorded); the random model's text may say "usage" itself
        assert not any(json.loads(e).get("usage") for e in events[:-1])
    finally:
        FlakyLedger.down = False
    assert ask().status_code == 200
    stored = {r.request_id for r in server.call(ledger.records())}
    assert set(answered) <= stored and len(answered) == 2
    server.call(ledger.close())  # a ledger given to create_app is the caller's to close


def test_a_lone_request_is_committed_on_the_loop_and_concurrent_ones_by_the_writer(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server()
    ledger = server.app[LEDGER]
    inline, commits = ledger.inline_commits, ledger.commits
    ids = []
    for _ in range(3):  # one client: nothing else in flight when each is recorded
        r = requests.post(server.base_url + CHAT, json=BODY, timeout=30)
        assert r.status_code == 200
        ids.append(r.headers["X-Request-Id"])
    assert (ledger.inline_commits - inline, ledger.commits - commits) == (3, 3)
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda _: requests.post(server.base_url + CHAT, json=BODY, timeout=30), range(8))
        )
    assert [a.status_code for a in answers] == [200] * 8
    ids += [a.headers["X-Request-Id"] for a in answers]
    assert ledger.commits - ledger.inline_commits > commits - inline  # by the writer thread
    assert set(ids) <= {rec.request_id for rec in server.call(ledger.records())}

    off = make_server(ledger_inline_commit=False)
    assert requests.post(off.base_url + CHAT, json=BODY, timeout=30).status_code == 200
    assert off.app[LEDGER].inline_commits == 0 and off.app[LEDGER].commits == 1


def test_client_leaving_mid_stream_is_recorded_as_cancelled(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server()
    gate = server.app[SCHEDULER].devices["cpu"].gate  # type: ignore[index]
    gate.clear()
    resp = requests.post(
        server.base_url + CHAT, json=BODY | {"stream": True, "max_tokens": 8}, stream=True, timeout=30
    )
    rid = resp.headers["X-Request-Id"]
    lines = resp.iter_lines()  # keep the iterator: dropping it would close the connection at once
    first = next(lines)
    assert first.startswith(b"data: ")
    queue = server.app[SCHEDULER].queues["tiny-gpt2"]  # type: ignore[index]
    deadline = time.monotonic() + 10
    while queue.running == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    resp.close()  # the client leaves after the first event, once its batch has started
    time.sleep(0.3)
    gate.set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        mine = [r for r in _records(server) if r.request_id == rid]
        if mine:
            break
        time.sleep(0.05)
    assert mine and mine[0].status == "cancelled" and mine[0].joules > 0  # the device did the work


def test_a_client_sending_its_body_too_slowly_gets_408(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(client_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model"'
        )
        answer = sock.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 408")
    assert '"request_timeout"' in answer
    assert requests.get(server.base_url + "/healthz", timeout=5).status_code == 200


def test_a_connection_with_no_request_in_progress_is_closed_after_idle_timeout_s(make_server) -> None:  # type: ignore[no-untyped-def]
    """Slow headers (a request line and some headers, then nothing) and an idle keep-alive connection
    are both closed; aiohttp's own default would hold them for an hour."""
    server = make_server(idle_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.2)
        slow.sendall(b"Content-Type: application/json\r\n")  # still arriving: no request yet
        assert slow.recv(65536) == b""  # closed, without an answer (none was asked for)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as idle:
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += idle.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        while idle.recv(65536):  # the rest of the answer, then the close
            pass


def test_a_request_that_runs_past_idle_timeout_s_is_answered(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(idle_timeout_s=0.3)
    gate = server.app[SCHEDULER].devices["cpu"].gate  # type: ignore[index]
    gate.clear()  # the device holds the batch, so the request is in progress for a second
    threading.Timer(1.0, gate.set).start()
    r = requests.post(server.base_url + CHAT, json=BODY, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0


def _metric_on(sock: socket.socket, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """A metric's samples, read with GET /metrics on a connection kept open (no new connection)."""
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == name
    }


def _kept_open(server: LiveServer) -> socket.socket:
    """A keep-alive connection that has been answered once (so the server has taken it)."""
    sock = _open_if_served(server)
    assert sock is not None, "refused"
    return sock


def _open_if_served(server: LiveServer) -> socket.socket | None:
    """A new connection answered 200 to GET /healthz and kept open; None where it was refused."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while not answer.endswith(b"}"):
        answer += sock.recv(65536)
    if answer.startswith(b"HTTP/1.1 200"):
        return sock
    assert answer.startswith(b"HTTP/1.1 503"), answer
    sock.close()
    return None


def _refused_answer(server: LiveServer, body_bytes: int) -> bytes:
    """Send a chat request with a body of `body_bytes` on a new connection; everything read back."""
    body = json.dumps({**BODY, "user": "x" * body_bytes}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        answer = b""
        while chunk := sock.recv(65536):  # to the server's close
            answer += chunk
    return answer


def test_connections_over_max_connections_are_answered_503_and_closed(make_server) -> None:  # type: ignore[no-untyped-def]
    """Past `max_connections` open at once, a new connection gets 503 `too_many_connections` in the
    error envelope, whatever its request, even one with a large body sent before the answer is read
    (the refused connection is read to its end, not reset); the official client sees the 503; once a
    connection closes, new ones are served again."""
    server = make_server(max_connections=2)
    first, second = _kept_open(server), _kept_open(server)
    try:
        answer = _refused_answer(server, 200_000)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), head
        assert b"Retry-After: 1" in head and b"Connection: close" in head
        error = json.loads(body)["error"]
        assert error["code"] == "too_many_connections" and "max_connections 2" in error["message"]
        assert error["type"] == "overloaded"
        c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as refused:
            c.chat.completions.create(**BODY)  # type: ignore[call-overload]
        assert refused.value.status_code == 503 and refused.value.code == "too_many_connections"
        # the two kept open are counted, the refused ones not; the refusals are counted by reason
        assert _metric_on(first, "wattproxy_open_connections") == {(): 2.0}
        assert _metric_on(first, "wattproxy_connections_refused_total") == {
            (("reason", "max_connections"),): 2.0,
            (("reason", "max_connections_per_client"),): 0.0,
        }
        second.close()
        deadline = time.monotonic() + 10
        while True:  # served again once the server has seen the close
            try:
                chat = c.chat.completions.create(**BODY)  # type: ignore[call-overload]
                break
            except openai.InternalServerError:
                assert time.monotonic() < deadline, "the closed connection was never uncounted"
                time.sleep(0.05)
        assert chat.usage is not None and chat.usage.completion_tokens > 0
    finally:
        first.close()
        second.close()


def test_connections_over_max_connections_per_client_are_refused_per_address(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(max_connections_per_client=1)
    kept = _kept_open(server)
    try:
        head = _refused_answer(server, 10).partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 503")
    finally:
        kept.close()
    deadline = time.monotonic() + 10
    while (again := _open_if_served(server)) is None:  # served once the server has seen the close
        assert time.monotonic() < deadline, "the closed connection was never uncounted"
        time.sleep(0.05)
    with again:
        refused = _metric_on(again, "wattproxy_connections_refused_total")
    assert refused[(("reason", "max_connections_per_client"),)] >= 1  # and each retry before the close


FIT_OPEN_FILES = """
import logging, resource, sys
from proxy.cli import _fit_open_files
logging.basicConfig(level=logging.WARNING, format="%(message)s")
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
_fit_open_files(1000)
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


@pytest.mark.parametrize(
    ("soft", "hard", "after", "warned"), [(512, 4096, 1256, False), (300, 300, 300, True)]
)
def test_serve_raises_the_open_files_limit_to_fit_max_connections(
    soft: int, hard: int, after: int, warned: bool
) -> None:
    """A socket a connection: the soft limit is raised to max_connections + RESERVED_FILES where the
    hard limit allows; where it does not, the operator is told (a connection past the limit would fail
    at accept() instead of getting its 503)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", FIT_OPEN_FILES, str(soft), str(hard)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == after
    assert ("fewer than max_connections (1000)" in done.stderr) is warned, done.stderr


def test_sigterm_under_load_drains_and_every_answer_is_in_the_ledger(
    model_cache: Path, tmp_path: Path
) -> None:
    env = dict(os.environ, WATTPROXY_CACHE_DIR=str(model_cache), WATTPROXY_DATA_DIR=str(tmp_path))
    server = ServeProcess(["--meter", "synthetic", "--auth", "none"], env)
    server.wait_ready()
    outcomes: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                r = requests.post(server.url + CHAT, json=BODY, timeout=30)
            except requests.ConnectionError:
                return  # the server has closed its socket
            outcomes.append((r.status_code, r.headers.get("X-Request-Id")))
            if r.status_code == 503:
                return

    with ThreadPoolExecutor(16) as pool:
        for _ in range(16):
            pool.submit(client)
        time.sleep(2.0)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
        stop.set()
    statuses = {s for s, _ in outcomes}
    assert statuses <= {200, 503} and 200 in statuses
    answered = {rid for s, rid in outcomes if s == 200}

    async def stored() -> set[str]:
        ledger = Ledger(f"sqlite:///{tmp_path / 'wattproxy.db'}")
        await ledger.start()
        ids = {r.request_id for r in await ledger.records()}
        await ledger.close()
        return ids

    assert answered <= asyncio.run(stored())


@pytest.fixture(autouse=True)
def _reset_flaky_ledger() -> None:
    FlakyLedger.down = False
