"""Proxy mode (issue 9): WattProxy in front of an OpenAI-compatible upstream on the same host.

The real upstream is a second WattProxy serving the embedded tiny models (auth off, synthetic meter).
The proxy serves no local model; its synthetic meter stands for the upstream's GPU `cuda:0`. A tiny
aiohttp stub plays the upstreams that are slow, erroring or speak another error shape."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
import requests
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from backends.openai_upstream import MAX_EVENT_BYTES
from proxy.config import Settings
from proxy.energy.meter import Reading, SyntheticMeter
from proxy.state import LEDGER, MONITORS, SCHEDULER, SERVICE, UPSTREAM
from tests.conftest import LiveServer, add_key, settings_for_tests

T = TypeVar("T")
CHAT = "/v1/chat/completions"
# a short streamed chat, sent as raw HTTP where a test reads the stream's bytes itself
STREAMED_CHAT = {
    "model": "tiny-gpt2",
    "messages": [{"role": "user", "content": "x"}],
    "max_tokens": 8,
    "stream": True,
}


class ProxyServer(LiveServer):
    """A proxy-mode server: ready once its upstream's models are known (it has no local model)."""

    expect_ready = True  # False: one whose upstream cannot be reached, started all the same

    def wait_ready(self, timeout_s: float) -> None:
        assert self.app is not None
        service = self.app[SERVICE]
        if not self.expect_ready:
            return
        deadline = time.monotonic() + timeout_s
        while service.upstream != "ready":
            if time.monotonic() > deadline:
                raise TimeoutError("the upstream's models were not discovered in time")
            time.sleep(0.02)


