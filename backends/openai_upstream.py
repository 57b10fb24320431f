"""A thin async client for an OpenAI-compatible upstream server (vLLM, TGI, another WattProxy).

One `OpenAIUpstream` owns one `aiohttp.ClientSession` for the life of the service (the model list, and
everything where the base URL is `https://` or names credentials) and, for an `http://` upstream, one
`backends.http1.Http1Pool` for plain answers and streams (a third of aiohttp's CPU a plain request):
each a pool of at most `max_connections` keep-alive connections, a connect timeout (TCP connect, s) and a
read timeout (the longest wait for the next byte of an answer, s; for a plain answer that includes the
whole generation).
Pooled connections are dropped after `keepalive_timeout_s` idle (s), below the 5 s that vLLM's
uvicorn keeps them, so a request is not sent on a connection the server is closing.

Generation requests are POSTs and are never retried: aiohttp retries only idempotent methods on a
stale connection, and nothing here retries at all. A caller that is cancelled (its own client left)
closes the connection it was using, so the upstream sees the disconnect and cancels the work.

It never imports `proxy`. Transport failures become typed exceptions, in one place (`_translated`):

- `UpstreamUnreachable`: no connection could be made (refused, DNS failure, no route);
- `UpstreamTimeout`: connecting, or waiting for the next byte, took longer than its timeout;
- `UpstreamBadResponse`: the connection broke mid-answer, or the answer was malformed;
- `UpstreamStatus`: the upstream answered with a non-2xx status (its body is kept for pass-through).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import aiohttp
from yarl import URL

from backends import http1

JSON = "application/json"
MAX_EVENT_BYTES = 1 << 20  # one SSE line (SseParser refuses longer ones)
MAX_RETRY_AFTER_S = 86_400.0  # an upstream's Retry-After passed on is at most a day


class UpstreamError(Exception):
    """Base of the upstream client's errors; the message is safe to show to a client."""


class UpstreamUnreachable(UpstreamError):
    """No connection to the upstream could be made."""


class UpstreamTimeout(UpstreamError):
    """Connecting (`phase` "connect") or reading the answer (`phase` "read") timed out."""

    def __init__(self, message: str, phase: Literal["connect", "read"]) -> None:
        super().__init__(message)
        self.phase = phase


class UpstreamBadResponse(UpstreamError):
    """The upstream broke the connection mid-answer or sent something that is not an answer."""


class UpstreamStatus(UpstreamError):
    """A non-2xx answer. `body` is the raw body (bytes), `retry_after_s` from its Retry-After (s)."""

    def __init__(self, status: int, body: bytes, content_type: str, retry_after_s: float | None) -> None:
        super().__init__(f"the upstream answered {status}")
        self.status = status
        self.body = body
        self.content_type = content_type
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class UpstreamModel:
    """A model the upstream serves: its id and, where the upstream says (WattProxy does), its task."""

    id: str
    task: str | None = None


@dataclass(frozen=True)
class Answer:
    """A 2xx plain answer: status and raw body."""

    status: int
    body: bytes


