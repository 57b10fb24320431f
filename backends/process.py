"""A model that runs in a process of its own (`own_process = true` in a model's settings).

In the serving process the event loop (HTTP, validation, accounting) and the device's worker thread
(the model's Python: `generate`'s loop, a diffusion pipeline's steps) share one interpreter lock.
Where the model's Python is much of its time (small models, and on a GPU any decoding that is bound
by kernel launches), every request the loop handles holds the model back. Here the model runs in a
child process with an interpreter of its own; the worker thread sends it each batch and waits.

The parent keeps a *front* that answers what the server asks before a batch (the prompt's tokens,
the context size, batch keys) without the weights. Nothing else changes: the worker thread still
reads the meter around the job (it brackets the round trip to the child), and a streamed member's
pieces come back as messages (one a decoding step for all its streamed members), handed to their
`on_text` on the worker thread, as in-process.

CPU-time estimates must count the child's CPU: each answer carries the child's process CPU time,
and `cpu_seconds` (this process's CPU plus every child's last report) is the estimated meter's clock
where models run in processes of their own. A child reports when a batch ends, so its CPU lands in
the job that spent it.

A child that dies fails the batch it was running (RuntimeError, recorded as a failed job) and is
started again, its model loaded again, at the next batch. So does a child that runs a batch for longer
than `batch_timeout_s` (where set): it is taken as hung (a deadlock, a kernel that never returns) and
killed, so that the device's queue moves on.

A child's life is its server's: it runs in a session of its own and ignores SIGINT and SIGTERM, so that
a terminal's Ctrl-C or a service manager's SIGTERM to every process of the service reaches the server
alone, which drains (its in-flight batches finish in their model processes) and then stops its
children. A child whose server is gone reads the end of its pipe and exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from backends.base import (
    BackendRequest,
    BackendResult,
    Task,
    TextPiece,
    TextRequest,
    flush_all,
    flushes_of,
    freeze_heap,
)

log = logging.getLogger(__name__)
_PROJECT_ROOT = Path(__file__).resolve().parent.parent  # where `backends` is importable from

_reports_lock = threading.Lock()
_reports: dict[int, float] = {}  # a child's serial number -> its last reported process CPU time, s
_serials = iter(range(1, 1 << 62))


def cpu_seconds() -> float:
    """This process's CPU time plus the last one each of its model processes reported (dead ones
    included: what they spent was spent), s. Non-decreasing."""
    with _reports_lock:
        children = sum(_reports.values())
    return time.process_time() + children


def _report(serial: int, cpu_s: float) -> None:
    with _reports_lock:
        if cpu_s > _reports.get(serial, 0.0):
            _reports[serial] = cpu_s


def _child_main(
    conn: Connection,
    task: Task,
    name: str,
    source: str,
    device: str,
    dtype: str,
    torch_threads: int | None,
    cuda_graphs: bool = False,
) -> None:
    """The model process: load, answer "ready", then run each batch it is sent until told to stop."""
    import torch

    from backends import load_backend

    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        backend = load_backend(task, name, source, device=device, dtype=dtype, cuda_graphs=cuda_graphs)
    except BaseException as e:
        conn.send(("failed", _sendable(e), time.process_time()))
        return
    # As the serving process does once its models are loaded (proxy.app.freeze_heap): the model's heap
    # out of the cyclic collector's reach, whose full passes over it would stall generation.
    freeze_heap()
    conn.send(("ready", None, time.process_time()))
    try:
        while (message := conn.recv()) is not None:
            requests, streamed, interval_s = message
            sender = _StepSender(conn, interval_s)
            batch = [
                replace(r, on_text=sender.member(i)) if i in streamed else r for i, r in enumerate(requests)
            ]
            try:
                results = backend.run(batch)
                backend.synchronize()
            except Exception as e:
                sender.flush_now()
                conn.send(("error", _sendable(e), time.process_time()))
            else:
                sender.flush_now()
                conn.send(("done", results, time.process_time()))
    except (EOFError, OSError):  # the server is gone (it closed the pipe, or exited)
        pass
    finally:
        backend.close()


class _StepSender:
    """The streamed members' pieces of one batch, sent to the server a decoding step at a time: one
    message a step for all its members (the backend calls `flush` after each step) rather than one a
    piece; where steps come faster than the consumers' `interval_s` (they would hold the pieces that
    long anyway), a message every `interval_s`, with several steps' pieces."""

    def __init__(self, conn: Connection, interval_s: float = 0.0) -> None:
        self._conn = conn
        self._held: list[tuple[int, str | TextPiece]] = []
        self._interval_s = interval_s
        self._last_s = 0.0

    def member(self, index: int) -> _MemberSink:
        return _MemberSink(self._held, index, self.flush)

    def flush(self) -> None:
        """A step ended: send the held pieces, unless the last message is under `interval_s` old."""
        now_s = time.monotonic()
        if self._held and now_s - self._last_s >= self._interval_s:
            self._last_s = now_s
            self.flush_now()

    def flush_now(self) -> None:
        """Send the held pieces (the batch ended)."""
        if self._held:
            self._conn.send(("pieces", self._held, None))
            self._held.clear()


