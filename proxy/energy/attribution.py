"""Pure attribution arithmetic: a device's sampled energy timeline + jobs -> joules per job and idle.

No I/O, no clocks, no torch. Units: seconds (s) on one monotonic clock, joules (J).

The model. A meter gives cumulative energy samples (t, E). A stepped counter (NVML's updates every
~20-100 ms) repeats its value between updates, so only *change points* (the first sample showing a
new value) carry timing information: the energy between two change points was drawn over the time
between them and is spread uniformly over it. A continuous meter (synthetic, estimated) makes every
sample a change point, so a job bracketed by samples gets exactly the meter's difference across it.

Each interval's energy is split over the jobs ("spans") active in it. Where spans overlap, each
sub-segment is shared in proportion to the spans' work rates (weight / duration): over its life a
span receives weight x overlap / duration of the shared energy, i.e. the work it did in that window.
Energy in no span is idle. Every split closes exactly: sum(shares) + idle == interval energy.

Uncertainty: a share taken from an interval that a span covers only partly rests on the uniform-power
assumption (the counter step is coarser than the span); the span's uncertainty adds up, for each such
interval, the smaller of what it took and what it left, so a span shorter than the counter step is
uncertain by up to 100%, and one whose bracketing reads are change points has none.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise


@dataclass(slots=True)  # not frozen: built per request, and a frozen __init__ is twice as slow
class Interval:
    """Energy `energy_j` observed between two change points of a meter, [start_s, end_s]."""

    start_s: float
    end_s: float
    energy_j: float


@dataclass(slots=True)  # not frozen: built per request, and a frozen __init__ is twice as slow
class Span:
    """A job's activity on one device: [start_s, end_s] with `weight` units of work (> 0 preferred)."""

    key: Hashable
    start_s: float
    end_s: float
    weight: float = 1.0

    @property
    def rate(self) -> float:
        """Work per second; a zero-length span has no rate (it can only meet a zero-length interval)."""
        duration_s = self.end_s - self.start_s
        return self.weight / duration_s if duration_s > 0 else 0.0


@dataclass
class Split:
    """Result of attributing some intervals: joules per span key, their uncertainty, and idle joules."""

    shares_j: dict[Hashable, float] = field(default_factory=dict)
    uncertainty_j: dict[Hashable, float] = field(default_factory=dict)
    idle_j: float = 0.0

    @property
    def total_j(self) -> float:
        return sum(self.shares_j.values()) + self.idle_j

    def add(self, other: Split) -> None:
        for key, joules in other.shares_j.items():
            self.shares_j[key] = self.shares_j.get(key, 0.0) + joules
        for key, joules in other.uncertainty_j.items():
            self.uncertainty_j[key] = self.uncertainty_j.get(key, 0.0) + joules
        self.idle_j += other.idle_j


def change_points(samples: Sequence[tuple[float, float]], *, continuous: bool) -> list[tuple[float, float]]:
    """Keep the samples (t_s, energy_j) that carry timing: all of them for a continuous meter, else the
    first sample and each first observation of a new counter value. Samples must be in time order."""
    if continuous or len(samples) < 2:
        return list(samples)
    kept = [samples[0]]
    for t_s, energy_j in samples[1:]:
        if energy_j != kept[-1][1]:
            kept.append((t_s, energy_j))
    return kept


def intervals_between(points: Sequence[tuple[float, float]]) -> list[Interval]:
    """Consecutive change points -> intervals. Energy never decreases (meters guarantee it)."""
    return [Interval(t0, t1, max(e1 - e0, 0.0)) for (t0, e0), (t1, e1) in pairwise(points)]


def split_interval(interval: Interval, spans: Iterable[Span]) -> Split:
    """Share one interval's energy among the spans active in it; the rest is idle. Exact closure."""
    a, b, energy_j = interval.start_s, interval.end_s, interval.energy_j
    split = Split()
    if energy_j == 0.0:
        return split
    if b <= a:
        # A zero-length interval (two reads within the clock's resolution): give it to the spans that
        # contain the instant, by weight, else to idle.
        holders = [s for s in spans if s.start_s <= a <= s.end_s]
        _share(split, energy_j, [(s.key, s.weight) for s in holders])
        split.idle_j = energy_j - sum(split.shares_j.values())
        return split

    active = [s for s in spans if s.end_s > a and s.start_s < b]
    if not active:
        split.idle_j = energy_j
        return split
    if len(active) == 1 and active[0].start_s <= a and active[0].end_s >= b:  # the common case: one job
        split.shares_j[active[0].key] = energy_j
        split.uncertainty_j[active[0].key] = 0.0
        return split
    inner = {t for s in active for t in (s.start_s, s.end_s) if a < t < b}
    cuts = sorted({a, b, *inner})
    for u, v in pairwise(cuts):
        members = [(s.key, s.rate) for s in active if s.start_s <= u and s.end_s >= v]
        _share(split, energy_j * ((v - u) / (b - a)), members)
    split.idle_j = energy_j - sum(split.shares_j.values())

    for s in active:
        taken_j = split.shares_j.get(s.key, 0.0)
        if s.start_s > a or s.end_s < b:  # the span covers this interval only partly
            # (never below 0: the shares' rounding can leave `taken_j` a hair above `energy_j`)
            split.uncertainty_j[s.key] = max(min(taken_j, energy_j - taken_j), 0.0)
        else:
            split.uncertainty_j.setdefault(s.key, 0.0)
    return split


def _share(split: Split, energy_j: float, members: Sequence[tuple[Hashable, float]]) -> None:
    """Add `energy_j` to `members` in proportion to their weights (equal shares if all weights are 0)."""
    if not members or energy_j == 0.0:
        return
    if any(math.isinf(w) for _, w in members):  # rates of spans shorter than float resolution
        members = [(key, 1.0 if math.isinf(w) else 0.0) for key, w in members]
    total = sum(w for _, w in members)
    for key, w in members:
        part = energy_j * (w / total if total > 0 else 1.0 / len(members))
        split.shares_j[key] = split.shares_j.get(key, 0.0) + part


def attribute(intervals: Iterable[Interval], spans: Sequence[Span]) -> Split:
    """Attribute a whole timeline at once (the reference the incremental accountant must agree with)."""
    total = Split()
    for interval in intervals:
        total.add(split_interval(interval, spans))
    for s in spans:
        total.shares_j.setdefault(s.key, 0.0)
        total.uncertainty_j.setdefault(s.key, 0.0)
    return total


def split_by_work(energy_j: float, work_units: Sequence[float]) -> list[float]:
    """Split a job's energy over its members in proportion to their work units (equal if all are 0).

    The last member takes the remainder so the parts add up to `energy_j` exactly."""
    if len(work_units) <= 1:
        return [energy_j] if work_units else []
    total = sum(work_units)
    if total <= 0:
        parts = [energy_j / len(work_units)] * len(work_units)
    else:
        parts = [energy_j * (w / total) for w in work_units]
    parts[-1] = max(energy_j - sum(parts[:-1]), 0.0)
    return parts


def amortize(idle_j: float, energies_j: Mapping[Hashable, float]) -> dict[Hashable, float]:
    """Charge `idle_j` to requests in proportion to their energy (equally if all have none)."""
    keys = list(energies_j)
    parts = split_by_work(idle_j, [energies_j[k] for k in keys])
    return dict(zip(keys, parts, strict=True))
