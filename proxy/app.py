"""The composition root: `create_app` wires settings, meters, monitors, carbon, backends, scheduler,
metrics and routes. Long-lived objects live in `cleanup_ctx` under typed app keys."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path
from typing import cast

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from prometheus_client import CollectorRegistry

from backends import load_backend
from backends.base import Backend, BackendRequest, ImageRequest, ImageResult, TextRequest, TextResult
from backends.base import freeze_heap as base_freeze_heap
from backends.process import cpu_seconds as process_cpu_seconds
from proxy import accounts_api, api
from proxy.auth import KeyCache, Principal, auth_middleware, new_key
from proxy.budgets import Budgets
from proxy.carbon import CarbonModel, build_carbon
from proxy.config import Settings, parse_size
from proxy.energy.meter import EnergyMeter, open_meter
from proxy.energy.monitor import Charge, DeviceMonitor
from proxy.errors import ApiError, InvalidRequest, Overloaded, ServerError, error_middleware, error_response
from proxy.ledger import Ledger, LedgerRecord, LedgerUnavailable
from proxy.metrics import JOULES_PER_KWH, EnergyBook, EnergyEntry, Metrics, RequestStats, metrics_handler
from proxy.scheduler import DeviceWorker, ModelQueue, Outcome, RequestTag, Scheduler
from proxy.state import (
    BOOK,
    BUDGETS,
    CARBON,
    KEYS,
    LEDGER,
    METRICS,
    MONITORS,
    PRINCIPAL,
    RECORDER,
    REQUEST_ID,
    SCHEDULER,
    SERVICE,
    SETTINGS,
    USER,
    ServedModel,
    Service,
)

log = logging.getLogger(__name__)


ALWAYS_OPEN = ("/healthz", "/readyz", "/metrics", "/openapi.json")

# A UUID version 7 (RFC 9562) over its 128-bit integer: 48 bits of Unix time in ms, the version (7),
# 12 bits of the millisecond's fraction, the variant (10) and 62 random bits.
_UUID7_VERSION_VARIANT = (0x7 << 76) | (0b10 << 62)
_RANDOM_62 = (1 << 62) - 1
_RANDOM_PER_DRAW = 256
_spare_random: deque[int] = deque()
os.register_at_fork(after_in_child=_spare_random.clear)  # a forked child must not repeat the parent's


def _draw_random(n: int) -> list[int]:
    pool = os.urandom(8 * n)
    return [int.from_bytes(pool[i : i + 8], "big") & _RANDOM_62 for i in range(0, 8 * n, 8)]


def new_request_id() -> str:
    """A request id: a UUID version 7 as 32 hex digits, ordered by time (to the 1/4096 ms) and unique
    by 62 random bits. Time-ordered ids are appended at the end of the ledger's primary-key index,
    where random ones (uuid4) land on a random page each: as the ledger grows, that is a page read
    and a page written per record (`bench/results/ledger.md`). The random bits come from
    `os.urandom` 256 ids' worth at a time: each call of it lets go of the interpreter lock (the
    `getrandom` syscall may block), and the event loop then waits to get it back from the device and
    ledger threads. A deque's `popleft` and `extend` are atomic, so threads can share it."""
    while True:
        try:
            random_bits = _spare_random.popleft()
            break
        except IndexError:
            _spare_random.extend(_draw_random(_RANDOM_PER_DRAW))
    ms, ns = divmod(time.time_ns(), 1_000_000)
    value = (ms << 80) | ((ns * 4096 // 1_000_000) << 64) | _UUID7_VERSION_VARIANT | random_bits
    return value.to_bytes(16, "big").hex()


class Accountant:
    """Turns each device commit into CO2 and book entries (runs under the monitor's lock)."""

    def __init__(self, book: EnergyBook, carbon: CarbonModel, clock: Callable[[], float]) -> None:
        self.book = book
        self.carbon = carbon
        self._wall_minus_clock_s = time.time() - clock()

    def on_commit(self, device: str, idle_j: float, commits: Sequence[tuple[object, Charge]]) -> None:
        entries = []
        for tag, charge in commits:
            assert isinstance(tag, RequestTag)
            when = datetime.fromtimestamp(self._wall_minus_clock_s + charge.start_s, tz=timezone.utc)
            tag.carbon = self.carbon.charge(charge.joules / JOULES_PER_KWH, when, charge.device_seconds)
            entries.append(EnergyEntry(tag.model, tag.task, tag.user, charge.joules, tag.carbon.co2_grams))
        self.book.commit(device, idle_j, entries)


def _meter_for(settings: Settings, device: str, clock: Callable[[], float]) -> EnergyMeter:
    e = settings.energy
    return open_meter(
        settings.meter,
        device,
        clock=clock,
        synthetic={
            "idle_watts": e.synthetic_idle_watts,
            "busy_watts": e.synthetic_busy_watts,
            "update_period_s": e.synthetic_update_period_s,
        },
        estimated={
            "watts_per_core": e.estimated_watts_per_core,
            "idle_watts": e.estimated_idle_watts,
            # the CPU of the models that run in processes of their own counts too
            "cpu_clock": process_cpu_seconds,
        },
        nvml={"step_hint_s": e.nvml_step_hint_s},
    )


def _resolve_source(source: str, cache_dir: Path) -> str | Path:
    if source.startswith("tiny:"):
        from backends import LOADING
        from backends.tiny import ensure_model

        with LOADING:  # builds the model (torch) on first use: one at a time, as loads are
            return ensure_model(source.removeprefix("tiny:"), cache_dir / "models")
    return source


def create_app(
    settings: Settings,
    *,
    meters: Mapping[str, EnergyMeter] | None = None,
    backends: Mapping[str, Backend] | None = None,
    registry: CollectorRegistry | None = None,
    ledger: Ledger | None = None,
    clock: Callable[[], float] = time.monotonic,
    freeze: bool = False,
) -> web.Application:
    """Build the service. `meters` (by device) and `backends` (by model name) replace the configured
    ones, for tests and embedding; everything else comes from `settings`. `freeze`: take the heap
    out of the cyclic GC's reach once set up and once the models are loaded (`freeze_heap`; what
    `wattproxy serve` does: a process that is the service, not one that builds many)."""
    given_ledger = ledger
    service = Service(models={m.name: ServedModel(settings=m) for m in settings.models})
    registry = registry if registry is not None else CollectorRegistry()
    book = EnergyBook()
    metrics = Metrics(registry, book)

    def request_id_of(request: web.Request) -> str | None:
        return request.get(REQUEST_ID)

    def set_principal(request: web.Request, principal: Principal) -> None:
        request[PRINCIPAL] = principal
        request[USER] = principal.user

    @web.middleware
    async def request_context(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        request[REQUEST_ID] = new_request_id()
        request[USER] = "anonymous"
        if service.draining and request.path not in ALWAYS_OPEN:
            return error_response(
                Overloaded("the server is shutting down", retry_after_s=5), request[REQUEST_ID]
            )
        service.inflight += 1
        try:
            return await handler(request)
        finally:
            service.inflight -= 1

    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[
            *([cors_middleware(settings.cors_origins)] if settings.cors_origins else []),
            request_context,
            error_middleware(request_id_of, settings.max_body_bytes),
            auth_middleware(settings.auth, lambda: app[KEYS], set_principal),
        ],
    )
    app[SETTINGS] = settings
    app[SERVICE] = service
    app[METRICS] = metrics
    app[BOOK] = book
    scheduler = Scheduler()
    app[SCHEDULER] = scheduler

    budgets = Budgets()
    app[BUDGETS] = budgets

    async def ledger_ctx(app: web.Application) -> AsyncIterator[None]:
        ledger = given_ledger if given_ledger is not None else Ledger(settings.db_url())
        if settings.ledger_inline_commit:
            ledger.inline_when = service.alone
        await ledger.start()
        app[LEDGER] = ledger
        app[KEYS] = KeyCache(ledger, ttl_s=settings.key_cache_ttl_s)
        if settings.auth == "none":
            log.warning(
                "AUTH IS OFF (--auth none): every request is accepted and accounted to user 'anonymous'"
            )
        else:
            await bootstrap_admin_key(ledger)
        budgets.set_keys(await ledger.keys(include_revoked=False))
        await budgets.refresh(ledger)
        refresher = asyncio.create_task(_refresh_budgets(ledger, budgets, settings.budget_refresh_s))
        yield
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        if given_ledger is None:
            await ledger.close()

    async def carbon_ctx(app: web.Application) -> AsyncIterator[None]:
        carbon = build_carbon(settings.carbon)
        await carbon.start()
        app[CARBON] = carbon
        yield
        await carbon.close()

    async def monitors_ctx(app: web.Application) -> AsyncIterator[None]:
        accountant = Accountant(book, app[CARBON], clock)
        monitors: dict[str, DeviceMonitor] = {}
        loop = asyncio.get_running_loop()
        upstream_devices = settings.upstream.device_names() if settings.upstream is not None else []
        for device in sorted({m.device for m in settings.models} | set(upstream_devices)):
            meter = (meters or {}).get(device) or await loop.run_in_executor(
                None, _meter_for, settings, device, clock
            )
            monitor = DeviceMonitor(
                meter,
                idle_policy=settings.idle_policy,
                amortize_window_s=settings.amortize_window_s,
                sample_period_s=settings.energy.sample_period_s,
                finalize_poll_s=settings.energy.finalize_poll_s,
                max_finalize_delay_s=settings.energy.max_finalize_delay_s,
                clock=clock,
                on_commit=accountant.on_commit,
            )
            book.add_device(device)
            await loop.run_in_executor(None, monitor.start)  # its first read may block (NVML)
            log.info(
                "energy meter on %s: %s (%s, %s)",
                device,
                type(meter).__name__,
                meter.measurement,
                meter.method,
            )
            monitors[device] = monitor
            scheduler.add_device(DeviceWorker(device, monitor))
        app[MONITORS] = monitors
        carbon = app[CARBON]

        def intensity() -> tuple[str, str, float]:
            now = carbon.current()
            return now.zone, now.source, now.g_per_kwh

        metrics.attach(
            power=lambda: {d: m.power_watts() for d, m in monitors.items()},
            queue_depths=scheduler.depths,
            intensity=intensity,
            budgets=budgets.remaining_kwh,
            phone_charge_kwh=settings.phone_charge_kwh,
            model_exits=lambda: _model_exits(service),
        )
        yield
        await scheduler.stop()
        for monitor in monitors.values():
            await loop.run_in_executor(None, monitor.stop)
            await loop.run_in_executor(None, monitor.meter.close)

    async def models_ctx(app: web.Application) -> AsyncIterator[None]:
        record = _recorder(metrics, app[LEDGER], budgets)
        app[RECORDER] = record
        loading = _load_models(settings, service, scheduler, record, backends or {}, freeze)
        loader = asyncio.create_task(loading)
        yield
        loader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loader
        for served in service.models.values():
            if served.backend is not None:
                served.backend.close()

    # carbon first: a bad [carbon] table fails the start before anything (a key, a database) is created
    app.cleanup_ctx.extend([carbon_ctx, ledger_ctx, monitors_ctx, models_ctx])
    if settings.upstream is not None:
        from proxy.upstream import upstream_ctx

        app.cleanup_ctx.append(upstream_ctx(settings))

    async def freeze_when_set_up(app: web.Application) -> None:  # after every cleanup_ctx has set up
        freeze_heap()

    if freeze:
        app.on_startup.append(freeze_when_set_up)
    api.add_routes(app)
    accounts_api.add_routes(app)
    app.router.add_get("/metrics", metrics_handler(registry, settings.metrics_token))
    return app


def freeze_heap() -> None:
    """Take what is alive now (the libraries, torch, the models) out of the cyclic GC's reach. A full
    collection walks it all, a stall of the event loop and of every request in flight: 25 ms over the
    90,000 objects of a proxy-mode process, 230 ms over the 474,000 of the embedded models' (measured
    here; it made the p99 of proxy mode at 64 connections). Called once the service is set up and
    again once its models are loaded; what is allocated later is collected as usual."""
    log.info("%d objects set aside from garbage collection", base_freeze_heap())


async def _load_models(
    settings: Settings,
    service: Service,
    scheduler: Scheduler,
    record: Callable[[Sequence[Outcome]], Awaitable[None]],
    given: Mapping[str, Backend],
    freeze: bool = False,
) -> None:
    """Load every model off the event loop, all at once: one at a time in this process (`LOADING`),
    while the model processes load theirs side by side. Readiness flips per model as each is ready."""
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    loads = [  # upstream models may be added meanwhile: these are the configured ones
        _load_model(settings, name, served, scheduler, record, given.get(name))
        for name, served in list(service.models.items())
    ]
    await asyncio.gather(*loads)
    if freeze:
        freeze_heap()


async def _load_model(
    settings: Settings,
    name: str,
    served: ServedModel,
    scheduler: Scheduler,
    record: Callable[[Sequence[Outcome]], Awaitable[None]],
    backend: Backend | None,
) -> None:
    loop = asyncio.get_running_loop()
    ms = served.settings
    try:
        if backend is None:
            source = await loop.run_in_executor(None, _resolve_source, ms.source, settings.cache_dir)
            backend = await loop.run_in_executor(
                None,
                lambda: load_backend(
                    ms.task,
                    ms.name,
                    source,
                    device=ms.device,
                    dtype=ms.dtype,
                    own_process=ms.own_process,
                    torch_threads=settings.torch_threads,
                    cuda_graphs=ms.cuda_graphs,
                    batch_timeout_s=ms.batch_timeout_s,
                ),
            )
    except Exception as e:
        served.load_error = f"{type(e).__name__}: {e}"
        log.exception("loading model %s from %s failed", name, ms.source)
        return
    served.backend = backend
    if "response_format" in served.honours():
        # its requests' schemas are checked on the event loop (proxy.api): the checker's import
        # (xgrammar: 0.2 s, torch and transformers being loaded) is done here, before the model is
        # ready, not at the first such request, holding every other one
        await loop.run_in_executor(None, importlib.import_module, "backends.structured")
    if ms.warmup is True or (ms.warmup == "auto" and ms.device.startswith("cuda")):
        await _warm_up(name, served, backend, scheduler.devices[ms.device])
    queue = ModelQueue(
        name=name,
        task=ms.task,
        backend=backend,
        device=scheduler.devices[ms.device],
        max_batch_size=ms.max_batch_size,
        max_wait_s=ms.max_wait_ms / 1000.0,
        max_queue=ms.max_queue,
        max_queue_per_user=ms.max_queue_per_user,
        fair=ms.batch_order == "fair",
        stream_interval_s=ms.stream_interval_ms / 1000.0,
        record=record,
    )
    scheduler.add_model(queue)
    served.queue = queue
    log.info("model %s (%s) ready on %s", name, ms.task, ms.device)


def _model_exits(service: Service) -> dict[tuple[str, str], int]:
    """(model, reason) -> model processes that ended other than by the server (`ProcessBackend.exits`),
    for every model served from a process of its own."""
    out: dict[tuple[str, str], int] = {}
    for name, served in list(service.models.items()):
        exits = getattr(served.backend, "exits", None)
        if isinstance(exits, dict):
            out.update(((name, reason), n) for reason, n in exits.items())
    return out


async def _warm_up(name: str, served: ServedModel, backend: Backend, worker: DeviceWorker) -> None:
    """The model's first request, run before it takes any (`ModelSettings.warmup`); a failure is logged
    (the requests would fail alike) and the model is served all the same."""
    ms = served.settings
    request: BackendRequest
    if ms.task == "text":
        request = TextRequest(prompt="Hello", max_tokens=1, temperature=0.0)
    else:
        width, height = parse_size(ms.default_size)
        request = ImageRequest(
            prompt="warm-up",
            width=width,
            height=height,
            steps=1,
            guidance_scale=ms.default_guidance_scale,
            seed=0,
        )
    _, error, _, run_s = await worker.warm_up(backend, request)
    if error is not None:
        log.error("warming model %s up failed: %s: %s", name, type(error).__name__, error)
    else:
        log.info("model %s warmed up in %.3f s", name, run_s)


class _NoRequestBytes(logging.Filter):
    """aiohttp logs a malformed request (ERROR, with its exception) quoting the offending bytes, which
    can be an `Authorization` header: keep the event, drop the bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if isinstance(err, HttpProcessingError):
            record.msg = f"{record.getMessage()}: {type(err).__name__} (HTTP {err.code})"
            record.args = None
            record.exc_info = record.exc_text = None
        return True


# After `wattproxy serve`'s drain (bounded by drain_timeout_s), what aiohttp gives handlers still
# running before cancelling them (its default, 60 s, applied twice, left proxy-mode streams running
# far past the drain's bound).
SHUTDOWN_GRACE_S = 1.0


class _EnvelopeRequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, answering what aiohttp refuses before any handler runs (a
    malformed request; a request line or header field over `max_header_bytes`) in the OpenAI error
    envelope, where aiohttp answers in plain text that quotes the request's bytes back."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if an answer has begun
        err: ApiError
        if isinstance(exc, LineTooLong):
            limit = exc.args[1] if len(exc.args) > 1 else "max_header_bytes"
            err = InvalidRequest(
                f"a request line or header field is longer than {limit} bytes (max_header_bytes)",
                code="header_too_large",
            )
        elif 400 <= status < 500:
            name = type(exc).__name__ if exc is not None else "bad request"
            err = InvalidRequest(f"malformed HTTP request ({name})", code="invalid_http_request")
        else:
            err = ServerError(_phrase(status))
        response = error_response(err)
        response.set_status(status)
        response.force_close()
        return response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        refusal = cast(_EnvelopeServer, self._manager).refusal(transport)  # its server made it
        if refusal is None:
            super().connection_made(transport)
            return
        # answered and half-closed at once; never registered with the server (nothing to undo)
        self.__class__ = _RefusedConnection
        self._manager = None
        self.transport = transport
        tcp = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's subclasses
        tcp.write(refusal)
        tcp.write_eof()
        self._loop.call_later(REFUSED_LINGER_S, tcp.close)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


# A refused connection is answered at once and half-closed; what its client sends meanwhile is read
# and dropped until the client closes its side, for at most this long. Closed outright, a socket with
# unread bytes (the client's request) is reset, and a reset can discard the answer before it is read.
REFUSED_LINGER_S = 2.0


class _RefusedConnection(web_protocol.RequestHandler):
    """A connection over `max_connections` or `max_connections_per_client`: answered 503 in the error
    envelope (`Connection: close`, `Retry-After`) whatever its request, then closed."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> None:
        return None  # the client is done too: the transport closes

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None


def _refusal(message: str, code: str) -> bytes:
    """The whole HTTP answer to a refused connection."""
    body = json.dumps(Overloaded(message, code=code).body()).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class _EnvelopeServer(web.Server):
    """aiohttp's server, its connections handled by `_EnvelopeRequestHandler`, at most
    `max_connections` of them open at once and `max_connections_per_client` from one address."""

    max_connections: int
    max_per_client: int | None
    per_client: dict[str, int]
    on_refused: Callable[[str], None]
    refusals: dict[str, bytes]

    def __call__(self) -> web_protocol.RequestHandler:
        handler = super().__call__()
        handler.__class__ = _EnvelopeRequestHandler  # the same slots: only the error answers change
        return handler

    def refusal(self, transport: asyncio.BaseTransport) -> bytes | None:
        """The whole answer for a new connection over a limit (the refusal counted); None within them."""
        reason = None
        if len(self._connections) >= self.max_connections:
            reason = "max_connections"
        elif self.max_per_client is not None:
            client = _client_of(transport)
            if self.per_client.get(client, 0) >= self.max_per_client:
                reason = "max_connections_per_client"
        if reason is None:
            return None
        self.on_refused(reason)
        return self.refusals[reason]

    def connection_made(self, handler: web_protocol.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if self.max_per_client is not None:
            client = _client_of(transport)
            self.per_client[client] = self.per_client.get(client, 0) + 1

    def connection_lost(self, handler: web_protocol.RequestHandler, exc: BaseException | None = None) -> None:
        if self.max_per_client is not None and handler.transport is not None:
            client = _client_of(handler.transport)
            left = self.per_client.get(client, 0) - 1
            if left > 0:
                self.per_client[client] = left
            else:
                self.per_client.pop(client, None)
        super().connection_lost(handler, exc)


def _client_of(transport: asyncio.BaseTransport) -> str:
    """The client's address (its host, without the port); '' where there is none (a Unix socket)."""
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


class _AppRunner(web.AppRunner):
    __slots__ = ()

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _EnvelopeServer
        assert isinstance(server, _EnvelopeServer)
        settings, metrics = self.app[SETTINGS], self.app[METRICS]
        server.max_connections = settings.max_connections
        server.max_per_client = settings.max_connections_per_client
        server.per_client = {}
        server.on_refused = lambda reason: metrics.connections_refused.labels(reason).inc()
        server.refusals = {
            "max_connections": _refusal(
                f"too many connections open at once (max_connections {settings.max_connections})",
                "too_many_connections",
            ),
            "max_connections_per_client": _refusal(
                "too many connections open at once from this address "
                f"(max_connections_per_client {settings.max_connections_per_client})",
                "too_many_connections",
            ),
        }
        metrics.open_connections.set_function(lambda: len(server.connections))
        return server


def make_runner(app: web.Application) -> web.AppRunner:
    """The runner every entry point uses: client disconnects cancel handlers (a queued request whose
    client left is dropped), request lines and header fields are bounded by `max_header_bytes`, a
    connection with no request in progress is closed after `idle_timeout_s` (aiohttp's keep-alive
    timer, which also runs while a request's headers are arriving), and what aiohttp refuses itself is
    answered in the error envelope (`_EnvelopeRequestHandler`)."""
    settings = app[SETTINGS]
    server_log = logging.getLogger("proxy.http")
    if not any(isinstance(f, _NoRequestBytes) for f in server_log.filters):
        server_log.addFilter(_NoRequestBytes())
    return _AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_GRACE_S,
        access_log=None,
        logger=server_log,
        max_line_size=settings.max_header_bytes,
        max_field_size=settings.max_header_bytes,
        keepalive_timeout=settings.idle_timeout_s,
    )


def cors_middleware(origins: Sequence[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """CORS for the configured origins only ("*" allows any); without configuration there is none."""
    allowed = set(origins)

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None or not ("*" in allowed or origin in allowed):
            return await handler(request)
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            headers.update(
                {
                    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                    "Access-Control-Allow-Headers": "Authorization, Content-Type",
                    "Access-Control-Max-Age": "600",
                }
            )
            return web.Response(status=204, headers=headers)
        resp = await handler(request)
        resp.headers.update(headers)
        return resp

    return middleware


async def bootstrap_admin_key(ledger: Ledger) -> None:
    """On first start with no keys, create one admin key and print it once (to stdout, never to logs)."""
    if await ledger.keys():
        return
    secret, record = new_key("admin", admin=True)
    await ledger.add_key(record)
    sys.stdout.write(
        f"\nNo API keys existed: created admin key {record.key_id} for user 'admin'. "
        f"It is shown only once:\n\n    {secret}\n\n"
        "Use it as 'Authorization: Bearer <key>'; create more with 'wattproxy keys create'.\n\n"
    )
    sys.stdout.flush()


async def _refresh_budgets(ledger: Ledger, budgets: Budgets, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            budgets.set_keys(await ledger.keys(include_revoked=False))
            await budgets.refresh(ledger)
        except LedgerUnavailable as e:
            log.warning("budget refresh failed: %s", e)


def ledger_record(o: Outcome) -> LedgerRecord:
    tag, charge, carbon = o.tag, o.charge, o.tag.carbon
    text = o.result if isinstance(o.result, TextResult) else None
    image = o.result if isinstance(o.result, ImageResult) else None
    req = o.request if isinstance(o.request, ImageRequest) else None
    images = image.count if image else 0
    # positional, in LedgerRecord's field order: a call with 24 keywords costs 0.6 µs more (hot path)
    return LedgerRecord(
        tag.request_id,  # request_id
        datetime.now(timezone.utc),  # time
        tag.user,  # user
        tag.key_id,  # key_id
        tag.model,  # model
        tag.task,  # task
        o.status,  # status
        text.prompt_tokens if text else 0,  # prompt_tokens
        text.completion_tokens if text else 0,  # completion_tokens
        images,  # images
        req.width * req.height * images if req else 0,  # pixels
        req.steps if req else 0,  # steps
        charge.device,  # device
        charge.joules,  # joules
        charge.idle_joules,  # idle_joules
        charge.uncertainty_joules,  # uncertainty_joules
        charge.measurement,  # measurement
        carbon.co2_grams if carbon else 0.0,  # co2_grams
        carbon.embodied_co2_grams if carbon else 0.0,  # embodied_co2_grams
        carbon.intensity_g_per_kwh if carbon else 0.0,  # carbon_intensity_g_per_kwh
        carbon.pue if carbon else 1.0,  # pue
        carbon.source if carbon else "",  # carbon_source
        o.queue_wait_s,  # queue_seconds
        o.run_s,  # run_seconds
    )


def _recorder(
    metrics: Metrics, ledger: Ledger, budgets: Budgets
) -> Callable[[Sequence[Outcome]], Awaitable[None]]:
    """Commit each finished member to the ledger (group commit), then count it in budgets and metrics.
    Runs before any member's response is sent."""

    async def record(outcomes: Sequence[Outcome]) -> None:
        if not outcomes:
            return
        await ledger.record([ledger_record(o) for o in outcomes])
        for o in outcomes:
            budgets.add(o.tag.user, o.charge.joules, o.tag.carbon.co2_grams if o.tag.carbon else 0.0)
        batch_size: int | None = outcomes[0].batch_size  # observed once a batch, with its first member
        for o in outcomes:
            tag, result = o.tag, o.result
            text = result if isinstance(result, TextResult) else None
            metrics.observe_request(
                RequestStats(  # positional, in field order (hot path: keywords cost 0.3 µs more)
                    tag.model,  # model
                    tag.task,  # task
                    tag.user,  # user
                    o.status,  # status
                    tag.request_id,  # request_id
                    o.charge.joules / JOULES_PER_KWH,  # energy_kwh
                    tag.carbon.co2_grams if tag.carbon is not None else None,  # co2_grams
                    o.queue_wait_s,  # queue_wait_s
                    o.duration_s,  # duration_s
                    text.prompt_tokens if text else 0,  # prompt_tokens
                    text.completion_tokens if text else 0,  # completion_tokens
                    result.count if isinstance(result, ImageResult) else 0,  # images
                ),
                batch_size,
            )
            batch_size = None

    return record
