"""Security, one test (or table of cases) per rule: who may call what (every route x every role), keys
never logged and stored only hashed, limits on headers, bodies, prompts, n, steps, sizes and tokens,
metric labels never taken from request text, prompts neither logged nor stored, CORS only where
configured, and only safetensors weights with no remote code."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file

from backends import load_backend
from backends.tiny import ensure_model
from proxy.app import create_app
from proxy.auth import new_key
from proxy.config import ModelSettings, Settings, embedded_models
from proxy.ledger import Ledger
from proxy.state import SERVICE
from tests.conftest import LiveServer, add_key, settings_for_tests

# The policy under test, written out here rather than imported: a route the server opens by mistake
# must fail these tests, not silently join the public set.
PUBLIC = frozenset({"/healthz", "/readyz", "/openapi.json", "/metrics"})
ROLES = ("none", "bad", "revoked", "user", "admin")
SECRET_RE = re.compile(r"wp-[A-Za-z0-9_-]{43}")

CHAT = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "tiny-gpt2", "prompt": "hi", "max_tokens": 2}
IMAGE = {"model": "tiny-sd", "prompt": "a fox", "size": "64x64", "steps": 1}


def _routes() -> list[tuple[str, str]]:
    """Every (method, path template) in the app's router, so that a new route is covered at once."""
    app = create_app(Settings(models=embedded_models()))
    return sorted({(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None})


def _access(path: str) -> str:
    if path in PUBLIC:
        return "public"
    return "admin" if path == "/v1/keys" or path.startswith("/v1/keys/") else "user"


def _db_path(settings: Settings) -> Path:
    return Path(settings.db_url().removeprefix("sqlite:///"))


def _revoked_key(db_url: str, user: str) -> str:
    async def make() -> str:
        ledger = Ledger(db_url)
        await ledger.start()
        secret, record = new_key(user)
        await ledger.add_key(record)
        assert await ledger.revoke_key(record.key_id)
        await ledger.close()
        return secret

    return asyncio.run(make())


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _assert_envelope(resp: requests.Response, status: int, error_type: str) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == error_type, body
    return body["error"]  # type: ignore[no-any-return]


def _logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every captured record as a handler would write it (exception and stack included), plus its args."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [f"{formatter.format(record)} {record.args!r}" for record in caplog.records]


def _metric_labels(text: str) -> list[dict[str, str]]:
    return [s.labels for family in text_string_to_metric_families(text) for s in family.samples]


@pytest.fixture(scope="module")
def keyed(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    """A server with auth on: an admin, two users (bob, carol) and a revoked key."""
    data_dir = tmp_path_factory.mktemp("keyed")
    settings = settings_for_tests(model_cache, data_dir, auth="keys", key_cache_ttl_s=0)
    db = settings.db_url()
    keys = {
        "admin": add_key(db, "admin", admin=True),
        "user": add_key(db, "bob"),
        "carol": add_key(db, "carol"),
        "revoked": _revoked_key(db, "mallory"),
        "bad": "wp-" + "A" * 43,
    }
    server = LiveServer(settings).start()
    yield server, keys
    server.stop()


def _sample_request(
    server: LiveServer, keys: dict[str, str], method: str, path: str
) -> tuple[str, dict[str, Any] | None, set[int]]:
    """A concrete request for a route and the statuses that mean it was served. Routes this table does
    not know get placeholder parameters and an empty body, and count as served unless 401/403/5xx."""
    if path == "/v1/keys/{key_id}":  # a fresh key to revoke, so each admin call really revokes one
        made = requests.post(
            server.base_url + "/v1/keys", json={"user": "victim"}, headers=_auth(keys["admin"]), timeout=10
        )
        return f"/v1/keys/{made.json()['id']}", None, {200}
    samples: dict[tuple[str, str], tuple[str, dict[str, Any] | None, set[int]]] = {
        ("POST", "/v1/chat/completions"): (path, CHAT, {200}),
        ("POST", "/v1/completions"): (path, COMPLETION, {200}),
        ("POST", "/v1/images/generations"): (path, IMAGE, {200}),
        ("POST", "/v1/keys"): (path, {"user": "newcomer"}, {201}),
        ("GET", "/v1/models/{model}"): ("/v1/models/tiny-gpt2", None, {200}),
        ("HEAD", "/v1/models/{model}"): ("/v1/models/tiny-gpt2", None, {200}),
    }
    if (method, path) in samples:
        return samples[(method, path)]
    concrete = re.sub(r"\{[^}]+\}", "placeholder", path)
    if path in PUBLIC or (method in ("GET", "HEAD") and concrete == path):
        return concrete, None, {200}
    return concrete, ({} if method == "POST" else None), set(range(200, 500)) - {401, 403}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(("method", "path"), _routes(), ids=lambda v: str(v))
def test_authentication_and_authorization_matrix(
    keyed: tuple[LiveServer, dict[str, str]], method: str, path: str, role: str
) -> None:
    server, keys = keyed
    url_path, body, served = _sample_request(server, keys, method, path)
    resp = requests.request(
        method,
        server.base_url + url_path,
        json=body,
        headers=_auth(None if role == "none" else keys[role]),
        timeout=60,
    )
    access = _access(path)
    if access == "public" or role == "admin" or (access == "user" and role == "user"):
        assert resp.status_code in served, (resp.status_code, resp.text[:300])
    elif role in ("none", "bad", "revoked"):
        if method == "HEAD":
            assert resp.status_code == 401
        else:
            error = _assert_envelope(resp, 401, "authentication_error")
            assert role == "none" or keys[role] not in json.dumps(error)
    else:  # a user key on an admin route
        if method == "HEAD":
            assert resp.status_code == 403
        else:
            _assert_envelope(resp, 403, "permission_error")


def test_a_user_reads_only_their_own_usage(keyed: tuple[LiveServer, dict[str, str]]) -> None:
    server, keys = keyed

    def usage(key: str, query: str = "") -> requests.Response:
        return requests.get(server.base_url + "/v1/usage" + query, headers=_auth(key), timeout=10)

    for key in ("user", "carol"):
        answered = requests.post(
            server.base_url + "/v1/chat/completions", json=CHAT, headers=_auth(keys[key]), timeout=60
        )
        assert answered.status_code == 200
    _assert_envelope(usage(keys["user"], "?user=carol"), 403, "permission_error")
    _assert_envelope(usage(keys["user"], "?group_by=user"), 403, "permission_error")
    own = usage(keys["user"]).json()
    assert own["user"] == "bob"
    carol = usage(keys["admin"], "?user=carol").json()
    assert carol["user"] == "carol" and carol["total"]["requests"] >= 1
    everyone = usage(keys["admin"], "?group_by=user").json()
    assert {"bob", "carol"} <= {row["group"] for row in everyone["data"]}


def test_stolen_hashes_and_malformed_headers_do_not_authenticate(
    keyed: tuple[LiveServer, dict[str, str]],
) -> None:
    server, keys = keyed
    stolen_hash = hashlib.sha256(keys["admin"].encode()).hexdigest()  # what the database holds
    for header in (
        f"Bearer {stolen_hash}",
        f"Basic {keys['admin']}",
        keys["admin"],
        "Bearer ",
        f"Bearer {keys['admin'][:-1]}",
        f"Bearer {keys['admin']}x",
    ):
        resp = requests.get(server.base_url + "/v1/keys", headers={"Authorization": header}, timeout=10)
        _assert_envelope(resp, 401, "authentication_error")


def test_a_key_that_is_not_utf8_is_a_401_and_cannot_forge_log_lines(
    keyed: tuple[LiveServer, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    """A header byte that is not UTF-8 (aiohttp gives it as a lone surrogate) on a path that carries
    an encoded newline: a 401 like any wrong key, and no log line starts where the client wants."""
    import socket

    server, _ = keyed
    forged = "2026-11-26 21:48:00,000 CRITICAL proxy.auth: admin key accepted"
    path = "/v1/x%0A" + forged.replace(" ", "%20")
    with caplog.at_level(logging.INFO), socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
            + b"Authorization: Bearer wp-\xff\r\n\r\n"
        )
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert not any(line.startswith(forged) for line in "\n".join(_logged(caplog)).splitlines())


# -- keys: never logged, stored only hashed -----------------------------------------------------------


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_keys_are_never_logged_and_stored_only_hashed(
    make_server: Callable[..., LiveServer],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    server = make_server(auth="keys", key_cache_ttl_s=0)  # no keys yet: one admin key is printed once
    printed = capfd.readouterr()
    admin = SECRET_RE.findall(printed.out)
    assert len(admin) == 1 and admin[0] not in printed.err
    admin_key = admin[0]
    secrets = [admin_key]

    def call(method: str, path: str, key: str, **kw: Any) -> requests.Response:
        return requests.request(method, server.base_url + path, headers=_auth(key), timeout=60, **kw)

    made = call("POST", "/v1/keys", admin_key, json={"user": "dana"})
    assert made.status_code == 201
    dana, dana_id = made.json()["key"], made.json()["id"]
    secrets.append(dana)
    assert call("POST", "/v1/completions", dana, json=COMPLETION).status_code == 200
    near_miss = dana[:-1] + ("A" if dana[-1] != "A" else "B")
    assert call("GET", "/v1/usage", near_miss).status_code == 401
    assert call("DELETE", f"/v1/keys/{dana_id}", admin_key).status_code == 200
    assert call("GET", "/v1/usage", dana).status_code == 401
    listed = call("GET", "/v1/keys", admin_key).text
    assert not any(s in listed or hashlib.sha256(s.encode()).hexdigest() in listed for s in secrets)

    env = dict(os.environ, WATTPROXY_DATA_DIR=str(tmp_path), WATTPROXY_LOG_LEVEL="DEBUG")
    created = _cli(env, "keys", "create", "--user", "erin")
    assert created.returncode == 0, created.stderr
    erin = SECRET_RE.findall(created.stdout)
    assert len(erin) == 1  # shown once, on stdout
    secrets.append(erin[0])
    assert call("GET", "/v1/usage", erin[0]).status_code == 200
    erin_id = next(
        k["id"] for k in map(json.loads, _cli(env, "keys", "list").stdout.splitlines()) if k["user"] == "erin"
    )
    revoked = _cli(env, "keys", "revoke", erin_id)
    assert revoked.returncode == 0
    assert call("GET", "/v1/usage", erin[0]).status_code == 401
    server.stop()

    logged = [created.stderr, revoked.stderr, capfd.readouterr().err, *_logged(caplog)]
    for secret in secrets:
        assert not any(secret in text or secret.removeprefix("wp-") in text for text in logged)

    db = _db_path(server.settings)
    with sqlite3.connect(db) as conn:
        dump = "\n".join(conn.iterdump())
        hashes = {row[0] for row in conn.execute("SELECT key_hash FROM api_keys")}
    assert hashes == {hashlib.sha256(s.encode()).hexdigest() for s in secrets}
    stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    for secret in secrets:
        assert secret.removeprefix("wp-") not in dump
        assert secret.removeprefix("wp-").encode() not in stored


# -- limits ---------------------------------------------------------------------------------------------

MAX_BODY = 4096
MAX_HEADER = 2048


@pytest.fixture(scope="module")
def limited(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    models = [
        ModelSettings(
            name="tiny-gpt2",
            task="text",
            source="tiny:tiny-gpt2",
            max_tokens=8,
            default_max_tokens=4,
            max_prompt_tokens=16,
            max_n=2,
        ),
        ModelSettings(
            name="tiny-sd",
            task="image",
            source="tiny:tiny-sd",
            sizes=["64x64"],
            max_n=2,
            default_steps=1,
            max_steps=3,
            max_prompt_chars=64,
        ),
    ]
    settings = settings_for_tests(
        model_cache,
        tmp_path_factory.mktemp("limited"),
        models=models,
        max_body_bytes=MAX_BODY,
        max_header_bytes=MAX_HEADER,
    )
    server = LiveServer(settings).start()
    yield server
    server.stop()


LONG_TEXT = "the energy of every request " * 20  # > 16 tokens, > 64 characters, < 4096 bytes

OVER_LIMITS = [
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": LONG_TEXT}]}, "messages"),
    ("/v1/completions", {**COMPLETION, "prompt": LONG_TEXT}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ["short", LONG_TEXT]}, "prompt"),
    ("/v1/images/generations", {**IMAGE, "prompt": LONG_TEXT}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "n": 3}, "n"),
    ("/v1/completions", {**COMPLETION, "n": 2, "prompt": ["one", "two"]}, "n"),
    ("/v1/images/generations", {**IMAGE, "n": 3}, "n"),
    ("/v1/images/generations", {**IMAGE, "steps": 4}, "steps"),
    ("/v1/images/generations", {**IMAGE, "size": "128x128"}, "size"),
    ("/v1/images/generations", {**IMAGE, "size": "60x60"}, "size"),
    ("/v1/images/generations", {**IMAGE, "size": "64x64x64"}, "size"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 9}, "max_tokens"),
    (
        "/v1/chat/completions",
        {**CHAT, "max_tokens": None, "max_completion_tokens": 9},
        "max_completion_tokens",
    ),
    ("/v1/completions", {**COMPLETION, "max_tokens": 10**6}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "user": "u" * 257}, "user"),
    ("/v1/images/generations", {**IMAGE, "user": "u" * 257}, "user"),
]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    OVER_LIMITS,
    ids=[f"{i}-{path.removeprefix('/v1/')}-{param}" for i, (path, _, param) in enumerate(OVER_LIMITS)],
)
def test_over_a_limit_is_a_400_naming_the_parameter(
    limited: LiveServer, path: str, body: dict[str, Any], param: str
) -> None:
    resp = requests.post(limited.base_url + path, json=body, timeout=30)
    error = _assert_envelope(resp, 400, "invalid_request_error")
    assert error["param"] == param, error


