"""Per-model queues, dynamic batching, backpressure, cancellation, and one worker thread per device.

A request becomes a `WorkItem` in its model's bounded queue. The model's batcher takes the oldest
item and every queued item with the same `batch_key`, up to `max_batch_size`, waiting at most
`max_wait_ms` (counted from the oldest item's arrival) for more, unless every member it answered in
the last `max_wait_ms` has been followed by an arrival: then no batch-mate is on its way (a lone
client, say, that sends its next request once answered) and the batch starts at once. The batch runs
as one *job* on the device's single worker thread, bracketed by the device monitor's meter reads
after synchronization.
While a job runs, the queue fills, so batches grow with load. A request whose client leaves while it
is queued is dropped and never runs; one whose batch has started is charged (the device did the work).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from backends.base import Backend, BackendRequest, BackendResult
from proxy.carbon import CarbonCharge
from proxy.energy.monitor import Charge, DeviceMonitor, JobHandle

log = logging.getLogger(__name__)


@dataclass(eq=False)
class RequestTag:
    """Who a member of a job is: the labels it is accounted under. `carbon` is set at commit."""

    request_id: str
    model: str
    task: str
    user: str
    key_id: str | None = None
    carbon: CarbonCharge | None = None


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
    pieces: asyncio.Queue[str | None] | None = None
    state: Literal["queued", "dropped", "running", "done"] = "queued"


class NotRecorded(Exception):
    """The ledger could not commit a finished batch: its requests must not be answered as successes."""


class QueueFull(Exception):
    def __init__(self, model: str, retry_after_s: float) -> None:
        super().__init__(f"the queue for model {model!r} is full; retry after {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


JobResult = tuple[list[BackendResult] | None, BaseException | None, JobHandle, float]
_Job = tuple[asyncio.AbstractEventLoop, asyncio.Future[JobResult], Backend, Sequence[WorkItem]]


class DeviceWorker:
    """One thread per device; runs jobs one at a time and brackets each with meter reads.

    The thread is its own (a queue in, `call_soon_threadsafe` out) rather than a one-thread executor:
    the round trip of every batch is then cheaper (no concurrent future chained to an asyncio one)."""

    def __init__(self, device: str, monitor: DeviceMonitor) -> None:
        self.device = device
        self.monitor = monitor
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None  # started by the first job
        self._closed = False
        # Cleared, it holds jobs before they start (used to pause a device, and by tests).
        self.gate = threading.Event()
        self.gate.set()

    async def run(self, backend: Backend, items: Sequence[WorkItem]) -> JobResult:
        """`run_job` in the device's thread, jobs in the order they are given."""
        if self._closed:
            raise RuntimeError(f"the worker of device {self.device} is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=f"device-{self.device}", daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[JobResult] = loop.create_future()
        self._jobs.put((loop, future, backend, items))
        return await future

    def _main(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, backend, items = job
            try:
                done: tuple[JobResult | None, BaseException | None] = (self.run_job(backend, items), None)
            except BaseException as e:  # run_job never raises but for a bug: its batcher sees it
                done = (None, e)
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, *done)

    def run_job(self, backend: Backend, items: Sequence[WorkItem]) -> JobResult:
        """Runs in the worker thread. Never raises: a failed batch is still a measured job."""
        self.gate.wait()
        backend.synchronize()
        handle = self.monitor.begin()
        t0 = time.perf_counter()
        results: list[BackendResult] | None = None
        error: BaseException | None = None
        try:
            results = backend.run([it.request for it in items])
            backend.synchronize()
            if len(results) != len(items):
                raise RuntimeError(f"backend returned {len(results)} results for {len(items)} requests")
        except Exception as e:
            error, results = e, None
        run_s = time.perf_counter() - t0
        units = [r.work_units for r in results] if results is not None else [0.0] * len(items)
        self.monitor.end(handle, [(it.tag, w) for it, w in zip(items, units, strict=True)])
        return results, error, handle, run_s

    def close(self) -> None:
        """Stop taking jobs; return once the queued ones have run."""
        self._closed = True
        self.gate.set()
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()


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
    items: deque[WorkItem] = field(default_factory=deque)
    running: int = 0
    batch_seconds_ewma: float = 0.0
    # Members answered in the model's last answers and not yet matched by an arrival, and when those
    # answers went out: the batch-mates that may be on their way.
    _returning: int = 0
    _answered_s: float = -math.inf
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _finishers: set[asyncio.Task[None]] = field(default_factory=set)

    def depth(self) -> int:
        return len(self.items)

    def submit(
        self, request: BackendRequest, tag: RequestTag, *, pieces: asyncio.Queue[str | None] | None = None
    ) -> WorkItem:
        if len(self.items) >= self.max_queue:
            batches_ahead = math.ceil(len(self.items) / self.max_batch_size) + self.running
            raise QueueFull(self.name, max(1.0, batches_ahead * max(self.batch_seconds_ewma, 0.1)))
        loop = asyncio.get_running_loop()
        item = WorkItem(
            request=request,
            tag=tag,
            key=self.backend.batch_key(request),
            enqueued_s=self.clock(),
            future=loop.create_future(),
            pieces=pieces,
        )
        self.items.append(item)
        if self._returning:
            self._returning -= 1
        self._arrived.set()
        return item

    def drop(self, item: WorkItem) -> bool:
        """Remove a queued item whose client left. False if its batch already started."""
        if item.state != "queued":
            return False
        item.state = "dropped"
        with contextlib.suppress(ValueError):
            self.items.remove(item)
        return True

    def start(self) -> None:
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
        return [it for it in self.items if it.key == key][: self.max_batch_size]

    def _all_back(self) -> bool:
        """Whether every member answered in the last `max_wait_s` has been matched by an arrival since:
        no batch-mate to wait for. False without recent answers (a quiet model waits as configured)."""
        if self.clock() - self._answered_s > self.max_wait_s:
            self._returning = 0
            return False
        return self._returning == 0

    async def _batcher(self) -> None:
        while True:
            while not self.items:
                self._arrived.clear()
                await self._arrived.wait()
            first = self.items[0]
            deadline = first.enqueued_s + self.max_wait_s
            batch = self._compatible(first.key)
            while (
                len(batch) < self.max_batch_size
                and (remaining := deadline - self.clock()) > 0
                and not self._all_back()
            ):
                self._arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                if first.state != "queued":
                    break
                batch = self._compatible(first.key)
            batch = [it for it in self._compatible(first.key) if it.state == "queued"] if self.items else []
            if not batch:
                continue
            for it in batch:
                self.items.remove(it)
                it.state = "running"
            self.running += 1
            try:
                results, error, handle, run_s = await self.device.run(self.backend, batch)
            except BaseException:
                self.running -= 1
                raise
            self.running -= 1
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
        """Wait for the job's energy to be final, record every member, then answer them."""
        # Most jobs are final when they end (their charges are set): no future to make and await then.
        charges = handle.charges
        if charges is None:
            charges = await asyncio.wrap_future(handle.result)
        start_s = handle.start_s
        outcomes = []
        for i, it in enumerate(batch):
            status: Status = "error" if error is not None else ("cancelled" if it.future.done() else "ok")
            outcomes.append(
                Outcome(  # positional, in field order (a member of every batch: keywords cost more)
                    it.tag,  # tag
                    it.request,  # request
                    results[i] if results is not None else None,  # result
                    error,  # error
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
