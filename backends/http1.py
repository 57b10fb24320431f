"""A lean HTTP/1.1 client for one plain-HTTP upstream: POSTs whose whole answer is read, over a pool of
keep-alive connections, on asyncio protocols.

Proxy mode's plain answers take this path (`OpenAIUpstream.post` on an `http://` base URL): aiohttp's
client cost about 220 µs of CPU a request here against about 70 µs for this one (the same stub, one
connection, `bench/results/profiles.md`), a large share of what the proxy adds. Streams, `https://`
upstreams and the model list stay on aiohttp's client.

What it does: one request at a time on a connection (no pipelining); the answer framed by
Content-Length, chunked transfer coding, or the connection's close (RFC 9112); 1xx heads skipped; a
gzip or deflate body decoded; connections reused while the server keeps them (HTTP/1.1 without
`Connection: close`) and dropped after `keepalive_timeout_s` idle. Timeouts as aiohttp's: connecting
(`connect_timeout_s`) and the longest wait for the next byte of the answer (`read_timeout_s`). Nothing
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

MAX_HEAD_BYTES = 64 * 1024  # status line and headers; a longer head is no answer of an OpenAI server


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
    body: bytes

    @property
    def content_type(self) -> str:
        """The media type without parameters (aiohttp's `content_type`: application/octet-stream where
        none is given)."""
        value = self.headers.get("content-type", "")
        return value.split(";", 1)[0].strip().lower() or "application/octet-stream"


class _Connection(asyncio.Protocol):
    """One keep-alive connection: the answer to the request in flight, parsed as its bytes come."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Response] | None = None
        self.last_data_s = 0.0  # loop time of the last byte (or of sending the request)
        self.timer: asyncio.TimerHandle | None = None  # the read timeout's check
        self.idle_since_s = 0.0
        self.reusable = True
        self._buf = bytearray()
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._headers: dict[str, str] = {}
        self._framing = ""  # "" while the head is read; then "length", "chunked" or "close"
        self._remaining = 0  # body bytes still expected ("length"), or of the current chunk
        self._chunk_state = "size"  # "size", "data", "data_end", "trailer"
        self._body = bytearray()

    # -- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # not TCP: nothing to do
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.last_data_s = self._loop.time()
        if self.waiter is None or self.waiter.done():  # bytes nobody asked for: not reusable
            self.reusable = False
            if self.transport is not None:
                self.transport.close()
            return
        self._buf += data
        try:
            response = self._parse()
        except BadAnswer as e:
            self._fail(e)
            return
        if response is not None:
            self.waiter.set_result(response)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.transport = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self._framing == "close":  # an answer framed by the connection's end: whole now
            waiter.set_result(self._response(bytes(self._body)))
        else:
            partial = bool(self._framing)
            waiter.set_exception(Disconnected("the connection closed before the whole answer", partial))

    # -- parsing -------------------------------------------------------------------------------------

    def _fail(self, error: Exception) -> None:
        self.reusable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    def _parse(self) -> Response | None:
        """The whole answer, where the bytes so far hold it; None: more is needed."""
        buf = self._buf
        while not self._framing:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise BadAnswer("an answer's head longer than 64 KiB")
                return None
            head = bytes(buf[:end])
            del buf[: end + 4]
            self._head(head)
        if self._framing == "length":
            if len(buf) < self._remaining:
                return None
            body = bytes(buf[: self._remaining])
            del buf[: self._remaining]
            return self._response(body)
        if self._framing == "chunked":
            return self._chunks()
        self._body += buf  # "close": everything until the connection ends
        buf.clear()
        return None

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

    def _chunks(self) -> Response | None:
        buf = self._buf
        while True:
            if self._chunk_state == "size":
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 4096:
                        raise BadAnswer("a chunk's size line longer than 4 KiB")
                    return None
                size = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[: end + 2]
                try:
                    self._remaining = int(size, 16)
                except ValueError:
                    raise BadAnswer(f"a bad chunk size: {size[:40]!r}") from None
                self._chunk_state = "data" if self._remaining else "trailer"
            elif self._chunk_state == "data":
                taken = min(len(buf), self._remaining)
                self._body += buf[:taken]
                del buf[:taken]
                self._remaining -= taken
                if self._remaining:
                    return None
                self._chunk_state = "data_end"
            elif self._chunk_state == "data_end":
                if len(buf) < 2:
                    return None
                if buf[:2] != b"\r\n":
                    raise BadAnswer("a chunk not followed by CRLF")
                del buf[:2]
                self._chunk_state = "size"
            else:  # trailer fields, up to an empty line
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise BadAnswer("trailer fields longer than 64 KiB")
                    return None
                del buf[: end + 2]
                if end == 0:
                    return self._response(bytes(self._body))

    def _response(self, body: bytes) -> Response:
        coding = self._headers.get("content-encoding", "identity").strip().lower()
        if coding in ("gzip", "x-gzip", "deflate"):
            try:  # wbits 47: a gzip or zlib header, found by the decoder
                body = zlib.decompress(body, 47) if coding != "deflate" else _inflate(body)
            except zlib.error as e:
                raise BadAnswer(f"a body that is not {coding}: {e}") from e
        elif coding not in ("", "identity"):
            raise BadAnswer(f"a body in an unsupported coding: {coding[:40]}")
        response = Response(self._status, self._headers, body)
        if self._buf:  # bytes past the answer: the connection's framing cannot be trusted
            self.reusable = False
        self._reset()
        return response


def _inflate(body: bytes) -> bytes:
    """`deflate` is zlib's format, or (as some servers send it) raw deflate."""
    try:
        return zlib.decompress(body)
    except zlib.error:
        return zlib.decompress(body, -15)


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
        data = self.request_head(path, headers, len(body)) + body
        async with self._slots:
            conn = await self._connection()
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[Response] = loop.create_future()
            conn.waiter = waiter
            conn.last_data_s = loop.time()
            conn.timer = loop.call_at(conn.last_data_s + self._read_timeout_s, self._check_read, conn, waiter)
            done = False
            try:
                assert conn.transport is not None
                conn.transport.write(data)
                response = await waiter
                done = True
                return response
            finally:
                if conn.timer is not None:
                    conn.timer.cancel()
                    conn.timer = None
                conn.waiter = None
                if done and conn.reusable and conn.transport is not None:
                    conn.idle_since_s = loop.time()
                    self._idle.append(conn)
                else:  # cancelled, failed, or framed by its end: the connection goes
                    self._drop(conn)

    def _check_read(self, conn: _Connection, waiter: asyncio.Future[Response]) -> None:
        if waiter.done():
            return
        loop = asyncio.get_running_loop()
        waited_s = loop.time() - conn.last_data_s
        if waited_s >= self._read_timeout_s:
            waiter.set_exception(ReadTimeout(f"no byte of the answer for {self._read_timeout_s:g} s"))
        else:
            conn.timer = loop.call_at(conn.last_data_s + self._read_timeout_s, self._check_read, conn, waiter)

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