@contextlib.contextmanager
def _translated(base_url: str) -> Iterator[None]:
    """Map aiohttp's and asyncio's transport errors to the typed errors above (raised `from` them)."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as e:
        raise UpstreamTimeout(f"connecting to the upstream {base_url} timed out", "connect") from e
    except (aiohttp.ServerTimeoutError, asyncio.TimeoutError) as e:
        raise UpstreamTimeout(f"the upstream {base_url} did not answer in time", "read") from e
    except aiohttp.ClientConnectorError as e:
        raise UpstreamUnreachable(
            f"the upstream {base_url} is unreachable ({e.os_error.strerror or e})"
        ) from e
    except aiohttp.ServerDisconnectedError as e:
        raise UpstreamBadResponse(f"the upstream {base_url} closed the connection without answering") from e
    except aiohttp.ClientPayloadError as e:
        raise UpstreamBadResponse(f"the upstream {base_url} broke off its answer") from e
    except aiohttp.ClientError as e:
        raise UpstreamBadResponse(
            f"the connection to the upstream {base_url} failed ({type(e).__name__})"
        ) from e


@contextlib.contextmanager
def _lean_translated(base_url: str) -> Iterator[None]:
    """`_translated` for the lean client's errors (backends.http1)."""
    try:
        yield
    except http1.ConnectTimeout as e:
        raise UpstreamTimeout(f"connecting to the upstream {base_url} timed out", "connect") from e
    except http1.ReadTimeout as e:
        raise UpstreamTimeout(f"the upstream {base_url} did not answer in time", "read") from e
    except http1.ConnectError as e:
        raise UpstreamUnreachable(f"the upstream {base_url} is unreachable ({e.strerror or e})") from e
    except http1.Disconnected as e:
        what = "broke off its answer" if e.partial else "closed the connection without answering"
        raise UpstreamBadResponse(f"the upstream {base_url} {what}") from e
    except http1.BadAnswer as e:
        raise UpstreamBadResponse(f"the upstream {base_url} sent a bad answer ({e})") from e
    except OSError as e:  # the connection failed while the request was written or read
        raise UpstreamBadResponse(
            f"the connection to the upstream {base_url} failed ({type(e).__name__})"
        ) from e


def _retry_after_s(value: str | None) -> float | None:
    """A Retry-After header's `value` in seconds: its delay, or the time until its HTTP date (RFC 9110),
    at most a day; None where it is neither (or not a finite, non-negative delay: `inf` and `nan` parse
    as floats)."""
    if value is None:
        return None
    try:
        delay_s = float(value)
    except ValueError:
        pass
    else:
        return min(delay_s, MAX_RETRY_AFTER_S) if math.isfinite(delay_s) and delay_s >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return min(
        max((when - datetime.datetime.now(datetime.timezone.utc)).total_seconds(), 0.0), MAX_RETRY_AFTER_S
    )


class SseParser:
    """The data payloads of server-sent events, from an answer's bytes fed in pieces cut anywhere.

    Lines end with LF, CRLF or a bare CR (the SSE rules); a blank line ends an event; an event's
    `data:` lines are joined with LF; comment lines (keep-alive pings) and other fields are skipped. A
    line longer than `max_line_bytes` (a broken upstream must not fill the memory) raises ValueError:
    at once, or, where the same piece completed events before it, at the next `feed` or `close`, once
    those have been returned."""

    def __init__(self, max_line_bytes: int = MAX_EVENT_BYTES) -> None:
        self._pending = b""  # the start of a line whose end has not arrived
        self._data: list[bytes] = []  # the data lines of the event being read
        self._max_line_bytes = max_line_bytes
        self._too_long = False

    def feed(self, piece: bytes) -> list[bytes]:
        """The events that `piece` completes, in order."""
        if self._too_long:
            raise ValueError(f"a stream line longer than {self._max_line_bytes} bytes")
        text = self._pending + piece if self._pending else piece
        if b"\r" in text:  # CRLF and bare CR ends as LF; a CR at the very end may be half a CRLF: kept
            held = text.endswith(b"\r")
            text = (text[:-1] if held else text).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if held:
                text += b"\r"
        lines = text.split(b"\n")
        self._pending = lines.pop()
        self._too_long = len(self._pending) > self._max_line_bytes
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if not line:  # a blank line ends an event
                if data:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data = self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
        if self._too_long and not events:
            raise ValueError(f"a stream line longer than {self._max_line_bytes} bytes")
        return events

    def close(self) -> list[bytes]:
        """The end of the answer: an event whose blank line (or last line's end) never came."""
        if self._too_long:
            raise ValueError(f"a stream line longer than {self._max_line_bytes} bytes")
        events = self.feed(b"\n") if self._pending else []
        if self._data:
            events.append(b"\n".join(self._data))
            self._data = []
        return events


