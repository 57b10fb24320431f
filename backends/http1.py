"""A lean HTTP/1.1 client for one plain-HTTP upstream: POSTs over a pool of keep-alive connections, on
asyncio protocols, whose answer is read whole (`post`) or as its body comes (`open_stream`).

Proxy mode forwards through it where the upstream's base URL is `http://` (`OpenAIUpstream`):
aiohttp's client cost about 220 µs of CPU a request here against about 70 µs for this one (the same
stub, one connection, `bench/results/profiles.md`), a large share of what the proxy adds. `https://`
upstreams, URLs with credentials and the model list stay on aiohttp's client.

What it does: one request at a time on a connection (no pipelining); the answer framed by
Content-Length, chunked transfer coding, or the connection's close (RFC 9112); 1xx heads skipped; a
gzip or deflate body decoded; connections reused while the server keeps them (HTTP/1.1 without
`Connection: close`, the answer read to its end) and dropped after `keepalive_timeout_s` idle.
Timeouts as aiohttp's: connecting (`connect_timeout_s`) and the longest wait for the next byte of the
answer (`read_timeout_s`). A stream's unread body is held up to `MAX_BUFFERED_BYTES`, then the
connection stops reading until the caller catches up (the upstream's sends then wait on TCP). Nothing
is retried. A caller that is cancelled closes its connection, so the server sees its client leave.

Errors: `ConnectError` (no connection), `ConnectTimeout`, `ReadTimeout`, `Disconnected` (the
connection closed before a whole answer), `BadAnswer` (not an HTTP answer); the caller translates them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import zlib
from dataclasses import dataclass
from typing import Any

MAX_HEAD_BYTES = 64 * 1024  # status line and headers; a longer head is no answer of an OpenAI server
MAX_BUFFERED_BYTES = 512 * 1024  # a stream's body received and not yet read: past it, reading pauses


class ConnectError(OSError):
    """No connection could be made (refused, no route, DNS failure)."""


class ConnectTimeout(Exception):
    """Connecting took longer than `connect_timeout_s`."""


class ReadTimeout(Exception):
    """No byte of the answer came for `read_timeout_s`."""


class Disconnected(Exception):
    """The connection closed before the whole answer had come (`partial`: after its head)."""

    def __init__(self, message: str, partial: bool) -> None:
        super().__init__(message)
        self.partial = partial


class BadAnswer(Exception):
    """What came is not an HTTP/1.x answer (or its body's framing or coding is broken)."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # names lower-cased; a repeated header's last value
    body: bytes  # the whole body (`post`); empty for a stream's head

    @property
    def content_type(self) -> str:
        """The media type without parameters (aiohttp's `content_type`: application/octet-stream where
        none is given)."""
        value = self.headers.get("content-type", "")
        return value.split(";", 1)[0].strip().lower() or "application/octet-stream"


class _Connection(asyncio.Protocol):
    """One keep-alive connection: the answer to the request in flight, parsed as its bytes come. A
    plain request's `waiter` gets the whole answer; a stream's gets its head, and its body collects in
    `_body` for `read_body`, with `_ended` or `_error` once there is no more."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Response] | None = None
        self.active = False  # a request is in flight (bytes outside one make the connection unusable)
        self.streaming = False
        self.last_data_s = 0.0  # loop time of the last byte (or of sending the request)
        self.timer: asyncio.TimerHandle | None = None  # the read timeout's check
        self.idle_since_s = 0.0
        self.reusable = True
        self._buf = bytearray()
        self._reader: asyncio.Future[None] | None = None  # a stream's reader waiting for bytes
        self._paused = False
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._headers: dict[str, str] = {}
        self._framing = ""  # "" while the head is read; then "length", "chunked" or "close"
        self._remaining = 0  # body bytes still expected ("length"), or of the current chunk
        self._chunk_state = "size"  # "size", "data", "data_end", "trailer"
        self._body = bytearray()
        self._decoder: Any = None  # a stream's gzip or deflate decoder
        self._ended = False
        self._error: Exception | None = None

    def start(self, waiter: asyncio.Future[Response], streaming: bool) -> None:
        self._reset()
        self.waiter, self.streaming, self.active = waiter, streaming, True
        self.last_data_s = self._loop.time()

    # -- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # not TCP: nothing to do
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.last_data_s = self._loop.time()
        if not self.active or self._ended or self._error is not None:  # bytes nobody asked for
            self.reusable = False
            if self.transport is not None:
                self.transport.close()
            return
        self._buf += data
        try:
            self._parse()
        except BadAnswer as e:
            self.fail(e)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.transport = None
        if not self.active or self._ended or self._error is not None:
            return
        if self._framing == "close":  # an answer framed by the connection's end: whole now
            try:
                self._complete()
            except BadAnswer as e:
                self.fail(e)
        else:
            partial = bool(self._framing)
            self.fail(Disconnected("the connection closed before the whole answer", partial))

    # -- what the pool calls -------------------------------------------------------------------------

    def fail(self, error: Exception) -> None:
        """The request in flight fails with `error` (its caller gets it), and the connection closes."""
        self.reusable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        elif not self._ended and self._error is None:
            self._error = error
            self._wake()
        if self.transport is not None:
            self.transport.close()

    async def read_body(self) -> bytes:
        """A stream's body received so far and not yet read (waiting until there is some); b"" at its
        end. Raises the error that ended it."""
        while not self._body and not self._ended and self._error is None:
            self._reader = self._loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        if self._body:
            data = bytes(self._body)
            self._body.clear()
            if self._paused and self.transport is not None:
                self._paused = False
                self.transport.resume_reading()
            return data
        if self._error is not None:
            raise self._error
        return b""

    @property
    def ended(self) -> bool:
        return self._ended

    # -- parsing -------------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def _parse(self) -> None:
        buf = self._buf
        while not self._framing:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise BadAnswer("an answer's head longer than 64 KiB")
                return
            head = bytes(buf[:end])
            del buf[: end + 4]
            self._head(head)
        if self._framing == "length":
            taken = min(len(buf), self._remaining)
            if taken:
                self._deliver(bytes(buf[:taken]))
                del buf[:taken]
                self._remaining -= taken
            if not self._remaining:
                self._complete()
        elif self._framing == "chunked":
            self._chunks()
        elif buf:  # "close": everything until the connection ends
            self._deliver(bytes(buf))
            buf.clear()

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not status_line[1].isdigit():
            raise BadAnswer(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
        status = int(status_line[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise BadAnswer(f"a malformed header line: {line[:80]!r}")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if 100 <= status < 200:  # an interim answer (100 Continue, 103 Early Hints): the next head
            return
        self._status, self._headers = status, headers
        if status_line[0] == b"HTTP/1.0" or "close" in headers.get("connection", "").lower():
            self.reusable = False
        if status in (204, 304):
            self._framing, self._remaining = "length", 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._framing = "chunked"
        elif "content-length" in headers:
            length = headers["content-length"]
            if not length.isdigit():
                raise BadAnswer(f"a bad Content-Length: {length[:40]!r}")
            self._framing, self._remaining = "length", int(length)
        else:
            self._framing = "close"
            self.reusable = False
        coding = headers.get("content-encoding", "identity").strip().lower()
        if coding not in ("", "identity", "gzip", "x-gzip", "deflate"):
            raise BadAnswer(f"a body in an unsupported coding: {coding[:40]}")
        if self.streaming:
            if coding in ("gzip", "x-gzip", "deflate"):  # wbits 47: a gzip or zlib header, found
                self._decoder = zlib.decompressobj(47)
            assert self.waiter is not None
            self.waiter.set_result(Response(status, headers, b""))

    def _deliver(self, data: bytes) -> None:
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(data)
            except zlib.error as e:
                raise BadAnswer(f"a body that does not decode: {e}") from e
        self._body += data
        if self.streaming:
            self._wake()
            if len(self._body) > MAX_BUFFERED_BYTES and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()

    def _chunks(self) -> None:
        buf = self._buf
        while True:
            if self._chunk_state == "size":
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 4096:
                        raise BadAnswer("a chunk's size line longer than 4 KiB")
                    return
                size = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[: end + 2]
                try:
                    self._remaining = int(size, 16)
                except ValueError:
                    raise BadAnswer(f"a bad chunk size: {size[:40]!r}") from None
                self._chunk_state = "data" if self._remaining else "trailer"
            elif self._chunk_state == "data":
                taken = min(len(buf), self._remaining)
                if not taken:
                    return
                self._deliver(bytes(buf[:taken]))
                del buf[:taken]
                self._remaining -= taken
                if self._remaining:
                    return
                self._chunk_state = "data_end"
            elif self._chunk_state == "data_end":
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise BadAnswer("a chunk not followed by CRLF")
                del buf[:2]
                self._chunk_state = "size"
            else:  # trailer fields, up to an empty line
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise BadAnswer("trailer fields longer than 64 KiB")
                    return
                del buf[: end + 2]
                if end == 0:
                    self._complete()
                    return

    def _complete(self) -> None:
        """The whole answer has come."""
        if self._buf:  # bytes past the answer: the connection's framing cannot be trusted
            self.reusable = False
        if self.streaming:
            if self._decoder is not None:
                self._body += self._decoder.flush()
            self._ended = True
            self._wake()
            return
        body = bytes(self._body)
        coding = self._headers.get("content-encoding", "identity").strip().lower()
        if coding in ("gzip", "x-gzip", "deflate"):
            try:  # wbits 47: a gzip or zlib header, found by the decoder
                body = zlib.decompress(body, 47) if coding != "deflate" else _inflate(body)
            except zlib.error as e:
                raise BadAnswer(f"a body that is not {coding}: {e}") from e
        self._ended = True
        assert self.waiter is not None
        self.waiter.set_result(Response(self._status, self._headers, body))


def _inflate(body: bytes) -> bytes:
    """`deflate` is zlib's format, or (as some servers send it) raw deflate."""
    try:
        return zlib.decompress(body)
    except zlib.error:
        return zlib.decompress(body, -15)


class Http1Stream:
    """A streamed answer: its head (`status`, `headers`, `content_type`), then its body as it comes
    (`read`, b"" at its end). `release` when done with it (the connection goes back to the pool where
    the body was read to its end), `abort` to drop the connection at once."""

    def __init__(self, pool: Http1Pool, conn: _Connection, head: Response) -> None:
        self._pool, self._conn, self._head = pool, conn, head
        self.status, self.headers = head.status, head.headers
        self._done = False

    @property
    def content_type(self) -> str:
        return self._head.content_type

    async def read(self) -> bytes:
        return await self._conn.read_body()

    async def read_all(self) -> bytes:
        parts = []
        while piece := await self.read():
            parts.append(piece)
        return b"".join(parts)

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._pool._finish(self._conn, self._conn.ended)

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._pool._finish(self._conn, False)


class Http1Pool:
    """Keep-alive connections to one `host:port` (plain TCP), at most `max_connections` in use at once
    (more requests wait for one); idle ones are reused newest first and dropped after
    `keepalive_timeout_s`."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int,
        keepalive_timeout_s: float,
    ) -> None:
        self.host, self.port = host, port
        self._host_header = (host if ":" not in host else f"[{host}]") + (f":{port}" if port != 80 else "")
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._keepalive_timeout_s = keepalive_timeout_s
        self._idle: collections.deque[_Connection] = collections.deque()
        self._slots = asyncio.Semaphore(max_connections)
        self._open: set[_Connection] = set()

    def request_head(self, path: str, headers: dict[str, str], length: int) -> bytes:
        """The request's head. Header names and values with a CR, LF or NUL are refused (ValueError):
        they would split the request."""
        lines = [f"POST {path} HTTP/1.1", f"Host: {self._host_header}", f"Content-Length: {length}"]
        for name, value in headers.items():
            if any(c in name or c in value for c in "\r\n\0") or not name:
                raise ValueError(f"a header that cannot be sent: {name[:40]!r}")
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def post(self, path: str, headers: dict[str, str], body: bytes) -> Response:
        """POST `body` to `path` and read the whole answer."""
        conn, waiter = await self._send(path, headers, body, streaming=False)
        done = False
        try:
            response = await waiter
            done = True
            return response
        finally:
            self._finish(conn, done)

    async def open_stream(self, path: str, headers: dict[str, str], body: bytes) -> Http1Stream:
        """POST `body` to `path`; the answer once its head has come, its body to be read as it comes.
        The caller must `release` or `abort` it."""
        conn, waiter = await self._send(path, headers, body, streaming=True)
        try:
            head = await waiter
        except BaseException:
            self._finish(conn, False)
            raise
        return Http1Stream(self, conn, head)

    async def _send(
        self, path: str, headers: dict[str, str], body: bytes, streaming: bool
    ) -> tuple[_Connection, asyncio.Future[Response]]:
        data = self.request_head(path, headers, len(body)) + body
        await self._slots.acquire()
        try:
            conn = await self._connection()
        except BaseException:
            self._slots.release()
            raise
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Response] = loop.create_future()
        conn.start(waiter, streaming)
        conn.timer = loop.call_at(conn.last_data_s + self._read_timeout_s, self._check_read, conn)
        assert conn.transport is not None
        conn.transport.write(data)
        return conn, waiter

    def _finish(self, conn: _Connection, whole: bool) -> None:
        """The request on `conn` is over (`whole`: its answer was read to its end): the connection goes
        back to the pool where it can take another, else it closes; its slot is free."""
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        conn.active = False
        conn.waiter = None
        if whole and conn.reusable and conn.transport is not None:
            conn.idle_since_s = asyncio.get_running_loop().time()
            self._idle.append(conn)
        else:  # cancelled, failed, not read to its end, or framed by its close: the connection goes
            self._drop(conn)
        self._slots.release()

    def _check_read(self, conn: _Connection) -> None:
        if not conn.active or conn.ended:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - conn.last_data_s >= self._read_timeout_s:
            conn.fail(ReadTimeout(f"no byte of the answer for {self._read_timeout_s:g} s"))
        else:
            conn.timer = loop.call_at(conn.last_data_s + self._read_timeout_s, self._check_read, conn)

    async def _connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        now_s = loop.time()
        while self._idle:
            conn = self._idle.pop()
            transport = conn.transport
            fresh = now_s - conn.idle_since_s < self._keepalive_timeout_s
            if transport is not None and not transport.is_closing() and fresh:
                return conn
            self._drop(conn)
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop), self.host, self.port),
                self._connect_timeout_s,
            )
        except asyncio.TimeoutError:
            raise ConnectTimeout(f"connecting took longer than {self._connect_timeout_s:g} s") from None
        except OSError as e:
            raise ConnectError(e.errno, e.strerror or str(e)) from e
        self._open.add(conn)
        return conn

    def _drop(self, conn: _Connection) -> None:
        self._open.discard(conn)
        conn.reusable = False
        if conn.transport is not None:
            conn.transport.close()

    def close(self) -> None:
        """Close every connection (those in use too: their callers get `Disconnected`)."""
        self._idle.clear()
        for conn in list(self._open):
            self._drop(conn)