class Stub:
    """An OpenAI-shaped upstream that misbehaves on request: the chat model's name says how."""

    MODELS = (
        "ok-no-usage", "slow", "long-plain", "flat-400", "text-500", "auth-401", "not-json", "overloaded-503",
        "fast-stream", "endless-stream", "odd-sse", "huge-line", "done-then-stall", "usage-on-choices",
        "dated-503", "slow-stream", "error-200", "slow-429", "slow-start-stream", "tgi-error-stream",
        "flat-error-stream", "flat-error-200", "empty-200", "partial-422", "list-message-400", "inf-503",
        "cut-stream", "no-done-stream",
    )  # fmt: skip
    IMAGE_MODELS = ("slow-image",)
    SLOW_S = 2.0  # how long "slow-start-stream" takes to its first token, "slow-image" to its answer
    FAST_STREAM_CHUNKS = 20_000  # more than the sockets between the proxy and its client can buffer
    ENDLESS_STREAM_CHUNKS = 1_000_000  # about 150 MB: until the proxy stops reading it, in effect
    # Server-sent events as upstreams may write them: CRLF and LF line ends, a comment (keep-alive),
    # an event with two data lines, a field other than data, "data:" with no space; in pieces cut
    # inside lines and inside a CRLF, each sent on its own.
    ODD_SSE = (
        b': ping\r\n\r\ndata: {"id":"o","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"con',
        b'tent":"ab"}}]}\r',
        b"\n\r\nevent: message\ndata:",
        b'{"id":"o","object":"chat.completion.chunk",\ndata: "choices":[{"index":0,"delta":',
        b'{"content":"cd"}}]}\n\n',
        b'data: {"id":"o","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":3,',
        b'"completion_tokens":2,"total_tokens":5}}\n\ndata: [DONE]\n\n',
    )

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="stub-upstream", daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.chat_bodies: list[dict[str, Any]] = []  # every chat request's body, as the stub got it
        self.completion_bodies: list[dict[str, Any]] = []  # and every completion request's
        self.embedding_bodies: list[dict[str, Any]] = []  # and every embeddings request's
        self.slow_done = False  # "slow-start-stream" or "slow-image" has come to its answer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _models(self, request: web.Request) -> web.Response:
        models = [{"id": m} for m in self.MODELS] + [{"id": m, "task": "image"} for m in self.IMAGE_MODELS]
        return web.json_response({"object": "list", "data": models})

    async def _image(self, request: web.Request) -> web.Response:
        """An image generation that takes `SLOW_S` (the image itself is not looked at)."""
        body = await request.json()
        await asyncio.sleep(self.SLOW_S)
        self.slow_done = True
        return web.json_response({"created": 0, "data": [{"b64_json": ""} for _ in range(body.get("n", 1))]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.chat_bodies.append(body)
        model = body["model"]
        if model in (
            "fast-stream",
            "endless-stream",
            "odd-sse",
            "huge-line",
            "done-then-stall",
            "usage-on-choices",
            "slow-start-stream",
            "tgi-error-stream",
            "flat-error-stream",
            "cut-stream",
            "no-done-stream",
        ):
            return await self._stream(request, model)
        if model == "slow":
            await asyncio.sleep(3.0)
        if model == "long-plain":  # a long non-streamed generation that reports its usage
            await asyncio.sleep(1.5)
            message = {"role": "assistant", "content": "a long answer"}
            usage = {"prompt_tokens": 10, "completion_tokens": 300, "total_tokens": 310}
            choice = {"index": 0, "message": message, "finish_reason": "length"}
            return web.json_response({"id": "l", "object": "chat.completion", "model": model,
                                      "choices": [choice], "usage": usage})  # fmt: skip
        if model == "flat-400":  # vLLM's older error shape
            body = {"object": "error", "message": "bad top_k", "type": "BadRequestError", "param": "top_k"}
            return web.json_response({**body, "code": 400}, status=400)
        if model == "text-500":
            return web.Response(text="Internal Server Error", status=500)
        if model == "auth-401":
            return web.json_response({"error": {"message": "no", "type": "auth", "param": None}}, status=401)
        if model == "error-200":  # an error object with status 200
            return web.json_response({"error": {"message": "model crashed", "type": "internal"}})
        if model == "flat-error-200":  # vLLM's flat error object with status 200
            return web.json_response({"object": "error", "message": "engine dead", "type": "internal"})
        if model == "empty-200":
            return web.json_response({})
        if model == "slow-429":  # refused, but only after a while (the proxy has cut pieces of it)
            await asyncio.sleep(0.6)
            return web.json_response({"error": {"message": "queue full", "type": "busy"}}, status=429)
        if model == "partial-422":  # an envelope without type, param or code
            return web.json_response({"error": {"message": "bad"}}, status=422)
        if model == "list-message-400":  # FastAPI-like detail in the message, and a type that is no string
            detail = [{"loc": ["body", "n"], "msg": "too big"}]
            return web.json_response({"error": {"message": detail, "type": 7, "code": True}}, status=400)
        if model == "inf-503":
            return web.json_response({"error": "busy"}, status=503, headers={"Retry-After": "inf"})
        if model == "dated-503":  # Retry-After as an HTTP date, 30 s ahead
            when = email.utils.formatdate(time.time() + 30, usegmt=True)
            return web.json_response({"error": "busy"}, status=503, headers={"Retry-After": when})
        if model == "overloaded-503":
            return web.json_response({"error": "busy", "error_type": "overloaded"}, status=503)
        if model == "not-json":
            return web.Response(text="<html>hello</html>", content_type="text/html")
        message = {"role": "assistant", "content": "twelve characters of text"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return web.json_response(
            {"id": "x", "object": "chat.completion", "model": model, "choices": [choice]}
        )

    async def _completion(self, request: web.Request) -> web.Response:
        """A completion of 12 characters for each prompt, without usage (after the prompt, a text one,
        where it is echoed)."""
        body = await request.json()
        self.completion_bodies.append(body)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        count = len(prompts) if prompts and isinstance(prompts[0], list) else 1
        echoed = prompts[0] if body.get("echo") and isinstance(prompts[0], str) else ""
        choices = [
            {"index": i, "text": echoed + "twelve chars", "finish_reason": "stop"} for i in range(count)
        ]
        return web.json_response(
            {"id": "c", "object": "text_completion", "model": body["model"], "choices": choices}
        )

    async def _embeddings(self, request: web.Request) -> web.Response:
        """Two numbers an input; usage (5 tokens an input) unless the model is "ok-no-usage"."""
        body = await request.json()
        self.embedding_bodies.append(body)
        inputs = body["input"]
        count = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
        answer: dict[str, Any] = {
            "object": "list",
            "model": body["model"],
            "data": [{"object": "embedding", "index": i, "embedding": [0.25, -0.5]} for i in range(count)],
        }
        if body["model"] != "ok-no-usage":
            answer["usage"] = {"prompt_tokens": 5 * count, "total_tokens": 5 * count}
        return web.json_response(answer)

    async def _stream(self, request: web.Request, model: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if model == "huge-line":  # a chunk, then a line past the proxy's limit (MAX_EVENT_BYTES)
            choice = {"index": 0, "delta": {"content": "ok"}, "finish_reason": None}
            await resp.write(b"data: " + json.dumps({"id": "h", "choices": [choice]}).encode() + b"\n\n")
            with contextlib.suppress(ConnectionResetError):  # the proxy hangs up partway
                await resp.write(b"data: " + b"x" * (MAX_EVENT_BYTES + 10) + b"\n\n")
                await resp.write_eof()
            return resp
        if model == "slow-stream":  # a token every 0.1 s for a minute
            choice = {"index": 0, "delta": {"content": "word"}, "finish_reason": None}
            event = (
                b"data: "
                + json.dumps({"id": "s", "object": "chat.completion.chunk", "choices": [choice]}).encode()
            )
            with contextlib.suppress(ConnectionResetError):
                for _ in range(600):
                    await resp.write(event + b"\n\n")
                    await asyncio.sleep(0.1)
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
            return resp
        if model in ("done-then-stall", "usage-on-choices"):
            usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
            choice = {"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}
            chunk = {"id": "d", "object": "chat.completion.chunk", "model": model, "choices": [choice]}
            if (
                model == "usage-on-choices"
            ):  # the usage on the last chunk with choices, not on a chunk of its own
                chunk["usage"] = usage
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if model == "done-then-stall":
                await resp.write(b"data: [DONE]\n\n")
                await asyncio.sleep(30)  # the body never ends: [DONE] must
            else:
                await resp.write(b"data: [DONE]\n\n")
            with contextlib.suppress(ConnectionResetError):
                await resp.write_eof()
            return resp
        if model == "slow-start-stream":  # the answer's headers at once, its first token late
            await asyncio.sleep(self.SLOW_S)
            self.slow_done = True
            choice = {"index": 0, "delta": {"content": "late"}, "finish_reason": "stop"}
            chunk = {"id": "l", "object": "chat.completion.chunk", "model": model, "choices": [choice]}
            with contextlib.suppress(ConnectionResetError):
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")
                await resp.write_eof()
            return resp
        if model in ("tgi-error-stream", "flat-error-stream"):  # a chunk, then an error event not in
            choice = {"index": 0, "delta": {"content": "hi"}, "finish_reason": None}  # OpenAI's shape
            chunk = {"id": "e", "object": "chat.completion.chunk", "model": model, "choices": [choice]}
            error = (
                {"error": "CUDA out of memory", "error_type": "generation"}
                if model == "tgi-error-stream"
                else {"object": "error", "message": "engine dead", "type": "InternalServerError", "code": 500}
            )
            for event in (chunk, error):
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        if model in ("cut-stream", "no-done-stream"):  # the body ends without [DONE]: "cut-stream" before
            # its choice's finish_reason (an upstream that died mid-answer), "no-done-stream" after it
            reason = None if model == "cut-stream" else "stop"
            for content, finish in (("one", None), ("two", reason)):
                choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish}
                chunk = {"id": "n", "object": "chat.completion.chunk", "model": model, "choices": [choice]}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await resp.write_eof()
            return resp
        if model == "odd-sse":
            for piece in self.ODD_SSE:
                await resp.write(piece)
                await asyncio.sleep(0.02)  # each piece reaches the proxy in a read of its own
            await resp.write_eof()
            return resp
        choice = {"index": 0, "delta": {"content": "word"}, "finish_reason": None}
        chunk = {"id": "f", "object": "chat.completion.chunk", "model": model, "choices": [choice]}
        event = b"data: " + json.dumps(chunk).encode() + b"\n\n"
        chunks = self.ENDLESS_STREAM_CHUNKS if model == "endless-stream" else self.FAST_STREAM_CHUNKS
        try:  # as fast as it can write (as fast as the proxy reads)
            for _ in range(chunks):
                await resp.write(event)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:  # the proxy left (its client did)
            pass
        return resp

    def start(self) -> Stub:
        self.thread.start()

        async def up() -> None:
            app = web.Application(client_max_size=64 << 20)  # as vLLM: no 1 MiB limit
            app.router.add_get("/v1/models", self._models)
            app.router.add_post(CHAT, self._chat)
            app.router.add_post("/v1/completions", self._completion)
            app.router.add_post("/v1/images/generations", self._image)
            app.router.add_post("/v1/embeddings", self._embeddings)
            self.runner = web.AppRunner(app, handler_cancellation=True)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = self.runner.addresses[0][1]

        self._call(up())
        return self

    def stop(self) -> None:
        if self.runner is not None:
            self._call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def upstream(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(settings_for_tests(model_cache, tmp_path_factory.mktemp("upstream"))).start()
    yield server
    server.stop()


@pytest.fixture
def make_proxy(model_cache: Path, tmp_path: Path) -> Iterator[Callable[..., ProxyServer]]:
    proxies: list[ProxyServer] = []

    def make(
        url: str, *, upstream: dict[str, Any] | None = None, ready: bool = True, **overrides: Any
    ) -> ProxyServer:
        settings = Settings.model_validate(
            {
                "port": 0,
                "cache_dir": model_cache,
                "data_dir": tmp_path / f"proxy{len(proxies)}",
                "meter": "synthetic",
                "auth": "none",
                "upstream": {"url": url, "devices": [0], **(upstream or {})},
                "energy": {"sample_period_s": 0.01, "max_finalize_delay_s": 0.5},
                **overrides,
            }
        )
        proxy = ProxyServer(settings)
        proxy.expect_ready = ready
        proxies.append(proxy)
        return proxy.start(ready_timeout_s=30)  # type: ignore[return-value]

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def proxy(upstream: LiveServer, make_proxy: Callable[..., ProxyServer]) -> ProxyServer:
    return make_proxy(upstream.base_url + "/v1")


@pytest.fixture(scope="module")
def stub() -> Iterator[Stub]:
    server = Stub().start()
    yield server
    server.stop()


def client(server: LiveServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0, timeout=60)


def metric_samples(server: LiveServer) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = requests.get(server.base_url + "/metrics", timeout=10).text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _chat(proxy: ProxyServer, model: str) -> requests.Response:
    """A plain chat of `model` through the proxy, as raw HTTP."""
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
    return requests.post(proxy.base_url + CHAT, json=body, timeout=30)


def _energy(usage: Any) -> dict[str, Any]:
    return usage.model_extra["energy"]  # type: ignore[no-any-return]


def test_models_are_discovered_with_their_tasks(proxy: ProxyServer) -> None:
    tasks = {m.id: m.model_extra["task"] for m in client(proxy).models.list().data}  # type: ignore[index]
    assert tasks == {"tiny-gpt2": "text", "tiny-sd": "image"}
    ready = requests.get(proxy.base_url + "/readyz", timeout=10).json()
    assert ready == {
        "status": "ready",
        "models": {"tiny-gpt2": "ready", "tiny-sd": "ready"},
        "upstream": "ready",
    }


def test_openai_client_works_through_the_proxy_for_every_endpoint(proxy: ProxyServer) -> None:
    c = client(proxy)
    raw = c.chat.completions.with_raw_response.create(
        model="tiny-gpt2", messages=[{"role": "user", "content": "Hello there"}], max_tokens=6, temperature=0
    )
    chat = raw.parse()
    assert chat.object == "chat.completion" and isinstance(chat.choices[0].message.content, str)
    assert chat.usage is not None and chat.usage.prompt_tokens > 0 and 0 < chat.usage.completion_tokens <= 6
    energy = _energy(chat.usage)
    assert energy["measurement"] == "synthetic-timeline" and energy["device"] == "cuda:0"
    assert energy["usage_source"] == "upstream" and energy["joules"] > 0
    assert float(raw.headers["X-Energy-Joules"]) == energy["joules"]
    assert raw.headers["X-Energy-Measurement"] == "synthetic-timeline"

    completion = c.completions.create(model="tiny-gpt2", prompt="Once upon", max_tokens=4, temperature=0)
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert _energy(completion.usage)["joules"] > 0

    image = c.images.generate(model="tiny-sd", prompt="a fox", n=2, size="64x64", extra_body={"steps": 2})
    assert len(image.data) == 2 and image.data[0].b64_json
    usage = image.usage.model_extra  # type: ignore[union-attr]
    assert (usage["images"], usage["pixels"], usage["steps"]) == (2, 2 * 64 * 64, 2)  # type: ignore[index]
    assert usage["energy"]["joules"] > 0 and usage["energy"]["usage_source"] == "upstream"  # type: ignore[index]


def test_streams_pass_through_chunk_by_chunk_and_end_with_usage(
    proxy: ProxyServer, upstream: LiveServer
) -> None:
    messages = [{"role": "user", "content": "Count with me"}]
    direct = client(upstream).chat.completions.create(
        model="tiny-gpt2", messages=messages, max_tokens=12, temperature=0
    )
    chunks = list(
        client(proxy).chat.completions.create(
            model="tiny-gpt2",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == direct.choices[0].message.content
    assert sum(1 for ch in chunks if ch.choices) > 2  # passed on as they came, not gathered into one
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == direct.usage.completion_tokens  # type: ignore[union-attr]
    energy = _energy(last.usage)
    assert energy["usage_source"] == "upstream" and energy["measurement"] == "synthetic-timeline"
    assert energy["joules"] > 0

    # without include_usage, the usage chunk WattProxy asked the upstream for is not passed on
    plain = list(
        client(proxy).completions.create(model="tiny-gpt2", prompt="Once", max_tokens=5, stream=True)
    )
    assert plain and all(ch.usage is None for ch in plain)


def _drive(proxy: ProxyServer, requests_n: int) -> list[dict[str, Any]]:
    """Many overlapping requests of different lengths, plain and streamed; returns their energies."""
    c = client(proxy)

    def one(i: int) -> dict[str, Any]:
        messages = [{"role": "user", "content": "tell me " * (1 + i % 4)}]
        if i % 3 == 0:
            chunks = list(
                c.chat.completions.create(
                    model="tiny-gpt2",
                    messages=messages,
                    max_tokens=2 + (i * 7) % 40,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            return _energy(chunks[-1].usage)
        r = c.chat.completions.create(
            model="tiny-gpt2", messages=messages, max_tokens=2 + (i * 5) % 30, temperature=0
        )
        return _energy(r.usage)

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(requests_n)))


@pytest.mark.parametrize(
    ("idle_policy", "update_period_s", "devices"),
    [("separate", 0.0, [0]), ("amortize", 0.05, [0, 1])],
)
def test_conservation_with_many_overlapping_requests(
    upstream: LiveServer,
    make_proxy: Callable[..., ProxyServer],
    idle_policy: str,
    update_period_s: float,
    devices: list[int],
) -> None:
    proxy = make_proxy(
        upstream.base_url,
        upstream={"devices": devices, "split_interval_s": 0.002},  # streams cut into many pieces
        idle_policy=idle_policy,
        energy={
            "synthetic_update_period_s": update_period_s,
            "sample_period_s": 0.01,
            "max_finalize_delay_s": 0.2,
        },
    )
    energies = _drive(proxy, 24)
    label = "+".join(f"cuda:{d}" for d in devices)
    assert all(e["joules"] > 0 and e["measurement"] == "synthetic-timeline" for e in energies)
    assert {e["device"] for e in energies} == {label}
    answered_j = sum(e["joules"] for e in energies)
    sums = {name: sum(v for _, v in samples) for name, samples in metric_samples(proxy).items()}
    assert math.isclose(sums["wattproxy_energy_kwh_total"] * 3.6e6, answered_j, rel_tol=1e-9)
    assert math.isclose(
        sums["wattproxy_energy_kwh_total"] + sums["wattproxy_idle_energy_kwh_total"],
        sums["wattproxy_device_energy_kwh_total"],
        rel_tol=1e-9,
    )
    assert proxy.app is not None
    records = proxy.call(proxy.app[LEDGER].records())
    assert len(records) == len(energies) and len({r.request_id for r in records}) == len(records)
    assert math.isclose(sum(r.joules for r in records), answered_j, rel_tol=1e-9)
    assert {(r.measurement, r.device) for r in records} == {("synthetic-timeline", label)}
    monitors = [proxy.app[MONITORS][f"cuda:{d}"] for d in devices]
    assert all(m._next_key > 2 * len(energies) for m in monitors)  # jobs begun or split: many pieces
    proxy.stop()  # the last reading is taken and every pending joule is committed
    idle_j = sum(m.committed_idle_j for m in monitors)
    assert math.isclose(answered_j + idle_j, sum(m.meter_delta_j for m in monitors), rel_tol=1e-9)
    if update_period_s:
        assert any(e["uncertainty_kwh"] > 0 for e in energies)
    if idle_policy == "amortize":
        assert any(e["idle_joules"] > 0 for e in energies)


class _SlowReadMeter(SyntheticMeter):
    """Reads like NVML's: they block (2 ms here), and the threads that make them are noted."""

    blocking_reads = True

    def __init__(self) -> None:
        super().__init__("cuda:0", idle_watts=60.0, busy_watts=300.0)
        self.reader_threads: set[int] = set()

    def read(self) -> Reading:
        self.reader_threads.add(threading.get_ident())
        time.sleep(0.002)
        return super().read()


def test_a_meter_whose_reads_block_is_never_read_on_the_event_loop(
    upstream: LiveServer, model_cache: Path, tmp_path: Path
) -> None:
    """With NVML (3-4.6 ms a read), reading the meter at every request's start, end and pieces would
    stall the proxy's event loop: the boundaries are placed between the sampler thread's readings."""
    settings = Settings.model_validate(
        {
            "port": 0,
            "cache_dir": model_cache,
            "data_dir": tmp_path / "slow-meter",
            "auth": "none",
            "upstream": {"url": upstream.base_url, "devices": [0], "split_interval_s": 0.002},
            "energy": {"sample_period_s": 0.01, "max_finalize_delay_s": 0.5},
        }
    )
    meter = _SlowReadMeter()
    proxy = ProxyServer(settings, meters={"cuda:0": meter})
    proxy.start(ready_timeout_s=30)
    try:
        meter.reader_threads.clear()  # the reads while requests are served
        energies = _drive(proxy, 12)
        assert proxy.app is not None
        records = proxy.call(proxy.app[LEDGER].records())
        monitor = proxy.app[MONITORS]["cuda:0"]
    finally:
        proxy.stop()
    assert proxy.thread.ident not in meter.reader_threads
    assert all(e["joules"] > 0 and e["measurement"] == "synthetic-timeline" for e in energies)
    answered_j = sum(e["joules"] for e in energies)
    assert len(records) == len(energies)
    assert math.isclose(sum(r.joules for r in records), answered_j, rel_tol=1e-9)
    assert math.isclose(answered_j + monitor.committed_idle_j, monitor.meter_delta_j, rel_tol=1e-9)


def test_a_long_request_gets_more_energy_than_a_short_one_it_overlaps(proxy: ProxyServer) -> None:
    c = client(proxy)
    messages = [{"role": "user", "content": "Tell me a long story"}]

    def ask(max_tokens: int) -> Any:
        chunks = list(
            c.chat.completions.create(
                model="tiny-gpt2",
                messages=messages,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        return chunks[-1].usage

    with ThreadPoolExecutor(2) as pool:
        long_f = pool.submit(ask, 60)
        short_f = pool.submit(ask, 2)
        long_usage, short_usage = long_f.result(60), short_f.result(60)
    assert long_usage.completion_tokens > short_usage.completion_tokens
    assert _energy(long_usage)["joules"] > _energy(short_usage)["joules"] > 0


def test_upstream_4xx_passes_through_with_its_status_and_envelope(proxy: ProxyServer) -> None:
    body = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}
    r = requests.post(proxy.base_url + CHAT, json=body, timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "max_tokens" and error["code"] == "max_tokens_exceeded"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(proxy).chat.completions.create(**body)  # type: ignore[call-overload]
    refused = [
        v for labels, v in metric_samples(proxy)["wattproxy_requests_total"] if labels["status"] != "ok"
    ]
    assert refused == [2.0]  # counted once each, as refused, and recorded nowhere else
    assert proxy.app is not None and proxy.call(proxy.app[LEDGER].count()) == 0


def test_an_unreachable_upstream_gives_502_and_readiness_says_so(
    stub: Stub, make_proxy: Callable[..., ProxyServer]
) -> None:
    with socket_closed_port() as port:
        # models listed in the configuration: readiness still asks the upstream whether it is there
        proxy = make_proxy(f"http://127.0.0.1:{port}", upstream={"models": [{"name": "m"}]}, ready=False)
        r = requests.post(
            proxy.base_url + CHAT, json={"model": "m", "messages": [{"role": "user", "content": "x"}]}
        )
        assert r.status_code == 502
        error = r.json()["error"]
        assert error["code"] == "upstream_unreachable" and "unreachable" in error["message"]
        deadline = time.monotonic() + 10
        while (ready := requests.get(proxy.base_url + "/readyz", timeout=10)).status_code != 503:
            assert time.monotonic() < deadline, ready.json()
            time.sleep(0.05)
        assert ready.json()["upstream"] == "unreachable"
    # one that can be reached is ready, even where it lists no models (asked only whether it answers)
    listed = make_proxy(stub.url, upstream={"models": [{"name": "not-in-its-list"}]})
    ready = requests.get(listed.base_url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["upstream"] == "ready"


class socket_closed_port:
    """A localhost port with nothing listening on it (bound, then closed)."""

    def __enter__(self) -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        return None


def test_slow_and_erroring_upstreams_give_their_statuses(
    stub: Stub, make_proxy: Callable[..., ProxyServer]
) -> None:
    proxy = make_proxy(stub.url, upstream={"read_timeout_s": 0.3})

    t0 = time.monotonic()
    slow = _chat(proxy, "slow")
    assert slow.status_code == 504 and slow.json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - t0 < 2.5
    flat = _chat(proxy, "flat-400")  # vLLM's flat error shape becomes the OpenAI envelope
    assert flat.status_code == 400
    assert flat.json() == {
        "error": {"message": "bad top_k", "type": "BadRequestError", "param": "top_k", "code": 400}
    }
    text = _chat(proxy, "text-500")  # a 5xx page's text is not passed on (it can be a stack trace)
    assert text.status_code == 500 and text.json()["error"]["message"] == "the upstream answered 500"
    crashed = _chat(proxy, "error-200")  # not passed on as a success
    assert crashed.status_code == 502 and crashed.json()["error"]["code"] == "upstream_bad_response"
    dated = _chat(proxy, "dated-503")
    assert dated.status_code == 503 and 25 <= int(dated.headers["Retry-After"]) <= 31
    busy = _chat(proxy, "overloaded-503")
    assert busy.status_code == 503 and busy.json()["error"]["message"] == "busy"
    auth = _chat(proxy, "auth-401")  # the upstream refused WattProxy's credentials: not the client's fault
    assert auth.status_code == 502 and auth.json()["error"]["code"] == "upstream_auth_failed"
    garbage = _chat(proxy, "not-json")
    assert garbage.status_code == 502 and garbage.json()["error"]["code"] == "upstream_bad_response"

    ok = _chat(proxy, "ok-no-usage")  # no usage from the upstream: WattProxy's estimate, said so
    assert ok.status_code == 200
    usage = ok.json()["usage"]
    assert usage["completion_tokens"] == 7 and usage["energy"]["usage_source"] == "estimate"  # 25 chars / 4

    # the timed-out and the malformed answers may have run upstream: charged and recorded as errors
    assert proxy.app is not None
    deadline = time.monotonic() + 10
    while (statuses := [r.status for r in proxy.call(proxy.app[LEDGER].records())]).count("error") < 3:
        assert time.monotonic() < deadline, statuses
        time.sleep(0.05)
    assert sorted(statuses) == ["error", "error", "error", "ok"]
    # each counted once: as recorded ("error"), not again as the error it was answered with
    counted = [
        (labels["model"], labels["status"], v)
        for labels, v in metric_samples(proxy)["wattproxy_requests_total"]
    ]
    for model in ("slow", "not-json"):
        assert [(status, v) for m, status, v in counted if m == model and v] == [("error", 1.0)], counted


def test_error_answers_reach_the_client_in_the_openai_envelope(
    stub: Stub, make_proxy: Callable[..., ProxyServer]
) -> None:
    proxy = make_proxy(stub.url)

    for model in ("flat-error-200", "empty-200"):  # a 200 that is no answer is not passed on as one
        r = _chat(proxy, model)
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_bad_response", r.text
    assert "engine dead" in _chat(proxy, "flat-error-200").json()["error"]["message"]
    partial = _chat(proxy, "partial-422")  # every field of the envelope there
    assert partial.status_code == 422
    assert partial.json() == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}
    }
    odd = _chat(proxy, "list-message-400")  # and of its type: the message a string, no type or code of others
    assert odd.status_code == 400
    error = odd.json()["error"]
    assert json.loads(error["message"]) == [{"loc": ["body", "n"], "msg": "too big"}]
    assert error["type"] == "invalid_request_error" and error["param"] is None and error["code"] is None
    busy = _chat(proxy, "inf-503")  # a Retry-After that is no delay is not passed on (nor a 500 made of it)
    assert busy.status_code == 503 and "Retry-After" not in busy.headers
    with pytest.raises(openai.BadRequestError, match="too big"):
        client(proxy).chat.completions.create(
            model="list-message-400", messages=[{"role": "user", "content": "x"}]
        )


@pytest.mark.parametrize("model", ["tgi-error-stream", "flat-error-stream"])
def test_error_events_mid_stream_reach_the_client_in_the_openai_envelope(
    stub: Stub, make_proxy: Callable[..., ProxyServer], model: str
) -> None:
    proxy = make_proxy(stub.url)
    message = "CUDA out of memory" if model == "tgi-error-stream" else "engine dead"
    body = {**STREAMED_CHAT, "model": model}
    raw = requests.post(proxy.base_url + CHAT, json=body, timeout=30).text
    events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["message"] == message and set(error) == {"message", "type", "param", "code"}
    with pytest.raises(openai.APIError, match=message):  # the official client reads it as an error
        list(client(proxy).chat.completions.create(**body))  # type: ignore[call-overload]
    assert proxy.app is not None
    deadline = time.monotonic() + 10
    while len(records := proxy.call(proxy.app[LEDGER].records())) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [r.status for r in records] == ["error", "error"] and all(r.joules > 0 for r in records)


def test_a_stream_the_upstream_cut_short_is_an_error_not_an_answer(
    stub: Stub, make_proxy: Callable[..., ProxyServer]
) -> None:
    """A stream whose body ends without [DONE] while a choice has no finish_reason was cut short (the
    upstream died mid-answer): the client gets an error event (the official client raises) and the
    ledger an error. One that ends without [DONE] after every choice finished is taken as complete."""
    proxy = make_proxy(stub.url)
    cut = {**STREAMED_CHAT, "model": "cut-stream"}
    raw = requests.post(proxy.base_url + CHAT, json=cut, timeout=30).text
    events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:2]] == ["one", "two"]
    assert json.loads(events[-2])["error"]["code"] == "upstream_bad_response" and events[-1] == "[DONE]"
    with pytest.raises(openai.APIError, match="ended before its end"):
        list(client(proxy).chat.completions.create(**cut))  # type: ignore[call-overload]
    whole = {**STREAMED_CHAT, "model": "no-done-stream"}
    chunks = list(client(proxy).chat.completions.create(**whole))  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "onetwo"
    assert proxy.app is not None
    deadline = time.monotonic() + 10
    while len(records := proxy.call(proxy.app[LEDGER].records())) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    by_model = sorted((r.model, r.status) for r in records)
    assert by_model == [("cut-stream", "error"), ("cut-stream", "error"), ("no-done-stream", "ok")]


def test_a_request_refused_after_a_while_is_charged_what_it_was_given(
    stub: Stub, make_proxy: Callable[..., ProxyServer]
) -> None:
    """Pieces cut while it waited were given energy, final once cut: it is charged and recorded (status
    error), so that every joule stays accounted (conservation), not in the metrics alone."""
    proxy = make_proxy(stub.url, upstream={"split_interval_s": 0.05})
    body = {"model": "slow-429", "messages": [{"role": "user", "content": "hello"}]}
    r = requests.post(proxy.base_url + CHAT, json=body, timeout=30)
    assert r.status_code == 429 and r.json()["error"]["message"] == "queue full"
    assert proxy.app is not None
    deadline = time.monotonic() + 10
    while not (records := proxy.call(proxy.app[LEDGER].records())):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [r.status for r in records] == ["error"] and records[0].joules > 0
    sums = {name: sum(v for _, v in samples) for name, samples in metric_samples(proxy).items()}
    assert math.isclose(sums["wattproxy_energy_kwh_total"] * 3.6e6, records[0].joules, rel_tol=1e-9)
    counted = [(lb["status"], v) for lb, v in metric_samples(proxy)["wattproxy_requests_total"] if v]
    assert counted == [("error", 1.0)]  # counted once, as recorded
    monitor = proxy.app[MONITORS]["cuda:0"]
    proxy.stop()
    assert math.isclose(records[0].joules + monitor.committed_idle_j, monitor.meter_delta_j, rel_tol=1e-9)


@pytest.mark.parametrize("slow", ["stream", "image"])
def test_a_slow_first_token_or_a_slow_image_holds_no_one_back(
    stub: Stub, make_proxy: Callable[..., ProxyServer], slow: str
) -> None:
    """A stream whose first token is late, and an image, are cut into pieces while they wait like a plain
    answer: a short request that overlaps them has its energy final without waiting for their end."""
    proxy = make_proxy(stub.url)
    c = client(proxy)
    stub.slow_done = False

    def long_one() -> float:
        if slow == "image":
            img = c.images.generate(model="slow-image", prompt="a fox", size="64x64", n=2)
            return float(img.usage.model_extra["energy"]["joules"])  # type: ignore[union-attr]
        body = {**STREAMED_CHAT, "model": "slow-start-stream", "stream_options": {"include_usage": True}}
        chunks = list(c.chat.completions.create(**body))  # type: ignore[call-overload]
        return float(_energy(chunks[-1].usage)["joules"])

    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(long_one)
        time.sleep(0.4)  # the long one is in flight upstream
        short = c.chat.completions.create(model="ok-no-usage", messages=[{"role": "user", "content": "x"}])
        # answered while the upstream was still on the long one: its energy did not wait for it
        assert not stub.slow_done
        assert _energy(short.usage)["joules"] > 0
        assert long.result() > 0


def test_a_short_request_is_answered_without_waiting_for_a_long_plain_one(
    stub: Stub, make_proxy: Callable[..., ProxyServer]
) -> None:
    proxy = make_proxy(stub.url)

    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(_chat, proxy, "long-plain")
        time.sleep(0.3)  # the long request is in flight upstream
        short = _chat(proxy, "ok-no-usage")
        assert short.status_code == 200
        assert not long.done()  # answered while the long one was still running: its energy did not wait
        assert long.result().status_code == 200
    short_j = short.json()["usage"]["energy"]["joules"]
    long_j = long.result().json()["usage"]["energy"]["joules"]
    assert 0 < short_j < long_j


def test_estimates_use_the_configured_tokenizer(
    stub: Stub, make_proxy: Callable[..., ProxyServer], model_cache: Path
) -> None:
    from transformers import AutoTokenizer

    from backends.tiny import ensure_model

    proxy = make_proxy(stub.url, upstream={"tokenizer": "tiny:tiny-gpt2"})
    body = {"model": "ok-no-usage", "messages": [{"role": "user", "content": "hello there"}]}
    usage = requests.post(proxy.base_url + CHAT, json=body, timeout=30).json()["usage"]
    tokenizer = AutoTokenizer.from_pretrained(ensure_model("tiny-gpt2", model_cache / "models"))
    count = len(tokenizer.encode("twelve characters of text", add_special_tokens=False))
    assert usage["completion_tokens"] == count and usage["prompt_tokens"] == len(
        tokenizer.encode("hello there")
    )
    assert usage["energy"]["usage_source"] == "estimate"
    # a long prompt is counted once, on a worker thread (not on the event loop), with the same count
    from proxy.upstream import TokenCounter

    threads: list[str] = []
    real = TokenCounter.count

    def noting(self: TokenCounter, text: str) -> int:
        threads.append(threading.current_thread().name)
        return real(self, text)

    long = "hello there " * 500
    TokenCounter.count = noting  # type: ignore[method-assign]
    try:
        body["messages"] = [{"role": "user", "content": long}]
        usage = requests.post(proxy.base_url + CHAT, json=body, timeout=30).json()["usage"]
    finally:
        TokenCounter.count = real  # type: ignore[method-assign]
    assert usage["prompt_tokens"] == len(tokenizer.encode(long, add_special_tokens=False))
    loop_thread = proxy.thread.name
    assert threads[0] != loop_thread  # the prompt, on a worker thread
    assert threads[1:] == [loop_thread]  # the (short) answer's text, on the loop


def _streamed(proxy: ProxyServer, model: str) -> list[Any]:
    """The chunks of a streamed chat through the proxy (openai client, usage asked for)."""
    stream = client(proxy).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    return list(stream)


def test_a_stream_without_usage_is_estimated_from_all_its_text(
    stub: Stub, make_proxy: Callable[..., ProxyServer]
) -> None:
    """The stub's fast stream reports no usage: the estimate counts the text of every piece (one count
    a piece, about 4 characters a token), the last piece's included."""
    proxy = make_proxy(stub.url + "/v1")
    chunks = _streamed(proxy, "fast-stream")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "word" * Stub.FAST_STREAM_CHUNKS
    usage = chunks[-1].usage
    assert usage is not None and _energy(usage)["usage_source"] == "estimate"
    assert usage.completion_tokens == len(text) // 4  # "word": 4 characters, whatever the pieces


def test_what_only_the_upstreams_model_does_is_sent_on_as_asked(
    stub: Stub, make_proxy: Callable[..., ProxyServer]
) -> None:
    """Tools, JSON mode, log probabilities, penalties and image parts, which a model served in process
    refuses or answers itself, reach the upstream as the client sent them, an image of 2 MiB in base64
    included (proxy mode's body limit is 20 MiB, not 1); the prompt estimate counts the text parts."""
    proxy = make_proxy(stub.url + "/v1")
    picture = "data:image/png;base64," + "iVBORw0K" * (1 << 18)  # 2 MiB of base64
    asked: dict[str, Any] = {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "logprobs": True,
        "top_logprobs": 2,
        "presence_penalty": 0.5,
        "logit_bias": {"50256": -100},
    }
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {
                    "type": "image_url",
                    "image_url": {"url": picture, "detail": "low"},
                },
            ],
        }
    ]
    answer = client(proxy).chat.completions.create(model="ok-no-usage", messages=messages, **asked)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "twelve characters of text"
    sent = stub.chat_bodies[-1]
    assert sent["messages"] == messages and {k: sent[k] for k in asked} == asked
    assert answer.usage is not None and _energy(answer.usage)["usage_source"] == "estimate"
    assert answer.usage.prompt_tokens == -(-len("What is in this picture?") // 4)  # 4 characters a token


def test_embeddings_are_forwarded_and_charged_by_their_inputs_tokens(
    stub: Stub, make_proxy: Callable[..., ProxyServer]
) -> None:
    """/v1/embeddings goes to the upstream as the client sent it; the answer comes back with the energy
    in its usage, each request charged by its input tokens (the upstream's count, or WattProxy's
    estimate where it gives none; token ids counted exactly), and recorded; the books close."""
    proxy = make_proxy(stub.url + "/v1")
    c = client(proxy)
    both = c.embeddings.create(model="slow", input=["a joule", "a watt-hour"])
    assert stub.embedding_bodies[-1] == {
        "model": "slow",
        "input": ["a joule", "a watt-hour"],
        "encoding_format": "base64",
    }
    assert [d.index for d in both.data] == [0, 1] and both.data[0].embedding == [0.25, -0.5]
    assert (both.usage.prompt_tokens, both.usage.total_tokens) == (10, 10)
    energy = _energy(both.usage)
    assert (
        energy["usage_source"] == "upstream"
        and energy["joules"] > 0
        and energy["measurement"].endswith("-timeline")
    )
    guessed = c.embeddings.create(model="ok-no-usage", input="twelve chars")
    assert (
        guessed.usage.prompt_tokens == 3 and _energy(guessed.usage)["usage_source"] == "estimate"
    )  # 4 a token
    ids = c.embeddings.create(model="ok-no-usage", input=[[1, 2, 3], [4, 5]])
    assert ids.usage.prompt_tokens == 5 and len(ids.data) == 2
    assert proxy.app is not None
    deadline = time.monotonic() + 10
    while len(records := proxy.call(proxy.app[LEDGER].records())) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert sorted((r.prompt_tokens, r.completion_tokens, r.status) for r in records) == [
        (3, 0, "ok"),
        (5, 0, "ok"),
        (10, 0, "ok"),
    ]
    monitor = proxy.app[MONITORS]["cuda:0"]
    proxy.stop()
    charged = sum(r.joules for r in records)
    assert math.isclose(charged + monitor.committed_idle_j, monitor.meter_delta_j, rel_tol=1e-9)


def test_prompts_of_token_ids_are_sent_on_and_counted_exactly(
    stub: Stub, make_proxy: Callable[..., ProxyServer]
) -> None:
    """A completion's prompt as token ids (one prompt's, or several's) reaches the upstream as it was
    sent; its tokens are the ids, counted, not estimated. An echoed prompt is not counted as
    completion tokens where they are estimated."""
    proxy = make_proxy(stub.url + "/v1")
    c = client(proxy)
    one = c.completions.create(model="ok-no-usage", prompt=[15496, 995, 0, 7], max_tokens=3)
    assert stub.completion_bodies[-1]["prompt"] == [15496, 995, 0, 7]
    assert one.usage is not None and one.usage.prompt_tokens == 4
    assert one.usage.completion_tokens == 3  # "twelve chars": 12 characters, 4 a token
    two = c.completions.create(model="ok-no-usage", prompt=[[1, 2], [3, 4, 5]], max_tokens=3)
    assert stub.completion_bodies[-1]["prompt"] == [[1, 2], [3, 4, 5]]
    assert two.usage is not None and two.usage.prompt_tokens == 5 and len(two.choices) == 2
    assert _energy(two.usage)["usage_source"] == "estimate"  # the completions' tokens are estimated
    echoed = c.completions.create(model="ok-no-usage", prompt="sixteen chars ok", max_tokens=3, echo=True)
    assert echoed.choices[0].text == "sixteen chars oktwelve chars"
    assert echoed.usage is not None and (echoed.usage.prompt_tokens, echoed.usage.completion_tokens) == (4, 3)


def test_a_client_that_disconnects_mid_stream_cancels_the_upstream_request(
    proxy: ProxyServer, upstream: LiveServer
) -> None:
    assert upstream.app is not None and proxy.app is not None
    queue = upstream.app[SCHEDULER].queues["tiny-gpt2"]
    gate = upstream.app[SCHEDULER].devices["cpu"].gate
    upstream_service = upstream.app[SERVICE]

    def cancelled_upstream() -> float:
        samples = metric_samples(upstream).get("wattproxy_requests_total", [])
        return sum(v for labels, v in samples if labels["status"] == "cancelled")

    before = cancelled_upstream()
    gate.clear()  # the upstream's device holds the batch before it starts: the request stays in flight
    try:
        with requests.post(proxy.base_url + CHAT, json=STREAMED_CHAT, stream=True, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: dropping the generator closes the connection
            assert next(lines).startswith(b"data: ")  # the role chunk: the stream is open end to end
            deadline = time.monotonic() + 10
            while not queue.running:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert upstream_service.inflight == 1
        # the client left: the proxy closes its upstream connection and the upstream's handler ends,
        # although the upstream's batch cannot have finished (its device is held)
        deadline = time.monotonic() + 10
        while upstream_service.inflight:
            assert time.monotonic() < deadline, "the upstream request was not cancelled"
            time.sleep(0.01)
    finally:
        gate.set()
    deadline = time.monotonic() + 10
    while cancelled_upstream() < before + 1:  # the upstream charges its batch to a request whose client left
        assert time.monotonic() < deadline
        time.sleep(0.05)
    while not (records := proxy.call(proxy.app[LEDGER].records())):
        assert time.monotonic() < deadline, "the cancelled request was not recorded"
        time.sleep(0.05)
    assert [r.status for r in records] == ["cancelled"] and records[0].joules > 0
    cancelled = [
        labels
        for labels, v in metric_samples(proxy)["wattproxy_requests_total"]
        if labels["status"] == "cancelled"
    ]
    assert [labels["model"] for labels in cancelled] == ["tiny-gpt2"]


def test_clients_that_reset_mid_stream_are_recorded_and_log_no_error(
    stub: Stub, make_proxy: Callable[..., ProxyServer], caplog: pytest.LogCaptureFixture
) -> None:
    """A client that resets its connection while chunks are flowing makes the proxy's next write
    fail: the request is recorded as cancelled, and nothing is logged as a server fault."""
    proxy = make_proxy(stub.url + "/v1")
    assert proxy.app is not None
    messages = [{"role": "user", "content": "x"}]
    body = json.dumps({"model": "fast-stream", "messages": messages, "stream": True})
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    request = f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode()
    clients = 12
    caplog.set_level(logging.WARNING)
    for i in range(clients):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
            sock.sendall(request)
            received = b""
            while len(received) < 2000 * (i + 1):  # some of the stream, more each time
                received += sock.recv(65536)
            assert received.startswith(b"HTTP/1.1 200")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close: reset
    deadline = time.monotonic() + 30
    while len(records := proxy.call(proxy.app[LEDGER].records())) < clients:
        assert time.monotonic() < deadline, f"{len(records)} of {clients} streams recorded"
        time.sleep(0.05)
    assert [r.status for r in records] == ["cancelled"] * clients
    assert all(r.joules > 0 and r.completion_tokens > 0 for r in records)
    faults = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert faults == []


def test_a_streaming_client_that_stops_reading_is_let_go_after_the_client_timeout(
    stub: Stub, make_proxy: Callable[..., ProxyServer], caplog: pytest.LogCaptureFixture
) -> None:
    """Once the sockets to a client that reads nothing are full, the proxy's write waits; after
    `client_timeout_s` it gives the client up: the stream is recorded as cancelled, the upstream
    request is closed, and nothing is logged as a server fault."""
    proxy = make_proxy(stub.url + "/v1", client_timeout_s=0.5)
    assert proxy.app is not None
    messages = [{"role": "user", "content": "x"}]
    body = json.dumps({"model": "endless-stream", "messages": messages, "stream": True})
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    caplog.set_level(logging.WARNING)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", proxy.port))
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode())  # and reads nothing
        deadline = time.monotonic() + 60
        while not (records := proxy.call(proxy.app[LEDGER].records())):
            assert time.monotonic() < deadline, "the stalled stream was never given up"
            time.sleep(0.05)
    assert [r.status for r in records] == ["cancelled"] and records[0].completion_tokens > 0
    assert proxy.app[UPSTREAM].inflight == 0  # its upstream request was closed
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_stream_line_past_the_limit_ends_the_stream_with_an_error(
    stub: Stub, make_proxy: Callable[..., ProxyServer]
) -> None:
    """An upstream that sends a line longer than MAX_EVENT_BYTES (1 MiB) is a broken one: the client
    gets what came before it, then the error event (upstream_bad_response); the request is charged
    and recorded as an error."""
    proxy = make_proxy(stub.url + "/v1")
    assert proxy.app is not None
    body = {"model": "huge-line", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with requests.post(proxy.base_url + CHAT, json=body, stream=True, timeout=30) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith(b"data: ")]
    assert r.status_code == 200 and json.loads(events[0])["choices"][0]["delta"]["content"] == "ok"
    assert json.loads(events[1])["error"]["code"] == "upstream_bad_response" and events[2:] == [b"[DONE]"]
    deadline = time.monotonic() + 10
    while not (records := proxy.call(proxy.app[LEDGER].records())):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [r.status for r in records] == ["error"] and records[0].joules > 0


def _fault_on_call(n: int, real: Callable[..., T]) -> Callable[..., T]:
    """`real`, which raises RuntimeError on its n-th call: a stand-in for a fault in WattProxy's code."""
    calls = [0]

    def wrapped(*args: Any) -> T:
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError("injected fault")
        return real(*args)

    return wrapped


def _the_next_request_is_answered_and_both_are_recorded(proxy: ProxyServer) -> None:
    """After a request that failed inside the proxy: the next one overlaps nothing left open, so it is
    answered with its energy; both are in the ledger, charged (the failed one as an error)."""
    assert proxy.app is not None
    answer = client(proxy).chat.completions.create(
        model="tiny-gpt2", messages=[{"role": "user", "content": "y"}], max_tokens=4
    )
    assert _energy(answer.usage)["joules"] > 0
    deadline = time.monotonic() + 10
    while len(records := proxy.call(proxy.app[LEDGER].records())) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert sorted(r.status for r in records) == ["error", "ok"] and all(r.joules > 0 for r in records)


def test_a_fault_of_the_proxys_own_mid_stream_is_charged_and_blocks_no_one(
    proxy: ProxyServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception no path expects (here injected into the third event's inspection) ends the stream
    with the server_error event and [DONE], a well-formed answer; the request is charged and recorded
    as an error, its piece is closed, and the requests after it are answered and accounted as usual."""
    import proxy.upstream as upstream_module

    assert proxy.app is not None
    monkeypatch.setattr(upstream_module, "_inspect_event", _fault_on_call(3, upstream_module._inspect_event))
    caplog.set_level(logging.WARNING)
    with requests.post(proxy.base_url + CHAT, json=STREAMED_CHAT, stream=True, timeout=30) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith(b"data: ")]
    # up to two chunks (the events read together with the third are not sent), the error, [DONE]
    assert r.status_code == 200 and 2 <= len(events) <= 4
    assert all("choices" in json.loads(e) for e in events[:-2])
    assert json.loads(events[-2])["error"]["type"] == "server_error" and events[-1] == b"[DONE]"
    assert [rec.getMessage().split(" (")[0] for rec in caplog.records if rec.levelno >= logging.ERROR] == [
        "unhandled error in POST '/v1/chat/completions'"
    ]
    _the_next_request_is_answered_and_both_are_recorded(proxy)


def test_a_fault_of_the_proxys_own_in_a_plain_answer_is_charged_and_blocks_no_one(
    proxy: ProxyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import proxy.upstream as upstream_module

    assert proxy.app is not None
    monkeypatch.setattr(upstream_module, "_token_usage", _fault_on_call(1, upstream_module._token_usage))
    body = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    failed = requests.post(proxy.base_url + CHAT, json=body, timeout=30)
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
    _the_next_request_is_answered_and_both_are_recorded(proxy)


def test_server_sent_events_are_read_however_the_upstream_writes_them(
    stub: Stub, make_proxy: Callable[..., ProxyServer]
) -> None:
    """CRLF line ends, a comment, a multi-line data field, another field, and pieces cut inside lines
    and inside a CRLF: the client gets each event once, whole, and the upstream's usage."""
    proxy = make_proxy(stub.url + "/v1")
    chunks = _streamed(proxy, "odd-sse")
    assert [c.choices[0].delta.content for c in chunks if c.choices] == ["ab", "cd"]
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, 2)
    assert _energy(usage)["usage_source"] == "upstream"


def test_keys_budgets_ledger_and_metrics_work_through_the_proxy(
    upstream: LiveServer, make_proxy: Callable[..., ProxyServer], tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'keyed.db'}"
    alice = add_key(db, "alice", budget_kwh=1e-12, budget_period="day")
    bob = add_key(db, "bob")
    proxy = make_proxy(upstream.base_url, auth="keys", db=db)
    with pytest.raises(openai.AuthenticationError):
        client(proxy, "wrong").models.list()
    for key in (alice, bob):
        r = client(proxy, key).chat.completions.create(
            model="tiny-gpt2", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert _energy(r.usage)["joules"] > 0
    with pytest.raises(openai.RateLimitError) as refused:
        client(proxy, alice).chat.completions.create(
            model="tiny-gpt2", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
    assert refused.value.response.json()["error"]["type"] == "budget_exceeded"
    assert proxy.app is not None
    records = proxy.call(proxy.app[LEDGER].records())
    assert sorted(r.user for r in records) == ["alice", "bob"]
    assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 and r.device == "cuda:0" for r in records)
    samples = metric_samples(proxy)
    ok = {labels["user"]: v for labels, v in samples["wattproxy_requests_total"] if labels["status"] == "ok"}
    assert ok == {"alice": 1.0, "bob": 1.0}
    energy_users = {labels["user"] for labels, v in samples["wattproxy_energy_kwh_total"] if v > 0}
    assert energy_users == {"alice", "bob"}
    remaining = {labels["user"]: v for labels, v in samples["wattproxy_budget_remaining_kwh"]}
    assert remaining["alice"] < 0


def test_a_stream_ends_at_done_and_usage_on_a_chunk_with_choices_is_the_upstreams(
    stub: Stub, make_proxy: Callable[..., ProxyServer]
) -> None:
    """[DONE] ends a stream even where the upstream's body goes on (no wait for the read timeout, no
    error); usage sent on a chunk that has choices is the upstream's, and the client gets it once."""
    proxy = make_proxy(stub.url, upstream={"read_timeout_s": 20})
    t0 = time.monotonic()
    chunks = _streamed(proxy, "done-then-stall")
    assert time.monotonic() - t0 < 10
    assert chunks[-1].usage is not None and chunks[-1].usage.model_extra["energy"]["joules"] >= 0  # type: ignore[index]
    chunks = _streamed(proxy, "usage-on-choices")
    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1 and with_usage[0].usage.prompt_tokens == 3  # type: ignore[union-attr]
    assert with_usage[0].usage.model_extra["energy"]["usage_source"] == "upstream"  # type: ignore[union-attr,index]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hi"
    records = proxy.call(proxy.app[LEDGER].records())  # type: ignore[index]
    assert sorted(r.status for r in records) == ["ok", "ok"]


def test_sigterm_in_proxy_mode_cuts_streams_off_at_the_drain_timeout(
    stub: Stub, model_cache: Path, tmp_path: Path
) -> None:
    """`wattproxy serve --upstream` with a stream that would go on for minutes: SIGTERM ends it once
    drain_timeout_s has passed (not after aiohttp's own 60 s twice), and the stream is recorded."""
    import os
    import signal
    import sqlite3

    from tests.test_lifecycle import ServeProcess

    env = dict(
        os.environ,
        WATTPROXY_CACHE_DIR=str(model_cache),
        WATTPROXY_DATA_DIR=str(tmp_path),
        WATTPROXY_DRAIN_TIMEOUT_S="1",
    )
    server = ServeProcess(["--upstream", stub.url, "--auth", "none", "--meter", "synthetic"], env)
    try:
        server.wait_ready(60)
        got_some = threading.Event()

        def read() -> None:
            body = {"model": "slow-stream", "messages": [{"role": "user", "content": "x"}], "stream": True}
            with (
                contextlib.suppress(requests.RequestException),
                requests.post(server.url + CHAT, json=body, stream=True, timeout=60) as r,
            ):
                for _ in r.iter_content(None):
                    got_some.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert got_some.wait(30)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0, "".join(server.lines)
        assert time.monotonic() - t0 < 15  # 1 s of drain, 1 s of grace, then the shutdown
        reader.join(timeout=10)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    with sqlite3.connect(tmp_path / "wattproxy.db") as db:
        statuses = [row[0] for row in db.execute("SELECT status FROM requests")]
    assert len(statuses) == 1 and statuses[0] in ("cancelled", "error")  # cut off, charged and recorded


def test_an_upstream_urls_credentials_are_named_nowhere(make_proxy: Callable[..., ProxyServer]) -> None:
    """A user:password in the upstream URL reaches neither clients' error messages nor the log."""
    with socket.socket() as closed:  # a port nobody listens on: every request fails, with a message
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    proxy = make_proxy(
        f"http://svc:Sup3rS3cret@127.0.0.1:{port}/v1", upstream={"models": [{"name": "m"}]}, ready=False
    )
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    resp = requests.post(proxy.base_url + CHAT, json=body, timeout=30)
    assert resp.status_code == 502 and f"127.0.0.1:{port}" in resp.text
    assert "Sup3rS3cret" not in resp.text and "svc" not in resp.text


def test_the_upstreams_model_list_is_asked_again(make_proxy: Callable[..., ProxyServer]) -> None:
    """Models the upstream starts serving are served through the proxy, and those it stops serving are
    not, without a restart (every models_refresh_s)."""
    stub = Stub()
    stub.MODELS = ("ok-no-usage",)  # type: ignore[misc]
    stub.start()
    try:
        proxy = make_proxy(stub.url, upstream={"models_refresh_s": 0.1})
        body = {"messages": [{"role": "user", "content": "x"}]}

        def status(model: str) -> int:
            return requests.post(proxy.base_url + CHAT, json={**body, "model": model}, timeout=30).status_code

        assert status("ok-no-usage") == 200 and status("long-plain") == 404
        stub.MODELS = ("long-plain",)  # type: ignore[misc]
        deadline = time.monotonic() + 10
        while status("ok-no-usage") != 404 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status("ok-no-usage") == 404 and status("long-plain") == 200
        assert requests.get(proxy.base_url + "/readyz", timeout=10).json()["upstream"] == "ready"
    finally:
        stub.stop()
    # the upstream gone: readiness says so (503), so that nothing is routed here meanwhile
    deadline = time.monotonic() + 10
    while (ready := requests.get(proxy.base_url + "/readyz", timeout=10)).status_code == 200:
        assert time.monotonic() < deadline, ready.text
        time.sleep(0.05)
    assert ready.status_code == 503
    assert ready.json()["status"] == "unavailable" and ready.json()["upstream"] == "unreachable"
