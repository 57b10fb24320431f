"""Attribution arithmetic and the incremental device monitor: conservation, fairness, no negatives."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.energy.attribution import (
    Interval,
    Span,
    amortize,
    attribute,
    change_points,
    intervals_between,
    split_by_work,
    split_interval,
)
from proxy.energy.meter import SyntheticMeter
from proxy.energy.monitor import DeviceMonitor, _Job


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def close(a: float, b: float, rel: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


# -- pure functions ----------------------------------------------------------------------------


def test_single_job_gets_the_whole_interval_it_covers() -> None:
    split = split_interval(Interval(0.0, 1.0, 100.0), [Span("a", 0.0, 1.0)])
    assert split.shares_j == {"a": 100.0}
    assert split.idle_j == 0.0
    assert split.uncertainty_j == {"a": 0.0}


def test_short_job_inside_a_counter_step_gets_its_time_share_and_full_uncertainty() -> None:
    # A 10 ms job inside a 100 ms counter step: not 0 J, but 10% of the step, uncertain by all of it.
    split = split_interval(Interval(0.0, 0.1, 20.0), [Span("a", 0.04, 0.05)])
    assert close(split.shares_j["a"], 2.0)
    assert close(split.idle_j, 18.0)
    assert close(split.uncertainty_j["a"], 2.0)


def test_overlapping_jobs_share_by_work_rate() -> None:
    # a: 2 work units over [0, 2]; b: 1 unit over [1, 2]. In [1, 2] rates are 1/s and 1/s -> equal.
    split = split_interval(Interval(0.0, 2.0, 40.0), [Span("a", 0.0, 2.0, 2.0), Span("b", 1.0, 2.0, 1.0)])
    assert close(split.shares_j["a"], 30.0)
    assert close(split.shares_j["b"], 10.0)
    assert close(split.idle_j, 0.0)


def test_change_points_keep_first_observation_of_each_value() -> None:
    samples = [(0.0, 0.0), (0.02, 0.0), (0.04, 0.0), (0.1, 5.0), (0.12, 5.0), (0.2, 9.0)]
    assert change_points(samples, continuous=False) == [(0.0, 0.0), (0.1, 5.0), (0.2, 9.0)]
    assert change_points(samples, continuous=True) == samples


def test_split_by_work_is_exact_and_proportional() -> None:
    parts = split_by_work(10.0, [1.0, 2.0, 7.0])
    assert parts == pytest.approx([1.0, 2.0, 7.0])
    assert sum(parts) == 10.0
    assert split_by_work(9.0, [0.0, 0.0, 0.0]) == [3.0, 3.0, 3.0]


def test_amortize_in_proportion_to_energy() -> None:
    assert amortize(6.0, {"a": 1.0, "b": 2.0}) == pytest.approx({"a": 2.0, "b": 4.0})


times = st.floats(min_value=0.0, max_value=10.0, allow_nan=False)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[Interval], list[Span]]:
    cuts = sorted(set(draw(st.lists(times, min_size=2, max_size=12))))
    if len(cuts) < 2:
        cuts = [0.0, 1.0]
    energies = draw(st.lists(st.floats(0.0, 500.0), min_size=len(cuts) - 1, max_size=len(cuts) - 1))
    readings, e = [(cuts[0], 0.0)], 0.0
    for t, de in zip(cuts[1:], energies, strict=True):
        e += de
        readings.append((t, e))
    spans = []
    for i in range(draw(st.integers(0, 6))):
        a, b = sorted((draw(times), draw(times)))
        spans.append(Span(i, a, b, draw(st.floats(0.0, 100.0))))
    return intervals_between(readings), spans


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_conservation_no_negatives_and_bounded_uncertainty(layout: tuple[list[Interval], list[Span]]) -> None:
    intervals, spans = layout
    split = attribute(intervals, spans)
    metered = sum(i.energy_j for i in intervals)
    assert close(split.total_j, metered)
    assert split.idle_j >= -1e-9 * max(metered, 1.0)
    assert all(v >= 0.0 for v in split.shares_j.values())
    assert all(0.0 <= split.uncertainty_j[k] <= split.shares_j[k] + 1e-9 for k in split.shares_j)


@settings(max_examples=200, deadline=None)
@given(st.floats(0.0, 1e6), st.integers(1, 16), st.floats(0.1, 1e4))
def test_homogeneous_batch_members_get_equal_shares(energy_j: float, n: int, units: float) -> None:
    parts = split_by_work(energy_j, [units] * n)
    assert close(sum(parts), energy_j)
    assert all(close(p, energy_j / n, rel=1e-9) for p in parts)


# -- the incremental monitor --------------------------------------------------------------------


def _monitor(
    clock: FakeClock, policy: str = "separate", period: float = 0.0, commits: list | None = None
) -> DeviceMonitor:
    meter = SyntheticMeter("cpu", idle_watts=10.0, busy_watts=110.0, update_period_s=period, clock=clock)

    def on_commit(device: str, idle_j: float, charges: object) -> None:
        if commits is not None:
            commits.append((idle_j, list(charges)))  # type: ignore[call-overload]

    m = DeviceMonitor(meter, idle_policy=policy, clock=clock, on_commit=on_commit, max_finalize_delay_s=0.5)  # type: ignore[arg-type]
    m._sample()
    return m


def test_monitor_charges_busy_energy_to_members_and_idle_to_no_one() -> None:
    clock = FakeClock()
    commits: list = []
    m = _monitor(clock, commits=commits)
    clock.advance(2.0)  # idle: 20 J
    job = m.begin()
    clock.advance(1.0)  # busy: 110 J
    m.end(job, [("r1", 1.0), ("r2", 3.0)])
    charges = job.result.result(timeout=1)
    assert close(charges["r1"].joules, 27.5) and close(charges["r2"].joules, 82.5)
    assert charges["r1"].measurement == "synthetic" and charges["r1"].uncertainty_joules == 0.0
    assert close(m.committed_idle_j, 20.0)
    assert close(m.committed_idle_j + m.committed_attributed_j, m.processed_j)


def test_monitor_amortize_charges_preceding_idle_to_the_next_job() -> None:
    clock = FakeClock()
    m = _monitor(clock, policy="amortize")
    clock.advance(2.0)
    job = m.begin()
    clock.advance(1.0)
    m.end(job, [("r1", 1.0)])
    charge = job.result.result(timeout=1)["r1"]
    assert close(charge.joules, 130.0) and close(charge.idle_joules, 20.0)
    assert m.committed_idle_j == 0.0


@pytest.mark.parametrize("ticks", [False, True])
def test_monitor_amortize_charges_only_a_window_of_idle(ticks: bool) -> None:
    """Under amortize a job takes the idle energy of at most `amortize_window_s` before its start (by
    time); older idle is idle, committed by the sampler's ticks as it ages (the device's counter moves
    while it idles) or at the job's commit."""
    clock = FakeClock()
    meter = SyntheticMeter("cpu", idle_watts=10.0, busy_watts=110.0, clock=clock)
    m = DeviceMonitor(meter, idle_policy="amortize", amortize_window_s=1.0, clock=clock)
    m._sample()
    clock.advance(5.0)  # 50 J idle
    if ticks:
        with m._lock:
            m._insert_locked(m._read())
            finished = m._advance_locked(commit_idle=True)  # what the sampler thread does
        m._resolve(finished)
        assert close(m.committed_idle_j, 40.0)  # all but the last second's
    clock.advance(1.0)  # 10 J more
    job = m.begin()
    clock.advance(1.0)  # 110 J busy
    m.end(job, [("r1", 1.0)])
    charge = job.result.result(timeout=1)["r1"]
    assert close(charge.idle_joules, 10.0) and close(charge.joules, 120.0)  # the second before it
    assert close(m.committed_idle_j, 50.0)
    assert close(m.committed_idle_j + m.committed_attributed_j, m.processed_j)


