"""Shared fixtures: the tiny models built once per session, and a real server on a free localhost
port running in its own thread and event loop (so tests can use the official sync `openai` client)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Coroutine, Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from hypothesis import settings as hypothesis_settings

from backends.base import Backend, BackendRequest, BackendResult
from backends.tiny import ensure_model
from proxy.app import create_app, make_runner
from proxy.config import ModelSettings, Settings

# CI (HYPOTHESIS_PROFILE=ci, set by .ci/run) draws the same examples on every run, so a submission's
# result does not depend on the draw; local runs draw new ones, to find what CI's fixed draw misses.
hypothesis_settings.register_profile("ci", derandomize=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

T = TypeVar("T")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    for preset in ("tiny-gpt2", "tiny-sd"):
        ensure_model(preset, cache / "models")
    return cache


class LiveServer:
    """create_app() behind a real TCP socket, in a background thread with its own loop."""

    def __init__(self, settings: Settings, **app_kwargs: Any) -> None:
        self.settings = settings
        self.app_kwargs = app_kwargs
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-server", daemon=True)
        self.app: web.Application | None = None
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, ready_timeout_s: float = 120.0) -> LiveServer:
        self.thread.start()

        async def up() -> None:
            self.app = create_app(self.settings, **self.app_kwargs)
            self.runner = make_runner(self.app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = self.runner.addresses[0][1]

        self.call(up())
        self.wait_ready(ready_timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        from proxy.state import SERVICE

        assert self.app is not None
        deadline = time.monotonic() + timeout_s
        service = self.app[SERVICE]
        while time.monotonic() < deadline:
            if all(m.queue is not None for m in service.models.values()):
                return
            failed = [m.load_error for m in service.models.values() if m.load_error]
            if failed:
                raise RuntimeError(f"model failed to load: {failed}")
            time.sleep(0.05)
        raise TimeoutError("models did not load in time")

    def stop(self) -> None:
        if self.runner is not None:
            self.call(self.runner.cleanup())
            self.runner = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def add_key(db_url: str, user: str, **kw: Any) -> str:
    """Store a new API key in the ledger at `db_url` (before a server starts); returns the secret."""
    from proxy.auth import new_key
    from proxy.ledger import Ledger

    async def add() -> str:
        ledger = Ledger(db_url)
        await ledger.start()
        secret, record = new_key(user, **kw)
        await ledger.add_key(record)
        await ledger.close()
        return secret

    return asyncio.run(add())


def settings_for_tests(cache: Path, tmp: Path, **overrides: Any) -> Settings:
    """Settings for tests: tiny models from the session cache, synthetic meter, small limits."""
    models = overrides.pop("models", None) or [
        ModelSettings(name="tiny-gpt2", task="text", source="tiny:tiny-gpt2", max_tokens=64, max_n=4),
        ModelSettings(name="tiny-sd", task="image", source="tiny:tiny-sd", max_batch_size=4, max_steps=20),
    ]
    base: dict[str, Any] = {
        "port": 0,
        "cache_dir": cache,
        "data_dir": tmp,
        "meter": "synthetic",
        "auth": "none",
        "models": models,
        "torch_threads": 1,
    }
    base.update(overrides)
    # The tests start dozens of servers, and a model process takes about 6 s to start here: a model
    # whose test does not ask for `own_process` runs in the server's process. The default (own process)
    # is what `wattproxy serve` runs in tests/test_lifecycle.py, and what test_api's basic endpoint
    # tests and tests/test_process_backend.py serve.
    base["models"] = [
        m
        if not isinstance(m, ModelSettings) or "own_process" in m.model_fields_set
        else m.model_copy(update={"own_process": False})
        for m in base["models"]
    ]
    return Settings.model_validate(base)


@pytest.fixture
def make_server(model_cache: Path, tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    servers: list[LiveServer] = []

    def make(app_kwargs: dict[str, Any] | None = None, **overrides: Any) -> LiveServer:
        server = LiveServer(settings_for_tests(model_cache, tmp_path, **overrides), **(app_kwargs or {}))
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


class BackendWrapper:
    """Test-only: a real backend behind a wrapper that tests subclass to change `run`."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name, self.task, self.device = inner.name, inner.task, inner.device

    def __getattr__(self, name: str) -> object:  # prompt_ids, count_prompt_tokens, max_context_tokens
        return getattr(self.inner, name)

    def load(self) -> None:
        self.inner.load()

    def batch_key(self, request: BackendRequest) -> Hashable:
        return self.inner.batch_key(request)

    def run(self, batch: Sequence[BackendRequest]) -> list[BackendResult]:
        return self.inner.run(batch)

    def synchronize(self) -> None:
        self.inner.synchronize()

    def close(self) -> None:
        self.inner.close()