class EventStream:
    """The data payloads of a server-sent-events answer, in order, the final `[DONE]` included
    (`SseParser`'s rules). `read` gives the body's bytes as they come (b"" at its end), `close` drops
    the connection, `translated` maps the transport's errors (aiohttp's client, or backends.http1)."""

    def __init__(
        self,
        read: Callable[[], Awaitable[bytes]],
        close: Callable[[], None],
        base_url: str,
        translated: Callable[[str], contextlib.AbstractContextManager[None]],
    ) -> None:
        self._read, self._close = read, close
        self._base_url = base_url
        self._translated = translated

    async def batches(self) -> AsyncIterator[list[bytes]]:
        """The events as they arrive: each list holds every event complete in what has been received
        so far (one, unless the reader fell behind: then all that are waiting, to be sent on at once)."""
        parser = SseParser()
        while True:
            with self._translated(self._base_url):
                piece = await self._read()
            try:
                events = parser.feed(piece) if piece else parser.close()
            except ValueError as e:
                raise UpstreamBadResponse(f"the upstream {self._base_url} sent a bad stream: {e}") from e
            if events:
                yield events
            if not piece:  # end of the answer
                return

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for events in self.batches():
            for event in events:
                yield event

    def abort(self) -> None:
        """Close the connection now: the upstream sees its client leave and cancels the request."""
        self._close()