def test_stepped_counter_short_job_is_not_zero_and_waits_for_the_next_update() -> None:
    clock = FakeClock(0.0)
    m = _monitor(clock, period=0.1)
    clock.advance(0.02)
    m.sample()
    clock.advance(0.01)
    job = m.begin()  # t = 0.03
    clock.advance(0.01)
    m.end(job, [("r", 1.0)])  # t = 0.04: the counter has not moved since 0.0
    assert not job.result.done()
    clock.advance(0.07)  # t = 0.11: counter updated at 0.1
    m.sample()
    charge = job.result.result(timeout=1)["r"]
    assert charge.joules > 0.0
    assert charge.uncertainty_joules == pytest.approx(charge.joules)


def test_forced_finalization_when_the_counter_does_not_move() -> None:
    clock = FakeClock(0.0)
    meter = SyntheticMeter("cpu", idle_watts=0.0, busy_watts=0.0, update_period_s=0.1, clock=clock)
    m = DeviceMonitor(meter, clock=clock, max_finalize_delay_s=0.5)
    m.start()
    try:
        job = m.begin()
        m.end(job, [("r", 1.0)])
        clock.advance(1.0)
        assert job.result.result(timeout=2)["r"].joules == 0.0
    finally:
        m.stop()


class TickingClock(FakeClock):
    """Moves `tick` s at every read once `ticking` (the monitor's polls at stop read it)."""

    def __init__(self, t: float, tick: float) -> None:
        super().__init__(t)
        self.tick, self.ticking = tick, False

    def __call__(self) -> float:
        if self.ticking:
            self.t += self.tick
        return self.t


@pytest.mark.parametrize("idle_watts", [0.0, 10.0])
def test_stop_reads_the_step_that_shows_the_last_jobs_tail(idle_watts: float) -> None:
    """The job ends just after an update of a 0.1 s counter: its end read is a change point (final at
    once, with the energy up to that update) and its last 50 ms of busy power show at the next update.
    A server stopping then must still read that update: without it the ledger lacks 5 J here."""
    clock = TickingClock(0.0, tick=0.01)
    meter = SyntheticMeter("cpu", idle_watts=idle_watts, busy_watts=100.0, update_period_s=0.1, clock=clock)
    m = DeviceMonitor(meter, clock=clock, sample_period_s=60.0)
    m.start()
    clock.advance(0.15)
    job = m.begin()
    clock.advance(0.1)  # t = 0.25; the counter shows t = 0.2
    m.end(job, [("r", 1.0)])
    assert job.result.done()  # final at once: its end read is a change point
    clock.ticking = True
    m.stop()
    assert clock.t < 0.25 + 0.16  # polled until the update at 0.3 was read, not longer
    assert m.meter_delta_j == pytest.approx(100.0 * 0.1 + idle_watts * 0.2)  # the whole busy 0.1 s
    assert close(m.committed_attributed_j + m.committed_idle_j, m.meter_delta_j)


class _BlockingStepped(SyntheticMeter):
    """A stepped synthetic meter whose reads count as blocking (NVML's): no boundary reads it."""

    blocking_reads = True


