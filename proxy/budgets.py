"""Per-user energy budgets (kWh and/or gCO2e per day, month or in total).

A user's budget comes from their active API keys (the tightest limit when several keys set one).
Spending is kept in memory, loaded from the ledger at start and every `refresh_s` (so replicas
sharing a PostgreSQL ledger converge), and increased as each request is recorded.

Overshoot: admission checks spending *before* a request runs, so requests admitted while a user
was still under budget may all finish: a user can overshoot by at most the energy of the requests
they have in flight at the moment the budget is reached (with the default limits, at most
`max_queue` requests per model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from proxy.errors import BudgetExceeded
from proxy.ledger import ApiKeyRecord, Ledger

JOULES_PER_KWH = 3.6e6


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def period_bounds(period: str, now: datetime) -> tuple[datetime | None, datetime | None]:
    """(start, reset) of the budget period containing `now` (UTC); (None, None) for 'total'."""
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    if period == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        if start.month == 12:
            return start, start.replace(year=start.year + 1, month=1)
        return start, start.replace(month=start.month + 1)
    return None, None


@dataclass
class Budget:
    user: str
    kwh: float | None
    co2_grams: float | None
    period: str
    start: datetime | None = None
    reset: datetime | None = None
    spent_j: float = 0.0
    spent_co2_grams: float = 0.0

    @property
    def remaining_kwh(self) -> float | None:
        return None if self.kwh is None else self.kwh - self.spent_j / JOULES_PER_KWH


class Budgets:
    def __init__(self, clock: Callable[[], datetime] = _utcnow) -> None:
        self._clock = clock
        self._budgets: dict[str, Budget] = {}

    def set_keys(self, keys: Iterable[ApiKeyRecord]) -> None:
        """Derive each user's budget from their active keys (tightest limit wins), keeping spending."""
        new: dict[str, Budget] = {}
        for k in keys:
            if k.revoked is not None or (k.budget_kwh is None and k.budget_co2_grams is None):
                continue
            b = new.get(k.user)
            if b is None:
                new[k.user] = Budget(k.user, k.budget_kwh, k.budget_co2_grams, k.budget_period)
                continue
            b.kwh = _tightest(b.kwh, k.budget_kwh)
            b.co2_grams = _tightest(b.co2_grams, k.budget_co2_grams)
            if _period_rank(k.budget_period) < _period_rank(b.period):
                b.period = k.budget_period
        for user, b in new.items():
            old = self._budgets.get(user)
            if old is not None and old.period == b.period:
                b.start, b.reset = old.start, old.reset
                b.spent_j, b.spent_co2_grams = old.spent_j, old.spent_co2_grams
        self._budgets = new

    async def refresh(self, ledger: Ledger) -> None:
        """Reload spending in each user's current period from the ledger (the authority)."""
        now = self._clock()
        since = {}
        for b in self._budgets.values():
            b.start, b.reset = period_bounds(b.period, now)
            since[b.user] = b.start
        if not since:
            return
        spent = await ledger.spent_by_user(since)
        for user, (joules, grams) in spent.items():
            b = self._budgets.get(user)
            if b is not None:
                b.spent_j, b.spent_co2_grams = joules, grams

    def add(self, user: str, joules: float, co2_grams: float) -> None:
        b = self._budgets.get(user)
        if b is None:
            return
        self._roll(b)
        b.spent_j += joules
        b.spent_co2_grams += co2_grams

    def check(self, user: str) -> None:
        """Raise BudgetExceeded (429) when the user is at or over a limit."""
        b = self._budgets.get(user)
        if b is None:
            return
        self._roll(b)
        if b.kwh is not None and b.spent_j / JOULES_PER_KWH >= b.kwh:
            raise self._exceeded(b, f"{b.kwh:g} kWh", f"{b.spent_j / JOULES_PER_KWH:.6g} kWh")
        if b.co2_grams is not None and b.spent_co2_grams >= b.co2_grams:
            raise self._exceeded(b, f"{b.co2_grams:g} gCO2e", f"{b.spent_co2_grams:.6g} gCO2e")

    def remaining_kwh(self) -> dict[str, float]:
        out = {}
        for b in self._budgets.values():
            self._roll(b)
            if b.remaining_kwh is not None:
                out[b.user] = b.remaining_kwh
        return out

    def budget(self, user: str) -> Budget | None:
        return self._budgets.get(user)

    def _roll(self, b: Budget) -> None:
        if b.reset is not None and self._clock() >= b.reset:
            b.start, b.reset = period_bounds(b.period, self._clock())
            b.spent_j = b.spent_co2_grams = 0.0

    def _exceeded(self, b: Budget, limit: str, spent: str) -> BudgetExceeded:
        if b.reset is None:
            when, retry = "it does not reset (a total budget); ask an admin to raise it", None
        else:
            when = f"it resets at {b.reset.isoformat()}"
            retry = max((b.reset - self._clock()).total_seconds(), 1.0)
        period = {"day": "daily", "month": "monthly", "total": "total"}[b.period]
        return BudgetExceeded(
            f"energy budget exceeded for user '{b.user}': {period} budget {limit}, spent {spent}; {when}",
            retry_after_s=retry,
        )


def _tightest(a: float | None, b: float | None) -> float | None:
    values = [v for v in (a, b) if v is not None and not math.isnan(v)]
    return min(values) if values else None


def _period_rank(period: str) -> int:
    return {"day": 0, "month": 1, "total": 2}.get(period, 2)
