"""Closed-loop HTTP clients in a process of their own, so that they do not share the server's GIL.

    echo '{"base_url": ..., "headers": {...}, "requests": [[path, body], ...], "concurrency": 8,
           "client": "raw"}' | python -m bench.loadgen

Each of `concurrency` clients sends its next request when its previous one is answered. Prints one JSON
object: the wall time from the first request sent to the last answer read (process start-up and the
requests' encoding excluded), the process's CPU time over the same stretch (`cpu_s`), and per answer
its latency and a trimmed payload (`usage`; `data` as a list of nulls of the same length, since images
are not sent back; `events`, a stream's chunks before [DONE]).

Two clients, chosen by `client`:

- `raw` (the default): one keep-alive HTTP/1.1 connection per client on asyncio's streams-free
  protocol layer (uvloop where installed), requests encoded before the clock starts, answers framed by
  Content-Length or chunked encoding and only the parts read that the benchmark needs (a stream's
  usage chunk, not its token chunks). On a 2-core machine the clients share the cores with the server
  and its model; this client's CPU per answer is a small fraction of aiohttp's client's (measured in
  `bench/results/profiles.md`), so that the served figures measure the server rather than the clients.
- `aiohttp`: `aiohttp.ClientSession` through `bench.common.drive`, every answer parsed in full.

Any status but 200, and an error event in a stream, raises.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from bench.common import drive

_HEADER_END = b"\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_USAGE = re.compile(rb'"usage":\s*\{')  # token chunks carry "usage": null, or none at all


def trimmed(payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "usage": payload.get("usage"),
        "data": [None] * len(payload.get("data") or []),
        "events": payload.get("events"),  # streamed answers: chunks before [DONE]
    }


def dechunked(body: bytes | bytearray) -> bytes | None:
    """A chunked body's data, or None while its last chunk has not arrived."""
    out = bytearray()
    pos = 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(body[pos:eol]).split(b";", 1)[0], 16)
        start = eol + 2
        if size == 0:
            return bytes(out) if body[start : start + 2] == b"\r\n" else None
        if len(body) < start + size + 2:
            return None
        out += body[start : start + size]
        pos = start + size + 2


def stream_payload(data: bytes) -> dict[str, Any]:
    """What `bench.common.read_stream` makes of a streamed answer (usage of the last chunk that has
    one, chunks before [DONE]), reading only the chunks that carry usage or an error."""
    usage = None
    events = 0
    for line in data.split(b"\n"):
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        events += 1
        if line.startswith(b'data: {"error"'):
            raise RuntimeError(f"the stream failed: {json.loads(line[6:])['error']}")
        if _USAGE.search(line):
            usage = json.loads(line[6:]).get("usage") or usage
    return {"usage": usage, "events": events}


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that carries one request at a time."""

    def __init__(self) -> None:
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bool, bytes]] | None = None
        self.header_end = -1
        self.status = 0
        self.length: int | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"the server closed the connection: {exc}"))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.header_end < 0:
            end = buffer.find(_HEADER_END)
            if end < 0:
                return
            self.header_end = end + 4
            head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
            self.status = int(head[0].split(" ", 2)[1])
            self.length = None
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    self.length = int(value)
                elif name == "connection" and value.strip().lower() == "close":
                    self.closed = True  # the next request goes on a new connection
        if self.length is not None:
            if len(buffer) - self.header_end < self.length:
                return
            body = bytes(buffer[self.header_end : self.header_end + self.length])
            chunked = False
        else:
            if not buffer.endswith(_LAST_CHUNK):
                return
            data_ = dechunked(memoryview(buffer)[self.header_end :].tobytes())
            if data_ is None:
                return
            body, chunked = data_, True
        self.buffer = bytearray()
        self.header_end = -1
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self.status, chunked, body))

    async def exchange(self, request: bytes) -> tuple[int, bool, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


def encoded_request(host: str, path: str, headers: dict[str, str], body: dict[str, Any]) -> bytes:
    content = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(content)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + content


async def drive_raw(
    base_url: str,
    headers: dict[str, str],
    requests: Sequence[tuple[str, dict[str, Any]]],
    concurrency: int,
) -> tuple[float, list[tuple[float, dict[str, Any]]]]:
    """`bench.common.drive`'s closed loop on raw keep-alive connections: (wall s, [(latency s,
    payload)]) in completion order, payloads as `trimmed` returns them."""
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    encoded = [encoded_request(url.netloc, url.path.rstrip("/") + path, headers, b) for path, b in requests]
    loop = asyncio.get_running_loop()
    pending = iter(range(len(requests)))
    answers: list[tuple[float, dict[str, Any]]] = []

    async def connect() -> _Connection:
        _, conn = await loop.create_connection(_Connection, host, port)
        return conn

    async def client(conn: _Connection) -> None:
        for i in pending:
            if conn.closed:
                conn.transport.close()
                conn = await connect()
            t0 = time.perf_counter()
            status, chunked, body = await conn.exchange(encoded[i])
            if status != 200:
                text = body[:2000].decode(errors="replace")
                raise RuntimeError(f"{requests[i][0]} answered {status}: {text}")
            payload = trimmed(stream_payload(body) if chunked else json.loads(body))
            answers.append((time.perf_counter() - t0, payload))
        conn.transport.close()

    connections = [await connect() for _ in range(concurrency)]
    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in connections))
    return time.perf_counter() - t0, answers


async def drive_aiohttp(
    base_url: str,
    headers: dict[str, str],
    requests: Sequence[tuple[str, dict[str, Any]]],
    concurrency: int,
) -> tuple[float, list[tuple[float, dict[str, Any]]]]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        wall_s, answers = await drive(
            session, base_url, lambda i: requests[i], range(len(requests)), concurrency
        )
    return wall_s, [(latency, trimmed(payload)) for latency, payload in answers]


CLIENTS = {"raw": drive_raw, "aiohttp": drive_aiohttp}


async def main(job: dict[str, Any]) -> dict[str, Any]:
    requests = [(path, body) for path, body in job["requests"]]
    run = CLIENTS[job.get("client", "raw")]
    cpu0 = time.process_time()
    wall_s, answers = await run(job["base_url"], job["headers"], requests, int(job["concurrency"]))
    cpu_s = time.process_time() - cpu0  # the clients' CPU (this process's, all threads) while they ran
    return {"wall_s": wall_s, "cpu_s": cpu_s, "answers": [[latency, payload] for latency, payload in answers]}


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


if __name__ == "__main__":
    job = json.load(sys.stdin)
    with asyncio.Runner(loop_factory=new_loop) as runner:
        json.dump(runner.run(main(job)), sys.stdout)
