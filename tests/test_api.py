"""End to end: a real server with the tiny models on a localhost port, driven by the official `openai`
client (and raw HTTP for malformed input)."""

from __future__ import annotations

import base64
import io
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from backends import load_backend
from backends.base import Backend, BackendRequest, BackendResult, ImageResult, TextRequest
from backends.tiny import ensure_model
from proxy.config import ModelSettings
from proxy.scheduler import PieceSink
from proxy.state import LEDGER, SCHEDULER, SERVICE
from tests.conftest import BackendWrapper, LiveServer, settings_for_tests


@pytest.fixture
def server(make_server) -> LiveServer:  # type: ignore[no-untyped-def]
    return make_server()


@pytest.fixture(scope="module")
def own_process_server(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Both models in model processes of their own (the default), shared by this module's tests."""
    assert ModelSettings.model_fields["own_process"].default is True
    own = {"own_process": True}  # settings_for_tests runs models that do not say so in process
    models = [
        ModelSettings(name="tiny-gpt2", task="text", source="tiny:tiny-gpt2", max_tokens=64, max_n=4, **own),
        ModelSettings(
            name="tiny-sd", task="image", source="tiny:tiny-sd", max_batch_size=4, max_steps=20, **own
        ),
    ]
    server = LiveServer(settings_for_tests(model_cache, tmp_path_factory.mktemp("own"), models=models))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["in_process", "own_process"])
def either_server(request: pytest.FixtureRequest, make_server) -> LiveServer:  # type: ignore[no-untyped-def]
    """The basic endpoint tests run against a server with the models in its own process and one with
    them in model processes of their own."""
    if request.param == "in_process":
        return make_server()  # type: ignore[no-any-return]
    server: LiveServer = request.getfixturevalue("own_process_server")
    assert all(m.backend.pid is not None for m in server.app[SERVICE].models.values())  # type: ignore[index,union-attr]
    return server


def client(server: LiveServer, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, **kw)  # type: ignore[arg-type]


def metric_samples(server: LiveServer, name: str) -> list[tuple[dict[str, str], float]]:
    text = requests.get(server.base_url + "/metrics", timeout=10).text
    out = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out.append((s.labels, s.value))
    return out


def test_models_list_each_with_its_task(either_server: LiveServer) -> None:
    server = either_server
    models = client(server).models.list()
    tasks = {m.id: m.model_extra["task"] for m in models.data}  # type: ignore[index]
    assert tasks == {"tiny-gpt2": "text", "tiny-sd": "image"}


def test_chat_completion_with_usage_and_energy(either_server: LiveServer) -> None:
    server = either_server
    raw = client(server).chat.completions.with_raw_response.create(
        model="tiny-gpt2", messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, temperature=0
    )
    chat = raw.parse()
    assert chat.object == "chat.completion"
    assert isinstance(chat.choices[0].message.content, str)
    assert chat.choices[0].finish_reason in ("stop", "length")
    usage = chat.usage
    assert usage is not None and usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    energy = usage.model_extra["energy"]  # type: ignore[index]
    assert energy["measurement"] == "synthetic" and energy["device"] == "cpu"
    assert energy["joules"] > 0 and energy["kwh"] == pytest.approx(energy["joules"] / 3.6e6)
    assert float(raw.headers["X-Energy-Joules"]) == energy["joules"]
    assert float(raw.headers["X-Energy-kWh"]) == energy["kwh"]
    assert float(raw.headers["X-CO2-Grams"]) == energy["co2_grams"]


def _plain_and_streamed(c: openai.OpenAI) -> tuple[Any, list[Any]]:
    """The same greedy chat, answered plain and streamed (with usage)."""
    messages: Any = [{"role": "user", "content": "Count with me"}]
    plain = c.chat.completions.create(model="tiny-gpt2", messages=messages, max_tokens=12, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model="tiny-gpt2",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    return plain, chunks


def test_chat_stream_matches_plain_and_ends_with_usage(either_server: LiveServer) -> None:
    server = either_server
    plain, chunks = _plain_and_streamed(client(server))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == plain.usage.completion_tokens  # type: ignore[union-attr]
    assert last.usage.model_extra["energy"]["joules"] > 0  # type: ignore[index]
    # the same fields as the plain answer's, its null ones included
    assert set(last.usage.model_extra["energy"]) == set(plain.usage.model_extra["energy"])  # type: ignore[index, union-attr]


def test_completions_plain_and_streamed(either_server: LiveServer) -> None:
    server = either_server
    c = client(server)
    done = c.completions.create(
        model="tiny-gpt2", prompt=["Once upon", "a time"], max_tokens=5, temperature=0
    )
    assert [ch.index for ch in done.choices] == [0, 1]
    assert done.usage is not None and done.usage.completion_tokens <= 10
    stream = c.completions.create(
        model="tiny-gpt2",
        prompt="Once upon",
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = list(stream)
    assert "".join(p.choices[0].text for p in pieces if p.choices) == done.choices[0].text
    assert pieces[-1].usage is not None


def test_a_completion_prompt_may_be_token_ids(either_server: LiveServer) -> None:
    """A prompt of token ids (one prompt's, or several's) runs on those ids: the answer of the text they
    encode, its tokens counted from the ids; an id past the vocabulary is a 400 naming the prompt."""
    server = either_server
    c = client(server)
    served = server.app[SERVICE].models["tiny-gpt2"]  # type: ignore[index]
    words = "The energy of one joule"
    ids = list(served.backend.prompt_ids(TextRequest(prompt=words)))
    by_text = c.completions.create(model="tiny-gpt2", prompt=words, max_tokens=5, temperature=0)
    by_ids = c.completions.create(model="tiny-gpt2", prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage is not None and by_text.usage is not None
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)
    two = c.completions.create(model="tiny-gpt2", prompt=[ids, ids[:2]], max_tokens=3, temperature=0)
    assert len(two.choices) == 2 and two.usage is not None and two.usage.prompt_tokens == len(ids) + 2
    streamed = c.completions.create(
        model="tiny-gpt2",
        prompt=ids,
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = list(streamed)
    assert "".join(p.choices[0].text for p in pieces if p.choices) == by_text.choices[0].text
    assert pieces[-1].usage is not None and pieces[-1].usage.prompt_tokens == len(ids)
    vocab = served.vocab_size()
    with pytest.raises(openai.BadRequestError) as refused:
        c.completions.create(model="tiny-gpt2", prompt=[[1, 2], [3, vocab]], max_tokens=2)
    body = refused.value.body
    assert (body["param"], body["code"]) == ("prompt", "invalid_token_id")  # type: ignore[index]
    assert str(vocab) in body["message"]  # type: ignore[index]


def test_images_b64_png_of_requested_size_and_count(either_server: LiveServer) -> None:
    server = either_server
    c = client(server)
    result = c.images.generate(
        model="tiny-sd",
        prompt="a red bicycle",
        n=2,
        size="128x128",
        response_format="b64_json",
        extra_body={"steps": 3, "seed": 7},
    )
    assert len(result.data) == 2
    for item in result.data:
        assert item.b64_json is not None
        img = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert img.format == "PNG" and img.size == (128, 128)
    again = c.images.generate(
        model="tiny-sd", prompt="a red bicycle", n=2, size="128x128", extra_body={"steps": 3, "seed": 7}
    )
    assert [d.b64_json for d in again.data] == [d.b64_json for d in result.data]  # one generator per image
    assert [d.model_extra["seed"] for d in again.data] == [7, 8]  # type: ignore[index]
    energy = result.usage.model_extra["energy"]  # type: ignore[union-attr]
    assert energy["joules"] > 0


def _post(server: LiveServer, path: str, body: object, **kw: object) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(
        server.base_url + path, data=data, headers={"Content-Type": "application/json"}, timeout=30, **kw
    )  # type: ignore[arg-type]


def _error(resp: requests.Response, status: int, param: str | None = None) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param
    return err


CHAT = "/v1/chat/completions"
IMAGES = "/v1/images/generations"


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "etype"),
    [
        (CHAT, b"{not json", 400, None, "invalid_request_error"),
        (CHAT, [1, 2], 400, None, "invalid_request_error"),
        (CHAT, {"model": "tiny-gpt2"}, 400, "messages", "invalid_request_error"),
        (CHAT, {"model": "tiny-gpt2", "messages": "hi"}, 400, "messages", "invalid_request_error"),
        (
            CHAT,
            {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"},
            400,
            "max_tokens",
            "invalid_request_error",
        ),
        (
            CHAT,
            {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000},
            400,
            "max_tokens",
            "invalid_request_error",
        ),
        (
            CHAT,
            {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}], "n": 99},
            400,
            "n",
            "invalid_request_error",
        ),
        (
            CHAT,
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            404,
            "model",
            "not_found_error",
        ),
        (
            CHAT,
            {"model": "tiny-sd", "messages": [{"role": "user", "content": "x"}]},
            400,
            "model",
            "invalid_request_error",
        ),
        (
            IMAGES,
            {"model": "tiny-sd", "prompt": "x", "size": "100x100"},
            400,
            "size",
            "invalid_request_error",
        ),
        (
            IMAGES,
            {"model": "tiny-sd", "prompt": "x", "size": "1024x1024"},
            400,
            "size",
            "invalid_request_error",
        ),
        (IMAGES, {"model": "tiny-sd", "prompt": "x", "size": "big"}, 400, "size", "invalid_request_error"),
        (IMAGES, {"model": "tiny-sd", "prompt": "x", "n": 50}, 400, "n", "invalid_request_error"),
        (IMAGES, {"model": "tiny-sd", "prompt": "x", "steps": 500}, 400, "steps", "invalid_request_error"),
        (
            IMAGES,
            {"model": "tiny-sd", "prompt": "x", "response_format": "url"},
            400,
            "response_format",
            "invalid_request_error",
        ),
        (IMAGES, {"model": "tiny-sd"}, 400, "prompt", "invalid_request_error"),
        (
            CHAT,
            {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}], "stop": ["s" * 513]},
            400,
            "stop.0",  # the list's first string is too long
            "invalid_request_error",
        ),
        (  # options of a stream not asked for: OpenAI's API and vLLM refuse them too
            CHAT,
            {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}], "stream_options": {}},
            400,
            "stream_options",
            "invalid_request_error",
        ),
        (
            "/v1/completions",
            {"model": "tiny-gpt2", "prompt": "x", "stream": False, "stream_options": {"include_usage": True}},
            400,
            "stream_options",
            "invalid_request_error",
        ),
        (  # a model served in process makes no embeddings (proxy mode forwards them)
            "/v1/embeddings",
            {"model": "tiny-gpt2", "input": "a joule"},
            400,
            "model",
            "invalid_request_error",
        ),
        ("/v1/nowhere", {}, 404, None, "not_found_error"),
    ],
)
def test_errors_use_the_openai_envelope(
    server: LiveServer, path: str, body: object, status: int, param: str | None, etype: str
) -> None:
    err = _error(_post(server, path, body), status, param)
    assert err["type"] == etype
    assert "Value error" not in str(err["message"])  # pydantic's wording is not passed on
    if param == "stream_options":
        assert err["message"] == (
            "Invalid value for 'stream_options': The 'stream_options' parameter is only allowed when "
            "'stream' is enabled."
        )


