"""The benchmarks' lean load generator (`bench.loadgen`'s raw client) against a real aiohttp server:
it must read every answer as the aiohttp client does (JSON and streamed, usage and counts), keep its
connections alive, and refuse what the benchmarks must not count."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from bench.loadgen import _Connection, dechunked, drive_aiohttp, drive_raw, stream_payload

USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


async def _json(request: web.Request) -> web.Response:
    body = await request.json()
    if body.get("fail"):
        return web.json_response({"error": {"message": "no", "type": "invalid_request_error"}}, status=400)
    # a big answer (aiohttp writes it in more than one segment), images among it
    return web.json_response({"data": [{"b64_json": "A" * 200_000}] * body["n"], "usage": USAGE})


async def _stream(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(body["tokens"]):
        # token texts that look like the framing and the keys the client looks for
        text = ["0\r\n\r\n", '"usage": {', '"error"', "data: x"][i % 4]
        chunk = {"choices": [{"delta": {"content": text}}], "usage": None}
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    if body.get("fail"):
        await resp.write(b'data: {"error": {"message": "the model failed"}}\n\n')
    else:
        await resp.write(b"data: " + json.dumps({"choices": [], "usage": USAGE}).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


@pytest.fixture
async def base_url(aiohttp_server: Any) -> tuple[str, list[int]]:
    peers: list[int] = []

    @web.middleware
    async def count_connections(request: web.Request, handler: Any) -> web.StreamResponse:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername")[1])
        return await handler(request)

    app = web.Application(middlewares=[count_connections])
    app.router.add_post("/v1/json", _json)
    app.router.add_post("/v1/stream", _stream)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), peers


def _requests() -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(24):
        if i % 2:
            out.append(("/v1/stream", {"tokens": i, "stream": True}))
        else:
            out.append(("/v1/json", {"n": i % 3}))
    return out


async def test_raw_client_reads_what_the_aiohttp_client_reads(base_url: tuple[str, list[int]]) -> None:
    url, peers = base_url
    requests = _requests()
    _, raw = await drive_raw(url, {"Authorization": "Bearer k"}, requests, 1)
    _, reference = await drive_aiohttp(url, {"Authorization": "Bearer k"}, requests, 1)
    # one client: answers in request order on both
    assert [p for _, p in raw] == [p for _, p in reference]
    # a stream of 1 token: its token chunk and the usage chunk
    assert raw[1][1] == {"usage": USAGE, "data": [], "events": 2}
    assert raw[4][1] == {"usage": USAGE, "data": [None], "events": None}
    assert len(set(peers[: len(requests)])) == 1  # one keep-alive connection carried them all


async def test_raw_clients_run_concurrently_on_their_own_connections(base_url: tuple[str, list[int]]) -> None:
    url, peers = base_url
    requests = _requests() * 4
    wall_s, answers = await drive_raw(url, {}, requests, 8)
    assert wall_s > 0 and len(answers) == len(requests)
    assert sum(1 for _, p in answers if p.get("events") is not None) == len(requests) // 2
    assert len(set(peers)) == 8


@pytest.mark.parametrize(
    ("path", "error"), [("/v1/json", "answered 400"), ("/v1/stream", "the stream failed")]
)
async def test_raw_client_refuses_an_error(base_url: tuple[str, list[int]], path: str, error: str) -> None:
    url, _ = base_url
    with pytest.raises(RuntimeError, match=error):
        await drive_raw(url, {}, [(path, {"fail": True, "tokens": 3, "n": 1})], 1)


async def test_raw_client_reconnects_when_the_server_closes(aiohttp_server: Any) -> None:
    async def closing(request: web.Request) -> web.Response:
        resp = web.json_response({"usage": USAGE, "data": []})
        resp.force_close()  # Connection: close
        return resp

    app = web.Application()
    app.router.add_post("/v1/x", closing)
    server = await aiohttp_server(app)
    _, answers = await drive_raw(str(server.make_url("")).rstrip("/"), {}, [("/v1/x", {})] * 5, 1)
    assert [p for _, p in answers] == [{"usage": USAGE, "data": [], "events": None}] * 5


def test_a_chunked_answer_is_complete_only_at_its_last_chunk() -> None:
    data = b'data: {"a": 1}\n\n' * 3
    body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (data[:10], data[10:])) + b"0\r\n\r\n"
    assert dechunked(body) == data
    for cut in range(len(body)):
        assert dechunked(body[:cut]) is None


class _Transport:
    def __init__(self) -> None:
        self.sent = b""

    def write(self, data: bytes) -> None:
        self.sent += data


async def test_a_connection_frames_answers_that_arrive_a_byte_at_a_time() -> None:
    events = b'data: {"usage": null}\n\ndata: {"usage": {"completion_tokens": 2}}\n\ndata: [DONE]\n\n'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(events), events)
    plain = json.dumps({"usage": USAGE}).encode()
    answers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,
        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(plain), plain),
    ]
    conn = _Connection()
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    for answer, expected in zip(answers, [(200, True, events), (200, False, plain)], strict=True):
        exchange = asyncio.ensure_future(conn.exchange(b"POST / HTTP/1.1\r\n\r\n"))
        await asyncio.sleep(0)  # the request is written, the answer awaited
        for i in range(len(answer)):
            assert not exchange.done()
            conn.data_received(answer[i : i + 1])
        assert await exchange == expected
    assert stream_payload(events) == {"usage": {"completion_tokens": 2}, "events": 2}
