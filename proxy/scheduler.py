"""Per-model queues, dynamic batching, backpressure, cancellation, and one worker thread per device.

A request becomes a `WorkItem` in its model's bounded queue. The model's batcher takes the oldest
item and every queued item with the same `batch_key`, up to `max_batch_size`, waiting at most
`max_wait_ms` (counted from the oldest item's arrival) for more, unless every member it answered in
the last `max_wait_ms` has been followed by an arrival: then no batch-mate is on its way (a lone
client, say, that sends its next request once answered) and the batch starts at once. The batch runs
as one *job* on the device's single worker thread, bracketed by the device monitor's boundaries
after synchronization (meter reads, or the clock's time for a meter whose reads block: NVML's).
While a job runs, the queue fills, so batches grow with load; a full batch that is waiting then is
handed to the device at once, to start as soon as the running job ends (a partial one stays in the
queue, where later arrivals can join it). A request whose client leaves while it is queued is dropped
and never runs; one whose batch has been handed to the device is charged (the device does the work).
A streamed member's text pieces reach the event loop a decoding step at a time (`StepPieces`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from backends.base import (
    Backend,
    BackendRequest,
    BackendResult,
    ImageRequest,
    ImageResult,
    TextPiece,
    flush_all,
    flushes_of,
)
from proxy.carbon import CarbonCharge
from proxy.energy.monitor import Charge, DeviceMonitor, JobHandle

log = logging.getLogger(__name__)

Piece = str | TextPiece  # a streamed piece: its text, with its tokens' log probabilities where asked


@dataclass(eq=False)
class RequestTag:
    """Who a member of a job is: the labels it is accounted under. `carbon` is set at commit."""

    request_id: str
    model: str
    task: str
    user: str
    key_id: str | None = None
    carbon: CarbonCharge | None = None


# A member nobody is charged for (a model's warm-up, `DeviceWorker.warm_up`): its job's energy is idle.
UNCHARGED = RequestTag("", "", "", "")

Status = Literal["ok", "error", "cancelled"]


@dataclass(slots=True)  # not frozen: built per request, and a frozen __init__ is twice as slow
class Outcome:
    tag: RequestTag
    request: BackendRequest
    result: BackendResult | None
    error: BaseException | None
    charge: Charge
    status: Status
    queue_wait_s: float
    run_s: float
    batch_size: int
    duration_s: float  # arrival in the queue to energy final, just before the answer


@dataclass(eq=False)
class WorkItem:
    request: BackendRequest
    tag: RequestTag
    key: Hashable
    enqueued_s: float
    future: asyncio.Future[Outcome]
    # streaming: text pieces arrive here from the worker thread; None marks the end of the text
    pieces: asyncio.Queue[Piece | None] | None = None
    state: Literal["queued", "dropped", "running", "done"] = "queued"
    units: int = 1  # what it takes of a batch's `max_batch_size`: an image request's images, else 1


class StepPieces:
    """Streamed text pieces on their way from a device's thread to the event loop, a decoding step at a
    time. Each streamed member's `on_text` is a `sink` of its model's StepPieces: it holds the piece,
    and the backend calls `flush` after every step (backends.base.TextRequest), which hands the held
    pieces of all the batch's streamed members to their queues in one call on the loop: one wake-up of
    the loop a step, not one a piece. Where steps come faster than `interval_s` (a small model on a
    CPU), a flush within `interval_s` of the last hand-over keeps holding them, and the next hands over
    several steps' pieces at once, which a stream then writes in one go: fewer wake-ups of the loop,
    each of which takes the interpreter lock from the model's thread in process. A piece then waits at
    most about `interval_s` (or one more step); steps slower than `interval_s` (a GPU's) are handed over
    each. The device's worker hands over what is held when a job ends (`flush_now`), before it hands
    the job back, so every piece reaches its queue before the end of its text (None)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float = 0.0) -> None:
        self._loop = loop
        self._lock = threading.Lock()  # the device's thread adds and flushes; a lock in case of two
        self._held: list[tuple[asyncio.Queue[Piece | None], Piece]] = []
        self.interval_s = interval_s
        self._last_s = 0.0

    def sink(self) -> PieceSink:
        return PieceSink(self)

    def add(self, pieces: asyncio.Queue[Piece | None], piece: Piece) -> None:
        with self._lock:
            self._held.append((pieces, piece))

    def flush_now(self) -> None:
        """Hand over every held piece now (a job ended)."""
        self._hand_over_held(None)

    def flush(self) -> None:
        """A step ended: hand over the held pieces, unless the last hand-over is under `interval_s` old."""
        self._hand_over_held(time.monotonic())

    def _hand_over_held(self, now_s: float | None) -> None:
        """Hand the held pieces to the loop; with `now_s`, only `interval_s` after the last hand-over."""
        with self._lock:
            if now_s is not None:
                if now_s - self._last_s < self.interval_s:
                    return
                if self._held:
                    self._last_s = now_s
            held, self._held = self._held, []
        if held:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody reads any more
                self._loop.call_soon_threadsafe(_hand_over, held)