class _MemberSink:
    """A streamed member's `on_text` in the model process (_StepSender)."""

    __slots__ = ("_held", "_index", "flush")

    def __init__(
        self, held: list[tuple[int, str | TextPiece]], index: int, flush: Callable[[], None]
    ) -> None:
        self._held, self._index, self.flush = held, index, flush

    def __call__(self, piece: str | TextPiece) -> None:
        self._held.append((self._index, piece))


def _sendable(e: BaseException) -> BaseException:
    """`e` itself where it survives pickling, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(e))
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")
    return e


# What the server asks of a model before its batch runs, which the front (the tokenizer and config, in
# this process) answers for the model process.
_FRONTS = frozenset({"prompt_ids", "count_prompt_tokens", "max_context_tokens", "honours", "vocab_size"})


class ProcessBackend:
    """`front`'s model, run in a child process (see the module docstring). `front` is the same
    backend class, constructed for the same model and loaded without its weights (its `run` is
    never called); everything the server asks before a batch is the front's."""

    def __init__(
        self,
        front: Any,
        *,
        task: Task,
        name: str,
        source: str,
        device: str = "cpu",
        dtype: str = "auto",
        torch_threads: int | None = None,
        cuda_graphs: bool = False,
        batch_timeout_s: float | None = None,
        start_timeout_s: float = 600.0,
    ) -> None:
        if batch_timeout_s is not None and not batch_timeout_s > 0:
            raise ValueError(f"batch_timeout_s must be above 0, got {batch_timeout_s}")
        self.front = front
        self.batch_timeout_s = batch_timeout_s
        self.name = name
        self.task: Task = task
        self.device = device
        self._args = (task, name, source, device, dtype, torch_threads, cuda_graphs)
        self._start_timeout_s = start_timeout_s
        self._lock = threading.Lock()  # one batch at a time, and one child
        self._conn: Connection | None = None
        self._process: Any = None
        self._serial = 0
        self._closed = False
        # the batch sent ahead, and the serial number of the model process it was sent to
        self._ahead: tuple[int, list[BackendRequest]] | None = None
        self.sent_ahead = 0  # batches sent before the one running ended
        # model processes that ended other than by `close`: "died" (found gone, while running a batch
        # or between batches), "hung" (killed after batch_timeout_s)
        self.exits = {"died": 0, "hung": 0}

    # what the server asks before a batch: the front's

    def batch_key(self, request: BackendRequest) -> Hashable:
        return self.front.batch_key(request)

    def __getattr__(self, name: str) -> Any:  # prompt_ids, count_prompt_tokens, max_context_tokens, ...
        if name in _FRONTS and self.front is not None:
            return getattr(self.front, name)
        raise AttributeError(name)

    @property
    def pid(self) -> int | None:
        """The model process's id while one runs."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    # the model: the child's

    def load(self) -> None:
        """Start the model process and wait until its model is loaded (blocking)."""
        self.start()
        self.wait_loaded()

    def start(self) -> None:
        """Start the model process; it loads its model meanwhile (`wait_loaded`)."""
        with self._lock:
            self._spawn()

    def wait_loaded(self) -> None:
        """Wait until the model process started by `start` has loaded its model (blocking)."""
        with self._lock:
            self._wait_loaded()

    def run(self, batch: Sequence[BackendRequest]) -> list[BackendResult]:
        """Run one batch in the model process; a streamed member's pieces reach its `on_text` here,
        on the calling thread, as they come."""
        return self.run_ahead(batch)

    def run_ahead(
        self,
        batch: Sequence[BackendRequest],
        ahead: Callable[[], Sequence[BackendRequest] | None] | None = None,
        wake: socket.socket | None = None,
    ) -> list[BackendResult]:
        """`run`, sending the next batch to the model process while this one runs: when `wake` (a
        non-blocking socket) becomes readable, `ahead()` may give the batch that runs next on this
        model, which is sent at once; the model process starts it as soon as this one ends, without
        waiting for this process to read the answer and send it (`DeviceWorker._ahead_of`). The
        call that then runs that batch only reads its answer (or sends it again to a model process
        started since, where the one it was sent to died)."""
        consumers: dict[int, Callable[[str], None] | None] = dict(_streamed(batch))
        flushes = flushes_of(batch)
        with self._lock:
            sent_ahead, self._ahead = self._ahead, None
            if self._process is not None and self._process.poll() is not None:
                self.exits["died"] += 1
                log.warning(
                    "the model process of %s exited (exit code %s) between batches; starting it again",
                    self.name,
                    self._stop(),
                )
            if self._conn is None:
                self._spawn()
                self._wait_loaded()
            conn = self._conn
            assert conn is not None
            try:
                if not _same_batch(sent_ahead, self._serial, batch):
                    if sent_ahead is not None and sent_ahead[0] == self._serial:  # never run: drop it
                        log.error("a batch sent ahead to the model process of %s was not run", self.name)
                        while conn.recv()[0] == "pieces":
                            pass
                    _send(conn, batch)
                timeout_s = self.batch_timeout_s
                deadline = None if timeout_s is None else time.monotonic() + timeout_s
                while True:
                    if wake is not None and self._ahead is None:
                        ready = wait((conn, wake), _left_s(deadline))
                        if not ready:
                            self._hung()
                        if wake in ready:
                            with contextlib.suppress(BlockingIOError):
                                wake.recv(4096)
                            if ahead is not None and (following := ahead()) is not None:
                                _send(conn, following)
                                self._ahead = (self._serial, list(following))
                                self.sent_ahead += 1
                            if conn not in ready:
                                continue
                    elif deadline is not None and not conn.poll(_left_s(deadline)):
                        self._hung()
                    answer = conn.recv()
                    if answer[0] != "pieces":
                        break
                    for index, piece in answer[1]:  # a step's pieces
                        consumers[index] = _deliver(consumers[index], piece)
                    if flushes:
                        flush_all(flushes)
            except (EOFError, OSError) as e:  # the pipe: the model process is gone
                self.exits["died"] += 1
                code = self._stop()
                raise RuntimeError(
                    f"the model process of {self.name} exited (exit code {code}) while running a batch; "
                    "it is started again at the next batch"
                ) from e
            kind, value, cpu_s = answer
            _report(self._serial, cpu_s)
            if kind == "done":
                return list(value)
            raise value  # the model's own error (an OSError of the model's among them), as it was raised

    def synchronize(self) -> None:
        """Nothing to wait for here: the model process synchronizes its device before it answers."""

    def close(self) -> None:
        """Stop the model process (it releases the model first)."""
        with self._lock:
            self._closed = True
            conn = self._conn
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.send(None)
            self._stop(grace_s=30.0)
        # The front holds a tokenizer, no device memory: its `close` would only open the device here.
        self.front = None

    def _spawn(self) -> None:
        if self._closed:
            raise RuntimeError(f"backend {self.name!r} is closed")
        # A fresh interpreter (never a fork of a process with threads and torch), started as a module
        # rather than by multiprocessing's spawn, which would run the parent's main script again.
        parent, child = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(_PROJECT_ROOT), env.get("PYTHONPATH"))))
        task, name, source, device, dtype, torch_threads, cuda_graphs = self._args
        argv = [sys.executable, "-m", "backends.process", str(child.fileno()), task, name, source, device]
        argv += [dtype, str(torch_threads or 0), "1" if cuda_graphs else "0"]
        self._serial = next(_serials)
        try:
            process = subprocess.Popen(
                argv,
                pass_fds=(child.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # out of the terminal's process group: Ctrl-C is the server's
            )
        finally:
            child.close()
        self._process, self._conn = process, Connection(parent.detach())

    def _wait_loaded(self) -> None:
        conn, process = self._conn, self._process
        if conn is None or process is None:
            raise RuntimeError(f"the model process of {self.name} was not started")
        try:
            if not conn.poll(self._start_timeout_s):
                raise RuntimeError(
                    f"the model process of {self.name} did not load in {self._start_timeout_s:g} s"
                )
            kind, value, cpu_s = conn.recv()
        except (EOFError, OSError) as e:
            code = self._stop()
            raise RuntimeError(
                f"the model process of {self.name} exited (exit code {code}) while loading"
            ) from e
        except BaseException:
            self._stop()
            raise
        _report(self._serial, cpu_s)
        if kind != "ready":
            self._stop()
            raise value
        log.info("model %s runs in process %d", self.name, process.pid)

    def _hung(self) -> None:
        """The running batch has taken longer than `batch_timeout_s`: kill the model process, and fail
        the batch (RuntimeError); the next batch starts a new one."""
        log.error(
            "the model process of %s ran a batch for more than batch_timeout_s (%g s): killing it",
            self.name,
            self.batch_timeout_s,
        )
        self.exits["hung"] += 1
        code = self._stop(grace_s=0.0)  # killed at once: it ignores SIGTERM, and a hung one would not exit
        raise RuntimeError(
            f"the model process of {self.name} ran a batch for more than batch_timeout_s "
            f"({self.batch_timeout_s:g} s) and was stopped (exit code {code}); it is started again at the "
            "next batch"
        )

    def _stop(self, grace_s: float = 5.0) -> int | None:
        """Close the pipe and end the process (killed if it does not exit within grace_s: it ignores
        SIGTERM)."""
        conn, process = self._conn, self._process
        self._conn = self._process = None
        if conn is not None:
            conn.close()
        if process is None:
            return None
        try:
            return process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()


def _left_s(deadline: float | None) -> float | None:
    """Seconds until `deadline` (time.monotonic), 0 once past; None (no limit) without one."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _send(conn: Connection, batch: Sequence[BackendRequest]) -> None:
    """Send a batch to the model process: its streamed members' consumers stay here, and the model
    process may hold their pieces as long as every one of those consumers would."""
    streamed = _streamed(batch)
    interval_s = min((float(getattr(c, "interval_s", 0.0)) for c in streamed.values()), default=0.0)
    sent = [replace(r, on_text=None) if i in streamed else r for i, r in enumerate(batch)]
    conn.send((sent, set(streamed), interval_s))


