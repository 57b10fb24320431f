"""The long-lived objects of a running service, and their typed app key."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from aiohttp import web

from backends.base import Backend, TextRequest
from proxy.auth import KeyCache, Principal
from proxy.budgets import Budgets
from proxy.carbon import CarbonModel
from proxy.config import ModelSettings, Settings
from proxy.energy.monitor import DeviceMonitor
from proxy.ledger import Ledger
from proxy.metrics import EnergyBook, Metrics
from proxy.scheduler import ModelQueue, Recorder, Scheduler

if TYPE_CHECKING:
    from proxy.upstream import UpstreamServing


@dataclass(eq=False)
class ServedModel:
    settings: ModelSettings
    backend: Backend | None = None
    queue: ModelQueue | None = None  # set once the model is loaded
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    upstream: bool = False  # proxy mode: the upstream server runs it (no backend, no queue)

    def tokenized(self, request: TextRequest) -> tuple[TextRequest, int]:
        """(the request, its prompt's tokens). Where the backend gives the prompt's token ids, the
        request returned carries them, so that its batch does not tokenize it again."""
        if request.prompt_ids is not None:  # a prompt given as token ids
            return request, len(request.prompt_ids)
        tokenize = getattr(self.backend, "prompt_ids", None)
        if tokenize is not None:
            ids = tuple(tokenize(request))
            return replace(request, prompt_ids=ids), len(ids)
        counter = getattr(self.backend, "count_prompt_tokens", None)
        return request, int(counter(request)) if counter is not None else 0

    def max_context_tokens(self) -> int | None:
        value = getattr(self.backend, "max_context_tokens", None)
        return int(value) if value else None

    def honours(self) -> frozenset[str]:
        """The request fields that ask the model for something (`protocol._ASKED_DOC`) its backend does."""
        return getattr(self.backend, "honours", frozenset())  # type: ignore[no-any-return]

    def vocab_size(self) -> int | None:
        value = getattr(self.backend, "vocab_size", None)
        return int(value) if value else None


@dataclass(eq=False)
class Service:
    models: dict[str, ServedModel] = field(default_factory=dict)
    draining: bool = False
    inflight: int = 0
    # proxy mode: "discovering" until the upstream's models are known, then "ready"; "unreachable" while
    # asking it for its models again fails (readiness 503: nothing routed here could be answered); None
    # without one
    upstream: str | None = None

    def alone(self) -> bool:
        """No request in flight but (at most) the caller's own: nobody waits on the event loop."""
        return self.inflight <= 1


SERVICE = web.AppKey("service", Service)
SETTINGS = web.AppKey("settings", Settings)
SCHEDULER = web.AppKey("scheduler", Scheduler)
MONITORS = web.AppKey("monitors", dict[str, DeviceMonitor])
METRICS = web.AppKey("metrics", Metrics)
CARBON = web.AppKey("carbon", CarbonModel)
BOOK = web.AppKey("book", EnergyBook)
LEDGER = web.AppKey("ledger", Ledger)
KEYS = web.AppKey("keys", KeyCache)
BUDGETS = web.AppKey("budgets", Budgets)
RECORDER = web.AppKey("recorder", Recorder)  # commits finished requests: ledger, budgets, metrics
UPSTREAM: web.AppKey[UpstreamServing] = web.AppKey("upstream")  # proxy mode's serving logic
REQUEST_ID = web.RequestKey("request_id", str)
USER = web.RequestKey("user", str)  # a registered principal's name, never text from the request body
PRINCIPAL = web.RequestKey("principal", Principal)
