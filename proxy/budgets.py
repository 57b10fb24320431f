"""Per-user energy budgets (kWh and/or gCO2e per day, month or in total).

A user's budgets come from their active API keys: one budget per period that any of their keys sets
(a day, a month, all time), each with the tightest kWh and gCO2e limits the keys set for that period,
each with its own spending. A user is refused (429) while any of their budgets is spent; a daily key
and a total key are two budgets, never one daily budget with the total's limit.

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
    # What `Budgets.add` added since the last refresh's query began (which may not have seen it)
    added_j: float = 0.0
    added_co2_grams: float = 0.0

    @property
    def remaining_kwh(self) -> float | None:
        return None if self.kwh is None else self.kwh - self.spent_j / JOULES_PER_KWH


# A total budget never resets: its 429 still says when to look again (an admin may raise it meanwhile).
TOTAL_RETRY_AFTER_S = 86400.0


class Budgets:
    def __init__(self, clock: Callable[[], datetime] = _utcnow) -> None:
        self._clock = clock
        self._budgets: dict[str, list[Budget]] = {}  # user -> one budget a period, shortest first

    def set_keys(self, keys: Iterable[ApiKeyRecord]) -> None:
        """Derive each user's budgets from their active keys: one a period, with the tightest limits
        the keys set for it; spending kept where a user's period had a budget before."""
        new: dict[tuple[str, str], Budget] = {}
        for k in keys:
            if k.revoked is not None or (k.budget_kwh is None and k.budget_co2_grams is None):
                continue
            b = new.get((k.user, k.budget_period))
            if b is None:
                new[(k.user, k.budget_period)] = Budget(
                    k.user, k.budget_kwh, k.budget_co2_grams, k.budget_period
                )
                continue
            b.kwh = _tightest(b.kwh, k.budget_kwh)
            b.co2_grams = _tightest(b.co2_grams, k.budget_co2_grams)
        old = {(b.user, b.period): b for budgets in self._budgets.values() for b in budgets}
        by_user: dict[str, list[Budget]] = {}
        for key, b in sorted(new.items(), key=lambda item: _period_rank(item[0][1])):
            before = old.get(key)
            if before is not None:
                b.start, b.reset = before.start, before.reset
                b.spent_j, b.spent_co2_grams = before.spent_j, before.spent_co2_grams
            by_user.setdefault(b.user, []).append(b)
        self._budgets = by_user

    async def refresh(self, ledger: Ledger) -> None:
        """Reload spending in each budget's current period from the ledger (the authority): one
        query a period that has budgets. Requests recorded while a query runs are added to what it
        found (it may have read the ledger before their records were committed), so that none is
        lost; one committed just before the query and added just after it counts twice until the
        next refresh (a window of one event-loop turn; the error is on the side of refusing)."""
        now = self._clock()
        by_period: dict[str, list[Budget]] = {}
        for budgets in self._budgets.values():
            for b in budgets:
                b.start, b.reset = period_bounds(b.period, now)
                by_period.setdefault(b.period, []).append(b)
        for budgets in by_period.values():
            starts = {b.user: b.start for b in budgets}
            for b in budgets:
                b.added_j = b.added_co2_grams = 0.0
            spent = await ledger.spent_by_user(starts)
            for b in budgets:
                if b.start != starts[b.user]:  # its period rolled over meanwhile: the query was of the last
                    continue
                spent_j, spent_co2_grams = spent.get(b.user, (0.0, 0.0))
                b.spent_j, b.spent_co2_grams = spent_j + b.added_j, spent_co2_grams + b.added_co2_grams

    def add(self, user: str, joules: float, co2_grams: float) -> None:
        budgets = self._budgets.get(user)
        if budgets is None:
            return
        for b in budgets:
            self._roll(b)
            b.spent_j += joules
            b.spent_co2_grams += co2_grams
            b.added_j += joules
            b.added_co2_grams += co2_grams

    def check(self, user: str) -> None:
        """Raise BudgetExceeded (429) when the user is at or over a limit of any of their budgets
        (named: the one that stays spent longest, with its reset as Retry-After)."""
        budgets = self._budgets.get(user)
        if budgets is None:
            return
        exceeded: BudgetExceeded | None = None
        for b in budgets:  # shortest period first: a longer one that is spent too is named instead
            self._roll(b)
            if b.kwh is not None and b.spent_j / JOULES_PER_KWH >= b.kwh:
                exceeded = self._exceeded(b, f"{b.kwh:g} kWh", f"{b.spent_j / JOULES_PER_KWH:.6g} kWh")
            elif b.co2_grams is not None and b.spent_co2_grams >= b.co2_grams:
                exceeded = self._exceeded(b, f"{b.co2_grams:g} gCO2e", f"{b.spent_co2_grams:.6g} gCO2e")
        if exceeded is not None:
            raise exceeded

    def remaining_kwh(self) -> dict[str, float]:
        """kWh each user with a kWh budget may still spend: the least any of their budgets leaves.
        Read-only (the metrics render it on a thread of their own): a period that has ended counts as
        rolled over without being rolled here."""
        out: dict[str, float] = {}
        now = self._clock()
        for user, budgets in self._budgets.items():
            for b in budgets:
                if b.kwh is None:
                    continue
                spent_j = 0.0 if b.reset is not None and now >= b.reset else b.spent_j
                left = b.kwh - spent_j / JOULES_PER_KWH
                out[user] = min(left, out.get(user, math.inf))
        return out

    def budgets(self, user: str) -> list[Budget]:
        """The user's budgets, one a period, shortest period first."""
        budgets = self._budgets.get(user, [])
        for b in budgets:
            self._roll(b)
        return list(budgets)

    def _roll(self, b: Budget) -> None:
        if b.reset is not None and self._clock() >= b.reset:
            b.start, b.reset = period_bounds(b.period, self._clock())
            b.spent_j = b.spent_co2_grams = 0.0

    def _exceeded(self, b: Budget, limit: str, spent: str) -> BudgetExceeded:
        if b.reset is None:
            when = "it does not reset (a total budget); ask an admin to raise it"
            retry = TOTAL_RETRY_AFTER_S
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