def _streamed(batch: Sequence[BackendRequest]) -> dict[int, Callable[[str], None]]:
    """The batch's streamed members: index -> the consumer of its pieces (`on_text`)."""
    return {i: r.on_text for i, r in enumerate(batch) if isinstance(r, TextRequest) and r.on_text is not None}


def _same_batch(
    sent: tuple[int, list[BackendRequest]] | None, serial: int, batch: Sequence[BackendRequest]
) -> bool:
    """Whether `batch` was sent ahead to the model process that runs now (`serial`)."""
    if sent is None or sent[0] != serial or len(sent[1]) != len(batch):
        return False
    return all(a is b for a, b in zip(sent[1], batch, strict=True))


def _deliver(
    consumer: Callable[[str | TextPiece], None] | None, piece: str | TextPiece
) -> Callable[[str | TextPiece], None] | None:
    """Hand `piece` to `consumer`; a consumer that raises gets no more (as in-process: one member's
    broken consumer must not fail its batch-mates)."""
    if consumer is None:
        return None
    try:
        consumer(piece)
    except Exception:
        log.warning("on_text callback failed; streaming to it stops", exc_info=True)
        return None
    return consumer


def main(argv: Sequence[str]) -> None:
    """`python -m backends.process FD TASK NAME SOURCE DEVICE DTYPE TORCH_THREADS CUDA_GRAPHS`."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # the server's to act on (module docstring)
        signal.signal(sig, signal.SIG_IGN)
    fd, task, name, source, device, dtype, threads, graphs = argv
    if task not in ("text", "image"):
        raise SystemExit(f"unknown task {task!r}")
    _child_main(Connection(int(fd)), task, name, source, device, dtype, int(threads) or None, graphs == "1")


if __name__ == "__main__":
    main(sys.argv[1:])