@pytest.mark.parametrize(
    ("stop", "message"),
    [
        (["a", "b", "c", "d", "e"], "List should have at most 4 items after validation, not 5"),
        ("s" * 513, "String should have at most 512 characters"),
        (5, "Input should be a valid string"),  # of no member's type: the first member's words
    ],
)
def test_a_value_refused_by_a_union_is_explained_by_the_member_of_its_type(
    stop: object, message: str
) -> None:
    """`stop` is a string or a list of up to 4: five strings are refused for being five, not for not
    being a string (pydantic reports every member's error, the string's first)."""
    from pydantic import ValidationError

    from proxy.errors import from_validation_error
    from proxy.protocol import CompletionRequest

    with pytest.raises(ValidationError) as refused:
        CompletionRequest.model_validate({"model": "tiny-gpt2", "prompt": "x", "stop": stop})
    err = from_validation_error(refused.value)
    assert (err.param, err.message) == ("stop", f"Invalid value for 'stop': {message}")


def test_body_over_the_limit_is_413(server: LiveServer) -> None:
    big = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    err = _error(_post(server, CHAT, big), 413)
    assert "too large" in str(err["message"])


def test_keys_are_not_minted_or_revoked_with_auth_off(server: LiveServer) -> None:
    """With `--auth none` everyone is an admin: a key created then would hold once the same ledger is
    served with keys on. Creating and revoking are refused (403 `auth_off`); listing is not."""
    created = requests.post(server.base_url + "/v1/keys", json={"user": "mallory", "admin": True}, timeout=30)
    assert created.status_code == 403 and created.json()["error"]["code"] == "auth_off"
    revoked = requests.delete(server.base_url + "/v1/keys/key_0123456789ab", timeout=30)
    assert revoked.status_code == 403 and revoked.json()["error"]["code"] == "auth_off"
    listed = requests.get(server.base_url + "/v1/keys", timeout=30)
    assert listed.status_code == 200 and all(k["user"] != "mallory" for k in listed.json()["data"])


def test_method_not_allowed_is_enveloped(server: LiveServer) -> None:
    resp = requests.get(server.base_url + CHAT, timeout=10)
    _error(resp, 405)


