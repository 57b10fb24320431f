"""Models in processes of their own (`own_process = true`, backends/process.py): the same answers as
in-process, errors that come back, a dead model process started again, and end to end through the
server, with the model process's CPU counted by the estimated meter."""

from __future__ import annotations

import math
import os
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from backends import load_backend, process
from backends.base import ChatMessage, ImageRequest, TextRequest, TextResult
from backends.process import ProcessBackend
from backends.tiny import ensure_model
from proxy.config import ModelSettings
from proxy.state import LEDGER, MONITORS, SERVICE
from tests.conftest import LiveServer
from tests.test_backends import StepLog, check_step_log


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Both sides on one torch thread (the child is given 1): identical floats, identical answers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def text_pair(model_cache: Path, one_thread: None) -> Iterator[tuple[ProcessBackend, object]]:
    source = ensure_model("tiny-gpt2", model_cache / "models")
    own = load_backend("text", "tiny-gpt2", source, own_process=True, torch_threads=1)
    here = load_backend("text", "tiny-gpt2", source)
    assert isinstance(own, ProcessBackend)
    yield own, here
    own.close()
    here.close()


def _exited(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_text_in_its_own_process_answers_as_in_process(text_pair: tuple[ProcessBackend, object]) -> None:
    own, here = text_pair
    assert own.pid is not None and own.pid != os.getpid()
    assert own.front._model is None  # this process holds the tokenizer, not the weights
    chat = TextRequest(messages=(ChatMessage("user", "What is a joule?"),), max_tokens=9, temperature=0)
    assert own.count_prompt_tokens(chat) == here.count_prompt_tokens(chat)  # type: ignore[attr-defined]
    assert own.prompt_ids(chat) == here.prompt_ids(chat)  # type: ignore[attr-defined]
    assert own.max_context_tokens == here.max_context_tokens == 512  # type: ignore[attr-defined]
    assert own.batch_key(chat) == here.batch_key(chat)  # type: ignore[attr-defined]

    def batch(streams: list[list[str]]) -> list[TextRequest]:
        return [
            chat,
            TextRequest(prompt="Once upon", max_tokens=12, temperature=0, on_text=streams[0].append),
            TextRequest(prompt="Numbers", max_tokens=5, temperature=0, on_text=streams[1].append),
        ]

    own_streams: list[list[str]] = [[], []]
    here_streams: list[list[str]] = [[], []]
    own_results = own.run(batch(own_streams))
    assert own_results == here.run(batch(here_streams))  # type: ignore[attr-defined]
    assert own_streams == here_streams and all(len(s) > 1 for s in own_streams)
    for streamed, result in zip(own_streams, own_results[1:], strict=True):
        assert isinstance(result, TextResult) and "".join(streamed) == result.text


def test_streamed_pieces_cross_over_a_step_at_a_time(text_pair: tuple[ProcessBackend, object]) -> None:
    """The model process sends a step's pieces of every streamed member in one message; here each
    message is handed out, then the consumers flushed, as in-process."""
    own, here = text_pair
    own_log, here_log = StepLog(), StepLog()

    def batch(log: StepLog) -> list[TextRequest]:
        return [
            TextRequest(prompt="Once upon", max_tokens=12, temperature=0, on_text=log.member(0)),
            TextRequest(prompt="Numbers", max_tokens=5, temperature=0, on_text=log.member(1)),
        ]

    results = own.run(batch(own_log))
    assert results == here.run(batch(here_log))  # type: ignore[attr-defined]
    check_step_log(own_log, results, members=2)  # type: ignore[arg-type]
    assert [step for step in own_log.steps if step] == [step for step in here_log.steps if step]


class _SlowConsumer:
    """A stream consumer that takes pieces no more often than `interval_s` (as the server's are)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.pieces: list[str] = []
        self.deliveries: list[int] = []  # pieces received by each flush that followed some

    def __call__(self, piece: str) -> None:
        self.pieces.append(piece)

    def flush(self) -> None:
        if len(self.pieces) > sum(self.deliveries):
            self.deliveries.append(len(self.pieces) - sum(self.deliveries))


def test_the_model_process_holds_pieces_for_the_consumers_interval(
    text_pair: tuple[ProcessBackend, object],
) -> None:
    """Consumers that take pieces at most every `interval_s`: the model process sends a message at most
    that often (here the first step's pieces, then the rest at the batch's end), and nothing is lost."""
    own, _ = text_pair
    held, each = _SlowConsumer(60.0), _SlowConsumer(0.0)
    (result,) = own.run([TextRequest(prompt="Once upon", max_tokens=12, temperature=0, on_text=held)])
    (again,) = own.run([TextRequest(prompt="Once upon", max_tokens=12, temperature=0, on_text=each)])
    assert isinstance(result, TextResult) and result == again
    assert "".join(held.pieces) == "".join(each.pieces) == result.text
    assert len(held.deliveries) == 2 and len(each.deliveries) == len(each.pieces) > 2


def test_a_broken_stream_consumer_stops_only_its_own_stream(text_pair: tuple[ProcessBackend, object]) -> None:
    own, _ = text_pair
    good: list[str] = []

    def broken(piece: str) -> None:
        raise RuntimeError("consumer gone")

    results = own.run(
        [
            TextRequest(prompt="a", max_tokens=6, temperature=0, on_text=broken),
            TextRequest(prompt="b", max_tokens=6, temperature=0, on_text=good.append),
        ]
    )
    assert [r.completion_tokens for r in results] == [6, 6]  # type: ignore[union-attr]
    assert "".join(good) == results[1].text  # type: ignore[union-attr]


def test_errors_come_back_and_a_dead_model_process_is_started_again(
    text_pair: tuple[ProcessBackend, object],
) -> None:
    own, here = text_pair
    with pytest.raises(ValueError, match="exceeds the model's context of 512 tokens"):
        own.run([TextRequest(prompt="Hello", max_tokens=600, temperature=0)])
    request = TextRequest(prompt="Still there?", max_tokens=4, temperature=0)
    assert own.run([request]) == here.run([request])  # type: ignore[attr-defined]  # the process went on

    # dies while it runs a batch (killed at its first streamed piece): that batch fails
    died_before = own.exits["died"]
    first = own.pid
    assert first is not None

    def kill(piece: str) -> None:
        os.kill(first, signal.SIGKILL)

    with pytest.raises(RuntimeError, match=r"exited .* while running a batch"):
        own.run([TextRequest(prompt="Long", max_tokens=400, temperature=0, on_text=kill)])
    assert _exited(first)
    assert own.run([request]) == here.run([request])  # type: ignore[attr-defined]  # a new process
    second = own.pid
    assert second not in (None, first)

    # dies between batches: the next batch starts a new one and runs
    assert second is not None
    os.kill(second, signal.SIGKILL)
    own._process.wait(10)
    assert own.run([request]) == here.run([request])  # type: ignore[attr-defined]
    assert own.pid not in (None, first, second)
    assert own.exits["died"] - died_before == 2 and own.exits["hung"] == 0


def test_a_hung_model_process_is_killed_after_batch_timeout_s_and_the_server_answers(
    make_server,  # type: ignore[no-untyped-def]
) -> None:
    """A model process that stops making progress (stopped with SIGSTOP mid-batch: a deadlock, a
    kernel that never returns, as far as the server can tell) is killed once its batch has run for
    batch_timeout_s: that request is answered 500 and recorded as an error, and the next one runs in a
    new model process. Without the limit the device's queue would wait for it for ever."""
    timeout_s = 3.0
    server: LiveServer = make_server(
        models=[
            ModelSettings(
                name="tiny-gpt2",
                task="text",
                source="tiny:tiny-gpt2",
                max_tokens=400,
                own_process=True,
                batch_timeout_s=timeout_s,
            )
        ],
    )
    backend = server.app[SERVICE].models["tiny-gpt2"].backend  # type: ignore[index]
    assert isinstance(backend, ProcessBackend) and backend.batch_timeout_s == timeout_s
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)

    def chat(max_tokens: int, stream: bool = False) -> object:
        return client.chat.completions.create(
            model="tiny-gpt2",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=max_tokens,
            temperature=0,
            stream=stream,
        )

    first = backend.pid
    assert first is not None
    chat(4)  # a batch well within the limit runs as usual
    assert backend.pid == first
    stream = chat(400, stream=True)
    next(iter(stream))  # type: ignore[call-overload]  # the batch runs in the model process
    os.kill(first, signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(openai.APIError):
        for _ in stream:  # type: ignore[attr-defined]
            pass
    assert time.monotonic() - t0 < timeout_s + 10
    assert _exited(first)
    answer = chat(4)  # a new model process
    assert answer.choices[0].message.content  # type: ignore[attr-defined]
    assert backend.pid not in (None, first)
    exits = {
        (s.labels["model"], s.labels["reason"]): s.value
        for family in text_string_to_metric_families(
            requests.get(server.base_url + "/metrics", timeout=10).text
        )
        for s in family.samples
        if s.name == "wattproxy_model_process_exits_total"
    }
    assert exits == {("tiny-gpt2", "hung"): 1.0, ("tiny-gpt2", "died"): 0.0}
    ledger = server.app[LEDGER]  # type: ignore[index]
    deadline = time.monotonic() + 10
    while len(records := server.call(ledger.records())) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert sorted(r.status for r in records) == ["error", "ok", "ok"]


def test_batch_timeout_s_is_for_a_model_in_a_process_of_its_own() -> None:
    with pytest.raises(ValueError, match="batch_timeout_s needs own_process"):
        ModelSettings(name="m", task="text", source="tiny:tiny-gpt2", own_process=False, batch_timeout_s=5)
    with pytest.raises(ValueError, match="batch_timeout_s"):
        ModelSettings(name="m", task="text", source="tiny:tiny-gpt2", batch_timeout_s=0)
    assert ModelSettings(name="m", task="text", source="tiny:tiny-gpt2").batch_timeout_s is None


def test_the_model_process_leaves_ctrl_c_and_sigterm_to_its_server(
    text_pair: tuple[ProcessBackend, object],
) -> None:
    """A terminal's Ctrl-C reaches its foreground process group, and a service manager's SIGTERM every
    process of the service: a model process must not die of either mid-batch (its server drains)."""
    own, here = text_pair
    quiet = TextRequest(prompt="Signals", max_tokens=40, temperature=0)
    assert own.run([quiet]) == here.run([quiet])  # type: ignore[attr-defined]
    pid = own.pid
    assert pid is not None
    assert os.getsid(pid) == pid != os.getsid(0)  # a session (and process group) of its own

    def signal_it(piece: str) -> None:
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)

    loud = TextRequest(prompt="Signals", max_tokens=40, temperature=0, on_text=signal_it)
    assert own.run([loud])[0].text == here.run([quiet])[0].text  # type: ignore[attr-defined]
    assert own.pid == pid  # the same process, still running