@pytest.mark.parametrize("idle_watts", [0.0, 10.0])
def test_stop_waits_for_a_step_after_a_reading_taken_after_the_last_job(idle_watts: float) -> None:
    """A job's boundaries are the clock's (a meter whose reads block). The first reading after its
    end shows a change, but from the counter's update at 0.2, before the end at 0.25: that change
    lacks the job's last 50 ms. Stopping, the monitor must wait for the update at 0.3 (a change since
    a reading taken after the end), or the ledger lacks 5 J of busy power here."""
    clock = TickingClock(0.0, tick=0.01)
    meter = _BlockingStepped("cpu", idle_watts=idle_watts, busy_watts=100.0, update_period_s=0.1, clock=clock)
    m = DeviceMonitor(meter, clock=clock, sample_period_s=60.0)
    m.sample()  # no sampler thread: every reading is this test's
    clock.advance(0.15)
    job = m.begin()
    clock.advance(0.1)  # t = 0.25; the counter shows t = 0.2
    m.end(job, [("r", 1.0)])
    clock.advance(0.01)
    m.sample()  # t = 0.26: the update of 0.2, first read now
    assert job.result.done()  # a change point past its end
    clock.ticking = True
    m.stop()
    assert clock.t < 0.25 + 0.16  # polled until the update at 0.3 was read, not longer
    assert m.meter_delta_j == pytest.approx(100.0 * 0.1 + idle_watts * 0.2)  # the whole busy 0.1 s
    assert close(m.committed_attributed_j + m.committed_idle_j, m.meter_delta_j)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.0, 0.3), st.floats(0.0, 0.3), st.integers(1, 4)), min_size=1, max_size=8),
    st.sampled_from([0.0, 0.05, 0.1]),
    st.sampled_from(["separate", "amortize"]),
)
def test_monitor_conserves_energy_over_any_job_sequence(
    jobs: list[tuple[float, float, int]], period: float, policy: str
) -> None:
    clock = FakeClock(0.0)
    m = _monitor(clock, policy=policy, period=period)
    handles = []
    for gap, length, members in jobs:
        clock.advance(gap)
        m.sample()
        h = m.begin()
        clock.advance(length)
        m.end(h, [((len(handles), i), 1.0) for i in range(members)])
        handles.append(h)
    clock.advance(0.5)
    m.stop()
    total = sum(c.joules for h in handles for c in h.result.result(timeout=1).values())
    assert all(c.joules >= 0 for h in handles for c in h.result.result().values())
    metered = m.meter.read().energy_j
    assert close(total + m.committed_idle_j, m.processed_j)
    assert m.processed_j <= metered + 1e-9
    for h in handles:
        shares = [c.joules for c in h.result.result().values()]
        assert all(close(s, shares[0]) for s in shares)


def test_split_continues_a_job_without_gap_and_conserves() -> None:
    clock = FakeClock()
    m = _monitor(clock)
    first = m.begin()
    clock.advance(1.0)
    second = m.split(first, [("stream", 1.0)])
    assert second.start_s == clock.t
    clock.advance(2.0)
    m.end(second, [("stream", 1.0)])
    a, b = first.result.result(timeout=1)["stream"], second.result.result(timeout=1)["stream"]
    assert close(a.joules, 110.0) and close(b.joules, 220.0)
    assert close(a.joules + b.joules + m.committed_idle_j, m.processed_j)


class _CountingMeter(SyntheticMeter):
    """A stepped synthetic meter (200 ms updates) that counts its reads."""

    def __init__(self) -> None:
        super().__init__("cpu", update_period_s=0.2)
        self.reads = 0

    def read(self):  # type: ignore[no-untyped-def]
        self.reads += 1
        return super().read()


def test_a_running_job_keeps_the_sampler_at_its_period() -> None:
    meter = _CountingMeter()
    m = DeviceMonitor(meter, sample_period_s=30.0, finalize_poll_s=0.002)
    m.start()
    try:
        job = m.begin()
        reads = meter.reads
        time.sleep(0.1)
        assert meter.reads == reads
        m.end(job, [("r", 1.0)])
    finally:
        m.stop()


def test_an_ended_job_waiting_for_the_counter_on_an_idle_device_is_polled_fast() -> None:
    meter = _CountingMeter()
    m = DeviceMonitor(meter, sample_period_s=30.0, finalize_poll_s=0.002)
    m.start()
    try:
        job = m.begin()
        m.end(job, [("r", 1.0)])  # within one counter step: its energy is known at the next update
        # With the sampler's 30 s period alone this would time out; the counter updates every 200 ms.
        charge = job.result.result(timeout=5.0)["r"]
        assert charge.joules > 0.0
        polls = meter.reads
        time.sleep(0.1)  # nothing waits any more: back to the 30 s period
        assert meter.reads == polls
    finally:
        m.stop()


def test_finalize_poll_must_be_positive() -> None:
    with pytest.raises(ValueError, match="finalize_poll_s"):
        DeviceMonitor(SyntheticMeter("cpu"), finalize_poll_s=0.0)


def test_overlapping_jobs_share_the_device_time_instead_of_each_taking_all_of_it() -> None:
    clock = FakeClock()
    m = _monitor(clock)
    clock.advance(1.0)
    first = m.begin()  # t = 1.0
    clock.advance(0.5)
    second = m.begin()  # t = 1.5: both in flight, as in proxy mode
    clock.advance(0.5)
    m.end(first, [("a", 1.0)])  # t = 2.0
    clock.advance(0.5)
    m.end(second, [("b", 1.0)])  # t = 2.5
    clock.advance(0.1)
    m.sample()
    a = first.result.result(timeout=1)["a"]
    b = second.result.result(timeout=1)["b"]
    assert close(a.device_seconds + b.device_seconds, 1.5)  # the device was busy 1.5 s, not 2 s
    assert a.device_seconds < 1.0 and b.device_seconds < 1.0