def test_openai_client_raises_typed_errors(server: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as exc:
        client(server).images.generate(model="tiny-sd", prompt="x", size="1024x1024")
    assert exc.value.body["param"] == "size"  # type: ignore[index]


def test_health_and_readiness(server: LiveServer) -> None:
    assert requests.get(server.base_url + "/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(server.base_url + "/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json()["models"] == {"tiny-gpt2": "ready", "tiny-sd": "ready"}


def _hold_device(server: LiveServer) -> threading.Event:
    gate = server.app[SCHEDULER].devices["cpu"].gate  # type: ignore[index]
    gate.clear()
    return gate


def test_concurrent_requests_are_batched(server: LiveServer) -> None:
    gate = _hold_device(server)
    c = client(server)

    def ask(i: int) -> str:
        r = c.chat.completions.create(
            model="tiny-gpt2",
            messages=[{"role": "user", "content": f"hello {i}"}],
            max_tokens=4,
            temperature=0,
        )
        return r.choices[0].message.content or ""

    queue = server.app[SCHEDULER].queues["tiny-gpt2"]  # type: ignore[index]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, 0)]
        deadline = time.monotonic() + 10
        while queue.running == 0 and time.monotonic() < deadline:  # the first batch holds the device
            time.sleep(0.01)
        futures += [pool.submit(ask, i) for i in range(1, 8)]
        while queue.depth() < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        [f.result(timeout=60) for f in futures]
    sizes = metric_samples(server, "wattproxy_batch_size_sum")
    counts = metric_samples(server, "wattproxy_batch_size_count")
    total = sum(v for labels, v in sizes if labels["model"] == "tiny-gpt2")
    batches = sum(v for labels, v in counts if labels["model"] == "tiny-gpt2")
    assert total == 8
    assert batches == 2  # one request was already running when the other seven queued up


class HeldBackend(BackendWrapper):
    """Test-only: the wrapped model's batches each wait in `run` until the test releases them."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.sizes: list[int] = []  # each batch's size, in the order the device started them
        self.holds: list[threading.Event] = []

    def run(self, batch: Sequence[BackendRequest]) -> list[BackendResult]:
        hold = threading.Event()
        self.sizes.append(len(batch))
        self.holds.append(hold)
        assert hold.wait(60), "the test did not release the batch"
        return self.inner.run(batch)


class CountingBackend(BackendWrapper):
    """Test-only: records every batch the real backend runs."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.batches: list[list[BackendRequest]] = []

    def run(self, batch: Sequence[BackendRequest]) -> list[BackendResult]:
        self.batches.append(list(batch))
        return self.inner.run(batch)


def test_a_model_warms_up_before_it_takes_requests_charged_to_nobody(make_server, model_cache: Path) -> None:  # type: ignore[no-untyped-def]
    """warmup = true: before the server is ready, each model has run one small request on its device's
    thread; nobody is charged for it (no record, no request counted, its energy idle, the books
    closed). "auto" (the default) warms up on CUDA devices only: not here."""
    models_dir = model_cache / "models"
    text = CountingBackend(load_backend("text", "tiny-gpt2", ensure_model("tiny-gpt2", models_dir)))
    image = CountingBackend(load_backend("image", "tiny-sd", ensure_model("tiny-sd", models_dir)))
    models = [
        ModelSettings(name="tiny-gpt2", task="text", source="tiny:tiny-gpt2", warmup=True),
        ModelSettings(
            name="tiny-sd", task="image", source="tiny:tiny-sd", warmup=True, default_size="128x128"
        ),
    ]
    server = make_server(models=models, app_kwargs={"backends": {"tiny-gpt2": text, "tiny-sd": image}})
    assert requests.get(server.base_url + "/readyz", timeout=10).status_code == 200
    ((warm_text,),) = text.batches
    ((warm_image,),) = image.batches
    assert isinstance(warm_text, TextRequest) and warm_text.max_tokens == 1
    assert (warm_image.width, warm_image.height, warm_image.steps) == (128, 128, 1)  # type: ignore[union-attr]
    assert server.call(server.app[LEDGER].records()) == []  # type: ignore[index]
    assert sum(v for _, v in metric_samples(server, "wattproxy_requests_total")) == 0
    idle = sum(v for _, v in metric_samples(server, "wattproxy_idle_energy_kwh_total"))
    device = sum(v for _, v in metric_samples(server, "wattproxy_device_energy_kwh_total"))
    assert idle > 0 and idle == pytest.approx(device, rel=1e-9)  # the warm-ups' energy is idle

    _chat(client(server), 0)
    assert len(text.batches) == 2
    (record,) = server.call(server.app[LEDGER].records())  # type: ignore[index]
    charged = sum(v for _, v in metric_samples(server, "wattproxy_energy_kwh_total"))
    assert record.joules > 0 and charged * 3.6e6 == pytest.approx(record.joules, rel=1e-9)

    plain = CountingBackend(load_backend("text", "tiny-gpt2", ensure_model("tiny-gpt2", models_dir)))
    auto = [ModelSettings(name="tiny-gpt2", task="text", source="tiny:tiny-gpt2")]
    assert auto[0].warmup == "auto"
    make_server(models=auto, app_kwargs={"backends": {"tiny-gpt2": plain}})
    assert plain.batches == []  # a CPU device: no warm-up


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def test_a_full_batch_waits_on_the_device_behind_the_running_one(make_server, model_cache: Path) -> None:  # type: ignore[no-untyped-def]
    """While a batch runs, a batch is handed to the device as soon as it is full, to start as soon as
    the running one ends (no round trip through the event loop in between); one at most, and a
    partial one stays in the queue, where later arrivals can still join it."""
    held = HeldBackend(load_backend("text", "tiny-gpt2", ensure_model("tiny-gpt2", model_cache / "models")))
    models = [ModelSettings(name="tiny-gpt2", task="text", source="tiny:tiny-gpt2", max_batch_size=2)]
    server = make_server(models=models, app_kwargs={"backends": {"tiny-gpt2": held}})
    queue = server.app[SCHEDULER].queues["tiny-gpt2"]  # type: ignore[index]
    c = client(server)
    with ThreadPoolExecutor(6) as pool:
        answers = [pool.submit(_chat, c, 0)]
        _until(lambda: len(held.holds) == 1, "the first batch runs")
        answers += [pool.submit(_chat, c, i) for i in range(1, 6)]
        # the second and third requests made a full batch, handed to the device while the first runs;
        # the other three wait in the queue (one batch at most waits on the device)
        _until(lambda: queue.running == 2 and queue.depth() == 3, "a batch waits on the device")
        assert held.sizes == [1]
        held.holds[0].set()
        # the second batch runs, and the batcher hands the next full one to the device behind it
        _until(lambda: len(held.holds) == 2, "the second batch runs")
        _until(lambda: queue.running == 2 and queue.depth() == 1, "the third batch waits on the device")
        assert held.sizes == [1, 2]  # the third has not started: the second still runs
        held.holds[1].set()
        _until(lambda: len(held.holds) == 3, "the third batch runs")
        assert held.sizes == [1, 2, 2]
        held.holds[2].set()
        _until(lambda: len(held.holds) == 4, "the last request runs")
        held.holds[3].set()
        [a.result(timeout=60) for a in answers]
    assert held.sizes == [1, 2, 2, 1]
    assert queue.running == 0
    records = server.call(server.app[LEDGER].records())  # type: ignore[index]
    assert len(records) == 6 and all(r.status == "ok" and r.joules > 0 for r in records)
    counts = metric_samples(server, "wattproxy_batch_size_count")
    assert sum(v for _, v in counts) == 4


def test_a_client_that_leaves_while_its_batch_waits_on_the_device_is_charged(
    make_server, model_cache: Path
) -> None:  # type: ignore[no-untyped-def]
    """A batch handed to the device behind the running one runs even if a client leaves meanwhile:
    that member is charged and recorded as cancelled, as in a running batch."""
    held = HeldBackend(load_backend("text", "tiny-gpt2", ensure_model("tiny-gpt2", model_cache / "models")))
    models = [ModelSettings(name="tiny-gpt2", task="text", source="tiny:tiny-gpt2", max_batch_size=2)]
    server = make_server(models=models, app_kwargs={"backends": {"tiny-gpt2": held}})
    queue = server.app[SCHEDULER].queues["tiny-gpt2"]  # type: ignore[index]
    c = client(server)
    body = {
        "model": "tiny-gpt2",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 2,
        "temperature": 0,
    }
    with ThreadPoolExecutor(5) as pool:
        answers = [pool.submit(_chat, c, 0)]
        _until(lambda: len(held.holds) == 1, "the first batch runs")
        answers += [pool.submit(_chat, c, i) for i in (1, 2)]
        _until(lambda: queue.running == 2, "the second batch waits on the device")
        answers.append(pool.submit(_chat, c, 3))
        _until(lambda: queue.depth() == 1, "the third batch's first request is queued")
        leaving = pool.submit(requests.post, server.base_url + CHAT, json=body, timeout=3.0)
        _until(lambda: queue.depth() == 2, "the third batch's second request is queued")
        held.holds[0].set()
        _until(lambda: len(held.holds) == 2 and queue.running == 2, "the third batch waits on the device")
        with pytest.raises(requests.exceptions.ReadTimeout):
            leaving.result(timeout=30)  # its client left while its batch waited on the device
        held.holds[1].set()
        _until(lambda: len(held.holds) == 3, "the third batch runs")
        held.holds[2].set()
        [a.result(timeout=60) for a in answers]
    assert held.sizes == [1, 2, 2]
    _until(lambda: len(server.call(server.app[LEDGER].records())) == 5, "every request is recorded")  # type: ignore[index]
    records = server.call(server.app[LEDGER].records())  # type: ignore[index]
    assert sorted(r.status for r in records) == ["cancelled", "ok", "ok", "ok", "ok"]
    assert all(r.joules > 0 for r in records)


class _PauseAfterFirstPieces:
    """Test-only `on_text` wrapper: once the first pieces have been flushed on their way to the client,
    generation waits (in the device's thread) until the test has seen them arrive."""

    def __init__(self, inner: PieceSink, seen: threading.Event) -> None:
        self.inner, self.seen, self.pieces, self.paused = inner, seen, 0, False
        self.paused_after = 0  # pieces handed out when generation paused

    def __call__(self, piece: str) -> None:
        self.pieces += 1
        self.inner(piece)

    def flush(self) -> None:
        self.inner.flush()
        if self.pieces and not self.paused:
            self.paused, self.paused_after = True, self.pieces
            assert self.seen.wait(30), "the first pieces did not reach the client before the batch ended"


class PausingBackend(HeldBackend):
    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.seen = threading.Event()
        self.finished = threading.Event()
        self.consumers: list[object] = []

    def run(self, batch: Sequence[BackendRequest]) -> list[BackendResult]:
        paused = [
            replace(r, on_text=_PauseAfterFirstPieces(r.on_text, self.seen))  # type: ignore[arg-type]
            if isinstance(r, TextRequest) and r.on_text is not None
            else r
            for r in batch
        ]
        self.consumers = [r.on_text for r in paused if isinstance(r, TextRequest) and r.on_text is not None]
        results = self.inner.run(paused)
        self.finished.set()
        return results


def test_a_streamed_piece_reaches_the_client_while_its_batch_still_runs(
    make_server, model_cache: Path
) -> None:  # type: ignore[no-untyped-def]
    """A step's pieces go to the event loop when the step ends (StepPieces), not when the batch does."""
    pausing = PausingBackend(
        load_backend("text", "tiny-gpt2", ensure_model("tiny-gpt2", model_cache / "models"))
    )
    models = [ModelSettings(name="tiny-gpt2", task="text", source="tiny:tiny-gpt2")]
    server = make_server(models=models, app_kwargs={"backends": {"tiny-gpt2": pausing}})
    c = client(server)
    messages = [{"role": "user", "content": "Count with me"}]
    text = ""
    stream = c.chat.completions.create(
        model="tiny-gpt2", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    for chunk in stream:
        content = chunk.choices[0].delta.content if chunk.choices else None
        if content and not pausing.seen.is_set():
            assert not pausing.finished.is_set()  # the model is still generating this request's text
            pausing.seen.set()
        text += content or ""
    assert pausing.seen.is_set() and pausing.finished.is_set()
    (consumer,) = pausing.consumers
    assert consumer.paused_after == 1  # type: ignore[union-attr]  # flushed after the step of its first piece
    plain = c.chat.completions.create(model="tiny-gpt2", messages=messages, max_tokens=12, temperature=0)
    assert text == plain.choices[0].message.content


def test_pieces_held_for_stream_interval_ms_all_reach_the_stream(make_server) -> None:  # type: ignore[no-untyped-def]
    """Steps that come faster than `stream_interval_ms` are handed over several at a time (here, with a
    second's interval, all at the job's end) and written together: every token still has its chunk,
    in order, and the stream ends as always."""
    models = [ModelSettings(name="tiny-gpt2", task="text", source="tiny:tiny-gpt2", stream_interval_ms=1000)]
    plain, chunks = _plain_and_streamed(client(make_server(models=models)))
    pieces = [ch.choices[0].delta.content for ch in chunks[1:] if ch.choices and ch.choices[0].delta.content]
    assert "".join(pieces) == plain.choices[0].message.content and len(pieces) > 1
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens  # type: ignore[union-attr]


def _waiting_model(max_wait_ms: float) -> list[ModelSettings]:
    return [
        ModelSettings(
            name="tiny-gpt2", task="text", source="tiny:tiny-gpt2", max_batch_size=8, max_wait_ms=max_wait_ms
        )
    ]


def _chat(c: openai.OpenAI, i: int) -> None:
    c.chat.completions.create(
        model="tiny-gpt2", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=2, temperature=0
    )


def _queue_wait(server: LiveServer) -> tuple[float, float]:
    """(requests, seconds queued in all) from the queue-wait histogram."""
    count = sum(v for _, v in metric_samples(server, "wattproxy_queue_wait_seconds_count"))
    total = sum(v for _, v in metric_samples(server, "wattproxy_queue_wait_seconds_sum"))
    return count, total


def test_a_lone_client_that_came_back_does_not_wait_for_batch_mates(make_server) -> None:  # type: ignore[no-untyped-def]
    """A quiet model's first request waits `max_wait_ms` for batch-mates; once every member answered
    has come back, nobody is on the way, and the next request starts at once."""
    server: LiveServer = make_server(models=_waiting_model(1500))
    c = client(server)
    for i in range(4):
        _chat(c, i)
    count, queued_s = _queue_wait(server)
    assert count == 4
    # the first waited its 1.5 s; the three that followed it (6 s more without the rule) started at once
    assert 1.4 <= queued_s < 2.5


def test_clients_that_come_back_together_are_batched_together(make_server) -> None:  # type: ignore[no-untyped-def]
    """Four clients, each sending its next request when answered: each round waits for all four (the
    members answered are on their way back), so every batch holds the four."""
    server: LiveServer = make_server(models=_waiting_model(3000))
    barrier = threading.Barrier(4)

    def loop(k: int) -> None:
        c = client(server)
        barrier.wait()
        for i in range(3):
            _chat(c, 10 * k + i)

    with ThreadPoolExecutor(4) as pool:
        [f.result(timeout=120) for f in [pool.submit(loop, k) for k in range(4)]]
    counts = metric_samples(server, "wattproxy_batch_size_count")
    sizes = metric_samples(server, "wattproxy_batch_size_sum")
    assert sum(v for _, v in sizes) == 12
    assert sum(v for _, v in counts) == 3


def test_a_request_whose_client_left_while_queued_never_runs(server: LiveServer) -> None:
    gate = _hold_device(server)
    queue = server.app[SCHEDULER].queues["tiny-gpt2"]  # type: ignore[index]
    c = client(server)
    body = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(lambda: c.chat.completions.create(**body))  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while queue.running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(server.base_url + CHAT, json=body, timeout=0.5)
        deadline = time.monotonic() + 10
        while queue.depth() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queue.depth() == 0  # dropped from the queue when its client went away
        gate.set()
        first.result(timeout=60)
    requests_total = metric_samples(server, "wattproxy_requests_total")
    assert sum(v for _, v in requests_total) == 1
    assert sum(v for _, v in metric_samples(server, "wattproxy_batch_size_count")) == 1


def test_full_queue_answers_429_with_retry_after(make_server) -> None:  # type: ignore[no-untyped-def]
    from proxy.config import ModelSettings

    server = make_server(
        models=[
            ModelSettings(
                name="tiny-gpt2", task="text", source="tiny:tiny-gpt2", max_queue=2, max_batch_size=1
            )
        ]
    )
    gate = _hold_device(server)
    body = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    queue = server.app[SCHEDULER].queues["tiny-gpt2"]  # type: ignore[index]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_post, server, CHAT, body)]
        while queue.running == 0:
            time.sleep(0.01)
        # the next one is a full batch (of one): handed to the device behind the running one, it has
        # left the queue; the two after it fill the queue
        futures.append(pool.submit(_post, server, CHAT, body))
        _until(lambda: queue.running == 2, "a batch waits on the device")
        futures += [pool.submit(_post, server, CHAT, body) for _ in range(2)]
        _until(lambda: queue.depth() == 2, "the queue is full")
        rejected = _post(server, CHAT, body)
        err = _error(rejected, 429)
        assert err["type"] == "rate_limit_exceeded"
        assert int(rejected.headers["Retry-After"]) >= 1
        gate.set()
        assert [f.result(timeout=60).status_code for f in futures] == [200, 200, 200, 200]


def test_a_request_whose_choices_do_not_all_fit_is_refused_before_any_runs(make_server) -> None:  # type: ignore[no-untyped-def]
    """All or nothing on 429: its first choice completing a batch with a queued request must not send that
    batch to the device (where it would run, and be charged, for a request answered 429 when a later
    choice finds the user's share of the queue full)."""
    from proxy.config import ModelSettings

    server = make_server(
        models=[
            ModelSettings(
                name="tiny-gpt2",
                task="text",
                source="tiny:tiny-gpt2",
                max_batch_size=2,
                max_queue=8,
                max_queue_per_user=2,
                max_n=4,
            )
        ]
    )
    gate = _hold_device(server)
    queue = server.app[SCHEDULER].queues["tiny-gpt2"]  # type: ignore[index]
    ask = {"model": "tiny-gpt2", "prompt": "x", "max_tokens": 2}
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_post, server, "/v1/completions", ask)]
        _until(lambda: queue.running == 1, "a batch holds the device")
        futures.append(pool.submit(_post, server, "/v1/completions", ask))
        _until(lambda: queue.depth() == 1, "a request is queued")
        refused = _post(server, "/v1/completions", {**ask, "n": 4})
        assert _error(refused, 429)["type"] == "rate_limit_exceeded"
        assert queue.running == 1 and queue.depth() == 1  # nothing of it queued, nothing sent ahead
        gate.set()
        assert [f.result(timeout=60).status_code for f in futures] == [200] * 2
    records = server.call(server.app[LEDGER].records())  # type: ignore[index]
    assert len(records) == 2
    assert not any(r.request_id.startswith(refused.headers["X-Request-Id"]) for r in records)


# -- found by review: long prompts, nulls, JSON limits, choices ------------------------------------------


class ThreadNotingBackend(BackendWrapper):
    """Notes, for each prompt it counts, whether it was counted on the event loop's thread."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.on_loop: list[tuple[int, bool]] = []

    def prompt_ids(self, request: TextRequest) -> tuple[int, ...]:
        chars = len(request.prompt or "") + sum(len(m.content) for m in request.messages or ())
        self.on_loop.append((chars, threading.current_thread().name == "live-server"))
        return self.inner.prompt_ids(request)  # type: ignore[attr-defined,no-any-return]


def test_a_request_without_max_tokens_gets_the_models_default_capped_by_the_context(
    server: LiveServer,
) -> None:
    """As OpenAI's API: a chat that sends no limit goes on to its end of sequence, the model's
    max_tokens (64 here) or the context, whichever comes first, never refused for a limit it did not
    send; a completion gets 16. A limit the client sent and the context cannot hold is a 400 naming
    the parameter it sent."""
    c = client(server)
    chat = c.chat.completions.create(model="tiny-gpt2", messages=[{"role": "user", "content": "Tell me"}])
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 64 or chat.choices[0].finish_reason == "stop"
    assert chat.usage.completion_tokens > 16
    completion = c.completions.create(model="tiny-gpt2", prompt="Tell me")
    assert completion.usage is not None and completion.usage.completion_tokens <= 16
    context = 512  # tiny-gpt2's
    long = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "a fox " * 240}]}
    capped = _post(server, CHAT, long)
    assert capped.status_code == 200, capped.text
    usage = capped.json()["usage"]
    assert context - 64 < usage["prompt_tokens"] < context
    assert usage["completion_tokens"] <= context - usage["prompt_tokens"]
    for param in ("max_tokens", "max_completion_tokens"):
        err = _error(_post(server, CHAT, {**long, param: 64}), 400, param)
        assert err["code"] == "context_length_exceeded"


def test_long_prompts_are_counted_off_the_event_loop(make_server, model_cache: Path) -> None:  # type: ignore[no-untyped-def]
    """A prompt longer than TOKENIZE_ON_LOOP_MAX_CHARS is tokenized on a worker thread: a megabyte of
    prompt would otherwise hold every other request and stream for half a second."""
    from proxy.api import TOKENIZE_ON_LOOP_MAX_CHARS

    noting = ThreadNotingBackend(
        load_backend("text", "tiny-gpt2", ensure_model("tiny-gpt2", model_cache / "models"))
    )
    server = make_server(app_kwargs={"backends": {"tiny-gpt2": noting}})
    short = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert _post(server, CHAT, short).status_code == 200
    long = "a fox " * (TOKENIZE_ON_LOOP_MAX_CHARS // 6 + 10)
    err = _error(
        _post(server, CHAT, {**short, "messages": [{"role": "user", "content": long}]}), 400, "messages"
    )
    assert err["code"] == "context_length_exceeded"
    _error(
        _post(server, "/v1/completions", {"model": "tiny-gpt2", "prompt": long, "max_tokens": 2}),
        400,
        "prompt",
    )
    assert noting.on_loop == [(2, True), (len(long), False), (len(long), False)]


class NotingImage:
    """A decoded image that notes the thread its PNG is made on."""

    def __init__(self, image: Image.Image, threads: list[str]) -> None:
        self.image, self.threads = image, threads

    def save(self, fp: io.BytesIO, format: str) -> None:
        self.threads.append(threading.current_thread().name)
        self.image.save(fp, format=format)


class PngNotingBackend(BackendWrapper):
    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.threads: list[str] = []
        self.run_threads: list[str] = []

    def run(self, batch: Sequence[BackendRequest]) -> list[BackendResult]:
        self.run_threads.append(threading.current_thread().name)
        return [
            replace(r, images=tuple(NotingImage(i, self.threads) for i in r.images))
            if isinstance(r, ImageResult)
            else r
            for r in self.inner.run(batch)
        ]


def test_pngs_are_made_off_the_device_thread_and_the_event_loop(make_server, model_cache: Path) -> None:  # type: ignore[no-untyped-def]
    """The device's thread hands the images back decoded and starts its next batch; the PNGs (tens of
    milliseconds each at 512x512) are made on a worker thread, not on the event loop."""
    noting = PngNotingBackend(
        load_backend("image", "tiny-sd", ensure_model("tiny-sd", model_cache / "models"))
    )
    server = make_server(app_kwargs={"backends": {"tiny-sd": noting}})
    images = client(server).images.generate(
        model="tiny-sd", prompt="a kite", n=2, size="64x64", extra_body={"steps": 1}
    )
    assert [Image.open(io.BytesIO(base64.b64decode(d.b64_json or ""))).size for d in images.data] == [
        (64, 64)
    ] * 2
    assert len(noting.threads) == 2 and noting.run_threads
    assert not {*noting.threads} & {"live-server", *noting.run_threads}
    usage = requests.get(server.base_url + "/v1/usage", timeout=10).json()
    assert usage["total"]["images"] == 2  # the ledger counts the images, encoded after the job


class UnencodableBackend(BackendWrapper):
    """Hands back, for requests whose prompt says so, an image Pillow cannot write as PNG (CMYK)."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.batch_sizes: list[int] = []

    def run(self, batch: Sequence[BackendRequest]) -> list[BackendResult]:
        self.batch_sizes.append(len(batch))
        results = self.inner.run(batch)
        return [
            replace(r, images=tuple(i.convert("CMYK") for i in r.images))
            if isinstance(r, ImageResult) and getattr(q, "prompt", "") == "unencodable"
            else r
            for q, r in zip(batch, results, strict=True)
        ]