def _end_flushes(requests: Sequence[BackendRequest]) -> tuple[Callable[[], None], ...]:
    """What a job's end calls so that no streamed piece stays held: a `PieceSink`'s `flush_now` (its
    `flush` may hold them for `interval_s`), another consumer's `flush` (backends.base.flushes_of)."""
    flushes = list(flushes_of(requests))
    for i, flush in enumerate(flushes):
        owner = getattr(flush, "__self__", None)
        if isinstance(owner, StepPieces):
            flushes[i] = owner.flush_now
    return tuple(flushes)


def _hand_over(held: list[tuple[asyncio.Queue[Piece | None], Piece]]) -> None:
    for pieces, piece in held:
        pieces.put_nowait(piece)


class PieceSink:
    """A streamed member's `on_text` (StepPieces): its pieces go to `pieces`, on the event loop."""

    __slots__ = ("_add", "flush", "interval_s", "pieces")

    def __init__(self, step_pieces: StepPieces) -> None:
        self.pieces: asyncio.Queue[Piece | None] = asyncio.Queue()
        self._add = step_pieces.add
        self.flush = step_pieces.flush
        self.interval_s = step_pieces.interval_s  # what the model's StepPieces holds pieces for

    def __call__(self, piece: Piece) -> None:
        self._add(self.pieces, piece)


class NotRecorded(Exception):
    """The ledger could not commit a finished batch: its requests must not be answered as successes."""


class QueueFull(Exception):
    def __init__(self, model: str, retry_after_s: float, user: str | None = None) -> None:
        if user is None:
            message = f"the queue for model {model!r} is full; retry after {retry_after_s:.0f} s"
        else:
            message = (
                f"user {user!r} has as many requests queued for model {model!r} as one user may "
                f"(max_queue_per_user); retry after {retry_after_s:.0f} s"
            )
        super().__init__(message)
        self.retry_after_s = retry_after_s


JobResult = tuple[list[BackendResult] | None, BaseException | None, JobHandle, float]
_Job = tuple[asyncio.AbstractEventLoop, asyncio.Future[JobResult], Backend, Sequence[WorkItem]]