def _woken() -> tuple[socket.socket, socket.socket]:
    """A wake-up socket pair (DeviceWorker's), signalled already."""
    wake, waker = socket.socketpair()
    wake.setblocking(False)
    waker.send(b"\0")
    return wake, waker


def test_the_next_batch_is_sent_ahead_and_answers_stay_with_their_batch(
    text_pair: tuple[ProcessBackend, object],
) -> None:
    own, here = text_pair
    first = [TextRequest(prompt="First batch", max_tokens=12, temperature=0)]
    second = [TextRequest(prompt="Second", max_tokens=6, temperature=0)] * 2
    given: list[int] = []

    def ahead() -> list[TextRequest]:
        given.append(1)
        return second

    wake, waker = _woken()
    with wake, waker:
        sent_before = own.sent_ahead
        assert own.run_ahead(first, ahead, wake) == here.run(first)  # type: ignore[attr-defined]
    assert given == [1] and own.sent_ahead == sent_before + 1
    assert own.run(second) == here.run(second)  # type: ignore[attr-defined]  # its answer only read
    third = [TextRequest(prompt="Third", max_tokens=4, temperature=0)]
    assert own.run(third) == here.run(third)  # type: ignore[attr-defined]  # and in step after it


def test_a_batch_sent_ahead_to_a_model_process_that_died_runs_on_the_next_one(
    text_pair: tuple[ProcessBackend, object],
) -> None:
    own, here = text_pair
    quiet = [TextRequest(prompt="Before", max_tokens=2, temperature=0)]
    own.run(quiet)  # a model process is running
    pid = own.pid
    assert pid is not None

    def kill(piece: str) -> None:
        os.kill(pid, signal.SIGKILL)

    dying = [TextRequest(prompt="Dies", max_tokens=400, temperature=0, on_text=kill)]
    following = [TextRequest(prompt="Goes on", max_tokens=8, temperature=0)]
    wake, waker = _woken()
    with wake, waker, pytest.raises(RuntimeError, match=r"exited .* while running a batch"):
        own.run_ahead(dying, lambda: following, wake)
    assert own.run(following) == here.run(following)  # type: ignore[attr-defined]  # sent again
    assert own.pid not in (None, pid)