def test_an_image_whose_png_cannot_be_made_is_answered_and_recorded_as_an_error(  # type: ignore[no-untyped-def]
    make_server, model_cache: Path
) -> None:
    """The PNGs are made after the job, off the device's thread, but before the record: a request
    whose PNG fails is answered 500 and recorded `error` with the energy its images took; the other
    members of its batch are answered and recorded `ok`."""
    backend = UnencodableBackend(
        load_backend("image", "tiny-sd", ensure_model("tiny-sd", model_cache / "models"))
    )
    server = make_server(app_kwargs={"backends": {"tiny-sd": backend}})
    queue = server.app[SCHEDULER].queues["tiny-sd"]  # type: ignore[index]
    queue.max_wait_s = 2.0  # both requests in one batch
    body = {"model": "tiny-sd", "size": "64x64", "steps": 1}
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(_post, server, IMAGES, {**body, "prompt": "unencodable"})
        good = pool.submit(_post, server, IMAGES, {**body, "prompt": "a kite"})
        bad_resp, good_resp = bad.result(timeout=60), good.result(timeout=60)
    err = _error(bad_resp, 500)
    assert err["type"] == "server_error"
    assert good_resp.status_code == 200 and len(good_resp.json()["data"]) == 1
    records = {r.request_id: r for r in server.call(server.app[LEDGER].records())}  # type: ignore[index]
    bad_record = records[bad_resp.headers["X-Request-Id"]]
    good_record = records[good_resp.headers["X-Request-Id"]]
    assert (bad_record.status, good_record.status) == ("error", "ok")
    assert backend.batch_sizes == [2]
    assert bad_record.joules > 0 and bad_record.images == 0 and good_record.images == 1
    counted = {
        labels["status"]: v
        for labels, v in metric_samples(server, "wattproxy_requests_total")
        if labels["model"] == "tiny-sd"
    }
    assert counted == {"error": 1.0, "ok": 1.0}


