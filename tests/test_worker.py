"""The device's worker thread: jobs back to back share one meter read at their common boundary."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable, Sequence

from backends.base import BackendRequest, BackendResult, ImageRequest, ImageResult
from proxy.energy.meter import Reading, SyntheticMeter
from proxy.energy.monitor import DeviceMonitor
from proxy.scheduler import DeviceWorker, RequestTag, StepPieces, WorkItem


class CountingMeter(SyntheticMeter):
    """A continuous synthetic meter that notes the thread of every read."""

    def __init__(self) -> None:
        super().__init__("cpu", idle_watts=50.0, busy_watts=300.0)
        self.readers: list[str] = []

    def read(self) -> Reading:
        self.readers.append(threading.current_thread().name)
        return super().read()


class SleepingBackend:
    """Each call sleeps 20 ms; a prompt of "fail" raises."""

    name, task, device = "sleeper", "image", "cpu"

    def load(self) -> None: ...

    def batch_key(self, request: BackendRequest) -> Hashable:
        return "all"

    def run(self, batch: Sequence[BackendRequest]) -> list[BackendResult]:
        time.sleep(0.02)
        if any(isinstance(r, ImageRequest) and r.prompt == "fail" for r in batch):
            raise RuntimeError("failed on purpose")
        return [ImageResult(images_png=(b"",), seeds=(0,), work_units=1.0) for _ in batch]

    def synchronize(self) -> None: ...

    def close(self) -> None: ...


def item(prompt: str) -> WorkItem:
    """An image request for SleepingBackend, its future on the running loop."""
    tag = RequestTag(request_id=prompt, model="sleeper", task="image", user="u")
    return WorkItem(ImageRequest(prompt=prompt), tag, "all", 0.0, asyncio.get_running_loop().create_future())


def test_back_to_back_jobs_share_their_boundary_read_and_conserve_energy() -> None:
    meter = CountingMeter()
    monitor = DeviceMonitor(meter)  # no sampler: every read is a job boundary's
    worker = DeviceWorker("cpu", monitor)
    backend = SleepingBackend()

    async def run_all() -> list[tuple[object, ...]]:
        worker.gate.clear()  # all four queued before the first starts
        futures = [worker.submit(backend, [item(p)]) for p in ("a", "b", "fail", "c")]
        worker.gate.set()
        return list(await asyncio.gather(*futures))

    done = asyncio.run(run_all())
    worker.close()
    monitor.stop()
    (_, _, a, _), (_, _, b, _), (_, error, failed, _), (_, _, c, _) = done  # type: ignore[misc]
    assert isinstance(error, RuntimeError)
    charges = [next(iter(h.charges.values())) for h in (a, b, failed, c)]  # type: ignore[union-attr]
    # a -> b -> fail: each next job begun at the last one's end, with that read; a failed job is
    # ended alone (the device may hold its half-done work), and the next begins with reads of its own
    assert charges[0].end_s == charges[1].start_s and charges[1].end_s == charges[2].start_s
    assert charges[2].end_s < charges[3].start_s
    device_reads = [name for name in meter.readers if name == "device-cpu"]
    # begin a, a|b, b|fail, end fail, begin c, end c: 6 reads where a begin and an end each would be 8
    assert len(device_reads) == 6
    # conservation: every joule the meter showed went to a job or to idle
    jobs_j = sum(ch.joules for ch in charges)
    assert abs(jobs_j + monitor.committed_idle_j - monitor.processed_j) < 1e-9
    assert all(ch.joules > 0 and ch.measurement == "synthetic" for ch in charges)


class SteppedBlockingMeter(CountingMeter):
    """As NVML's counter: stepped (every 30 ms) and its reads block (each takes 3 ms here)."""

    blocking_reads = True

    def __init__(self) -> None:
        SyntheticMeter.__init__(self, "cuda:0", idle_watts=50.0, busy_watts=300.0, update_period_s=0.03)
        self.readers = []

    def read(self) -> Reading:
        time.sleep(0.003)
        return super().read()


def test_a_device_thread_never_waits_for_a_blocking_meter_read() -> None:
    """A meter whose reads block (NVML: 3-4.6 ms a read on an H200) is never read by the device thread
    at a job's boundaries: the device would sit idle for each read. The boundaries are the clock's,
    the sampler reads (woken at a job's start on an idle device, polling at its end), each job is final
    once the counter has stepped past its end, and the books close."""
    meter = SteppedBlockingMeter()
    monitor = DeviceMonitor(meter, sample_period_s=0.05, finalize_poll_s=0.002)
    monitor.start()
    worker = DeviceWorker("cuda:0", monitor)
    backend = SleepingBackend()

    async def run_all() -> list[tuple[object, ...]]:
        worker.gate.clear()  # three back to back, then one alone on an idle device
        futures = [worker.submit(backend, [item(p)]) for p in ("a", "b", "c")]
        worker.gate.set()
        done = list(await asyncio.gather(*futures))
        await asyncio.sleep(0.1)
        done.append(await worker.submit(backend, [item("d")]))
        return done

    done = asyncio.run(run_all())
    handles = [h for _, _, h, _ in done]  # type: ignore[misc]
    charges = [next(iter(h.result.result(timeout=5).values())) for h in handles]  # type: ignore[union-attr]
    worker.close()
    monitor.stop()
    assert "device-cuda:0" not in meter.readers and meter.readers  # the sampler's reads only
    assert charges[0].end_s == charges[1].start_s and charges[1].end_s == charges[2].start_s
    assert all(ch.joules > 0 and ch.measurement == "synthetic" for ch in charges)
    jobs_j = sum(ch.joules for ch in charges)
    assert abs(jobs_j + monitor.committed_idle_j - monitor.processed_j) < 1e-9 * monitor.processed_j