def test_a_lone_job_holds_the_device_for_its_whole_duration() -> None:
    clock = FakeClock()
    m = _monitor(clock, period=0.1)
    clock.advance(0.33)
    job = m.begin()
    clock.advance(0.77)
    m.end(job, [("a", 1.0), ("b", 3.0)])
    clock.advance(0.2)
    m.sample()
    charges = job.result.result(timeout=1)
    assert close(charges["a"].device_seconds + charges["b"].device_seconds, 0.77)
    assert close(charges["b"].device_seconds, 3 * charges["a"].device_seconds)


def _open_job_shares_by_definition(spans: list[Span], a: float, b: float) -> bool:
    """Some open job shares part of [a, b] with another job (quadratic, by the definition)."""
    return any(
        any(s.key != o.key and s.start_s < b and s.end_s > max(a, o.start_s) for s in spans)
        for o in spans
        if o.end_s == math.inf and o.start_s < b
    )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.one_of(st.integers(0, 10), st.none())), min_size=0, max_size=8),
    st.integers(0, 20),
    st.integers(0, 10),
)
def test_open_job_sharing_check_matches_its_definition(
    raw: list[tuple[int, int | None]], a: int, width: int
) -> None:
    """The monitor's check (which relies on its jobs being in start order) against the definition."""
    m = DeviceMonitor(SyntheticMeter("cpu"))
    spans = []
    start = 0
    for i, (gap, length) in enumerate(raw):
        start += gap
        job = _Job(key=i, start_s=float(start), end_s=None if length is None else float(start + length))
        m._jobs[i] = job
        if length is None:
            m._open[i] = job
        spans.append(Span(i, job.start_s, math.inf if job.end_s is None else job.end_s))
    b = float(a + width)
    with m._lock:
        assert m._blocked_locked(float(a), b) == _open_job_shares_by_definition(spans, float(a), b)


def test_job_charges_are_on_the_handle_and_its_future_whenever_it_was_asked_for() -> None:
    clock = FakeClock()
    m = _monitor(clock)
    asked_late, asked_early = m.begin(), m.begin()
    waiting = asked_early.result  # a future asked for before the job is final
    clock.advance(1.0)
    m.end(asked_late, [("a", 1.0)])
    m.end(asked_early, [("b", 1.0)])
    assert asked_late.charges is not None and asked_early.charges is not None
    assert waiting.done() and waiting.result() is asked_early.charges
    assert asked_late.result.result(timeout=0) is asked_late.charges  # made already resolved
    assert close(asked_late.charges["a"].joules + asked_early.charges["b"].joules, 110.0)


class _LoggingMeter(SyntheticMeter):
    """Records every reading it returns."""

    def __init__(self, clock: FakeClock, period: float) -> None:
        super().__init__("cpu", idle_watts=10.0, busy_watts=110.0, update_period_s=period, clock=clock)
        self.readings: list[tuple[float, float]] = []

    def read(self):  # type: ignore[no-untyped-def]
        reading = super().read()
        self.readings.append((reading.t_s, reading.energy_j))
        return reading


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.0, 0.3), st.floats(0.0, 0.3), st.integers(1, 3)), min_size=1, max_size=8),
    st.sampled_from([0.0, 0.05, 0.1]),
)
def test_incremental_monitor_agrees_with_the_reference_attribution(
    jobs: list[tuple[float, float, int]], period: float
) -> None:
    """The monitor (with its one-job shortcuts) charges each job what `attribute` gives it over the
    same change points, uncertainty included."""
    clock = FakeClock(0.0)
    meter = _LoggingMeter(clock, period)
    m = DeviceMonitor(meter, clock=clock, max_finalize_delay_s=0.5)
    m.sample()
    handles = []
    for gap, length, members in jobs:
        clock.advance(gap)
        m.sample()
        h = m.begin()
        clock.advance(length)
        m.end(h, [((len(handles), i), 1.0) for i in range(members)])
        handles.append((h, members))
    clock.advance(0.5)
    m.stop()
    points = change_points(meter.readings, continuous=period == 0.0)
    if meter.readings[-1][0] > points[-1][0]:
        points.append(meter.readings[-1])  # stop() takes the last reading as a change point
    spans = []
    for key, (h, members) in enumerate(handles):
        end_s = next(iter(h.charges.values())).end_s
        spans.append(Span(key, h.start_s, end_s, float(members)))
    reference = attribute(intervals_between(points), spans)
    for key, (h, _) in enumerate(handles):
        charged = list(h.charges.values())
        scale = max(reference.total_j, 1.0)
        assert abs(sum(c.joules for c in charged) - reference.shares_j[key]) <= 1e-9 * scale
        assert abs(sum(c.uncertainty_joules for c in charged) - reference.uncertainty_j[key]) <= 1e-9 * scale


def test_uncertainty_is_never_negative_when_rounding_gives_a_span_a_hair_more_than_the_interval() -> None:
    # found by hypothesis: the second span's share rounds to 1.0000000000000002e-06 of 1e-06 J
    spans = [Span(0, 0.0, 1 / 3, 0.0), Span(1, 7.235784828053574e-117, 1.0, 1.0)]
    split = split_interval(Interval(0.0, 0.96875, 1e-6), spans)
    assert split.shares_j[1] > 1e-6  # the rounding this is about
    assert all(0.0 <= split.uncertainty_j[k] <= split.shares_j[k] for k in split.shares_j)