def test_null_parameters_mean_their_defaults(server: LiveServer) -> None:
    """OpenAI's clients send a parameter passed as None as null: it means the default."""
    c = client(server)
    chat = c.chat.completions.create(
        model="tiny-gpt2",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=None,
        top_p=None,
        n=None,
        stream=None,
        seed=None,
        stop=None,
    )
    assert len(chat.choices) == 1 and chat.usage is not None
    body = {
        "model": "tiny-sd",
        "prompt": "x",
        "n": None,
        "response_format": None,
        "size": "64x64",
        "steps": 1,
    }
    assert len(_post(server, IMAGES, body).json()["data"]) == 1
    _error(_post(server, CHAT, {"model": None, "messages": [{"role": "user", "content": "x"}]}), 400, "model")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"model": "tiny-gpt2", "seed": ' + b"7" * 5000 + b"}", "number too long"),
    ],
)
def test_json_past_pythons_limits_is_a_400(server: LiveServer, raw: bytes, message: str) -> None:
    err = _error(_post(server, CHAT, raw), 400)
    assert err["code"] == "invalid_json" and message in str(err["message"])


def test_choices_count_their_prompt_once_and_do_not_repeat_each_other(make_server) -> None:  # type: ignore[no-untyped-def]
    """n choices: usage counts the prompt once (as OpenAI does); the ledger keeps each member's own
    tokens. Seeded choices that run in different batches (batches of one here) are different samples,
    and the same request gives the same choices again."""
    server = make_server(
        models=[ModelSettings(name="tiny-gpt2", task="text", source="tiny:tiny-gpt2", max_batch_size=1)]
    )
    c = client(server)
    ask = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "Tell me"}], "max_tokens": 8}
    one = c.chat.completions.create(**ask, temperature=0)  # type: ignore[call-overload]
    three = c.chat.completions.with_raw_response.create(**ask, temperature=0, n=3)  # type: ignore[call-overload]
    parsed = three.parse()
    assert one.usage is not None and parsed.usage is not None
    assert parsed.usage.prompt_tokens == one.usage.prompt_tokens
    assert parsed.usage.completion_tokens == 3 * one.usage.completion_tokens  # greedy: three equal answers
    rid = three.headers["X-Request-Id"]
    records = {r.request_id: r for r in server.call(server.app[LEDGER].records())}  # type: ignore[index]
    members = [records[f"{rid}-{i}"] for i in range(3)]
    assert [m.prompt_tokens for m in members] == [one.usage.prompt_tokens] * 3
    seeded = [
        [ch.message.content for ch in c.chat.completions.create(**ask, temperature=1.0, seed=5, n=2).choices]  # type: ignore[call-overload]
        for _ in range(2)
    ]
    assert seeded[0][0] != seeded[0][1]  # two samples, not one sample twice
    assert seeded[0] == seeded[1]  # seeded: repeatable
    for seed in (-1, -(2**63), 2**63 - 1):  # any int64, as OpenAI and vLLM take it
        twice = [
            c.chat.completions.create(**ask, temperature=1.0, seed=seed).choices[0].message.content
            for _ in range(2)
        ]  # type: ignore[call-overload]
        assert twice[0] == twice[1]