def test_refused_requests_cost_nothing(limited: LiveServer) -> None:
    async def count() -> int:
        ledger = Ledger(limited.settings.db_url())
        await ledger.start()
        try:
            return await ledger.count()
        finally:
            await ledger.close()

    before = asyncio.run(count())
    for path, body, _ in OVER_LIMITS:
        assert requests.post(limited.base_url + path, json=body, timeout=30).status_code == 400
    assert asyncio.run(count()) == before  # nothing ran, nothing was charged


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_max_body_bytes_is_a_413(limited: LiveServer, chunked: bool) -> None:
    raw = json.dumps({**COMPLETION, "prompt": "x" * (2 * MAX_BODY)}).encode()
    data: Any = iter([raw[i : i + 1024] for i in range(0, len(raw), 1024)]) if chunked else raw
    resp = requests.post(
        limited.base_url + "/v1/completions",
        data=data,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    error = _assert_envelope(resp, 413, "invalid_request_error")
    assert str(MAX_BODY) in error["message"]


@pytest.mark.parametrize("where", ["header field", "request line"])
def test_an_oversized_header_is_refused_in_the_envelope(limited: LiveServer, where: str) -> None:
    big = "a" * (2 * MAX_HEADER)
    if where == "header field":
        resp = requests.get(limited.base_url + "/healthz", headers={"X-Padding": big}, timeout=10)
    else:
        resp = requests.get(limited.base_url + "/healthz?padding=" + big, timeout=10)
    error = _assert_envelope(resp, 400, "invalid_request_error")
    assert error["code"] == "header_too_large" and str(MAX_HEADER) in error["message"]
    assert "aaaa" not in resp.text  # aiohttp's own answer quoted the request's bytes back
    fine = requests.get(
        limited.base_url + "/healthz", headers={"X-Padding": "a" * (MAX_HEADER // 2)}, timeout=10
    )
    assert fine.status_code == 200  # the server is still serving


@pytest.mark.parametrize(
    "raw",
    [b"BLAH\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n"],
    ids=["method", "content-length"],
)
def test_a_malformed_request_is_refused_in_the_envelope(limited: LiveServer, raw: bytes) -> None:
    """What aiohttp refuses before any handler runs is answered in the error envelope too."""
    host, port = limited.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(raw)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"400" and b"application/json" in head
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_http_request"
    assert set(error) == {"message", "type", "param", "code"} and "zz" not in error["message"]


def test_a_key_in_an_oversized_header_is_not_logged(
    limited: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret, _ = new_key("nobody")
    padded = {"Authorization": f"Bearer {secret}" + "A" * (2 * MAX_HEADER)}
    resp = requests.get(limited.base_url + "/v1/models", headers=padded, timeout=10)
    assert 400 <= resp.status_code < 500
    assert not any(secret.removeprefix("wp-") in text for text in _logged(caplog))


# -- labels and prompts -----------------------------------------------------------------------------------


def test_metric_labels_never_come_from_request_text(keyed: tuple[LiveServer, dict[str, str]]) -> None:
    server, keys = keyed
    injected = f"injected-{uuid.uuid4().hex}"
    bob = _auth(keys["user"])
    bodies = [
        (
            "/v1/chat/completions",
            {
                **CHAT,
                "user": injected,
                "messages": [{"role": "user", "content": f'model="{injected}" tiny-sd user={injected}'}],
            },
        ),
        ("/v1/completions", {**COMPLETION, "user": injected, "prompt": f"{injected} tiny-sd"}),
        ("/v1/images/generations", {**IMAGE, "user": injected, "prompt": f"{injected} tiny-gpt2"}),
    ]
    for path, body in bodies:
        assert requests.post(server.base_url + path, json=body, headers=bob, timeout=60).status_code == 200
    unknown = requests.post(
        server.base_url + "/v1/chat/completions", json={**CHAT, "model": injected}, headers=bob, timeout=10
    )
    assert unknown.status_code == 404
    text = requests.get(server.base_url + "/metrics", timeout=10).text
    assert injected not in text
    labels = _metric_labels(text)
    keys_listed = requests.get(server.base_url + "/v1/keys", headers=_auth(keys["admin"]), timeout=10)
    registered = {k["user"] for k in keys_listed.json()["data"]}
    assert {lab["user"] for lab in labels if "user" in lab} <= registered
    assert {lab["model"] for lab in labels if "model" in lab} <= {"tiny-gpt2", "tiny-sd"}
    assert "bob" in {lab.get("user") for lab in labels}


def test_prompts_are_neither_logged_nor_stored(
    keyed: tuple[LiveServer, dict[str, str]],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    server, keys = keyed
    caplog.set_level(logging.DEBUG)
    marker = f"PROMPT-MARKER-{uuid.uuid4().hex}"
    bob = _auth(keys["user"])
    bodies = [
        (
            "/v1/chat/completions",
            {
                **CHAT,
                "messages": [{"role": "system", "content": marker}, {"role": "user", "content": marker}],
            },
        ),
        ("/v1/chat/completions", {**CHAT, "stream": True, "messages": [{"role": "user", "content": marker}]}),
        ("/v1/completions", {**COMPLETION, "prompt": [marker, marker + " again"], "stop": [marker]}),
        ("/v1/images/generations", {**IMAGE, "prompt": marker, "negative_prompt": marker}),
    ]
    for path, body in bodies:
        assert requests.post(server.base_url + path, json=body, headers=bob, timeout=60).status_code == 200
    refused = [  # refused ones too: bad JSON, a wrong type, an unknown model
        ("/v1/chat/completions", f'{{"model": "tiny-gpt2", "messages": [{{"content": "{marker}"'),
        ("/v1/completions", json.dumps({**COMPLETION, "prompt": marker, "n": marker})),
        ("/v1/images/generations", json.dumps({**IMAGE, "prompt": marker, "model": "tiny-gpt2"})),
    ]
    for path, raw in refused:
        resp = requests.post(
            server.base_url + path, data=raw, headers={**bob, "Content-Type": "application/json"}, timeout=10
        )
        assert resp.status_code == 400

    metrics = requests.get(server.base_url + "/metrics", timeout=10).text
    assert marker not in metrics
    logged = [capfd.readouterr().err, *_logged(caplog)]
    assert not any(marker in text for text in logged)
    data_dir = _db_path(server.settings).parent
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert marker.encode() not in path.read_bytes(), path


# -- CORS -------------------------------------------------------------------------------------------------

ALLOWED, FOREIGN = "https://ok.example", "https://evil.example"
CORS_HEADERS = ("Access-Control-Allow-Origin", "Access-Control-Allow-Methods", "Access-Control-Allow-Headers")


def _preflight(server: LiveServer, path: str, origin: str) -> requests.Response:
    return requests.options(
        server.base_url + path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
        timeout=10,
    )


@pytest.mark.parametrize(("method", "path"), _routes(), ids=lambda v: str(v))
def test_no_cors_headers_unless_configured(
    keyed: tuple[LiveServer, dict[str, str]], method: str, path: str
) -> None:
    server, keys = keyed
    concrete = re.sub(r"\{[^}]+\}", "placeholder", path)
    for key in (None, keys["user"]):
        resp = requests.request(
            method, server.base_url + concrete, headers={"Origin": FOREIGN, **_auth(key)}, timeout=60
        )
        assert not any(h in resp.headers for h in CORS_HEADERS), resp.headers
    preflight = _preflight(server, concrete, FOREIGN)
    assert preflight.status_code != 204 and preflight.status_code < 500
    assert not any(h in preflight.headers for h in CORS_HEADERS), preflight.headers


@pytest.fixture(scope="module")
def configured(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, str]]:
    """Auth on, CORS for one origin, and a bearer token on /metrics."""
    token = "metrics-" + uuid.uuid4().hex
    settings = settings_for_tests(
        model_cache,
        tmp_path_factory.mktemp("configured"),
        auth="keys",
        cors_origins=[ALLOWED],
        metrics_token=token,
    )
    key = add_key(settings.db_url(), "frank")
    server = LiveServer(settings).start()
    yield server, key
    server.stop()


def test_configured_cors_answers_only_the_allowed_origin(configured: tuple[LiveServer, str]) -> None:
    server, key = configured
    ok = requests.get(server.base_url + "/v1/models", headers={"Origin": ALLOWED, **_auth(key)}, timeout=10)
    assert ok.status_code == 200 and ok.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "Origin" in ok.headers["Vary"]
    denied = requests.get(server.base_url + "/v1/models", headers={"Origin": ALLOWED}, timeout=10)
    assert denied.status_code == 401  # a browser may read the error, but the key is still required
    assert denied.headers["Access-Control-Allow-Origin"] == ALLOWED

    preflight = _preflight(server, "/v1/chat/completions", ALLOWED)
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    allowed_headers = preflight.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed_headers and "content-type" in allowed_headers

    for origin in (FOREIGN, "null", ALLOWED + ".evil.example", "http://ok.example"):
        other = requests.get(
            server.base_url + "/v1/models", headers={"Origin": origin, **_auth(key)}, timeout=10
        )
        assert other.status_code == 200 and "Access-Control-Allow-Origin" not in other.headers
        refused = _preflight(server, "/v1/chat/completions", origin)
        assert refused.status_code != 204
        assert not any(h in refused.headers for h in CORS_HEADERS)


def test_metrics_token_closes_metrics(configured: tuple[LiveServer, str]) -> None:
    server, key = configured
    token = server.settings.metrics_token
    for header in ({}, _auth("wrong-" + "x" * 16), _auth(key)):
        resp = requests.get(server.base_url + "/metrics", headers=header, timeout=10)
        _assert_envelope(resp, 401, "authentication_error")
    assert requests.get(server.base_url + "/metrics", headers=_auth(token), timeout=10).status_code == 200


# -- only safetensors, no remote code -------------------------------------------------------------------


class _Trap:
    """Unpickling this creates `path`: proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.path), "w")


WEIGHTS = {"text": Path("model.safetensors"), "image": Path("unet/diffusion_pytorch_model.safetensors")}
PRESETS = {"text": "tiny-gpt2", "image": "tiny-sd"}


def _copy(model_cache: Path, task: str, dest: Path) -> Path:
    shutil.copytree(ensure_model(PRESETS[task], model_cache / "models"), dest)
    return dest


def _pickled_weights(model_cache: Path, task: str, dest: Path, marker: Path) -> Path:
    """The model with its safetensors weights replaced by a pickle (`torch.save`) of the same tensors,
    armed: unpickling it creates `marker`."""
    model = _copy(model_cache, task, dest)
    weights = model / WEIGHTS[task]
    state = load_file(weights)
    weights.unlink()
    pickled = weights.with_name("pytorch_model.bin" if task == "text" else "diffusion_pytorch_model.bin")
    torch.save({**state, "trap": _Trap(marker)}, pickled)
    return model


def _remote_code(model_cache: Path, task: str, dest: Path, marker: Path) -> Path:
    """The model pointing at custom code (auto_map, a custom component) that creates `marker` on import."""
    model = _copy(model_cache, task, dest)
    code = f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
    if task == "text":
        config = json.loads((model / "config.json").read_text())
        config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
        (model / "config.json").write_text(json.dumps(config))
        tokenizer = json.loads((model / "tokenizer_config.json").read_text())
        tokenizer["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
        (model / "tokenizer_config.json").write_text(json.dumps(tokenizer))
        (model / "evil.py").write_text(code)
    else:
        index = json.loads((model / "model_index.json").read_text())
        index["unet"] = ["evil_unet", "EvilUNet"]
        (model / "model_index.json").write_text(json.dumps(index))
        (model / "unet" / "evil_unet.py").write_text(code + "class EvilUNet:\n    pass\n")
    return model


@pytest.mark.parametrize("task", ["text", "image"])
def test_pickled_weights_are_never_loaded(model_cache: Path, tmp_path: Path, task: str) -> None:
    marker = tmp_path / "unpickled"
    model = _pickled_weights(model_cache, task, tmp_path / "model", marker)
    with pytest.raises(OSError, match="safetensors"):
        load_backend(task, "pickled", model)  # type: ignore[arg-type]
    assert not marker.exists()


@pytest.mark.parametrize("task", ["text", "image"])
def test_remote_code_is_never_executed(model_cache: Path, tmp_path: Path, task: str) -> None:
    marker = tmp_path / "executed"
    model = _remote_code(model_cache, task, tmp_path / "model", marker)
    if task == "text":  # a known architecture: its own class is used and auto_map ignored
        backend = load_backend("text", "remote", model)
        backend.close()
        config = json.loads((model / "config.json").read_text())
        config["model_type"] = "evil-gpt"  # no built-in class left to fall back on: refused
        (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_backend(task, "remote", model)  # type: ignore[arg-type]
    assert not marker.exists()


def test_a_model_that_breaks_the_rules_is_reported_failed(model_cache: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    models = [
        ModelSettings(
            name="pickled",
            task="text",
            source=str(_pickled_weights(model_cache, "text", tmp_path / "pickled", marker)),
        ),
        ModelSettings(
            name="remote",
            task="image",
            source=str(_remote_code(model_cache, "image", tmp_path / "remote", marker)),
        ),
    ]
    (tmp_path / "data").mkdir()
    server = LiveServer(settings_for_tests(model_cache, tmp_path / "data", models=models))
    try:
        with pytest.raises(RuntimeError, match="failed to load"):
            server.start()
        deadline = time.monotonic() + 60
        while True:
            ready = requests.get(server.base_url + "/readyz", timeout=10)
            if "loading" not in ready.json()["models"].values() or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert ready.status_code == 503
        assert ready.json()["models"] == {"pickled": "failed", "remote": "failed"}
        served = server.app[SERVICE].models  # type: ignore[index]
        assert "safetensors" in (served["pickled"].load_error or "")
        assert "trust_remote_code" in (served["remote"].load_error or "")
        resp = requests.post(server.base_url + "/v1/completions", json={**COMPLETION, "model": "pickled"})
        assert resp.status_code == 503
    finally:
        server.stop()
    assert not marker.exists()
