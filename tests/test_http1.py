"""backends/http1.py, the lean client of proxy mode's plain answers, against a real TCP server on
localhost that answers each request with scripted bytes (the framings, codings and faults an upstream
can send, written in pieces cut anywhere)."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pytest

from backends import http1
from backends.openai_upstream import OpenAIUpstream, UpstreamBadResponse, UpstreamStatus

# One answer: the pieces written (bytes, or a float: seconds to wait), then whether to close.
Script = tuple[Sequence[bytes | float], bool]


@dataclass
class ScriptedServer:
    """Reads each request (head and Content-Length body) and plays the next script."""

    scripts: list[Script]
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    requests: list[bytes] = field(default_factory=list)
    eofs: int = 0  # connections the client closed (EOF while waiting for a request)
    server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.eofs += 1
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.requests.append(head + await reader.readexactly(length))
                pieces, close = self.scripts.pop(0)
                for piece in pieces:
                    if isinstance(piece, float):
                        await asyncio.sleep(piece)
                    else:
                        writer.write(piece)
                        await writer.drain()
                if close:
                    return
        finally:
            self.open_now -= 1
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def _answer(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def _run(
    scripts: list[Script],
    body: Callable[[http1.Http1Pool, ScriptedServer], Awaitable[None]],
    **pool_options: float,
) -> ScriptedServer:
    server = ScriptedServer(scripts)

    async def main() -> None:
        port = await server.start()
        options = {
            "connect_timeout_s": 2.0,
            "read_timeout_s": 5.0,
            "max_connections": 8,
            "keepalive_timeout_s": 4.0,
            **pool_options,
        }
        pool = http1.Http1Pool("127.0.0.1", port, **options)  # type: ignore[arg-type]
        try:
            await body(pool, server)
        finally:
            pool.close()
            await asyncio.sleep(0.05)  # the server's side sees the closes
            await server.stop()

    asyncio.run(main())
    return server


def test_answers_framed_by_length_reuse_one_connection() -> None:
    async def body(pool: http1.Http1Pool, server: ScriptedServer) -> None:
        for i in range(5):
            resp = await pool.post("/v1/x", {"Content-Type": "application/json"}, b'{"i": %d}' % i)
            assert (resp.status, json.loads(resp.body)) == (200, {"n": i})
            assert resp.content_type == "application/json"

    answers = [
        _answer(b'{"n": %d}' % i, extra="Content-Type: application/json; charset=utf-8\r\n") for i in range(5)
    ]
    server = _run([(_bytewise(a) if i == 2 else [a], False) for i, a in enumerate(answers)], body)
    assert server.connections == 1
    head = server.requests[0].split(b"\r\n\r\n")[0].decode()
    assert head.startswith("POST /v1/x HTTP/1.1\r\n")
    assert "Host: 127.0.0.1:" in head and "Content-Length: 8" in head
    assert server.requests[3].endswith(b'{"i": 3}')


def test_chunked_answers_with_extensions_and_trailers_cut_anywhere() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: yes\r\n\r\n"
    )

    async def body(pool: http1.Http1Pool, server: ScriptedServer) -> None:
        for _ in range(2):
            assert (await pool.post("/", {}, b"")).body == b"hello world"

    server = _run([(_bytewise(chunked), False), ([chunked], False)], body)
    assert server.connections == 1  # the connection's framing held: reused


def test_an_answer_framed_by_the_close_and_one_that_says_close_are_not_reused() -> None:
    async def body(pool: http1.Http1Pool, server: ScriptedServer) -> None:
        assert (await pool.post("/", {}, b"")).body == b"until the end"
        assert (await pool.post("/", {}, b"")).body == b"ok"
        assert (await pool.post("/", {}, b"")).body == b"ok"

    server = _run(
        [
            ([b"HTTP/1.1 200 OK\r\n\r\nuntil ", 0.02, b"the end"], True),
            ([_answer(b"ok", extra="Connection: close\r\n")], True),
            ([_answer(b"ok")], False),
        ],
        body,
    )
    assert server.connections == 3


def test_gzip_and_deflate_bodies_are_decoded_and_interim_heads_skipped() -> None:
    import zlib

    text = b'{"choices": []}' * 20

    async def body(pool: http1.Http1Pool, server: ScriptedServer) -> None:
        for _ in range(3):
            assert (await pool.post("/", {}, b"")).body == text

    zipped = gzip.compress(text)
    server = _run(
        [
            ([b"HTTP/1.1 100 Continue\r\n\r\n" + _answer(zipped, extra="Content-Encoding: gzip\r\n")], False),
            ([_answer(zlib.compress(text), extra="Content-Encoding: deflate\r\n")], False),
            ([_answer(zlib.compress(text)[2:-4], extra="Content-Encoding: deflate\r\n")], False),  # raw
        ],
        body,
    )
    assert server.connections == 1


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY", "CRLF"),
        (_answer(b"not gzip", extra="Content-Encoding: gzip\r\n"), "not gzip"),
        (_answer(b"x", extra="Content-Encoding: br\r\n"), "unsupported coding"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000, "64 KiB"),
    ],
)
def test_what_is_not_an_answer_is_refused(answer: bytes, words: str) -> None:
    async def body(pool: http1.Http1Pool, server: ScriptedServer) -> None:
        with pytest.raises(http1.BadAnswer, match=words):
            await pool.post("/", {}, b"")
        assert (await pool.post("/", {}, b"")).body == b"fine"  # on a new connection

    server = _run([([answer, 1.0], True), ([_answer(b"fine")], False)], body)
    assert server.connections == 2


def test_a_connection_closed_before_or_during_the_answer_is_a_disconnect() -> None:
    async def body(pool: http1.Http1Pool, server: ScriptedServer) -> None:
        with pytest.raises(http1.Disconnected) as before:
            await pool.post("/", {}, b"")
        assert not before.value.partial
        with pytest.raises(http1.Disconnected) as during:
            await pool.post("/", {}, b"")
        assert during.value.partial

    _run([([], True), ([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"], True)], body)


def test_the_read_timeout_is_the_longest_wait_for_the_next_byte() -> None:
    async def body(pool: http1.Http1Pool, server: ScriptedServer) -> None:
        t0 = time.monotonic()
        trickled = await pool.post("/", {}, b"")  # 0.6 s in all, no gap of 0.3 s
        assert trickled.body == b"abcdef" and time.monotonic() - t0 >= 0.5
        t0 = time.monotonic()
        with pytest.raises(http1.ReadTimeout):
            await pool.post("/", {}, b"")
        assert 0.25 <= time.monotonic() - t0 < 1.5

    head = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n"
    trickle: list[bytes | float] = [head]
    for c in b"abcdef":
        trickle += [0.1, bytes([c])]
    _run([(trickle, False), ([2.0], True)], body, read_timeout_s=0.3)


def test_refused_connections_and_unsendable_headers() -> None:
    async def main() -> None:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        pool = http1.Http1Pool(
            "127.0.0.1", port, connect_timeout_s=2, read_timeout_s=2, max_connections=2, keepalive_timeout_s=4
        )
        with pytest.raises(http1.ConnectError):
            await pool.post("/", {}, b"")
        with pytest.raises(ValueError, match="cannot be sent"):
            await pool.post("/", {"X-Request-Id": "a\r\nX-Evil: 1"}, b"")

    asyncio.run(main())


def test_a_cancelled_caller_closes_its_connection() -> None:
    async def body(pool: http1.Http1Pool, server: ScriptedServer) -> None:
        task = asyncio.ensure_future(pool.post("/", {}, b""))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)  # the server ends its pause and reads again
        assert server.eofs == 1  # it saw its client leave, mid-answer
        assert (await pool.post("/", {}, b"")).body == b"next"

    server = _run(
        [
            ([b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nslo", 0.3, b"w answer"], False),
            ([_answer(b"next")], False),
        ],
        body,
    )
    assert server.connections == 2


def test_connections_in_use_are_bounded_and_idle_ones_expire() -> None:
    async def body(pool: http1.Http1Pool, server: ScriptedServer) -> None:
        answers = await asyncio.gather(*(pool.post("/", {}, b"") for _ in range(4)))
        assert [a.body for a in answers] == [b"ok"] * 4
        assert server.most_open == 2 and server.connections == 2
        await asyncio.sleep(0.4)  # past the keep-alive: both idle connections go
        assert (await pool.post("/", {}, b"")).body == b"ok"
        assert server.connections == 3

    _run([([0.1, _answer(b"ok")], False)] * 5, body, max_connections=2, keepalive_timeout_s=0.3)


def test_the_upstream_client_takes_the_lean_path_for_plain_http() -> None:
    """OpenAIUpstream.post on an http:// base URL with a path: the request goes to the base path, with
    the key and the caller's headers; a non-2xx answer is UpstreamStatus with its Retry-After; a bad
    answer is UpstreamBadResponse."""

    async def main() -> None:
        server = ScriptedServer(
            [
                ([_answer(b'{"ok": 1}')], False),
                ([_answer(b'{"error": {}}', "429 Too Many Requests", "Retry-After: 7\r\n")], False),
                ([b"garbage\r\n\r\n"], True),
            ]
        )
        port = await server.start()
        client = OpenAIUpstream(f"http://127.0.0.1:{port}/base/v1", api_key="sk-up")
        await client.start()
        try:
            assert client._pool is not None
            answer = await client.post("/v1/chat/completions", b"{}", {"X-Request-Id": "r1"})
            assert answer.body == b'{"ok": 1}'
            head = server.requests[0].decode()
            assert head.startswith("POST /base/v1/chat/completions HTTP/1.1\r\n")
            assert "Authorization: Bearer sk-up\r\n" in head and "X-Request-Id: r1\r\n" in head
            with pytest.raises(UpstreamStatus) as limited:
                await client.post("/v1/chat/completions", b"{}")
            assert (limited.value.status, limited.value.retry_after_s) == (429, 7.0)
            with pytest.raises(UpstreamBadResponse, match="bad answer"):
                await client.post("/v1/chat/completions", b"{}")
        finally:
            await client.close()
            await server.stop()
        assert OpenAIUpstream("https://example.com")._lean is False
        assert OpenAIUpstream("http://user:pw@127.0.0.1:9")._lean is False

    asyncio.run(main())


def test_a_stream_is_read_as_it_comes_and_its_connection_reused_once_read_to_its_end() -> None:
    events = [b"data: %d\n\n" % i for i in range(5)]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"

    async def body(pool: http1.Http1Pool, server: ScriptedServer) -> None:
        stream = await pool.open_stream("/s", {}, b"")
        assert (stream.status, stream.content_type) == (200, "text/event-stream")
        first = await stream.read()  # the first event, before the server has sent the rest
        assert first == events[0]
        rest = await stream.read_all()
        assert first + rest == b"".join(events)
        stream.release()
        again = await pool.open_stream("/s", {}, b"")
        assert await again.read_all() == b"".join(events)
        again.release()
        unread = await pool.open_stream("/s", {}, b"")  # let go before its end: the connection goes
        assert await unread.read() == events[0]
        unread.release()
        assert server.connections == 1
        assert (await pool.post("/", {}, b"")).body == b"after"
        assert server.connections == 2

    paced: list[bytes | float] = [head]
    for i, e in enumerate(events):
        paced += [b"%x\r\n%s\r\n" % (len(e), e), 0.05 if i == 0 else 0.0]
    paced.append(b"0\r\n\r\n")
    _run(
        [
            (paced, False),
            (_bytewise(head + chunked), False),
            ([head + chunked[:14], 0.3, chunked[14:]], False),  # 14 bytes: the first event's chunk
            ([_answer(b"after")], False),
        ],
        body,
    )


def test_a_stream_that_breaks_off_or_stalls_raises_after_what_came() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 100\r\n\r\n"

    async def body(pool: http1.Http1Pool, server: ScriptedServer) -> None:
        broken = await pool.open_stream("/s", {}, b"")
        assert await broken.read() == b"data: 1\n\n"
        with pytest.raises(http1.Disconnected) as cut:
            await broken.read()
        assert cut.value.partial
        broken.abort()
        stalled = await pool.open_stream("/s", {}, b"")
        assert await stalled.read() == b"data: 2\n\n"
        with pytest.raises(http1.ReadTimeout):
            await stalled.read()
        stalled.abort()

    _run(
        [([head, b"data: 1\n\n", 0.05], True), ([head, b"data: 2\n\n", 1.0], True)], body, read_timeout_s=0.3
    )


def test_a_stream_read_slowly_pauses_its_connection_and_loses_nothing() -> None:
    size = 3 * http1.MAX_BUFFERED_BYTES
    payload = bytes(range(256)) * (size // 256)
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(payload)}\r\n\r\n".encode()

    async def body(pool: http1.Http1Pool, server: ScriptedServer) -> None:
        stream = await pool.open_stream("/s", {}, b"")
        await asyncio.sleep(0.3)  # the server writes it all meanwhile; the client holds at most the limit
        held = len(stream._conn._body)
        assert held <= http1.MAX_BUFFERED_BYTES + 256 * 1024 and stream._conn._paused, held
        got = await stream.read_all()
        assert got == payload
        stream.release()

    _run([([head, payload], False)], body)