def test_more_choices_than_the_queue_holds_is_a_400(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(
        models=[ModelSettings(name="tiny-gpt2", task="text", source="tiny:tiny-gpt2", max_queue=2, max_n=4)]
    )
    ask = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    err = _error(_post(server, CHAT, {**ask, "n": 3}), 400, "n")
    assert "max_queue 2" in str(err["message"])
    listed = {"model": "tiny-gpt2", "prompt": ["a", "b", "c", "d", "e"], "max_tokens": 2}
    err = _error(_post(server, "/v1/completions", listed), 400, "prompt")
    assert str(err["message"]).startswith("n (1) x 5 prompts is 5 choices, above this model's limit of 4")
    assert _post(server, CHAT, {**ask, "n": 2}).status_code == 200


def test_one_user_cannot_fill_a_models_queue(make_server, model_cache: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """max_queue_per_user: a user with that many requests queued gets 429 (naming the cap, with
    Retry-After) for more, while another user's requests are still queued and answered."""
    from tests.conftest import add_key, settings_for_tests

    db = settings_for_tests(model_cache, tmp_path).db_url()
    hog, other = add_key(db, "hog"), add_key(db, "other")
    server = make_server(
        auth="keys",
        models=[
            ModelSettings(
                name="tiny-gpt2",
                task="text",
                source="tiny:tiny-gpt2",
                max_batch_size=1,
                max_queue=8,
                max_queue_per_user=2,
            )
        ],
    )
    body = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}

    def post(key: str) -> requests.Response:
        return requests.post(
            server.base_url + CHAT, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )

    gate = _hold_device(server)
    queue = server.app[SCHEDULER].queues["tiny-gpt2"]  # type: ignore[index]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post, hog)]
        _until(lambda: queue.running == 1, "the first batch runs")
        futures.append(pool.submit(post, hog))
        _until(lambda: queue.running == 2, "a full batch waits on the device")
        futures += [pool.submit(post, hog) for _ in range(2)]
        _until(lambda: queue.depth() == 2, "two of hog's requests are queued")
        refused = post(hog)
        err = _error(refused, 429)
        assert err["type"] == "rate_limit_exceeded" and "max_queue_per_user" in str(err["message"])
        assert int(refused.headers["Retry-After"]) >= 1
        futures.append(pool.submit(post, other))  # the queue still has room for others
        _until(lambda: queue.depth() == 3, "the other user's request is queued")
        gate.set()
        assert [f.result(timeout=60).status_code for f in futures] == [200] * 5


class BatchNotingBackend(BackendWrapper):
    """Notes each batch's prompts."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.batches: list[list[str]] = []

    def run(self, batch: Sequence[BackendRequest]) -> list[BackendResult]:
        self.batches.append([getattr(r, "prompt", None) or "" for r in batch])
        return self.inner.run(batch)


def test_a_fair_batch_leads_with_the_user_served_longest_ago_and_keeps_to_one_key() -> None:
    from proxy.scheduler import ModelQueue, RequestTag, WorkItem

    def item(user: str, key: str, n: int) -> WorkItem:
        tag = RequestTag(request_id=f"{user}{n}", model="m", task="text", user=user)
        return WorkItem(TextRequest(prompt=f"{user}{n}"), tag, key, float(n), None)  # type: ignore[arg-type]

    queue = ModelQueue("m", "text", None, None, 3, 0.0, 64, None, fair=True)  # type: ignore[arg-type]
    arrivals = [("a", "k1"), ("a", "k1"), ("b", "k2"), ("b", "k1"), ("c", "k1"), ("a", "k1")]
    queue.items.extend(item(user, key, n) for n, (user, key) in enumerate(arrivals, 1))
    queue.queued_units = len(queue.items)  # as `submit` counts them

    def ids(batch: list[WorkItem]) -> list[str]:
        return [it.tag.request_id for it in batch]

    # nobody served yet: users in the order of their oldest request; the leader's key (k1) only
    assert ids(queue._choose()) == ["a1", "b4", "c5"]
    queue._served = {"a": 5, "b": 3}  # c never served, then b, then a
    assert ids(queue._choose()) == ["c5", "b4", "a1"]
    queue._served = {"a": 1, "b": 7, "c": 6}  # a leads, with two turns: its second before b's second
    assert ids(queue._choose()) == ["a1", "c5", "b4"]
    queue.max_batch_size = 6  # all fit: arrival order, the oldest's key
    assert ids(queue._choose()) == ["a1", "a2", "b4", "c5", "a6"]
    queue.fair, queue.max_batch_size = False, 3
    assert ids(queue._choose()) == ["a1", "a2", "b4"]


def test_an_image_batch_holds_max_batch_size_images_not_requests() -> None:
    """An image request takes its `n` images of a batch: four requests of n=4 at max_batch_size 8 are two
    pipeline calls of 8 images, not one of 16 (which a GPU sized for 8 may not hold); one request with
    more images than a batch holds runs alone; what does not fit is not passed over (FIFO)."""
    from backends.base import ImageRequest
    from proxy.scheduler import ModelQueue, RequestTag, WorkItem

    def item(name: str, n: int, user: str = "u") -> WorkItem:
        tag = RequestTag(request_id=name, model="m", task="image", user=user)
        return WorkItem(ImageRequest(prompt=name, n=n), tag, "k", 0.0, None, units=n)  # type: ignore[arg-type]

    for fair in (False, True):
        queue = ModelQueue("m", "image", None, None, 8, 0.0, 64, None, fair=fair)  # type: ignore[arg-type]

        def queued(*items: WorkItem, q: ModelQueue = queue) -> list[str]:
            q.items.clear()
            q.items.extend(items)
            q.queued_units = sum(it.units for it in items)
            full = q._full_batch()
            return [it.tag.request_id for it in q._choose()] + (["(full)"] if full else [])

        assert queued(*(item(f"r{i}", 4, f"u{i}") for i in range(4))) == ["r0", "r1", "(full)"]
        assert queued(item("big", 12), item("r1", 1)) == ["big", "(full)"]
        assert queued(item("r0", 3), item("r1", 6), item("r2", 1)) == ["r0", "(full)"]  # r1 does not fit
        assert queued(item("r0", 3), item("r1", 2)) == ["r0", "r1"]  # room for more: not full


@pytest.mark.parametrize("order", ["fair", "arrival"])
def test_batches_take_users_in_turn_when_more_wait_than_a_batch_holds(  # type: ignore[no-untyped-def]
    make_server, model_cache: Path, tmp_path: Path, order: str
) -> None:
    """batch_order "fair" (the default): with a backlog of one user's requests queued, another user's
    request goes in the next batch formed, not behind the backlog; "arrival" keeps arrival order."""
    from tests.conftest import add_key, settings_for_tests

    db = settings_for_tests(model_cache, tmp_path).db_url()
    hog, other = add_key(db, "hog"), add_key(db, "other")
    noting = BatchNotingBackend(
        load_backend("text", "tiny-gpt2", ensure_model("tiny-gpt2", model_cache / "models"))
    )
    settings = {"max_batch_size": 2, "max_wait_ms": 0, "max_queue": 16, "batch_order": order}
    server = make_server(
        auth="keys",
        models=[ModelSettings(name="tiny-gpt2", task="text", source="tiny:tiny-gpt2", **settings)],  # type: ignore[arg-type]
        app_kwargs={"backends": {"tiny-gpt2": noting}},
    )

    def post(key: str, prompt: str) -> requests.Response:
        body = {"model": "tiny-gpt2", "prompt": prompt, "max_tokens": 2}
        return requests.post(
            server.base_url + "/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )

    gate = _hold_device(server)
    queue = server.app[SCHEDULER].queues["tiny-gpt2"]  # type: ignore[index]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, hog, "hog-1")]
        _until(lambda: queue.running == 1, "hog-1 runs (held)")
        for i in range(2, 7):  # hog-2 and hog-3 are handed to the device as a full batch behind it
            futures.append(pool.submit(post, hog, f"hog-{i}"))
            _until(lambda i=i: queue.depth() + 2 * (queue.running - 1) == i - 1, f"hog-{i} is queued")
        futures.append(pool.submit(post, other, "other"))
        _until(lambda: queue.depth() == 4, "the other user's request is queued behind hog's backlog")
        gate.set()
        assert [f.result(timeout=60).status_code for f in futures] == [200] * 7
    assert noting.batches[:2] == [["hog-1"], ["hog-2", "hog-3"]]
    if order == "fair":  # hog had the last two batches: the other user leads the next
        assert noting.batches[2:] == [["other", "hog-4"], ["hog-5", "hog-6"]]
    else:
        assert noting.batches[2:] == [["hog-4", "hog-5"], ["hog-6", "other"]]


def test_metrics_have_no_series_that_cannot_move_and_exact_bucket_bounds(server: LiveServer) -> None:
    """Token series only for text models, image series only for image models; histogram bounds as
    the decimals they are (le="2.5e-06", not "2.4999999999999998e-06")."""
    c = client(server)
    c.chat.completions.create(model="tiny-gpt2", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    c.images.generate(model="tiny-sd", prompt="x", size="64x64", extra_body={"steps": 1})
    tokens = {labels["model"] for labels, _ in metric_samples(server, "wattproxy_tokens_total")}
    images = {labels["model"] for labels, _ in metric_samples(server, "wattproxy_images_total")}
    assert tokens == {"tiny-gpt2"} and images == {"tiny-sd"}
    bounds = [
        labels["le"]
        for name in ("wattproxy_request_energy_kwh_bucket", "wattproxy_request_co2_grams_bucket")
        for labels, _ in metric_samples(server, name)
    ]
    assert bounds and all(b == "+Inf" or len(b) <= 8 for b in bounds), bounds


# What a model served in process does not do, asked through the official client: (call, kwargs, param).
_UNSUPPORTED: list[tuple[str, dict[str, Any], str]] = [
    # tools with tool_choice "auto" (the default): choosing between text and a call needs a parser
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tool_choice"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),  # without tools
    ("chat", {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ("chat", {"modalities": ["text", "audio"]}, "modalities"),
    (
        "chat",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "data:,"}},
                    ],
                }
            ]
        },
        "messages.0.content.1.type",
    ),
    ("completion", {"best_of": 3}, "best_of"),
    ("completion", {"suffix": "end"}, "suffix"),
    ("image", {"quality": "hd"}, "quality"),
    ("image", {"style": "natural"}, "style"),
    ("image", {"output_format": "jpeg"}, "output_format"),
    ("image", {"background": "transparent"}, "background"),
]


def test_what_a_model_served_in_process_cannot_do_is_refused_not_ignored(server: LiveServer) -> None:
    """Tools the model would have to choose between text and (tool_choice "auto"), the deprecated
    functions, audio, image parts, an image's quality, style, format or background: a clear 400
    `unsupported_value` naming the parameter, never an answer made as if it had not been asked; their
    defaults, as clients send them, are answered; nothing refused is run or recorded."""
    c = client(server)
    chat = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    completion = {"model": "tiny-gpt2", "prompt": "hi", "max_tokens": 2}
    image = {"model": "tiny-sd", "prompt": "a fox", "size": "64x64", "extra_body": {"steps": 1}}
    for call, kwargs, param in _UNSUPPORTED:
        with pytest.raises(openai.BadRequestError) as refused:
            if call == "chat":
                c.chat.completions.create(**{**chat, **kwargs})  # type: ignore[call-overload]
            elif call == "completion":
                c.completions.create(**{**completion, **kwargs})  # type: ignore[call-overload]
            else:
                c.images.generate(**{**image, **kwargs})  # type: ignore[call-overload]
        body = refused.value.body
        assert isinstance(body, dict), body
        assert (body["param"], body["code"], body["type"]) == (
            param,
            "unsupported_value",
            "invalid_request_error",
        )
        assert str(body["message"]).startswith("Unsupported value: ") and "tiny-" in str(body["message"])
    neutral_chat = c.chat.completions.create(
        model="tiny-gpt2",
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        max_tokens=2,
        presence_penalty=0,
        frequency_penalty=0.0,
        logit_bias={},
        logprobs=False,
        top_logprobs=0,
        tool_choice="none",
        response_format={"type": "text"},
        modalities=["text"],
    )
    assert neutral_chat.choices[0].message.content is not None
    neutral_completion = c.completions.create(
        **completion, echo=False, best_of=1, suffix=None, presence_penalty=0
    )
    assert neutral_completion.choices[0].text is not None
    neutral_image = c.images.generate(**image, quality="standard", output_format="png", background="auto")  # type: ignore[arg-type]
    assert neutral_image.data and neutral_image.data[0].b64_json
    assert len(server.call(server.app[LEDGER].records())) == 3  # type: ignore[index]


def _reference_logprobs(
    source: Path, prompt: str, steps: int, k: int
) -> list[tuple[str, float, list[float]]]:
    """Greedy decoding of `prompt` with transformers alone: each step's token text, its log probability
    and the `k` largest, from the model's raw distribution."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            logprobs = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
            token = int(logprobs.argmax())
            text = tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append((text, float(logprobs[token]), logprobs.topk(k).values.tolist()))
            ids = torch.cat([ids, torch.tensor([[token]])], dim=-1)
    return out


def test_log_probabilities_of_a_model_served_in_process(either_server: LiveServer, model_cache: Path) -> None:
    """`logprobs` (completions) and `logprobs` + `top_logprobs` (chat) from a transformers model, in this
    process or one of its own: the raw model's log probabilities of the tokens that make the text (those
    of transformers run alone, greedy), the most likely alternatives in order, the tokens spelling the
    text; asking for them changes nothing else; with a stop string, the tokens past it are left out; a
    stream's come with the chunks of text they make, and add up to a plain answer's (with a stop string
    too); top_logprobs without logprobs, or over 20 alternatives: a 400 naming the parameter."""
    server = either_server
    c = client(server)
    ask = {"model": "tiny-gpt2", "prompt": "The lighthouse", "max_tokens": 6, "temperature": 0}
    plain = c.completions.create(**ask)  # type: ignore[call-overload]
    answer = c.completions.create(**ask, logprobs=3)  # type: ignore[call-overload]
    choice = answer.choices[0]
    assert choice.text == plain.choices[0].text and plain.choices[0].logprobs is None
    lp = choice.logprobs
    reference = _reference_logprobs(ensure_model("tiny-gpt2", model_cache), "The lighthouse", 6, 3)
    generated = answer.usage.completion_tokens - (choice.finish_reason == "stop")  # the stop token has none
    assert (
        len(lp.tokens) == generated == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    )
    for i, (token, logprob, top) in enumerate(reference[:generated]):
        assert lp.tokens[i] == token
        assert lp.token_logprobs[i] == pytest.approx(logprob, abs=1e-4)
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(
            top[: len(lp.top_logprobs[i])], abs=1e-4
        )
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]

    chat = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "n": 2}
    sampled = c.chat.completions.create(**chat, temperature=0.9, seed=7, logprobs=True, top_logprobs=2)  # type: ignore[call-overload]
    again = c.chat.completions.create(**chat, temperature=0.9, seed=7)  # type: ignore[call-overload]
    for with_lp, without in zip(sampled.choices, again.choices, strict=True):
        assert with_lp.message.content == without.message.content and without.logprobs is None
        content = with_lp.logprobs.content
        assert content and "".join(t.token for t in content) == with_lp.message.content
        for t in content:
            assert t.logprob <= 0 and bytes(t.bytes) == t.token.encode()
            alternatives = [a.logprob for a in t.top_logprobs]
            assert len(alternatives) == 2 and alternatives == sorted(alternatives, reverse=True)
            assert t.logprob <= alternatives[0] + 1e-6  # sampled: at most the likeliest's
    no_top = c.chat.completions.create(**chat, temperature=0, logprobs=True)  # type: ignore[call-overload]
    for choice_ in no_top.choices:
        assert all(t.top_logprobs == [] for t in choice_.logprobs.content)

    # a stop string where the greedy text first shows it, past its start: the tokens past it go
    fox = {**ask, "prompt": "A fox"}
    text = c.completions.create(**fox).choices[0].text  # type: ignore[call-overload]
    at = next(i for i in range(2, len(text) - 1) if text.find(text[i : i + 2]) == i)
    cut = c.completions.create(**fox, logprobs=0, stop=[text[at : at + 2]]).choices[0]  # type: ignore[call-overload]
    assert cut.text == text[:at] and cut.finish_reason == "stop"
    spelled = "".join(cut.logprobs.tokens)
    assert spelled.startswith(cut.text) and len(spelled) - len(cut.logprobs.tokens[-1]) < len(cut.text)

    def joined(stream: list[Any]) -> dict[str, list[Any]]:
        """A completion stream's log probabilities, chunk after chunk (each chunk's as they came)."""
        carried = [ch.choices[0].logprobs for ch in stream if ch.choices and ch.choices[0].logprobs]
        fields = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        return {f: [x for chunk in carried for x in getattr(chunk, f)] for f in fields}

    streamed = list(c.completions.create(**ask, logprobs=3, stream=True))  # type: ignore[call-overload]
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == choice.text
    texts = [ch.choices[0] for ch in streamed if ch.choices and ch.choices[0].text]
    assert len(texts) > 1 and all(t.logprobs and t.logprobs.tokens for t in texts)  # with the text they make
    assert joined(streamed) == lp.model_dump()  # offsets in the whole text, as a plain answer's
    finish = [ch.choices[0] for ch in streamed if ch.choices and ch.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].logprobs is None  # every token went with its text
    cut_streamed = list(c.completions.create(**fox, logprobs=0, stop=[text[at : at + 2]], stream=True))  # type: ignore[call-overload]
    assert "".join(ch.choices[0].text for ch in cut_streamed if ch.choices) == cut.text
    assert joined(cut_streamed) == cut.logprobs.model_dump()
    chat_stream = list(
        c.chat.completions.create(**chat, temperature=0, logprobs=True, top_logprobs=2, stream=True)
    )  # type: ignore[call-overload]
    chat_plain = c.chat.completions.create(**chat, temperature=0, logprobs=True, top_logprobs=2)  # type: ignore[call-overload]
    for plain_choice in chat_plain.choices:
        pieces = [
            ch.choices[0] for ch in chat_stream if ch.choices and ch.choices[0].index == plain_choice.index
        ]
        assert "".join(p.delta.content or "" for p in pieces) == plain_choice.message.content
        assert all(p.logprobs and p.logprobs.content for p in pieces if p.delta.content)
        logged = [t for p in pieces if p.logprobs for t in p.logprobs.content]
        assert [t.model_dump() for t in logged] == [t.model_dump() for t in plain_choice.logprobs.content]

    for call, kwargs, param in (
        (c.completions.create, {**ask, "logprobs": 21}, "logprobs"),
        (c.chat.completions.create, {**chat, "top_logprobs": 2}, "top_logprobs"),
        (c.chat.completions.create, {**chat, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            call(**kwargs)
        assert refused.value.body["param"] == param, refused.value.body  # type: ignore[index]


def test_an_echoed_completion_starts_with_its_prompt_and_scores_it(
    either_server: LiveServer, model_cache: Path
) -> None:
    """`echo` on a transformers model (in this process or one of its own): the text starts with the
    prompt; with `logprobs`, the prompt's tokens come first, the first with none (null, as OpenAI
    gives it), each other's the raw model's at the position before it (transformers alone, to 1e-4).
    As lm-evaluation-harness asks to score a continuation (token ids, `max_tokens` 1, `logprobs` 1):
    one value a prompt token, then the generated one's. A stream starts with the prompt and its tokens'."""
    import torch
    from transformers import AutoModelForCausalLM

    server = either_server
    c = client(server)
    ask = {"model": "tiny-gpt2", "prompt": "The lighthouse keeper", "max_tokens": 4, "temperature": 0}
    plain = c.completions.create(**ask).choices[0]  # type: ignore[call-overload]
    echoed = c.completions.create(**ask, echo=True).choices[0]  # type: ignore[call-overload]
    assert echoed.text == ask["prompt"] + plain.text and echoed.logprobs is None

    model = AutoModelForCausalLM.from_pretrained(ensure_model("tiny-gpt2", model_cache)).eval()
    ids = server.app[SERVICE].models["tiny-gpt2"].backend.prompt_ids(TextRequest(prompt=ask["prompt"]))  # type: ignore[union-attr]
    with torch.inference_mode():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    scored = c.completions.create(**ask, echo=True, logprobs=2)  # type: ignore[call-overload]
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == echoed.text
    assert len(lp.tokens) == len(ids) + (
        scored.usage.completion_tokens - (scored.choices[0].finish_reason == "stop")
    )
    assert "".join(lp.tokens[: len(ids)]) == ask["prompt"]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(reference[i - 1, ids[i]]), abs=1e-4)
        top = sorted(lp.top_logprobs[i].values(), reverse=True)
        assert top == pytest.approx(reference[i - 1].topk(len(top)).values.tolist(), abs=1e-4)
    generated = c.completions.create(**ask, logprobs=2).choices[0].logprobs  # type: ignore[call-overload]
    assert lp.tokens[len(ids) :] == generated.tokens
    assert lp.token_logprobs[len(ids) :] == pytest.approx(generated.token_logprobs, abs=1e-6)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]

    harness = c.completions.create(  # type: ignore[call-overload]
        model="tiny-gpt2", prompt=list(ids), max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    scores = harness.choices[0].logprobs.token_logprobs
    assert harness.usage.prompt_tokens == len(ids)
    assert scores[: len(ids)] == pytest.approx(lp.token_logprobs[: len(ids)], abs=1e-6)
    assert len(scores) == len(ids) + (harness.choices[0].finish_reason == "length")
    assert harness.usage.energy["joules"] > 0  # type: ignore[union-attr]

    streamed = [
        ch.choices[0]
        for ch in c.completions.create(**ask, echo=True, logprobs=2, stream=True)  # type: ignore[call-overload]
        if ch.choices
    ]
    assert streamed[0].text == ask["prompt"] and streamed[0].logprobs.tokens == lp.tokens[: len(ids)]
    assert "".join(p.text for p in streamed) == scored.choices[0].text
    carried = [p.logprobs for p in streamed if p.logprobs]
    assert [t for x in carried for t in x.tokens] == lp.tokens
    assert [v for x in carried for v in x.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert [o for x in carried for o in x.text_offset] == lp.text_offset


_ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}


def test_structured_output_follows_the_schema_asked(either_server: LiveServer) -> None:
    """`response_format` on a transformers model (in this process or one of its own): with a JSON
    Schema, the text is a value of it (the tiny model has random weights: only the enforcement makes it
    JSON), sampled or greedy, streamed or not, and a request beside it in the batch is answered as
    alone; `json_object` gives an object; a format that is not one, or a schema that is not one, is a
    400 naming it."""
    server = either_server
    c = client(server)
    chat = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "Is the sky green?"}]}
    asked = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": _ANSWER_SCHEMA, "strict": True},
    }

    def valid(text: str) -> dict[str, Any]:
        value = json.loads(text)
        assert set(value) == {"ok", "color"} and type(value["ok"]) is bool, value
        assert value["color"] in ("red", "green", "blue"), value
        return value  # type: ignore[no-any-return]

    free = c.chat.completions.create(**chat, max_tokens=24, temperature=0).choices[0].message.content  # type: ignore[call-overload]
    with ThreadPoolExecutor(4) as pool:  # batched together, each its own
        answers = list(
            pool.map(
                lambda extra: c.chat.completions.create(**chat, **extra),  # type: ignore[call-overload]
                [
                    {"response_format": asked, "max_tokens": 64, "temperature": 0},
                    {"response_format": asked, "max_tokens": 64, "temperature": 1.0, "seed": 5, "n": 2},
                    {"max_tokens": 24, "temperature": 0},
                ],
            )
        )
    for answer in answers[:2]:
        for choice in answer.choices:
            assert choice.finish_reason == "stop", choice
            valid(choice.message.content)
    assert answers[2].choices[0].message.content == free

    pieces = c.chat.completions.create(
        **chat, response_format=asked, max_tokens=64, temperature=0, stream=True
    )  # type: ignore[call-overload]
    streamed = "".join(ch.choices[0].delta.content or "" for ch in pieces if ch.choices)
    assert valid(streamed) == valid(answers[0].choices[0].message.content)

    any_object = c.chat.completions.create(  # type: ignore[call-overload]
        **chat, response_format={"type": "json_object"}, max_tokens=16, temperature=0
    )
    assert any_object.choices[0].message.content.lstrip().startswith("{")

    for response_format, param in (
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}},
            "response_format.json_schema.schema",
        ),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            c.chat.completions.create(**chat, response_format=response_format, max_tokens=4)  # type: ignore[call-overload]
        body = refused.value.body
        assert (body["param"], body["code"]) == (param, "unsupported_value"), body  # type: ignore[index]