class OpenAIUpstream:
    """The client of one upstream base URL (`http://host:port`, with or without a trailing `/v1`).

    `start()` must run inside the event loop that will use it; `close()` releases the pool."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 300.0,
        max_connections: int = 256,
        keepalive_timeout_s: float = 4.0,
    ) -> None:
        base = base_url.rstrip("/")
        self.base_url = base.removesuffix("/v1")
        # what messages and logs name: without any user:password in the URL (clients see the messages)
        self.shown_url = str(URL(self.base_url).with_user(None))
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._max_connections = max_connections
        self._keepalive_timeout_s = keepalive_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}
        # an http:// upstream without credentials in its URL: the lean client, to its host and port
        parsed = URL(self.base_url)
        self._lean = parsed.scheme == "http" and not parsed.user and not parsed.password and bool(parsed.host)
        self._address = (str(parsed.host), int(parsed.port or 80)) if self._lean else None
        self._pool: http1.Http1Pool | None = None
        self._targets: dict[str, str] = {}  # path -> the request target (the base URL's path + path)

    def url(self, path: str) -> URL:
        """The absolute URL of `path` (e.g. "/v1/models") under the base URL, parsed once."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.base_url + path)
        return url

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, limit_per_host=0, keepalive_timeout=self._keepalive_timeout_s
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # one session serves every user: no upstream cookie is kept
            timeout=self._timeout,
            headers=self._headers,
            read_bufsize=MAX_EVENT_BYTES // 2,
            auto_decompress=True,
        )

        if self._address is not None:
            assert self._timeout.sock_connect is not None and self._timeout.sock_read is not None
            self._pool = http1.Http1Pool(
                *self._address,
                connect_timeout_s=self._timeout.sock_connect,
                read_timeout_s=self._timeout.sock_read,
                max_connections=self._max_connections,
                keepalive_timeout_s=self._keepalive_timeout_s,
            )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("OpenAIUpstream.start() was not called")
        return self._session

    async def models(self) -> list[UpstreamModel]:
        """The upstream's `/v1/models`: each model's id and, where reported, its task."""
        with _translated(self.shown_url):
            async with self.session.get(self.url("/v1/models")) as resp:
                body = await resp.read()
                if resp.status >= 300:
                    raise UpstreamStatus(
                        resp.status, body, resp.content_type, _retry_after_s(resp.headers.get("Retry-After"))
                    )
        try:
            data = json.loads(body)["data"]
            return [
                UpstreamModel(id=str(m["id"]), task=m.get("task") if isinstance(m.get("task"), str) else None)
                for m in data
            ]
        except (ValueError, KeyError, TypeError) as e:
            raise UpstreamBadResponse(f"the upstream {self.shown_url} sent a malformed model list") from e

    async def post(self, path: str, body: bytes, headers: Mapping[str, str] | None = None) -> Answer:
        """POST a JSON body (bytes, sent as is) and read the whole answer. Raises `UpstreamStatus` for a
        non-2xx answer, the transport errors above otherwise."""
        if self._pool is not None:
            return await self._lean_post(self._pool, path, body, headers)
        with _translated(self.shown_url):
            async with self.session.post(
                self.url(path), data=body, headers={"Content-Type": JSON, **(headers or {})}
            ) as resp:
                payload = await resp.read()
                if resp.status >= 300:
                    raise UpstreamStatus(
                        resp.status,
                        payload,
                        resp.content_type,
                        _retry_after_s(resp.headers.get("Retry-After")),
                    )
                return Answer(resp.status, payload)

    async def _lean_post(
        self, pool: http1.Http1Pool, path: str, body: bytes, headers: Mapping[str, str] | None
    ) -> Answer:
        sent = {"Content-Type": JSON, **self._headers, **(headers or {})}
        with _lean_translated(self.shown_url):
            resp = await pool.post(self._target(path), sent, body)
        if resp.status >= 300:
            raise UpstreamStatus(
                resp.status, resp.body, resp.content_type, _retry_after_s(resp.headers.get("retry-after"))
            )
        return Answer(resp.status, resp.body)

    def _target(self, path: str) -> str:
        """The request target of `path`: the base URL's path and `path`, as sent on the request line."""
        target = self._targets.get(path)
        if target is None:
            target = self._targets[path] = self.url(path).raw_path_qs
        return target

    @contextlib.asynccontextmanager
    async def stream(
        self, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[EventStream]:
        """POST a JSON body that asks for a stream; yields its `EventStream` once the answer's headers
        are in. A non-2xx answer raises `UpstreamStatus` (with its whole body) before any event.
        Leaving the block early (an exception, a cancellation) closes the connection."""
        if self._pool is not None:
            async with self._lean_stream(self._pool, path, body, headers) as events:
                yield events
            return
        with _translated(self.shown_url):
            resp = await self.session.post(
                self.url(path),
                data=body,
                headers={"Content-Type": JSON, "Accept": "text/event-stream", **(headers or {})},
            )
        try:
            if resp.status >= 300:
                with _translated(self.shown_url):
                    payload = await resp.read()
                raise UpstreamStatus(
                    resp.status, payload, resp.content_type, _retry_after_s(resp.headers.get("Retry-After"))
                )
            if resp.content_type != "text/event-stream":
                raise UpstreamBadResponse(
                    f"the upstream {self.shown_url} answered a stream request without one"
                )
            yield EventStream(resp.content.readany, resp.close, self.shown_url, _translated)
        except BaseException:
            resp.close()
            raise
        else:
            resp.release()

    @contextlib.asynccontextmanager
    async def _lean_stream(
        self, pool: http1.Http1Pool, path: str, body: bytes, headers: Mapping[str, str] | None
    ) -> AsyncIterator[EventStream]:
        sent = {"Content-Type": JSON, "Accept": "text/event-stream", **self._headers, **(headers or {})}
        with _lean_translated(self.shown_url):
            resp = await pool.open_stream(self._target(path), sent, body)
        try:
            if resp.status >= 300:
                with _lean_translated(self.shown_url):
                    payload = await resp.read_all()
                raise UpstreamStatus(
                    resp.status, payload, resp.content_type, _retry_after_s(resp.headers.get("retry-after"))
                )
            if resp.content_type != "text/event-stream":
                raise UpstreamBadResponse(
                    f"the upstream {self.shown_url} answered a stream request without one"
                )
            yield EventStream(resp.read, resp.abort, self.shown_url, _lean_translated)
        except BaseException:
            resp.abort()
            raise
        else:
            resp.release()
