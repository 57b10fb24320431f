"""Per-device energy bookkeeping: a background sampler, job spans, incremental attribution.

One `DeviceMonitor` per device. It reads the device's meter from a sampler thread (every
`sample_period_s`) and around every job (`begin`/`end`, called by the device worker after the device
is synchronized; proxy mode's event loop reads no meter whose reads block, see `begin`), keeps the
unprocessed part of the timeline, and attributes each interval by the rule of
`attribution.split_interval` as soon as every job it touches has ended, with a sweep that costs O(1)
a job boundary however many jobs are in flight (see `_advance_locked`). A job is finalized once a
change point at or after its end has been processed (for a stepped counter: the next counter update,
at most `max_finalize_delay_s` later), and its members get their `Charge` on its handle.

Conservation, per device, at every commit: sum(committed charges) + committed idle == meter energy
processed so far. `on_commit` sees each commit atomically (it runs under the monitor's lock), so a
metrics snapshot built from commits always satisfies the identity.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from proxy.energy.attribution import amortize, split_by_work
from proxy.energy.meter import EnergyMeter, MeterError, Reading

log = logging.getLogger(__name__)

IdlePolicy = Literal["separate", "amortize"]


@dataclass(slots=True)  # not frozen: built per request, and a frozen __init__ is twice as slow
class Charge:
    """What one request is charged for one job. Units: J, s."""

    joules: float  # its share of the job's energy, plus amortized idle under `amortize`
    idle_joules: float  # the amortized idle part of `joules` (0 under `separate`)
    uncertainty_joules: float  # energy placed by the uniform-power assumption (counter steps)
    measurement: str  # "measured" | "estimated" | "synthetic"; "unavailable" when the meter failed
    device: str
    start_s: float  # job start and end on the monitor's monotonic clock
    end_s: float
    device_seconds: float  # its share (by work) of the job's device time, for embodied carbon


CommitHook = Callable[[str, float, Sequence[tuple[Hashable, Charge]]], None]


# a job's place in the sweep (see `_advance_locked`)
_PENDING, _ACTIVE, _SWEPT, _COMMITTED = 0, 1, 2, 3
_MAX_RATE = 1e300  # a span of a few femtoseconds would have an infinite rate


@dataclass(slots=True, eq=False)
class _Job:
    key: int
    start_s: float
    end_s: float | None = None
    weight: float = 1.0
    members: Sequence[tuple[Hashable, float]] = ()
    energy_j: float = 0.0
    uncertainty_j: float = 0.0
    device_s: float = 0.0  # its share of the device's busy time (overlapping jobs share it, like energy)
    handle: JobHandle | None = None
    state: int = _PENDING
    rate: float = 0.0  # weight / duration once ended
    ma: float = 0.0  # the sweep's running sums when its share was last banked
    mal: float = 0.0
    mb: float = 0.0
    mta: float = 0.0
    mtb: float = 0.0


class JobHandle:
    """Returned by `DeviceMonitor.begin`. Once the job is finalized, `charges` holds {member: Charge};
    `result` is a future of them, for a caller that must wait (made on first use: most jobs are final
    by the time their caller looks, and a future costs more than the rest of a job's bookkeeping), and
    `final()` waits for them on an event loop."""

    __slots__ = ("_future", "_waiters", "charges", "key", "start_s")
    _lock = threading.Lock()  # one for all handles: held for a few attribute operations at a time

    def __init__(self, key: int, start_s: float) -> None:
        self.key = key
        self.start_s = start_s
        self.charges: dict[Hashable, Charge] | None = None
        self._future: concurrent.futures.Future[dict[Hashable, Charge]] | None = None
        self._waiters: list[asyncio.Future[dict[Hashable, Charge]]] | None = None

    async def final(self) -> dict[Hashable, Charge]:
        """The charges, once final, awaited on the running event loop. Where the job is finalized on
        another thread (the sampler's, the device worker's), the loop is woken once for every handle
        finalized together (`_wake`) rather than once a handle, as `asyncio.wrap_future(result)` does
        (about 14 us of the loop's CPU a handle, against 1; proxy mode waits for every request's)."""
        charges = self.charges
        if charges is not None:
            return charges
        waiter = asyncio.get_running_loop().create_future()  # each caller's own: one may be cancelled
        with self._lock:
            charges = self.charges
            if charges is None:
                if self._waiters is None:
                    self._waiters = [waiter]
                else:
                    self._waiters.append(waiter)
        if charges is not None:
            return charges
        return await waiter

    @property
    def result(self) -> concurrent.futures.Future[dict[Hashable, Charge]]:
        with self._lock:
            if self._future is None:
                self._future = concurrent.futures.Future()
                if self.charges is not None:
                    self._future.set_result(self.charges)
            return self._future

    def _set(self, charges: dict[Hashable, Charge]) -> None:
        with self._lock:
            if self.charges is not None:
                return
            self.charges = charges
            future, waiters, self._waiters = self._future, self._waiters, None
        if future is not None and not future.done():
            future.set_result(charges)
        if waiters is not None:
            for waiter in waiters:
                _wake(waiter, charges)


_woken_lock = threading.Lock()
_to_wake: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}


def _wake(waiter: asyncio.Future[Any], value: Any) -> None:
    """Resolve a loop's future from any thread. Off the loop, the futures resolved before the loop gets
    to them are resolved together, in one callback (one `call_soon_threadsafe` for the lot)."""
    loop = waiter.get_loop()
    if asyncio._get_running_loop() is loop:
        if not waiter.done():
            waiter.set_result(value)
        return
    with _woken_lock:
        pending = _to_wake.get(loop)
        first = pending is None
        if first:
            pending = _to_wake[loop] = []
        pending.append((waiter, value))
    if first:
        try:
            loop.call_soon_threadsafe(_wake_all, loop)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            with _woken_lock:
                _to_wake.pop(loop, None)


def _wake_all(loop: asyncio.AbstractEventLoop) -> None:
    with _woken_lock:
        pending = _to_wake.pop(loop, [])
    for waiter, value in pending:
        if not waiter.done():  # a waiter whose task was cancelled is done already
            waiter.set_result(value)


class DeviceMonitor:
    """Samples one meter and attributes its energy to jobs; thread-safe."""

    def __init__(
        self,
        meter: EnergyMeter,
        *,
        idle_policy: IdlePolicy = "separate",
        amortize_window_s: float = 60.0,
        sample_period_s: float = 0.05,
        finalize_poll_s: float = 0.005,
        max_finalize_delay_s: float = 1.0,
        power_window_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        on_commit: CommitHook | None = None,
        max_points: int = 4096,
    ) -> None:
        if idle_policy not in ("separate", "amortize"):
            raise ValueError(f"idle_policy must be 'separate' or 'amortize', not {idle_policy!r}")
        if sample_period_s <= 0:
            raise ValueError("sample_period_s must be > 0")
        if finalize_poll_s <= 0:
            raise ValueError("finalize_poll_s must be > 0")
        self.meter = meter
        self.device = meter.device
        self.idle_policy: IdlePolicy = idle_policy
        if amortize_window_s <= 0:
            raise ValueError("amortize_window_s must be > 0")
        # amortize: idle energy older than this when no job has come to take it is committed as idle
        # (a request after a quiet night does not take the night's idle energy; the device's counter
        # keeps moving while it is idle)
        self.amortize_window_s = amortize_window_s
        self.sample_period_s = sample_period_s
        self.finalize_poll_s = min(finalize_poll_s, sample_period_s)
        self.max_finalize_delay_s = max_finalize_delay_s
        self._clock = clock
        self._on_commit = on_commit
        self._max_points = max_points
        self._lock = threading.Lock()
        self._points: list[tuple[float, float]] = []  # unprocessed change points; [0] is the anchor
        self._latest: tuple[float, float] | None = None  # the latest sample, change point or not
        self._recent: deque[tuple[float, float]] = deque(maxlen=4096)  # for the power gauge
        self._power_window_s = power_window_s
        self._jobs: dict[int, _Job] = {}  # not yet committed, in start order
        self._open: dict[int, _Job] = {}  # not yet ended, in start order
        self._events: deque[tuple[float, _Job, bool]] = deque()  # boundaries not yet swept (t, job, starts)
        self._ended: deque[_Job] = deque()  # ended jobs not yet committed, in end order
        self._active: dict[int, _Job] = {}  # jobs the sweep is inside
        self._a = self._b = self._ta = self._tb = 0.0  # the sweep's running sums
        self._al = 0.0  # what rounding left out of A (A = _a + _al): a job's share is rate x a change in
        # A, and a short job's rate is large: its change in A can be far below A's last bit
        self._rate_sum = 0.0  # of the active jobs' rates
        self._rate_peak = 0.0  # the largest that sum has been since it was last counted afresh
        self._intervals = 0
        self._last_boundary_s = -math.inf
        self._next_key = 0
        self._pending_idle_j = 0.0  # amortize: idle processed but not yet charged
        self._pending_idle_from_s = -math.inf  # amortize: the timeline up to here was committed
        self.processed_j = 0.0  # meter energy processed (attributed + idle, pending included)
        self.committed_idle_j = 0.0
        self.committed_attributed_j = 0.0
        self.read_errors = 0
        self._first_energy_j: float | None = None
        # the first good reading's time: before it nothing was measured (a job that ran partly before
        # it is labelled `unavailable`); +inf until there is one
        self._timeline_start_s = math.inf
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by `end` when the device goes idle with jobs to finalize
        self._thread: threading.Thread | None = None

    # -- sampling ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Take the first reading and start the sampler thread."""
        self._sample()
        self._thread = threading.Thread(target=self._run, name=f"sampler-{self.device}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling, take a last reading and finalize every job (no joule left behind): a job
        nobody ended is closed at the last reading with no members (its energy is idle); a closed job
        the meter could not be read past is answered with what was measured, `unavailable`."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        point = self._read()
        with self._lock:
            self._insert_locked(point)
        self._settle_last_step()
        with self._lock:
            self._promote_latest_locked()
            if self._open:
                end_s = max(
                    self._latest[0] if self._latest is not None else self._clock(), self._last_boundary_s
                )
                for job in list(self._open.values()):
                    assert job.handle is not None
                    self._close_locked(job.handle, [], None, end_s)
            finished = self._advance_locked(commit_idle=True)
            if stale := [j for j in self._jobs.values() if j.end_s is not None]:
                finished += self._commit_locked(stale, measurement="unavailable")
            if self._pending_idle_j:
                finished += self._commit_locked([], flush_idle=True)
        self._resolve(finished)

    # A stepped counter shows a step's last stretch only at its next update: what a job drew between the
    # counter's last update before its end and its end is read after the job. The last read at stop must
    # come after that update, or the ledger lacks up to a step of busy power.
    SETTLE_STEPS = 1.5  # NVML's updates came 95-103 ms apart on an H200 (step_hint_s 0.1)

    def _settle_last_step(self) -> None:
        """Before the last reading of a stepped meter: poll (every `finalize_poll_s`) until the counter
        has moved since a reading taken after the last job boundary, or a reading is `SETTLE_STEPS`
        steps past it (a device drawing nothing while idle need not move); at most that long in all.

        Since a reading taken after the boundary (or at it: the boundary's own read): a change first
        read after the boundary may be an update from before it (where the boundary is the clock's, a
        meter whose reads block), which lacks the job's tail; an update after such a reading cannot."""
        step_s = 0.0 if self.meter.continuous else self.meter.step_hint_s
        if step_s <= 0 or self._last_boundary_s == -math.inf:
            return
        until_s = self._last_boundary_s + self.SETTLE_STEPS * step_s
        since_j: float | None = None  # the counter at the first reading taken after the boundary
        for _ in range(math.ceil(self.SETTLE_STEPS * step_s / self.finalize_poll_s) + 1):
            with self._lock:
                latest = self._latest
                if latest is None or latest[0] >= until_s:
                    return
                boundary_s = self._last_boundary_s  # a reading at it is the boundary's own, if any
                if latest[0] > boundary_s or (latest[0] == boundary_s and not self.meter.blocking_reads):
                    if since_j is not None and latest[1] > since_j:
                        return
                    if since_j is None:
                        since_j = latest[1]
            time.sleep(self.finalize_poll_s)
            reading = self._read()
            with self._lock:
                self._insert_locked(reading)

    def _run(self) -> None:
        """The sampler thread: a tick every period (`_tick`); a fault of a tick's is logged and the
        next tick comes as usual (a dead sampler would leave stepped meters' jobs unanswered)."""
        period_s = self.sample_period_s
        while True:
            self._wake.wait(period_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                period_s = self._tick()
            except Exception:
                log.exception("energy sampler on %s: a tick failed; sampling goes on", self.device)
                period_s = self.sample_period_s

    def _tick(self) -> float:
        """Read the meter, finalize what can be, and return the period until the next tick."""
        reading = self._read()  # outside the lock (an NVML read can take milliseconds); a failed
        with self._lock:  # read is simply retried next period
            self._insert_locked(reading)
            finished = []
            waiting = [j.end_s for j in self._jobs.values() if j.end_s is not None]
            if waiting:
                if self._latest is not None and self._latest[0] - min(waiting) >= self.max_finalize_delay_s:
                    self._promote_latest_locked()
                elif reading is None and self._clock() - min(waiting) >= self.max_finalize_delay_s:
                    finished = self._finalize_unmeasured_locked()  # (never read at all, too)
            finished += self._advance_locked(commit_idle=True)
            period_s = self.finalize_poll_s if self._idle_with_waiting_locked() else self.sample_period_s
        self._resolve(finished)
        return period_s

    def _idle_with_waiting_locked(self) -> bool:
        """No job runs on the device and some ended job waits for the counter's next change point.

        Then the sampler polls every `finalize_poll_s` instead of `sample_period_s`: the answers of
        those jobs wait on that change point, and with nothing running the extra reads cannot slow any
        work down (bench/nvml_interference.py measured what they cost a running job)."""
        return not self._open and bool(self._jobs)

    def _finalize_unmeasured_locked(self) -> list[tuple[_Job, dict[Hashable, Charge]]]:
        """The meter has failed past the end of waiting jobs: answer them with the energy measured up to
        the last good reading, labelled `unavailable`. Nothing is invented: what the meter shows across
        the outage once it recovers goes to the jobs still open then, or to idle."""
        last_good_s = self._points[-1][0] if self._points else -math.inf  # never read: nothing measured
        finished = self._advance_locked()  # everything up to the last good reading
        done = [j for j in self._jobs.values() if j.end_s is not None and j.end_s > last_good_s]
        if not done:
            return finished
        log.warning(
            "energy meter on %s unreadable for %.1f s: answering %d job(s) with the energy measured so far",
            self.device,
            self._clock() - last_good_s,
            len(done),
        )
        return finished + self._commit_locked(done, measurement="unavailable")

    def sample(self) -> Reading | None:
        """Read the meter now; returns None if the read failed."""
        reading = self._read()
        with self._lock:
            self._insert_locked(reading)
            finished = self._advance_locked()
        self._resolve(finished)
        return reading

    def _sample(self) -> None:
        reading = self._read()
        with self._lock:
            self._insert_locked(reading)

    def _read(self) -> Reading | None:
        """Read the meter, without the monitor's lock: a read can block for milliseconds (NVML), and
        the lock must never be held that long (the event loop takes it for proxy-mode requests)."""
        try:
            return self.meter.read()
        except MeterError as e:
            self.read_errors += 1
            log.warning("energy meter read failed on %s: %s", self.device, e)
            return None

    def _insert_locked(self, reading: Reading | None) -> float | None:
        """Put a reading on the timeline; returns the time it stands for, None if there is none.

        Reads run outside the lock, so a reading can arrive after a later one from another thread: it
        then adds nothing (the later one already holds at least its energy) and stands for the latest
        instant, so that the timeline's time and energy only ever grow."""
        if reading is None:
            return None
        point = (reading.t_s, reading.energy_j)
        latest = self._latest
        if latest is not None and (point[0] < latest[0] or (point[0] == latest[0] and point[1] <= latest[1])):
            return latest[0]
        self._latest = point
        if self._first_energy_j is None:
            self._first_energy_j = point[1]
            self._pending_idle_from_s = self._timeline_start_s = point[0]  # the timeline starts here
        self._recent.append(point)
        if not self._points or self.meter.continuous or point[1] != self._points[-1][1]:
            self._points.append(point)
        if len(self._points) > self._max_points:
            self._compact_locked()
        return point[0]

    def _promote_latest_locked(self) -> None:
        """Make the latest sample a change point (a counter that has not moved for a long time)."""
        if self._latest is not None and self._points and self._latest[0] > self._points[-1][0]:
            self._points.append(self._latest)

    def _compact_locked(self) -> None:
        """Merge adjacent unprocessed intervals that no job boundary falls inside (bounded memory)."""
        bounds = {j.start_s for j in self._jobs.values()} | {
            j.end_s for j in self._jobs.values() if j.end_s is not None
        }
        kept = [self._points[0]]
        for i in range(1, len(self._points) - 1):
            t_prev, t_here = kept[-1][0], self._points[i][0]
            t_next = self._points[i + 1][0]
            if any(t_prev < b < t_next for b in bounds) or any(b == t_here for b in bounds):
                kept.append(self._points[i])
        kept.append(self._points[-1])
        self._points = kept

    # -- jobs -------------------------------------------------------------------------------------

    def begin(self, *, on_loop: bool = False) -> JobHandle:
        """Mark the start of a job (call after synchronizing the device). Never raises on meter errors.

        A meter whose reads block (NVML: milliseconds a read) is not read at a job's boundaries: its
        boundaries are the clock's time, placed between the sampler's readings like any instant
        between two counter steps. Neither an event loop (proxy mode) nor a device thread waits for
        such a read: the device would sit idle for it between jobs. `on_loop`: the caller is an event
        loop; otherwise (a device thread) the sampler is woken to read at once on its own thread, so
        that a counter step that ended while the device was idle is read as idle, not spread over the
        job's first milliseconds (proxy mode's requests begin too often for a read each)."""
        self.meter.job_started()
        reading = self._boundary_read()
        if reading is None and not on_loop:
            self._wake.set()
        with self._lock:
            if not self._jobs and self.meter.continuous and self._idle_start_locked(reading):
                return self._open_locked(reading.t_s)  # type: ignore[union-attr]
            handle = self._open_locked(self._time_locked(reading))
            finished = self._advance_locked()
        self._resolve(finished)
        return handle

    def end(
        self,
        handle: JobHandle,
        members: Sequence[tuple[Hashable, float]],
        weight: float | None = None,
    ) -> None:
        """Mark the end of a job (after synchronizing the device) with its members and work units.

        Members with all-zero work units share equally (e.g. a batch that failed before reporting).
        A meter whose reads block is not read here (see `begin`); when the device is left idle with
        jobs to finalize, the sampler is woken to poll for the counter's next step. (The same from an
        event loop or a device thread.)"""
        reading = self._boundary_read()
        self.meter.job_finished()
        with self._lock:
            if len(self._jobs) == 1 and reading is not None and self.meter.continuous:
                finished = self._end_alone_locked(handle, members, reading)
                if finished is not None:
                    self._resolve(finished)
                    return
            self._close_locked(handle, members, weight, self._time_locked(reading))
            finished = self._advance_locked()
            if self._idle_with_waiting_locked():
                self._wake.set()
        self._resolve(finished)

    def split(
        self,
        handle: JobHandle,
        members: Sequence[tuple[Hashable, float]],
        weight: float | None = None,
    ) -> JobHandle:
        """End a job now and start its continuation at the same instant (no gap, no overlap).

        For long activities whose work arrives piecemeal (a streamed upstream response): each piece is
        a closed job with its own weight, so other jobs sharing the device need not wait for the whole
        activity to end before their energy is final. Also the boundary between back-to-back jobs
        on a device thread. A meter whose reads block is not read here (see `begin`), and the sampler
        is not woken: the device is busy on both sides of the instant."""
        reading = self._boundary_read()
        with self._lock:
            end_s = self._close_locked(handle, members, weight, self._time_locked(reading))
            following = self._open_locked(end_s)
            finished = self._advance_locked()
        self._resolve(finished)
        return following

    # The lone job (one request at a time on a device, and every job's start on an idle device): the
    # sweep's result computed directly, for the common case where nothing else touches the timeline.

    def _idle_start_locked(self, reading: Reading | None) -> bool:
        """A job starts on a continuous meter's device with no job to account: everything since the
        last processed change point is idle (what the sweep would find). False, with nothing changed,
        unless the reading follows the timeline's only point directly (then it becomes that point)."""
        points = self._points
        if reading is None or len(points) != 1 or self._events or self._active:
            return False
        t_s, energy_j = reading.t_s, reading.energy_j
        t0, e0 = points[0]
        if t_s <= t0 or energy_j < e0 or t_s < self._last_boundary_s or t_s < self._latest[0]:  # type: ignore[index]
            return False
        self._pending_idle_j += self._take_alone_locked(t_s, energy_j)
        return True

    def _end_alone_locked(
        self, handle: JobHandle, members: Sequence[tuple[Hashable, float]], reading: Reading
    ) -> list[tuple[_Job, dict[Hashable, Charge]]] | None:
        """The only job on a continuous meter ends, and no reading has come since its start: it takes
        the whole interval (energy and time), final at once. None, with nothing changed, otherwise."""
        job = self._jobs.get(handle.key)
        points = self._points
        if job is None or job.state != _PENDING or job.end_s is not None or len(points) != 1:
            return None
        t_s, energy_j = reading.t_s, reading.energy_j
        t0, e0 = points[0]
        if t0 != job.start_s or t_s <= t0 or energy_j < e0 or t_s < self._last_boundary_s:
            return None
        job_j = self._take_alone_locked(t_s, energy_j)
        del self._open[job.key]
        self._events.clear()  # its start, never applied
        # committed at once, never swept: its weight (the sweep's rate) is not needed
        if len(members) != 1 or self.idle_policy != "separate":
            job.end_s, job.members, job.energy_j, job.device_s, job.state = (
                t_s,
                list(members),
                job_j,
                t_s - t0,
                _SWEPT,
            )
            committed = self._commit_locked([job])
            self._pending_idle_from_s = t_s  # amortize: the timeline is committed up to here, as a sweep's
            return committed
        # `_commit_locked([job])` for its one member, inline: the general commit's lists and checks
        # cost 0.9 µs here, 6% of a request's accounting (bench/results/profiles.md)
        idle_j, self._pending_idle_j = self._pending_idle_j, 0.0
        del self._jobs[job.key]
        job.end_s, job.state = t_s, _COMMITTED  # done with: only its handle is read again
        member = members[0][0]
        charge = Charge(  # joules, idle_joules, uncertainty_joules, measurement, device, start_s,
            job_j, 0.0, 0.0, self.meter.measurement, self.device, t0, t_s, t_s - t0
        )  # end_s, device_seconds
        self.committed_attributed_j += job_j
        self.committed_idle_j += idle_j
        if self._on_commit is not None:
            self._on_commit(self.device, idle_j, [(member, charge)])
        return [(job, {member: charge})]

    def _take_alone_locked(self, t_s: float, energy_j: float) -> float:
        """The lone shortcuts' step of the sweep: the reading at `t_s` becomes the timeline's only point,
        and the energy since the previous one (returned, J) is processed."""
        e0 = self._points[0][1]
        point = self._points[0] = self._latest = (t_s, energy_j)
        self._recent.append(point)
        self._last_boundary_s = t_s
        self.processed_j += energy_j - e0
        self._intervals += 1
        return energy_j - e0

    def _boundary_read(self) -> Reading | None:
        """The reading a job boundary is placed at; none where the meter's reads block (the boundary
        is then the clock's time)."""
        return None if self.meter.blocking_reads else self._read()

    def _time_locked(self, reading: Reading | None) -> float:
        """Put a boundary's reading on the timeline; the time it stands for (the clock's without one),
        never before the latest reading nor the latest boundary (boundaries stay in time order)."""
        t_s = self._insert_locked(reading)
        if t_s is None:
            t_s = self._clock()
            if self._latest is not None and t_s < self._latest[0]:
                t_s = self._latest[0]
        if t_s < self._last_boundary_s:
            t_s = self._last_boundary_s
        self._last_boundary_s = t_s
        return t_s

    def _open_locked(self, start_s: float) -> JobHandle:
        key = self._next_key
        self._next_key += 1
        handle = JobHandle(key, start_s)
        job = _Job(key, start_s)
        job.handle = handle
        self._jobs[key] = self._open[key] = job
        self._events.append((start_s, job, True))
        return handle

    def _close_locked(
        self, handle: JobHandle, members: Sequence[tuple[Hashable, float]], weight: float | None, end_s: float
    ) -> float:
        job = self._open.pop(handle.key)
        job.end_s = end_s = max(end_s, job.start_s)
        job.members = list(members)
        total_work = sum(w for _, w in job.members)
        job.weight = weight if weight is not None else (total_work if total_work > 0 else 1.0)
        self._events.append((end_s, job, False))
        self._ended.append(job)
        duration_s = end_s - job.start_s
        rate = min(job.weight / duration_s, _MAX_RATE) if duration_s > 0 else 0.0
        swept = job.state == _ACTIVE  # swept alone on a stand-in rate so far (rare)
        if swept:
            self._bank(job)  # what it took at the stand-in rate; it goes on at its own
        job.rate = rate
        if swept:
            self._recount()  # the stand-in rate may be far off the real one
        return end_s

    # -- attribution ------------------------------------------------------------------------------
    #
    # A sweep over the timeline, left to right, one interval between change points at a time. Each
    # interval's energy is spread uniformly over its time; every instant's power is shared by the jobs
    # active then in proportion to their work rates (weight / duration), idle when there are none: the
    # rule of `attribution.split_interval`, which stays the reference. Instead of splitting every
    # interval over every job (quadratic in the jobs in flight: proxy mode has hundreds), the sweep
    # keeps running sums: A (joules per unit of rate) and B (joules per job where every active job has
    # rate 0, which share equally), and their time twins TA and TB. A job's share of everything swept
    # while it was active is rate x (A now - A at its start) + (B now - B at its start): O(1) a job
    # and an interval. Jobs start and end in time order (`_time_locked`), so their boundaries are a
    # queue merged with the change points.

    def _advance_locked(self, commit_idle: bool = False) -> list[tuple[_Job, dict[Hashable, Charge]]]:
        """Attribute every interval that can be split now, then finalize the jobs it completes.

        An open job's end and work rate are unknown, but its overlap with a past interval is not:
        an interval is processed unless an open job shares part of it with another job (only then
        would the split depend on the open job's rate; alone it takes all, whatever its rate). Idle
        energy alone is committed only when `commit_idle` (the sampler's ticks), else together with
        the next finished jobs."""
        points = self._points
        n = 0
        while n + 1 < len(points):
            (a, e0), (b, e1) = points[n], points[n + 1]
            if self._blocked_locked(a, b):
                break
            energy_j = e1 - e0 if e1 > e0 else 0.0
            if b > a:
                self._sweep_interval_locked(a, b, energy_j)
            else:
                self._instant_locked(a, energy_j)
            self.processed_j += energy_j
            n += 1
        if n:
            del points[:n]
        if not points:
            return []
        processed_until = points[0][0]
        self._frontier_events_locked(processed_until)
        done = []
        ended = self._ended
        while ended and ended[0].state >= _SWEPT:  # ends are swept in time order
            job = ended.popleft()
            if job.state == _SWEPT:
                done.append(job)
        if not done:
            if self.idle_policy == "amortize":
                if commit_idle and self._pending_idle_j and not self._open:
                    return self._flush_stale_idle_locked(processed_until)
                return []
            if not self._pending_idle_j or not commit_idle:
                return []
        committed = self._commit_locked(done)
        self._pending_idle_from_s = processed_until
        return committed

    def _blocked_locked(self, a: float, b: float) -> bool:
        """Whether a job still open shares part of [a, b] with another job. Jobs are kept in start
        order, so: the first open job; a second one that started before b shares [a, b]'s end with it;
        else any other job in [max(a, its start), b] does (the scan stops at the first job starting at
        or after b, and at the first blocker, which under load is one of the first few jobs)."""
        first = second = None
        for job in self._open.values():
            if first is None:
                first = job
            else:
                second = job
                break
        if first is None or first.start_s >= b:
            return False
        if second is not None and second.start_s < b:
            return True
        lo = max(a, first.start_s)
        for job in self._jobs.values():
            if job.start_s >= b:
                return False
            if job is not first and job.end_s is not None and job.end_s > lo:
                return True
        return False

    def _frontier_events_locked(self, until_s: float) -> None:
        """Apply the boundaries at the frontier, so that jobs ending there are final now. A start of a
        job still open is left for the sweep (activating it would only cost a bank at its end: the
        common in-process case), unless an end at the frontier waits behind it."""
        events = self._events
        while events and events[0][0] <= until_s:
            _, job, starts = events[0]
            if starts and job.end_s is None and job.state == _PENDING:
                for t_s, _, later_starts in events:  # an end at the frontier behind it?
                    if t_s > until_s:
                        return
                    if not later_starts:
                        break
                else:
                    return
            events.popleft()
            self._apply_event(job, starts)

    def _apply_events_locked(self, until_s: float) -> None:
        """Apply the job boundaries at or before `until_s` to the sweep's set of active jobs."""
        events = self._events
        while events and events[0][0] <= until_s:
            _, job, starts = events.popleft()
            self._apply_event(job, starts)

    def _apply_event(self, job: _Job, starts: bool) -> None:
        """A job's start or end reached by the sweep (a job committed early has none left to apply)."""
        if starts:
            if job.state == _PENDING:
                self._activate(job)
        elif job.state == _ACTIVE:
            self._deactivate(job)

    def _activate(self, job: _Job) -> None:
        if job.end_s is None:
            job.rate = 1.0  # open, so alone wherever it is swept (else it would block): any rate will do
        job.state = _ACTIVE
        job.ma, job.mal, job.mb, job.mta, job.mtb = self._a, self._al, self._b, self._ta, self._tb
        self._rate_sum += job.rate
        if self._rate_sum > self._rate_peak:
            self._rate_peak = self._rate_sum
        self._active[job.key] = job

    def _deactivate(self, job: _Job) -> None:
        self._bank(job)
        job.state = _SWEPT
        del self._active[job.key]
        if self._active:
            self._rate_sum -= job.rate
            if self._rate_sum < self._rate_peak * 1e-6:  # what is left may be lost in rounding: recount
                self._recount()
        else:  # nobody left: restart the running sums from 0 (no drift, no growth)
            self._rate_sum = self._rate_peak = self._a = self._al = self._b = self._ta = self._tb = 0.0

    def _recount(self) -> None:
        active = self._active
        if len(active) == 1:
            for job in active.values():
                self._rate_sum = self._rate_peak = job.rate
        else:
            self._rate_sum = self._rate_peak = math.fsum(job.rate for job in active.values())

    def _bank(self, job: _Job) -> None:
        """Add to the job what it took since its marks, and move the marks to now."""
        a, al, b, ta, tb = self._a, self._al, self._b, self._ta, self._tb
        job.energy_j += job.rate * ((a - job.ma) + (al - job.mal)) + (b - job.mb)
        job.device_s += job.rate * (ta - job.mta) + (tb - job.mtb)
        job.ma, job.mal, job.mb, job.mta, job.mtb = a, al, b, ta, tb

    def _add_a(self, x: float) -> None:
        """A += x, keeping what rounding drops in `_al` (Neumaier's compensated sum)."""
        a = self._a
        total = a + x
        self._al += (a - total) + x if abs(a) >= abs(x) else (x - total) + a
        self._a = total

    def _sweep_interval_locked(self, a: float, b: float, energy_j: float) -> None:
        """Sweep [a, b] (b > a), `energy_j` spread uniformly over it, cut at the boundaries inside it."""
        events = self._events
        if events and events[0][0] <= a:
            self._apply_events_locked(a)
        if not events or events[0][0] >= b:  # no boundary inside (the common case): one segment
            self._share_segment(energy_j, b - a)
            self._interval_done()
            return
        density = energy_j / (b - a)
        inside: dict[int, tuple[_Job, tuple[float, float, float]]] = {}  # jobs starting inside; sums then
        at_a = (self._a, self._al, self._b)
        u = a
        while True:
            while events and events[0][0] <= u:
                _, job, starts = events.popleft()
                if starts:
                    if job.state == _PENDING:
                        self._activate(job)
                        if u > a:
                            inside[job.key] = (job, (self._a, self._al, self._b))
                elif job.state == _ACTIVE:
                    if u > a and energy_j > 0:  # it covers [a, b] only in part: uncertain
                        _, since = inside.pop(job.key, (job, at_a))
                        self._uncertain(job, self._taken_since(job, since), energy_j)
                    self._deactivate(job)
            v = events[0][0] if events and events[0][0] < b else b
            if v > u:
                self._share_segment(density * (v - u), v - u)
                u = v
            if u >= b:
                break
        if energy_j > 0:
            for job, since in inside.values():
                if job.state == _ACTIVE:
                    self._uncertain(job, self._taken_since(job, since), energy_j)
        self._interval_done()

    def _share_segment(self, energy_j: float, seconds: float) -> None:
        """A stretch in which the active jobs do not change: its energy and time to the running sums
        (by rate; equally where every active job has rate 0), or to idle with no job active."""
        count = len(self._active)
        if count == 0:
            self._pending_idle_j += energy_j
        elif self._rate_sum > 0:
            self._add_a(energy_j / self._rate_sum)
            self._ta += seconds / self._rate_sum
        else:
            self._b += energy_j / count
            self._tb += seconds / count

    def _interval_done(self) -> None:
        self._intervals += 1
        if not self._intervals & 4095 and self._active:
            self._rebase()

    def _rebase(self) -> None:
        """Bank every active job and restart the running sums from 0: they stay small (exact
        differences) under a load that never lets the device go idle."""
        for job in self._active.values():
            self._bank(job)
            job.ma = job.mal = job.mb = job.mta = job.mtb = 0.0
        self._a = self._al = self._b = self._ta = self._tb = 0.0
        self._recount()

    def _taken_since(self, job: _Job, since: tuple[float, float, float]) -> float:
        """What an active job took since the running sums were `since` (A, its rounding, B)."""
        return job.rate * ((self._a - since[0]) + (self._al - since[1])) + (self._b - since[2])

    @staticmethod
    def _uncertain(job: _Job, taken_j: float, energy_j: float) -> None:
        # never below 0: rounding can leave `taken_j` a hair above `energy_j`
        job.uncertainty_j += max(min(taken_j, energy_j - taken_j), 0.0)

    def _instant_locked(self, t_s: float, energy_j: float) -> None:
        """A zero-length interval (two readings at one instant): its energy goes to the jobs that hold
        that instant, by weight (equally if none has any), else to idle (`split_interval`'s rule)."""
        if energy_j <= 0:
            return
        holders = [
            (j, j.weight)
            for j in self._jobs.values()
            if j.start_s <= t_s <= (j.end_s if j.end_s is not None else math.inf)
        ]
        total = sum(w for _, w in holders)
        given = 0.0
        for job, w in holders:
            part = energy_j * (w / total if total > 0 else 1.0 / len(holders))
            job.energy_j += part
            given += part
        self._pending_idle_j += energy_j - given

    def _flush_stale_idle_locked(self, processed_until: float) -> list[tuple[_Job, dict[Hashable, Charge]]]:
        """amortize, no job open: the pending idle energy older than `amortize_window_s` (by time, at
        the pending stretch's average draw) is committed as idle, so that the device's counter moves
        while it idles and the next job takes at most the window's worth."""
        span_s = processed_until - self._pending_idle_from_s
        if span_s <= self.amortize_window_s:
            return []
        kept_j = self._pending_idle_j * (self.amortize_window_s / span_s)
        self._pending_idle_j -= kept_j
        self._pending_idle_from_s = processed_until - self.amortize_window_s
        finished = self._commit_locked([], flush_idle=True)
        self._pending_idle_j = kept_j
        return finished

    def _commit_locked(
        self, done: list[_Job], flush_idle: bool = False, measurement: str | None = None
    ) -> list[tuple[_Job, dict[Hashable, Charge]]]:
        idle_j, self._pending_idle_j = self._pending_idle_j, 0.0
        charged_idle: dict[Hashable, float] = {}
        if self.idle_policy == "amortize" and done and not flush_idle:
            # the idle energy since the timeline was last committed, as far back as the window reaches
            # from the first job's start (by time, at the stretch's average draw); older is idle
            span_s = min(j.start_s for j in done) - self._pending_idle_from_s
            charged_j = (
                idle_j * (self.amortize_window_s / span_s) if span_s > self.amortize_window_s else idle_j
            )
            charged_idle = amortize(charged_j, {j.key: j.energy_j for j in done})
            idle_j -= charged_j
        out: list[tuple[_Job, dict[Hashable, Charge]]] = []
        commits: list[tuple[Hashable, Charge]] = []
        label = measurement or self.meter.measurement
        for job in done:
            del self._jobs[job.key]
            if job.state == _ACTIVE:  # committed before the sweep reached its end (the meter failed)
                self._deactivate(job)
            job.state = _COMMITTED
            assert job.end_s is not None
            job_idle_j = charged_idle.get(job.key, 0.0) if charged_idle else 0.0
            members = job.members
            shares: Iterable[tuple[Hashable, float, float, float, float]]  # member, J, idle J, uncertain J, s
            if len(members) == 1:  # one member takes it all (proxy mode's pieces, batch-1 jobs)
                shares = ((members[0][0], job.energy_j, job_idle_j, job.uncertainty_j, job.device_s),)
            else:
                units = [w for _, w in members]
                shares = zip(
                    [m for m, _ in members],
                    split_by_work(job.energy_j, units),
                    split_by_work(job_idle_j, units),
                    split_by_work(job.uncertainty_j, units),
                    split_by_work(job.device_s, units),
                    strict=True,
                )
            charges: dict[Hashable, Charge] = {}
            # a job that began before the meter's first good reading was measured in part at most
            job_label = label if job.start_s >= self._timeline_start_s else "unavailable"
            for member, e_j, i_j, u_j, s in shares:
                charge = Charge(  # positional, in field order (hot path: keywords cost more)
                    e_j + i_j,  # joules
                    i_j,  # idle_joules
                    u_j,  # uncertainty_joules
                    job_label,  # measurement
                    self.device,  # device
                    job.start_s,  # start_s
                    job.end_s,  # end_s
                    s,  # device_seconds
                )
                charges[member] = charge
                commits.append((member, charge))
            if not job.members:  # nobody to charge (e.g. every member was dropped): the energy is idle
                idle_j += job.energy_j + job_idle_j
            else:
                self.committed_attributed_j += job.energy_j + job_idle_j
            out.append((job, charges))
        self.committed_idle_j += idle_j
        if self._on_commit is not None and (commits or idle_j):
            try:
                self._on_commit(self.device, idle_j, commits)
            except Exception:  # the books' (metrics, carbon) fault: the jobs are final all the same
                log.exception("energy monitor on %s: recording a commit failed", self.device)
        return out

    @staticmethod
    def _resolve(finished: list[tuple[_Job, dict[Hashable, Charge]]]) -> None:
        for job, charges in finished:
            if job.handle is not None:
                job.handle._set(charges)

    # -- reporting --------------------------------------------------------------------------------

    def power_watts(self) -> float | None:
        """Mean power over the recent sampled timeline (W), or the meter's own figure before that."""
        with self._lock:
            if len(self._recent) >= 2:
                t_last, e_last = self._recent[-1]
                older = [p for p in self._recent if t_last - p[0] >= self._power_window_s]
                t0, e0 = older[-1] if older else self._recent[0]
                if t_last > t0:
                    return (e_last - e0) / (t_last - t0)
        return self.meter.power_watts()

    @property
    def meter_delta_j(self) -> float:
        """meter(last processed change point) - meter(first reading): what conservation is checked against."""
        with self._lock:
            if self._first_energy_j is None or not self._points:
                return 0.0
            return self._points[0][1] - self._first_energy_j

    @property
    def counter_step_s(self) -> float:
        return 0.0 if self.meter.continuous else self.meter.step_hint_s