def test_the_schema_checker_is_imported_before_a_model_that_honours_it_is_ready(
    make_server, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A request's JSON Schema is checked on the event loop (backends.structured): its import (xgrammar)
    is done while the model loads, not at the first such request, stalling every other."""
    monkeypatch.delitem(sys.modules, "backends.structured", raising=False)
    images = ModelSettings(name="tiny-sd", task="image", source="tiny:tiny-sd")
    make_server(models=[images])
    assert "backends.structured" not in sys.modules  # an image model honours no response_format
    make_server(models=[ModelSettings(name="tiny-gpt2", task="text", source="tiny:tiny-gpt2")])
    assert "backends.structured" in sys.modules


_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "celsius": {"type": "boolean"}},
            "required": ["city", "celsius"],
            "additionalProperties": False,
        },
    },
}
_TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
_PING = {  # no parameters: an empty object
    "type": "function",
    "function": {
        "name": "ping",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}


def test_a_chat_that_must_call_a_tool_calls_it(either_server: LiveServer) -> None:
    """`tools` with `tool_choice` a named function or "required", on a transformers model (in this
    process or one of its own): the answer is a call (or calls) whose arguments are a value of the
    function's parameters (held to them as structured output: the tiny model has random weights),
    with finish_reason "tool_calls"; the tools and a previous turn's calls reach the chat template
    (more prompt tokens); a stream sends the calls in one delta at its end; "none" answers text;
    "auto", an unknown function or tool_choice without tools are 400s naming the parameter."""
    server = either_server
    c = client(server)
    chat = {
        "model": "tiny-gpt2",
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "max_tokens": 64,
    }

    def arguments(call: Any, tool: dict[str, Any]) -> dict[str, Any]:
        value = json.loads(call.function.arguments)
        schema = tool["function"]["parameters"]
        assert set(value) == set(schema.get("required", ())), value
        for key, spec in schema["properties"].items():
            assert value[key] in spec["enum"] if "enum" in spec else type(value[key]) is bool, value
        return value  # type: ignore[no-any-return]

    named = c.chat.completions.create(  # type: ignore[call-overload]
        **chat, tools=[_WEATHER, _TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments(call, _WEATHER)

    required = c.chat.completions.create(  # type: ignore[call-overload]
        **chat,
        tools=[_PING, _TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0.8,
        seed=3,  # one whose draws end the list within the tiny model's 64 tokens (whitespace: up to 2)
    )
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    (call,) = choice.message.tool_calls
    arguments(call, {"ping": _PING, "get_time": _TIME}[call.function.name])

    weather = {
        "tools": [_WEATHER, _TIME],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    greedy = c.chat.completions.create(**chat, **weather, temperature=0).choices[0].message.tool_calls  # type: ignore[call-overload]
    streamed = [
        ch.choices[0]
        for ch in c.chat.completions.create(**chat, **weather, temperature=0, stream=True)
        if ch.choices
    ]  # type: ignore[call-overload]
    assert not any(ch.delta.content for ch in streamed)  # the calls' JSON is not sent as text
    (end,) = [ch for ch in streamed if ch.finish_reason]
    assert end.finish_reason == "tool_calls" and len(end.delta.tool_calls) == 1
    (delta,) = end.delta.tool_calls
    assert (delta.index, delta.type, delta.function.name) == (0, "function", "get_weather")
    assert json.loads(delta.function.arguments) == json.loads(greedy[0].function.arguments)

    plain = c.chat.completions.create(**chat, temperature=0)  # type: ignore[call-overload]
    offered = c.chat.completions.create(**chat, temperature=0, tools=[_WEATHER], tool_choice="none")  # type: ignore[call-overload]
    assert offered.choices[0].finish_reason != "tool_calls" and offered.choices[0].message.tool_calls is None
    assert offered.usage.prompt_tokens > plain.usage.prompt_tokens  # the tools are in the prompt
    history = [
        *chat["messages"],
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [named.choices[0].message.tool_calls[0].model_dump()],
        },
        {"role": "tool", "tool_call_id": named.choices[0].message.tool_calls[0].id, "content": "12 C, rain"},
    ]
    answered = c.chat.completions.create(  # type: ignore[call-overload]
        model="tiny-gpt2", messages=history, max_tokens=8, tools=[_WEATHER], tool_choice="none"
    )
    without_call = [*history[:1], {"role": "assistant", "content": None}, history[2]]
    bare = c.chat.completions.create(  # type: ignore[call-overload]
        model="tiny-gpt2", messages=without_call, max_tokens=8, tools=[_WEATHER], tool_choice="none"
    )
    assert answered.usage.prompt_tokens > bare.usage.prompt_tokens  # the call reached the template

    for kwargs, param in (
        ({"tools": [_WEATHER]}, "tool_choice"),  # "auto", the default with tools
        ({"tools": [_WEATHER], "tool_choice": "auto"}, "tool_choice"),
        (
            {"tools": [_WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            c.chat.completions.create(**chat, **kwargs)  # type: ignore[call-overload]
        assert refused.value.body["param"] == param, refused.value.body  # type: ignore[index]


def test_messages_a_models_chat_template_refuses_are_a_400(server: LiveServer) -> None:
    """A chat template that raises for the messages (as real ones do for roles that do not alternate,
    or more tool calls in a turn than they render): 400 naming messages, not a server error."""
    backend = server.app[SERVICE].models["tiny-gpt2"].backend  # type: ignore[index]
    tokenizer = backend._counting_tokenizer  # type: ignore[union-attr]
    tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    try:
        with pytest.raises(openai.BadRequestError) as refused:
            client(server).chat.completions.create(
                model="tiny-gpt2", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
    finally:
        tokenizer.chat_template = None
    body = refused.value.body
    assert (body["param"], body["code"]) == ("messages", "invalid_value"), body  # type: ignore[index]
    assert "roles must alternate" in body["message"]  # type: ignore[index]


def test_penalties_and_logit_bias_shape_each_choice_of_a_batch(either_server: LiveServer) -> None:
    """OpenAI's presence and frequency penalties and logit bias, on a transformers model (in this process
    or one of its own): each member of a batch gets its own (the same answer alone as batched with
    others), greedy included; a token past the vocabulary is a 400 naming logit_bias."""
    server = either_server
    c = client(server)
    ask = {"model": "tiny-gpt2", "prompt": "hello there", "max_tokens": 8, "temperature": 0}
    token = server.app[SERVICE].models["tiny-gpt2"].backend.prompt_ids(TextRequest(prompt=" cat"))[-1]  # type: ignore[index,union-attr]
    plain = c.completions.create(**ask).choices[0].text  # type: ignore[call-overload]
    biased = c.completions.create(**ask, logit_bias={str(token): 100}).choices[0].text  # type: ignore[call-overload]
    assert biased == " cat" * 8  # +100 on one token: greedy picks it every time
    penalised = c.completions.create(**ask, frequency_penalty=2.0).choices[0].text  # type: ignore[call-overload]
    assert penalised != plain
    with ThreadPoolExecutor(3) as pool:  # together, in one batch or not: each its own answer
        together = list(
            pool.map(
                lambda extra: c.completions.create(**ask, **extra).choices[0].text,  # type: ignore[call-overload]
                [{}, {"logit_bias": {str(token): 100}}, {"frequency_penalty": 2.0}],
            )
        )
    assert together == [plain, biased, penalised]
    with pytest.raises(openai.BadRequestError) as refused:
        c.completions.create(**ask, logit_bias={"999999": 5})  # type: ignore[call-overload]
    assert refused.value.body["param"] == "logit_bias" and refused.value.body["code"] == "invalid_token_id"  # type: ignore[index]