class DeviceWorker:
    """One thread per device; runs jobs one at a time and brackets each with the monitor's boundaries.

    The thread is its own (a queue in, `call_soon_threadsafe` out) rather than a one-thread executor:
    the round trip of every batch is then cheaper (no concurrent future chained to an asyncio one)."""

    def __init__(self, device: str, monitor: DeviceMonitor) -> None:
        self.device = device
        self.monitor = monitor
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None  # started by the first job
        self._taken: _Job | None = None  # the next job, taken from the queue at the last one's end
        self._closed = False
        # A backend whose `run_ahead` can send the next batch to its model process while one runs
        # (backends/process.py): while such a run is on, `submit` wakes it through this socket pair.
        self._wake, self._waker = socket.socketpair()
        self._wake.setblocking(False)
        self._waker.setblocking(False)
        self._running_ahead = False
        self._sent_ahead = False  # the taken job is already running in the backend's model process
        # Cleared, it holds jobs before they start (used to pause a device, and by tests).
        self.gate = threading.Event()
        self.gate.set()

    def submit(self, backend: Backend, items: Sequence[WorkItem]) -> asyncio.Future[JobResult]:
        """Queue the job for the device's thread (after the jobs queued before it); its result comes
        on the returned future."""
        if self._closed:
            raise RuntimeError(f"the worker of device {self.device} is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=f"device-{self.device}", daemon=True)
            self._thread.start()
        future: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        self._jobs.put((future.get_loop(), future, backend, items))
        if self._running_ahead:
            with contextlib.suppress(OSError):  # full: a wake-up is pending already
                self._waker.send(b"\0")
        return future

    def warm_up(self, backend: Backend, request: BackendRequest) -> asyncio.Future[JobResult]:
        """Run `request` on this device's thread as a job of its own that nobody is charged for (its
        energy is idle), so that the thread's first real batch does not pay the device's and the
        libraries' first-call costs (a CUDA graph's capture among them)."""
        item = WorkItem(
            request, UNCHARGED, backend.batch_key(request), 0.0, asyncio.get_running_loop().create_future()
        )
        return self.submit(backend, [item])

    def _main(self) -> None:
        job = self._jobs.get()
        begun: JobHandle | None = None  # the next job's handle, begun at the last one's end
        while job is not None:
            loop, future, backend, items = job
            self._taken, self._sent_ahead = None, False
            try:
                result, begun = self._run(backend, items, begun)
                done: tuple[JobResult | None, BaseException | None] = (result, None)
            except BaseException as e:  # _run never raises but for a bug: its batcher sees it
                done, begun = (None, e), None  # and a job it took runs next, begun on its own
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, *done)
            job = self._taken if self._taken is not None else self._jobs.get()

    def _run(
        self, backend: Backend, items: Sequence[WorkItem], begun: JobHandle | None
    ) -> tuple[JobResult, JobHandle | None]:
        """Run one job (begun already at the last job's end, or now) and return its result; in the
        worker thread, never raising: a failed batch is still a measured job. When the job succeeded
        and another is queued and free to start, that one is taken (`_taken`) and begun at this job's
        end at the same boundary (second): one mark instead of two between back-to-back jobs (one
        meter read where the meter is read there), and no instant between them that belongs to
        neither."""
        if begun is None:
            self.gate.wait()
            backend.synchronize()
            handle = self.monitor.begin()
        else:  # the device was synchronized at the end of the last job
            handle = begun
        t0 = time.perf_counter()
        results: list[BackendResult] | None = None
        error: BaseException | None = None
        requests = [it.request for it in items]
        try:
            if getattr(type(backend), "run_ahead", None) is not None:  # the class's: not a wrapper's
                self._running_ahead = True
                try:
                    results = backend.run_ahead(requests, self._ahead_of(backend), self._wake)  # type: ignore[attr-defined]
                finally:
                    self._running_ahead = False
            else:
                results = backend.run(requests)
            backend.synchronize()
            if len(results) != len(items):
                raise RuntimeError(f"backend returned {len(results)} results for {len(items)} requests")
        except Exception as e:
            error, results = e, None
        run_s = time.perf_counter() - t0
        if flushes := _end_flushes(requests):
            flush_all(flushes)  # pieces still held go to the loop before the job's end does
        units = [r.work_units for r in results] if results is not None else [0.0] * len(items)
        members = [(it.tag, w) for it, w in zip(items, units, strict=True) if it.tag is not UNCHARGED]
        if self._sent_ahead:  # the model process runs the next job already, whatever this one did
            self._sent_ahead = False
            return (results, error, handle, run_s), self.monitor.split(handle, members)
        taken = self._taken  # taken while this job ran, not sent ahead (another backend's)
        if taken is None and error is None and self.gate.is_set():
            taken = self._take_queued()
        if taken is None or error is not None or not self.gate.is_set():
            self.monitor.end(handle, members)
            return (results, error, handle, run_s), None
        return (results, error, handle, run_s), self.monitor.split(handle, members)

    def _ahead_of(self, backend: Backend) -> Callable[[], list[BackendRequest] | None]:
        """For `run_ahead`: take the next job from the queue, while the device is not paused; its
        requests, where it is for the same backend (it is sent ahead, and begins at this job's
        end, at the same boundary), else None (it runs next as usual). The model process starts a
        job sent ahead as soon as the running one ends, so the boundary that ends the running job
        (here, once its answer is read) falls a little after the next one began: that sliver of the
        next job's energy is charged to the running one."""

        def ahead() -> list[BackendRequest] | None:
            if self._taken is not None or not self.gate.is_set():
                return None
            job = self._take_queued()
            if job is None or job[2] is not backend:
                return None
            self._sent_ahead = True
            return [it.request for it in job[3]]

        return ahead

    def _take_queued(self) -> _Job | None:
        """Take the next queued job as `_taken`; None when none is queued, or only the close is (which
        stays queued: nothing can be queued behind it)."""
        try:
            job = self._jobs.get_nowait()
        except queue.Empty:
            return None
        if job is None:
            self._jobs.put(None)
            return None
        self._taken = job
        return job

    def close(self) -> None:
        """Stop taking jobs; return once the queued ones have run."""
        self._closed = True
        self.gate.set()
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
        self._wake.close()
        self._waker.close()