def test_overlapping_jobs_split_their_shared_time_by_work_rate() -> None:
    clock = FakeClock()
    m = _monitor(clock)
    clock.advance(1.0)
    first = m.begin()  # [1.0, 2.0], 1 unit of work: rate 1/s
    clock.advance(0.5)
    second = m.begin()  # [1.5, 2.5], 3 units: rate 3/s
    clock.advance(0.5)
    m.end(first, [("a", 1.0)])
    clock.advance(0.5)
    m.end(second, [("b", 3.0)])
    clock.advance(0.1)
    m.sample()
    a = first.result.result(timeout=1)["a"]
    b = second.result.result(timeout=1)["b"]
    # [1.0, 1.5] is the first's, [2.0, 2.5] the second's, [1.5, 2.0] shared 1:3
    assert close(a.device_seconds, 0.5 + 0.5 * 0.25)
    assert close(b.device_seconds, 0.5 * 0.75 + 0.5)


# -- meters whose reads block (NVML) ------------------------------------------------------------


class _GatedMeter(SyntheticMeter):
    """A synthetic meter whose reads block like NVML's, and can be held inside a read."""

    blocking_reads = True

    def __init__(self, clock: FakeClock) -> None:
        super().__init__("cuda:0", idle_watts=10.0, busy_watts=110.0, clock=clock)
        self.gate = threading.Event()
        self.gate.set()
        self.stuck = threading.Event()  # set by a read that found the gate closed (and waits at it)
        self.reads = 0

    def read(self):  # type: ignore[no-untyped-def]
        self.reads += 1
        if not self.gate.is_set():
            self.stuck.set()
        assert self.gate.wait(10)
        return super().read()


def test_a_job_starting_on_an_idle_device_wakes_the_sampler_but_a_loops_does_not() -> None:
    """A device thread's job start on a blocking meter reads nothing itself and wakes the sampler to
    read at once (a counter step that ended while the device was idle is then read as idle, not spread
    over the job's first milliseconds); an event loop's (proxy mode: a start a request) does not."""
    clock = FakeClock()
    meter = _GatedMeter(clock)
    m = DeviceMonitor(meter, clock=clock, sample_period_s=60.0)  # no tick of its own during the test
    m.start()
    try:
        time.sleep(0.05)  # the sampler thread is waiting out its period
        reads = meter.reads
        looped = m.begin(on_loop=True)
        time.sleep(0.2)
        assert meter.reads == reads  # nothing read: neither the loop nor the sampler
        clock.advance(1.0)
        m.end(looped, [("a", 1.0)])
        deadline = time.monotonic() + 5  # (the end wakes it: the device is idle with a job to finalize)
        while meter.reads == reads and time.monotonic() < deadline:
            time.sleep(0.005)
        assert looped.result.result(timeout=5)
        reads = meter.reads
        clock.advance(1.0)
        job = m.begin()  # a device thread's
        deadline = time.monotonic() + 5
        while meter.reads == reads and time.monotonic() < deadline:
            time.sleep(0.005)
        assert meter.reads > reads  # the sampler's read, woken by the start
        clock.advance(1.0)
        m.end(job, [("b", 1.0)])
    finally:
        m.stop()
    assert math.isclose(job.result.result(timeout=5)["b"].joules, 110.0, rel_tol=1e-9)


def test_the_lock_is_not_held_while_the_meter_reads() -> None:
    """A boundary from an event loop neither reads a blocking meter nor waits for a read in progress
    (an NVML read takes milliseconds: the loop would stall on every request)."""
    clock = FakeClock()
    meter = _GatedMeter(clock)
    m = DeviceMonitor(meter, clock=clock, sample_period_s=0.001)
    m.start()
    try:
        meter.gate.clear()
        assert meter.stuck.wait(5)  # the sampler thread is now stuck inside a read
        reads = meter.reads
        done = threading.Event()
        handles = []

        def boundaries() -> None:
            job = m.begin(on_loop=True)
            clock.advance(1.0)
            m.end(job, [("r", 1.0)])
            handles.append(job)
            done.set()

        threading.Thread(target=boundaries, daemon=True).start()
        assert done.wait(5), "begin/end waited for the sampler's read"
        assert meter.reads == reads  # and read nothing themselves
        assert handles[0].charges is None  # final only once a reading after its end is processed
    finally:
        meter.gate.set()
        m.stop()
    charge = handles[0].result.result(timeout=5)["r"]
    # 1 s of the job: 110 J busy, placed by the readings around it (the busy profile starts at begin)
    assert math.isclose(charge.joules + m.committed_idle_j, m.meter_delta_j, rel_tol=1e-12)
    assert math.isclose(charge.joules, 110.0, rel_tol=1e-9)