def test_a_job_taken_early_still_runs_when_its_predecessor_breaks_at_the_split() -> None:
    """A bug at the shared read fails the job that ended there (its batcher sees it), never the job
    taken from the queue: that one runs next, begun with a read of its own."""
    meter = CountingMeter()
    monitor = DeviceMonitor(meter)
    worker = DeviceWorker("cpu", monitor)
    backend = SleepingBackend()
    split = monitor.split
    calls: list[int] = []

    def broken_once(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in the monitor")
        return split(*args, **kwargs)  # type: ignore[arg-type]

    monitor.split = broken_once  # type: ignore[method-assign]

    async def run_all() -> list[object]:
        worker.gate.clear()
        futures = [worker.submit(backend, [item(p)]) for p in ("a", "b")]
        worker.gate.set()
        return list(await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10))

    first, second = asyncio.run(run_all())
    worker.close()
    assert isinstance(first, RuntimeError) and str(first) == "a bug in the monitor"
    results, error, _, _ = second  # type: ignore[misc]
    assert error is None and results is not None  # settled: its batcher is not left waiting
    assert len(calls) == 1  # b, the last job, ended on its own


async def test_final_charges_wake_the_loop_once_for_handles_finalized_together() -> None:
    """`JobHandle.final()`: jobs finalized on another thread wake their waiters with one loop callback
    for all of them; a waiter cancelled on the way does not stop a later one; a final job needs no wait."""
    loop = asyncio.get_running_loop()
    meter = SyntheticMeter("cuda:0", idle_watts=0.0, busy_watts=100.0)
    meter.blocking_reads = True  # as NVML's: the loop's boundaries are the clock's, the sampler finalizes
    monitor = DeviceMonitor(meter, finalize_poll_s=0.001)
    calls = []
    original = loop.call_soon_threadsafe

    def counted(callback, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(getattr(callback, "__name__", ""))
        return original(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    try:
        monitor.start()
        handles = [monitor.begin(on_loop=True) for _ in range(5)]  # as proxy mode's requests begin
        waits = [asyncio.ensure_future(h.final()) for h in handles]
        cancelled = asyncio.ensure_future(handles[0].final())
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        again = asyncio.ensure_future(handles[0].final())  # after a cancelled waiter on the same handle
        await asyncio.sleep(0.01)
        # ended from the loop: final once the sampler reads past the ends (a job whose end the sampler
        # has read past before the next end is finalized by that next end, on the loop, at once)
        for i, h in enumerate(handles):
            monitor.end(h, [(i, 1.0)], 1.0)
        charges = await asyncio.wait_for(asyncio.gather(*waits, again), 10)
    finally:
        loop.call_soon_threadsafe = original  # type: ignore[method-assign]
        monitor.stop()
    assert cancelled.cancelled()
    assert [set(c) for c in charges] == [{0}, {1}, {2}, {3}, {4}, {0}]
    assert sum(c[i].joules for i, c in enumerate(charges[:5])) > 0
    # the sampler finalized them together: fewer wake-ups than handles (one, unless the interpreter
    # switched threads between two of them), and none of asyncio.wrap_future's one a handle
    assert 1 <= calls.count("_wake_all") < len(handles), calls
    assert await handles[1].final() is charges[1]  # final already: returned at once


async def test_step_pieces_are_held_for_interval_s_after_a_hand_over() -> None:
    """`StepPieces.flush` hands the held pieces over unless the last hand-over is under `interval_s`
    old; `flush_now` (a job's end) always does; with no interval every flush does."""
    held = StepPieces(asyncio.get_running_loop(), interval_s=60.0)
    sink = held.sink()
    sink("a")
    sink.flush()  # the first hand-over
    await asyncio.sleep(0.01)
    assert sink.pieces.get_nowait() == "a"
    sink("b")
    sink("c")
    sink.flush()  # within the interval: held
    await asyncio.sleep(0.01)
    assert sink.pieces.empty()
    held.flush_now()
    await asyncio.sleep(0.01)
    assert [sink.pieces.get_nowait(), sink.pieces.get_nowait()] == ["b", "c"]
    each = StepPieces(asyncio.get_running_loop())
    other = each.sink()
    for piece in "xyz":
        other(piece)
        other.flush()
    await asyncio.sleep(0.01)
    assert [other.pieces.get_nowait() for _ in range(3)] == ["x", "y", "z"]
