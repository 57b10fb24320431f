"""The device's worker thread: jobs back to back share one meter read at their common boundary."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable, Sequence

from backends.base import BackendRequest, BackendResult, ImageRequest, ImageResult
from proxy.energy.meter import Reading, SyntheticMeter
from proxy.energy.monitor import DeviceMonitor
from proxy.scheduler import DeviceWorker, RequestTag, WorkItem


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


def test_back_to_back_jobs_share_their_boundary_read_and_conserve_energy() -> None:
    meter = CountingMeter()
    monitor = DeviceMonitor(meter)  # no sampler: every read is a job boundary's
    worker = DeviceWorker("cpu", monitor)
    backend = SleepingBackend()

    async def run_all() -> list[tuple[object, ...]]:
        loop = asyncio.get_running_loop()

        def item(prompt: str) -> WorkItem:
            tag = RequestTag(request_id=prompt, model="sleeper", task="image", user="u")
            return WorkItem(ImageRequest(prompt=prompt), tag, "all", 0.0, loop.create_future())

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
        loop = asyncio.get_running_loop()

        def item(prompt: str) -> WorkItem:
            tag = RequestTag(request_id=prompt, model="sleeper", task="image", user="u")
            return WorkItem(ImageRequest(prompt=prompt), tag, "all", 0.0, loop.create_future())

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