def _settle(future: asyncio.Future[JobResult], result: JobResult | None, error: BaseException | None) -> None:
    if future.cancelled():  # its batcher was stopped
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert result is not None
        future.set_result(result)


Recorder = Callable[[Sequence[Outcome]], Awaitable[None]]


@dataclass(eq=False)
class ModelQueue:
    """The queue and batcher of one model."""

    name: str
    task: str
    backend: Backend
    device: DeviceWorker
    max_batch_size: int
    max_wait_s: float
    max_queue: int
    record: Recorder
    clock: Callable[[], float] = time.monotonic
    max_queue_per_user: int | None = None
    fair: bool = False  # batches take users in turn when more wait than a batch holds (`_fair_batch`)
    stream_interval_s: float = 0.0  # StepPieces' interval_s
    items: deque[WorkItem] = field(default_factory=deque)
    queued_units: int = 0  # the queued items' units (WorkItem.units)
    running: int = 0
    batch_seconds_ewma: float = 0.0
    # Members answered in the model's last answers and not yet matched by an arrival, and when those
    # answers went out: the batch-mates that may be on their way.
    _returning: int = 0
    _answered_s: float = -math.inf
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    step_pieces: StepPieces | None = None  # made by `start`, on the serving loop
    # Jobs handed to the device and not yet finished, oldest first: the one running and at most one
    # full batch queued behind it, which the device's thread starts as soon as the running one ends (no
    # round trip through the event loop in between). A batch is queued ahead as soon as it is full
    # (`submit`, or the batcher when a job ends); a partial one waits, as it would have, for the running
    # job to end and more requests to arrive.
    _in_flight: deque[tuple[list[WorkItem], asyncio.Future[JobResult]]] = field(default_factory=deque)
    _finishers: set[asyncio.Task[None]] = field(default_factory=set)
    # fair: the number of the last batch each user had a request in (batches counted from 1)
    _served: dict[str, int] = field(default_factory=dict)
    _batches: int = 0

    def depth(self) -> int:
        return len(self.items)

    def submit(
        self, request: BackendRequest, tag: RequestTag, *, pieces: asyncio.Queue[Piece | None] | None = None
    ) -> WorkItem:
        if len(self.items) >= self.max_queue:
            raise QueueFull(self.name, self._retry_after_s(len(self.items)))
        cap = self.max_queue_per_user
        if cap is not None and len(self.items) >= cap:  # (a scan of the queue only where it may be over)
            user = tag.user
            if sum(1 for it in self.items if it.tag.user == user) >= cap:
                raise QueueFull(self.name, self._retry_after_s(cap), user)
        loop = asyncio.get_running_loop()
        item = WorkItem(
            request=request,
            tag=tag,
            key=self.backend.batch_key(request),
            enqueued_s=self.clock(),
            future=loop.create_future(),
            pieces=pieces,
            units=request.n if isinstance(request, ImageRequest) else 1,
        )
        self.items.append(item)
        self.queued_units += item.units
        if self._returning:
            self._returning -= 1
        self._arrived.set()
        if len(self._in_flight) == 1 and self.queued_units >= self.max_batch_size:
            self._queue_ahead()
        return item

    def check_room(self, count: int, user: str) -> None:
        """QueueFull unless `count` more requests of `user` fit in the queue: the members of one HTTP
        request are admitted together or not at all, before any is queued (a member queued first
        could complete a batch that is handed to the device at once, and run though refused)."""
        if len(self.items) + count > self.max_queue:
            raise QueueFull(self.name, self._retry_after_s(len(self.items)))
        cap = self.max_queue_per_user
        if (
            cap is not None
            and len(self.items) + count > cap  # (a scan of the queue only where it may be over)
            and sum(1 for it in self.items if it.tag.user == user) + count > cap
        ):
            raise QueueFull(self.name, self._retry_after_s(cap), user)

    def _retry_after_s(self, queued: int) -> float:
        """When `queued` requests ahead will have run: their batches and the running ones, each at the
        recent batch time (at least 0.1 s), and at least a second."""
        batches_ahead = math.ceil(queued / self.max_batch_size) + self.running
        return max(1.0, batches_ahead * max(self.batch_seconds_ewma, 0.1))

    def drop(self, item: WorkItem) -> bool:
        """Remove a queued item whose client left. False if its batch already started."""
        if item.state != "queued":
            return False
        item.state = "dropped"
        with contextlib.suppress(ValueError):
            self.items.remove(item)
            self.queued_units -= item.units
        return True

    def start(self) -> None:
        self.step_pieces = StepPieces(asyncio.get_running_loop(), self.stream_interval_s)
        self._task = asyncio.create_task(self._batcher(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._finishers:
            await asyncio.gather(*self._finishers, return_exceptions=True)

    def idle(self) -> bool:
        return not self.items and self.running == 0 and not self._finishers

    def _compatible(self, key: Hashable) -> list[WorkItem]:
        """The queued items of `key` in arrival order, as many as `max_batch_size` holds (in units: an
        image request's images; the first always, however many it has)."""
        batch: list[WorkItem] = []
        units, size = 0, self.max_batch_size
        for it in self.items:
            if it.key == key:
                if batch and units + it.units > size:
                    break
                batch.append(it)
                units += it.units
                if units >= size:
                    break
        return batch

    def _choose(self) -> list[WorkItem]:
        """The next batch from the queue as it is: the oldest item and its compatible items in arrival
        order, or, when more wait than a batch holds and the order is fair, `_fair_batch`."""
        if self.fair and self.queued_units > self.max_batch_size:
            return self._fair_batch()
        return self._compatible(self.items[0].key)

    def _has_room(self, batch: list[WorkItem], key: Hashable) -> bool:
        """Whether `batch` could still take a batch-mate: under `max_batch_size` in units, and nothing
        compatible queued left out of it (FIFO: what did not fit is not passed over for a later one)."""
        units = sum(it.units for it in batch)
        if units >= self.max_batch_size:
            return False
        return sum(1 for it in self.items if it.key == key and it.state == "queued") <= len(batch)

    def _fair_batch(self) -> list[WorkItem]:
        """Users in turn: the user whose last batch is oldest (never served first; ties in the order of
        their oldest queued requests) leads, with their oldest request's key; then one compatible
        request of each user in that order, round after round, each user's in arrival order."""
        size, served = self.max_batch_size, self._served
        oldest: dict[str, WorkItem] = {}
        for it in self.items:
            if it.tag.user not in oldest:
                oldest[it.tag.user] = it
        if len(oldest) == 1:  # one user: arrival order
            return self._compatible(self.items[0].key)
        order = sorted(oldest, key=lambda user: served.get(user, 0))  # stable: ties keep arrival order
        key = oldest[order[0]].key
        mine: dict[str, list[WorkItem]] = {user: [] for user in order}
        for it in self.items:
            if it.key == key and len(queued := mine[it.tag.user]) < size:
                queued.append(it)
        batch: list[WorkItem] = []
        units = 0
        for turn in range(size):
            for user in order:
                if turn < len(queued := mine[user]):
                    it = queued[turn]
                    if batch and units + it.units > size:
                        return batch
                    batch.append(it)
                    units += it.units
                    if units >= size:
                        return batch
        return batch

    def _all_back(self) -> bool:
        """Whether every member answered in the last `max_wait_s` has been matched by an arrival since:
        no batch-mate to wait for. False without recent answers (a quiet model waits as configured)."""
        if self.clock() - self._answered_s > self.max_wait_s:
            self._returning = 0
            return False
        return self._returning == 0

    def _full_batch(self) -> list[WorkItem] | None:
        """A full batch of queued items (`_choose`'s), if one is waiting: `max_batch_size` in units, or
        as many as fit before the next compatible one, which does not."""
        if self.queued_units < self.max_batch_size or not self.items:
            return None
        batch = [it for it in self._choose() if it.state == "queued"]
        return batch if batch and not self._has_room(batch, batch[0].key) else None

    async def _next_batch(self) -> list[WorkItem]:
        """Wait for the next batch: the oldest item and its compatible items, waiting for batch-mates
        as the module says."""
        while True:
            while not self.items:
                self._arrived.clear()
                await self._arrived.wait()
            first = self.items[0]
            deadline = first.enqueued_s + self.max_wait_s
            batch = self._compatible(first.key)
            while (
                self._has_room(batch, first.key)
                and (remaining := deadline - self.clock()) > 0
                and not self._all_back()
            ):
                self._arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                if first.state != "queued":
                    break
                batch = self._compatible(first.key)
            batch = [it for it in self._choose() if it.state == "queued"] if self.items else []
            if batch:
                return batch

    def _dispatch(self, batch: list[WorkItem]) -> asyncio.Future[JobResult]:
        for it in batch:
            self.items.remove(it)
            self.queued_units -= it.units
            it.state = "running"
        if self.fair:
            self._batches += 1
            for it in batch:
                self._served[it.tag.user] = self._batches
        self.running += 1
        return self.device.submit(self.backend, batch)

    def _queue_ahead(self) -> None:
        """With one job on the device, hand it the full batch that is waiting, if one is."""
        if len(self._in_flight) == 1 and (ahead := self._full_batch()) is not None:
            self._in_flight.append((ahead, self._dispatch(ahead)))

    async def _batcher(self) -> None:
        in_flight = self._in_flight
        try:
            while True:
                if not in_flight:
                    batch = await self._next_batch()
                    in_flight.append((batch, self._dispatch(batch)))
                self._queue_ahead()  # and `submit`, when an arrival completes a batch meanwhile
                batch, job = in_flight[0]
                try:
                    results, error, handle, run_s = await job
                except BaseException:
                    self.running -= len(in_flight)
                    raise
                in_flight.popleft()
                self.running -= 1
                self._ended(batch, results, error, handle, run_s)
        finally:  # stopped: no job is waited for any more, and `submit` hands the device none
            for _, job in in_flight:
                job.cancel()
            in_flight.clear()

    def _ended(
        self,
        batch: list[WorkItem],
        results: list[BackendResult] | None,
        error: BaseException | None,
        handle: JobHandle,
        run_s: float,
    ) -> None:
        self.batch_seconds_ewma = (
            run_s if not self.batch_seconds_ewma else 0.8 * self.batch_seconds_ewma + 0.2 * run_s
        )
        for it in batch:
            if it.pieces is not None:
                it.pieces.put_nowait(None)
        if error is not None:
            log.error("batch of %d on model %s failed: %r", len(batch), self.name, error)
        finisher = asyncio.create_task(self._finish(batch, results, error, handle, run_s))
        self._finishers.add(finisher)
        finisher.add_done_callback(self._finishers.discard)

    async def _finish(
        self,
        batch: Sequence[WorkItem],
        results: Sequence[BackendResult] | None,
        error: BaseException | None,
        handle: JobHandle,
        run_s: float,
    ) -> None:
        """Make the answers' PNGs, wait for the job's energy to be final, record every member, then
        answer them."""
        encoding = None
        if results and error is None and type(results[0]) is ImageResult:
            # decoded images (the device's thread went on to its next batch): each member's PNGs are
            # made on a worker thread of their own (Pillow's encoder lets go of the interpreter lock),
            # while the energy becomes final, and before the record, so that a member whose encoding
            # fails is recorded as the error it is answered with
            encoding = asyncio.gather(
                *(_encoded(r, not it.future.done()) for r, it in zip(results, batch, strict=True)),
                return_exceptions=True,
            )
        # Most jobs are final when they end (their charges are set): no future to make and await then.
        charges = handle.charges
        if charges is None:
            charges = await handle.final()
        member_errors: Sequence[BaseException | None] | None = None
        if encoding is not None:
            encoded = await encoding
            member_errors = [e if isinstance(e, BaseException) else None for e in encoded]
            results = [r if e is None else None for r, e in zip(encoded, member_errors, strict=True)]
            for failed in filter(None, member_errors):
                log.error("making the PNGs of a request on model %s failed: %r", self.name, failed)
        start_s = handle.start_s
        outcomes = []
        for i, it in enumerate(batch):
            member_error = error if member_errors is None else member_errors[i]
            status: Status = (
                "error" if member_error is not None else ("cancelled" if it.future.done() else "ok")
            )
            outcomes.append(
                Outcome(  # positional, in field order (a member of every batch: keywords cost more)
                    it.tag,  # tag
                    it.request,  # request
                    results[i] if results is not None else None,  # result (None where it failed)
                    member_error,  # error
                    charges[it.tag],  # charge
                    status,  # status
                    max(start_s - it.enqueued_s, 0.0),  # queue_wait_s
                    run_s,  # run_s
                    len(batch),  # batch_size
                    max(self.clock() - it.enqueued_s, 0.0),  # duration_s
                )
            )
        try:
            await self.record(outcomes)
        except Exception as e:
            log.error("recording a batch of %d on model %s failed: %s", len(batch), self.name, e)
            for it in batch:
                it.state = "done"
                if not it.future.done():
                    it.future.set_exception(NotRecorded(str(e)))
            return
        # Before the answers go out (a client cannot come back before its answer): who may come back.
        self._returning += sum(1 for it in batch if not it.future.done())
        self._answered_s = self.clock()
        for it, outcome in zip(batch, outcomes, strict=True):
            it.state = "done"
            if not it.future.done():
                it.future.set_result(outcome)


async def _encoded(result: BackendResult, wanted: bool) -> BackendResult:
    """The result with its decoded images made PNGs on a worker thread, where it is `wanted` (its
    client is still there) and has any; else as it is."""
    if wanted and isinstance(result, ImageResult) and result.images:
        return await asyncio.to_thread(result.encoded)
    return result


class Scheduler:
    """All model queues and device workers."""

    def __init__(self) -> None:
        self.queues: dict[str, ModelQueue] = {}
        self.devices: dict[str, DeviceWorker] = {}

    def add_device(self, worker: DeviceWorker) -> None:
        self.devices[worker.device] = worker

    def add_model(self, queue: ModelQueue) -> None:
        self.queues[queue.name] = queue
        queue.start()

    def depths(self) -> dict[str, int]:
        return {name: q.depth() for name, q in self.queues.items()}

    def idle(self) -> bool:
        return all(q.idle() for q in self.queues.values())

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every queue is empty and no job runs (bounded). True if drained in time."""
        deadline = time.monotonic() + timeout_s
        while not self.idle():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def stop(self) -> None:
        for q in self.queues.values():
            await q.stop()
        loop = asyncio.get_running_loop()
        for worker in self.devices.values():
            await loop.run_in_executor(None, worker.close)