def test_served_batches_queued_behind_the_running_one_are_sent_ahead(make_server) -> None:  # type: ignore[no-untyped-def]
    """16 clients at once on a model whose batches hold one request: every batch after the first waits
    on the device, and is sent to the model process while the one before it runs. Each answer is the
    one the model gives that prompt alone (no answer crosses to another batch), and every joule is in
    an answer or idle."""
    server: LiveServer = make_server(
        models=[
            ModelSettings(
                name="tiny-gpt2",
                task="text",
                source="tiny:tiny-gpt2",
                max_tokens=64,
                max_batch_size=1,
                max_wait_ms=0,
                own_process=True,
            )
        ]
    )
    backend = server.app[SERVICE].models["tiny-gpt2"].backend  # type: ignore[index]
    assert isinstance(backend, ProcessBackend)
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    prompts = [f"Prompt {'word ' * i}number {i}" for i in range(16)]

    def chat(prompt: str) -> object:  # sampled from a seed of its own: each prompt's answer differs
        return client.chat.completions.create(
            model="tiny-gpt2",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=10,
            temperature=1.0,
            seed=len(prompt),
        )

    alone = [chat(p) for p in prompts]  # one at a time: nothing waits, nothing is sent ahead
    assert backend.sent_ahead == 0
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(chat, prompts))
    assert backend.sent_ahead >= 4  # most of the 15 batches that waited
    texts = [a.choices[0].message.content for a in answers]  # type: ignore[attr-defined]
    assert texts == [a.choices[0].message.content for a in alone]  # type: ignore[attr-defined]
    assert len(set(texts)) > 8  # the prompts' answers differ: one in the wrong place would show
    answered_j = sum(a.usage.model_extra["energy"]["joules"] for a in alone + answers)  # type: ignore[attr-defined]
    monitor = server.app[MONITORS]["cpu"]  # type: ignore[index]
    server.stop()
    assert math.isclose(answered_j + monitor.committed_idle_j, monitor.meter_delta_j, rel_tol=1e-9)


