"""API keys, principals and roles.

A key is `wp-` + 43 url-safe characters (256 bits). Only its SHA-256 is stored; a presented key is
hashed once and compared with `secrets.compare_digest`. Verified keys are cached for
`cache_ttl_s` (default 1 s): a key revoked over HTTP stops working at once, one revoked with the CLI
(another process) within that TTL.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

from aiohttp import web

from proxy.errors import AuthenticationFailed, PermissionDenied
from proxy.ledger import ApiKeyRecord, Ledger

log = logging.getLogger(__name__)

KEY_PREFIX = "wp-"
USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ANONYMOUS = "anonymous"
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/metrics"})
BudgetPeriod = Literal["day", "month", "total"]


@dataclass(frozen=True)
class Principal:
    user: str
    key_id: str | None
    admin: bool


def hash_key(secret: str) -> str:
    # surrogatepass: a header's bytes that are not UTF-8 come as lone surrogates; such a key is
    # simply not one of ours (401), never an encoding error (a 500, a traceback in the log)
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_key(
    user: str,
    *,
    admin: bool = False,
    budget_kwh: float | None = None,
    budget_co2_grams: float | None = None,
    budget_period: BudgetPeriod = "total",
) -> tuple[str, ApiKeyRecord]:
    """A fresh secret (shown once) and the record to store (hash only)."""
    if not USER_RE.fullmatch(user):
        raise ValueError(
            "user must be 1-128 ASCII letters, digits, '-', '_' or '.', starting with a letter or digit"
        )
    for name, value in (("budget_kwh", budget_kwh), ("budget_co2_grams", budget_co2_grams)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number > 0")
    if budget_period not in ("day", "month", "total"):
        raise ValueError("budget period must be day, month or total")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKeyRecord(
        key_id="key_" + secrets.token_hex(6),
        key_hash=hash_key(secret),
        user=user,
        admin=admin,
        created=datetime.now(timezone.utc),
        budget_kwh=budget_kwh,
        budget_co2_grams=budget_co2_grams,
        budget_period=budget_period,
    )
    return secret, record


class KeyCache:
    """Verified keys by hash, each trusted for `ttl_s`; revocations through this process apply at once.

    Concurrent requests with a key whose verdict has expired share one database lookup (otherwise
    every request in flight at expiry would open a connection of its own: a few new connections a
    second under load)."""

    def __init__(
        self, ledger: Ledger, ttl_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ledger = ledger
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[float, ApiKeyRecord | None]] = {}
        self._inflight: dict[str, asyncio.Task[ApiKeyRecord | None]] = {}
        self._generation = 0  # bumped by `forget`: a lookup begun before must not refill the cache

    async def lookup(self, secret: str) -> ApiKeyRecord | None:
        digest = hash_key(secret)
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < self._ttl_s:
            record = hit[1]
        else:
            task = self._inflight.get(digest)
            if task is None:
                task = asyncio.ensure_future(self._fetch(digest, now, self._generation))
                task.add_done_callback(_retrieve)
                self._inflight[digest] = task
            record = await asyncio.shield(task)  # a waiter that leaves does not cancel the others'
        if record is None or record.revoked is not None:
            return None
        if not secrets.compare_digest(record.key_hash, digest):
            return None
        return record

    async def _fetch(self, digest: str, now: float, generation: int) -> ApiKeyRecord | None:
        try:
            record = await self._ledger.key_by_hash(digest)
        finally:
            if self._inflight.get(digest) is asyncio.current_task():
                del self._inflight[digest]
        if generation == self._generation:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now, record)
        return record

    def forget(self) -> None:
        """Drop every cached verdict (after a key is created or revoked here)."""
        self._cache.clear()
        self._inflight.clear()
        self._generation += 1


def _retrieve(task: asyncio.Task[ApiKeyRecord | None]) -> None:
    """Mark a lookup's failure as seen: its waiters may all have left (they get it if not)."""
    if not task.cancelled():
        task.exception()


def auth_middleware(
    mode: Literal["keys", "none"],
    keys: Callable[[], KeyCache],
    on_principal: Callable[[web.Request, Principal], None],
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Resolve `Authorization: Bearer <key>` into a Principal; 401 when missing, unknown or revoked."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        if mode == "none":
            on_principal(request, Principal(user=ANONYMOUS, key_id=None, admin=True))
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise AuthenticationFailed(
                "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key"
            )
        record = await keys().lookup(secret.strip())
        if record is None:
            raise AuthenticationFailed("invalid or revoked API key")
        on_principal(request, Principal(user=record.user, key_id=record.key_id, admin=record.admin))
        return await handler(request)

    return middleware


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise PermissionDenied("this endpoint needs an admin key", code="admin_required")