def test_stale_readings_from_another_thread_add_nothing() -> None:
    """A reading that reaches the timeline after a later one (reads run outside the lock) is dropped
    and stands for the latest instant: time and energy on the timeline never go back."""
    clock = FakeClock()
    m = _monitor(clock)
    clock.advance(1.0)
    early = m.meter.read()
    clock.advance(1.0)
    m.sample()
    with m._lock:
        assert m._insert_locked(early) == m._latest[0] == early.t_s + 1.0  # type: ignore[index]
    times = [t for t, _ in m._points]
    energies = [e for _, e in m._points]
    assert times == sorted(times) and energies == sorted(energies)
    m.stop()
    assert math.isclose(m.committed_idle_j, m.meter_delta_j, rel_tol=1e-12)
    assert math.isclose(m.meter_delta_j, 20.0, rel_tol=1e-9)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0.0, 0.2),  # gap after the previous job's start
            st.floats(0.0, 0.5),  # length
            st.lists(st.sampled_from([0.0, 1.0, 3.0]), min_size=1, max_size=3),  # members' work units
            st.one_of(st.none(), st.floats(0.0, 1.0)),  # where in it a stream is cut into two pieces
            st.booleans(),  # its boundaries come from an event loop (else from a device worker's thread)
        ),
        min_size=1,
        max_size=10,
    ),
    st.sampled_from([0.0, 0.05, 0.1]),
    st.sampled_from([0.02, 0.07, 0.3]),
    st.booleans(),
)
def test_overlapping_jobs_get_what_the_reference_attribution_gives_them(
    jobs: list[tuple[float, float, list[float], float | None, bool]],
    period: float,
    sample_every_s: float,
    blocking: bool,
) -> None:
    """Many jobs in flight at once (proxy mode), some cut into pieces (`split`, as streams are), with
    readings at their boundaries or (a meter whose reads block, from an event loop) only the
    sampler's, the two mixed on one device: each piece's joules and uncertainty are what `attribute`
    gives it over the same change points, and the books close."""
    clock = FakeClock(0.0)
    meter = _LoggingMeter(clock, period)
    meter.blocking_reads = blocking
    m = DeviceMonitor(meter, clock=clock, max_finalize_delay_s=0.5)
    m.sample()
    # (time, order, job) with, at one instant: ends, cuts, starts, ends of zero-length jobs, samples
    events: list[tuple[float, int, int]] = []
    t = 0.0
    for i, (gap, length, _, cut, _) in enumerate(jobs):
        t += gap
        end = t + length
        events += [(t, 2, i), (end, 0 if end > t else 3, i)]
        if cut is not None and t < t + length * cut < end:
            events.append((t + length * cut, 1, i))
    horizon = max(e[0] for e in events)
    events += [(k * sample_every_s, 4, -1) for k in range(1, int(horizon / sample_every_s) + 1)]
    handles: dict[int, Any] = {}
    pieces: list[tuple[Any, float]] = []  # (handle, weight) of every closed piece
    for when, kind, i in sorted(events):
        clock.t = max(clock.t, when)
        if kind == 4:
            m.sample()
        elif kind == 2:
            handles[i] = m.begin(on_loop=jobs[i][4])
        else:
            members = [((i, len(pieces), j), w) for j, w in enumerate(jobs[i][2])]
            work = sum(jobs[i][2])
            pieces.append((handles[i], work if work > 0 else 1.0))
            if kind == 1:
                handles[i] = m.split(handles[i], members)
            else:
                m.end(handles[i], members)
    clock.advance(0.5)
    m.stop()
    points = change_points(meter.readings, continuous=period == 0.0)
    if meter.readings[-1][0] > points[-1][0]:
        points.append(meter.readings[-1])
    spans = []
    charged = {}
    for key, (h, weight) in enumerate(pieces):
        charged[key] = list(h.result.result(timeout=1).values())
        spans.append(Span(key, h.start_s, charged[key][0].end_s, weight))
    reference = attribute(intervals_between(points), spans)
    scale = max(reference.total_j, 1.0)
    for key, charges in charged.items():
        assert abs(sum(c.joules for c in charges) - reference.shares_j[key]) <= 1e-9 * scale
        assert abs(sum(c.uncertainty_joules for c in charges) - reference.uncertainty_j[key]) <= 1e-9 * scale
        assert all(c.joules >= 0 and 0 <= c.uncertainty_joules <= c.joules + 1e-12 for c in charges)
    total = sum(c.joules for cs in charged.values() for c in cs)
    assert abs(total + m.committed_idle_j - m.processed_j) <= 1e-9 * scale
    assert abs(reference.idle_j - m.committed_idle_j) <= 1e-9 * scale