def test_a_model_that_cannot_load_fails_its_load(model_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_backend("text", "missing", tmp_path / "nothing-here", own_process=True)


def test_the_model_process_is_given_cuda_graphs(model_cache: Path) -> None:
    """`cuda_graphs` reaches the model process, which builds its backend with it: on this CPU it then
    refuses to load as the server's own check would (a CUDA device is needed)."""
    source = ensure_model("tiny-sd", model_cache / "models")
    from backends.image_diffusers import DiffusersImageBackend

    front = DiffusersImageBackend("tiny-sd", source)
    own = ProcessBackend(front, task="image", name="tiny-sd", source=str(source), cuda_graphs=True)
    try:
        with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
            own.load()
    finally:
        own.close()


def test_images_in_their_own_process_are_the_same_images(model_cache: Path, one_thread: None) -> None:
    source = ensure_model("tiny-sd", model_cache / "models")
    own = load_backend("image", "tiny-sd", source, own_process=True, torch_threads=1)
    here = load_backend("image", "tiny-sd", source)
    try:
        requests = [
            ImageRequest(prompt="a red fox", n=2, seed=3),
            ImageRequest(prompt="a lighthouse", seed=9),
        ]
        assert own.run(requests) == here.run(requests)
        pid = own.pid  # type: ignore[attr-defined]
    finally:
        own.close()
        here.close()
    assert pid is not None and _exited(pid) and own.pid is None  # type: ignore[attr-defined]


def test_served_from_their_own_processes_with_their_cpu_counted(make_server) -> None:  # type: ignore[no-untyped-def]
    """Chat, a stream and images through the openai client with both models in processes of their own;
    with the estimated meter (10 W a core, no idle power) a chat's joules hold at least the CPU its
    model process spent on it, and every joule is in an answer or idle."""
    server: LiveServer = make_server(
        meter="estimated",
        energy={"estimated_watts_per_core": 10.0, "estimated_idle_watts": 0.0, "sample_period_s": 0.01},
        models=[
            ModelSettings(
                name="tiny-gpt2", task="text", source="tiny:tiny-gpt2", max_tokens=64, own_process=True
            ),
            ModelSettings(
                name="tiny-sd", task="image", source="tiny:tiny-sd", max_steps=20, own_process=True
            ),
        ],
    )
    backends = [m.backend for m in server.app[SERVICE].models.values()]  # type: ignore[index]
    assert all(isinstance(b, ProcessBackend) for b in backends)
    pids = [b.pid for b in backends]  # type: ignore[union-attr]
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)

    children_before = sum(process._reports.values())
    chat = client.chat.completions.create(
        model="tiny-gpt2", messages=[{"role": "user", "content": "Hi"}], max_tokens=24, temperature=0
    )
    children_spent_s = sum(process._reports.values()) - children_before
    energy = chat.usage.model_extra["energy"]  # type: ignore[union-attr,index]
    assert chat.usage.completion_tokens == 24 and energy["measurement"] == "estimated"  # type: ignore[union-attr]
    assert children_spent_s > 0
    assert energy["joules"] >= 10.0 * children_spent_s

    streamed = client.chat.completions.create(
        model="tiny-gpt2",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.model_extra["energy"]["joules"] > 0  # type: ignore[index]

    image = client.images.generate(
        model="tiny-sd", prompt="a fox", n=2, size="64x64", extra_body={"steps": 2}
    )
    assert len(image.data) == 2 and image.usage.model_extra["energy"]["joules"] > 0  # type: ignore[union-attr]

    answered_j = energy["joules"] + chunks[-1].usage.model_extra["energy"]["joules"]  # type: ignore[union-attr,index]
    answered_j += image.usage.model_extra["energy"]["joules"]  # type: ignore[union-attr,index]
    monitor = server.app[MONITORS]["cpu"]  # type: ignore[index]
    server.stop()  # the models' processes stop with the server
    assert math.isclose(answered_j + monitor.committed_idle_j, monitor.meter_delta_j, rel_tol=1e-9)
    deadline = time.monotonic() + 10
    while not all(_exited(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_exited(p) for p in pids)