def test_a_job_ending_where_another_begins_is_final_at_once() -> None:
    """Two boundaries at one instant, the other job's start queued first (clock ties): the ended job
    is final when it ends, not at the next reading."""
    clock = FakeClock()
    m = _monitor(clock)
    first = m.begin()
    clock.advance(1.0)
    second = m.begin()  # t = 1.0
    m.end(first, [("a", 1.0)])  # t = 1.0 too
    assert first.charges is not None and close(first.charges["a"].joules, 110.0)
    assert second.charges is None
    clock.advance(1.0)
    m.end(second, [("b", 1.0)])
    assert second.charges is not None and close(second.charges["b"].joules, 110.0)
    assert close(220.0 + m.committed_idle_j, m.processed_j)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.0, 0.1), st.floats(0.0, 1.0), st.booleans()), min_size=2, max_size=12),
    st.sampled_from([0.0, 0.05]),
    st.booleans(),
)
def test_a_timeline_compacted_under_many_open_jobs_still_conserves(
    jobs: list[tuple[float, float, bool]], period: float, blocking: bool
) -> None:
    """With a long job open, readings pile up unprocessed; past `max_points` the monitor merges those
    that no job boundary needs. The books still close and no charge is negative or over-certain."""
    clock = FakeClock(0.0)
    meter = _LoggingMeter(clock, period)
    meter.blocking_reads = blocking
    m = DeviceMonitor(meter, clock=clock, max_finalize_delay_s=0.5, max_points=6)
    m.sample()
    events: list[tuple[float, int, int]] = []
    t = 0.0
    for i, (gap, length, _) in enumerate(jobs):
        t += gap
        end = t + length
        events += [(t, 1, i), (end, 0 if end > t else 2, i)]
    horizon = max(e[0] for e in events)
    events += [(k * 0.01, 3, -1) for k in range(1, int(horizon / 0.01) + 1)]  # many readings
    handles: dict[int, Any] = {}
    for when, kind, i in sorted(events):
        clock.t = max(clock.t, when)
        if kind == 3:
            m.sample()
        elif kind == 1:
            handles[i] = m.begin(on_loop=True)
        else:
            m.end(handles[i], [(i, 2.0 if jobs[i][2] else 0.0)])
    clock.advance(0.5)
    m.stop()
    charges = [h.result.result(timeout=1)[i] for i, h in handles.items()]
    assert all(c.joules >= 0 and 0 <= c.uncertainty_joules <= c.joules + 1e-12 for c in charges)
    total = sum(c.joules for c in charges)
    assert math.isclose(total + m.committed_idle_j, m.processed_j, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(m.processed_j, m.meter_delta_j, rel_tol=1e-9, abs_tol=1e-9)


@settings(max_examples=120, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0.0, 0.6),  # idle before it
            st.floats(0.0, 0.3),  # length
            st.lists(st.sampled_from([0.0, 1.0, 2.5]), min_size=1, max_size=3),  # members' work units
            st.booleans(),  # a sampler reading while it runs
            st.booleans(),  # a sampler reading before it starts
        ),
        min_size=1,
        max_size=8,
    ),
    st.sampled_from(["separate", "amortize"]),
    st.sampled_from([60.0, 0.25]),  # amortize_window_s: idle before a job longer than it, or not
)
def test_the_lone_job_shortcuts_agree_with_the_sweep(
    jobs: list[tuple[float, float, list[float], bool, bool]], policy: str, window: float
) -> None:
    """`begin` on an idle device and `end` of the only job (a continuous meter) skip the sweep: a
    monitor with those shortcuts turned off, fed the same readings, commits the same charges, idle
    and totals (sampler readings before and inside some jobs make the shortcuts refuse there)."""

    def run(shortcuts: bool) -> tuple[list[dict[Any, Any]], DeviceMonitor]:
        clock = FakeClock(0.0)
        m = DeviceMonitor(
            SyntheticMeter("cuda:0", clock=clock),  # type: ignore[arg-type]
            clock=clock,
            idle_policy=policy,
            amortize_window_s=window,
        )
        if not shortcuts:
            m._idle_start_locked = lambda reading: False  # type: ignore[method-assign]
            m._end_alone_locked = lambda *args: None  # type: ignore[method-assign]
        m.sample()
        charges = []
        for n, (gap, length, units, mid_sample, pre_sample) in enumerate(jobs):
            clock.advance(gap)
            if pre_sample:
                m.sample()
            h = m.begin()
            clock.advance(length / 2)
            if mid_sample:
                m.sample()
            clock.advance(length / 2)
            m.end(h, [((n, i), w) for i, w in enumerate(units)])
            charges.append(h.result.result(timeout=1))
        clock.advance(0.1)
        m.stop()
        return charges, m

    fast, m_fast = run(True)
    slow, m_slow = run(False)
    scale = max(m_slow.processed_j, 1.0)
    for a, b in zip(fast, slow, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            x, y = a[key], b[key]
            assert abs(x.joules - y.joules) <= 1e-9 * scale
            assert abs(x.idle_joules - y.idle_joules) <= 1e-9 * scale
            assert abs(x.uncertainty_joules - y.uncertainty_joules) <= 1e-9 * scale
            assert abs(x.device_seconds - y.device_seconds) <= 1e-9
            assert (x.start_s, x.end_s, x.measurement, x.device) == (
                y.start_s,
                y.end_s,
                y.measurement,
                y.device,
            )
    for name in ("processed_j", "committed_idle_j", "committed_attributed_j"):
        assert abs(getattr(m_fast, name) - getattr(m_slow, name)) <= 1e-9 * scale
    assert abs(m_fast.committed_idle_j + m_fast.committed_attributed_j - m_fast.processed_j) <= 1e-9 * scale


def test_the_lone_job_shortcuts_are_taken() -> None:
    """A request at a time on an idle continuous meter's device goes through both shortcuts (the
    equivalence test above would pass, uselessly, if they were never taken)."""
    clock = FakeClock(0.0)
    m = DeviceMonitor(SyntheticMeter("cuda:0", clock=clock), clock=clock)
    m.sample()
    seen = {"begin": 0, "end": 0}
    begin, end = m._idle_start_locked, m._end_alone_locked

    def counted_begin(reading: Any) -> bool:
        seen["begin"] += (ok := begin(reading))
        return ok

    def counted_end(*args: Any) -> Any:
        seen["end"] += (out := end(*args)) is not None
        return out

    m._idle_start_locked = counted_begin  # type: ignore[method-assign]
    m._end_alone_locked = counted_end  # type: ignore[method-assign]
    for _ in range(3):
        clock.advance(0.5)
        h = m.begin()
        clock.advance(1.0)
        m.end(h, [("r", 1.0)])
        assert h.charges is not None and close(h.charges["r"].joules, 300.0)  # busy_watts x 1 s
    assert seen == {"begin": 3, "end": 3}
    assert close(m.committed_idle_j, 3 * 0.5 * 50.0)  # idle_watts x the gaps


class _FailingMeter(SyntheticMeter):
    """A synthetic meter whose reads fail while `fail` is set (NVML's "GPU is lost")."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("cuda:0", idle_watts=10.0, busy_watts=110.0, **kwargs)
        self.fail = False

    def read(self) -> Any:
        from proxy.energy.meter import MeterError

        if self.fail:
            raise MeterError("GPU is lost")
        return super().read()


@pytest.mark.parametrize("update_period_s", [0.0, 0.1])  # continuous, stepped
def test_jobs_are_answered_when_the_meter_was_never_read(update_period_s: float) -> None:
    """A meter that fails from its first read: an ended job is answered after max_finalize_delay_s
    with nothing measured, `unavailable` (its waiter hung for ever)."""
    meter = _FailingMeter(update_period_s=update_period_s)
    meter.fail = True
    m = DeviceMonitor(meter, sample_period_s=0.01, finalize_poll_s=0.005, max_finalize_delay_s=0.2)
    m.start()
    try:
        h = m.begin()
        m.end(h, [("r", 1.0)])
        charge = h.result.result(timeout=10)["r"]
        assert (charge.joules, charge.measurement) == (0.0, "unavailable")
    finally:
        m.stop()


@pytest.mark.parametrize("update_period_s", [0.0, 0.1])  # continuous, stepped
def test_a_job_from_before_the_meters_first_reading_is_not_labelled_measured(update_period_s: float) -> None:
    """A meter unreadable at first that comes back before max_finalize_delay_s: the jobs that ran before
    its first good reading lie where nothing was measured, so their joules (none, or only what ran
    after that reading) are labelled `unavailable`, not `measured`; a job after it is `measured`."""
    clock = FakeClock(0.0)
    meter = _FailingMeter(clock=clock, update_period_s=update_period_s)
    meter.fail = True
    m = DeviceMonitor(meter, clock=clock, max_finalize_delay_s=5.0)  # type: ignore[arg-type]
    m.sample()  # fails: no timeline yet
    before = m.begin()
    clock.advance(0.5)
    m.end(before, [("before", 1.0)])
    straddling = m.begin()
    clock.advance(0.5)
    meter.fail = False
    m.sample()  # the first good reading
    clock.advance(0.5)
    m.end(straddling, [("straddling", 1.0)])
    after = m.begin()
    clock.advance(0.5)
    m.end(after, [("after", 1.0)])
    for _ in range(3):
        clock.advance(0.2)
        m.sample()
    m.stop()
    charges = {**before.charges, **straddling.charges, **after.charges}  # type: ignore[dict-item]
    assert {k: c.measurement for k, c in charges.items()} == {
        "before": "unavailable",
        "straddling": "unavailable",
        "after": "synthetic",  # the meter's own label
    }
    assert charges["before"].joules == 0.0 and charges["straddling"].joules > 0


@pytest.mark.parametrize("policy", ["separate", "amortize"])
def test_stop_finalizes_every_job_open_or_unreadable_and_keeps_the_books(policy: str) -> None:
    """At stop, a job nobody ended is closed at the last reading with its energy idle, and one the
    meter could not be read past is answered `unavailable`: every handle is final, and the committed
    books (charges + idle, what the metrics count) equal what the meter showed."""
    clock = FakeClock(0.0)
    meter = _FailingMeter(clock=clock)
    books = {"charged": 0.0, "idle": 0.0}

    def on_commit(device: str, idle_j: float, commits: list[tuple[Any, Any]]) -> None:
        books["idle"] += idle_j
        books["charged"] += sum(c.joules for _, c in commits)

    m = DeviceMonitor(meter, idle_policy=policy, clock=clock, on_commit=on_commit)  # type: ignore[arg-type]
    m.sample()
    clock.advance(2.0)
    left_open = m.begin()
    clock.advance(1.0)
    m.sample()
    m.stop()
    assert left_open.charges == {}
    assert math.isclose(books["charged"] + books["idle"], m.meter_delta_j, rel_tol=1e-9)
    assert m.meter_delta_j == pytest.approx(130.0)  # 2 s idle at 10 W, 1 s busy at 110 W

    clock = FakeClock(0.0)
    meter = _FailingMeter(clock=clock)
    m = DeviceMonitor(meter, idle_policy=policy, clock=clock, max_finalize_delay_s=0.2)  # type: ignore[arg-type]
    m.sample()
    h = m.begin()
    clock.advance(0.5)
    meter.fail = True  # its end cannot be read, nor anything after it
    m.end(h, [("r", 1.0)])
    clock.advance(0.5)
    m.stop()
    assert h.charges is not None and h.charges["r"].measurement == "unavailable"


def test_the_sampler_goes_on_after_a_fault_of_its_own() -> None:
    """A tick that fails other than by a meter error (a bug, a commit's bookkeeping) is logged and the
    sampler goes on: a stepped meter's ended jobs are still answered."""

    class Broken(SyntheticMeter):
        faults = 3

        def read(self) -> Any:
            if self.faults and threading.current_thread().name.startswith("sampler"):
                self.faults -= 1
                raise RuntimeError("not a MeterError")
            return super().read()

    calls = {"n": 0}

    def on_commit(device: str, idle_j: float, commits: list[Any]) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("the books failed once")

    meter = Broken("cuda:0", update_period_s=0.05)
    m = DeviceMonitor(meter, sample_period_s=0.01, finalize_poll_s=0.005, on_commit=on_commit)
    m.start()
    try:
        h = m.begin()
        time.sleep(0.05)
        m.end(h, [("r", 1.0)])
        assert h.result.result(timeout=10)["r"].joules >= 0
    finally:
        m.stop()
