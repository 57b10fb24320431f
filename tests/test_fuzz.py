"""Schemathesis against a live server: every operation in /openapi.json, fuzzed with schema-valid and
schema-invalid requests (a bounded number per operation), every response checked: no 5xx, the status
code and the content type are documented, the body conforms to the documented schema, invalid
requests are refused and valid ones are answered unless a configured limit refuses them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.core.failures import Failure

from proxy.app import create_app
from proxy.config import ModelSettings, Settings, embedded_models
from proxy.openapi import openapi_document
from proxy.protocol import ChatCompletionRequest, CompletionRequest, ImageGenerationRequest
from proxy.usage import parse_time
from tests.conftest import LiveServer, add_key, settings_for_tests

EXAMPLES_PER_OPERATION = 100

SCHEMA = schemathesis.openapi.from_dict(openapi_document())
# Replaced by `positive_data_within_limits`: the document is static while limits are per-model settings.
SCHEMA.config.checks.update(excluded_check_names=["positive_data_acceptance"])
# Every call carries an admin key (the fixture's); `ignored_auth` still checks that none, or a wrong one,
# is refused.
SCHEMA.config.generation.update(with_security_parameters=False)

# A generated `model` is a random string, which only ever reaches the 404 path (the coverage phase
# covers it), so fuzzed bodies and paths mostly name a served model of the operation's task.
SERVED_MODEL = {
    "/v1/chat/completions": "tiny-gpt2",
    "/v1/completions": "tiny-gpt2",
    "/v1/images/generations": "tiny-sd",
}


@SCHEMA.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    served = SERVED_MODEL.get(context.operation.path) if context.operation is not None else None
    if served is not None and isinstance(body, dict) and isinstance(body.get("model"), str):
        return st.sampled_from([{**body, "model": served}, body])
    return st.just(body)


@SCHEMA.hook
def flatmap_path_parameters(
    context: schemathesis.HookContext, path_parameters: dict[str, Any] | None
) -> st.SearchStrategy[dict[str, Any] | None]:
    if path_parameters is not None and isinstance(path_parameters.get("model"), str):
        return st.sampled_from(
            [
                {**path_parameters, "model": "tiny-gpt2"},
                {**path_parameters, "model": "tiny-sd"},
                path_parameters,
            ]
        )
    return st.just(path_parameters)


# A request the document calls valid may still be refused by a configured limit, with a 400 that names
# the limited parameter (or a 404 for a model or key that does not exist).
LIMIT_REFUSALS = {
    "max_tokens_exceeded": {"max_tokens", "max_completion_tokens"},
    "n_exceeded": {"n", "prompt"},  # "prompt": a list of prompts, each a choice
    "steps_exceeded": {"steps"},
    "invalid_size": {"size"},
    "prompt_too_long": {"prompt"},
    "context_length_exceeded": {"prompt", "messages", "max_tokens", "max_completion_tokens"},
    "invalid_token_id": {"logit_bias", "prompt"},  # a token id past the model's vocabulary
    "wrong_task": {"model"},  # a served model of the other task (the fuzzer learns names from answers)
}
# What a model served in process refuses though the document (which proxy mode shares) takes it: a
# parameter asking for what the model does not do (or a part of one: `response_format.type`), or a
# content part other than text.
UNSUPPORTED_IN_PROCESS = (
    ChatCompletionRequest.ASKED | CompletionRequest.ASKED | ImageGenerationRequest.ASKED | {"prompt"}
)  # "prompt": as token ids
CONTENT_PART_TYPE = re.compile(r"messages\.\d+\.content\.\d+\.type")
# a previous turn's tool call that a chat template cannot be given (no function name, arguments that
# are not an object): the document takes any object there, as proxy mode sends them on as they came
TOOL_CALL_PART = re.compile(r"messages\.\d+\.tool_calls\.\d+\.function(\.arguments)?")


class RefusedWithinLimits(Failure):
    """A schema-valid request refused other than by a configured limit."""


def positive_data_within_limits(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code < 400:
        return None
    try:
        error = response.json()["error"] if response.status_code in (400, 404) else {}
    except (ValueError, KeyError, TypeError):
        error = {}
    code, param = error.get("code"), error.get("param")
    if response.status_code == 404 and code in ("model_not_found", "key_not_found"):
        return None
    if response.status_code == 400 and param == "end" and _end_not_after_start(case):
        return None  # a report covers [start, end): the document says so, its schema cannot
    if response.status_code == 400 and param in LIMIT_REFUSALS.get(code, set()):
        return None
    if (
        response.status_code == 400
        and code == "unsupported_value"
        and isinstance(param, str)
        and (
            param.split(".")[0] in UNSUPPORTED_IN_PROCESS
            or CONTENT_PART_TYPE.fullmatch(param)
            or TOOL_CALL_PART.fullmatch(param)
        )
    ):
        return None
    raise RefusedWithinLimits(
        operation=case.operation.label,
        title="Schema-valid request refused other than by a configured limit",
        message=f"{response.status_code}: {response.text[:500]}",
    )


def _end_not_after_start(case: schemathesis.Case) -> bool:
    query = case.query or {}
    try:
        start, end = parse_time(query.get("start"), "start"), parse_time(query.get("end"), "end")
    except ValueError:
        return False
    return start is not None and end is not None and end <= start


@dataclass(frozen=True)
class Live:
    server: LiveServer
    headers: dict[str, str]  # an admin key's

    @property
    def base_url(self) -> str:
        return self.server.base_url


@pytest.fixture(scope="module")
def live(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Auth on (the fuzzer calls with an admin key, and checks that no key or a wrong one is refused)."""
    # Small limits keep every generated request cheap; the fuzzer reaches past them on purpose.
    models = [
        ModelSettings(
            name="tiny-gpt2",
            task="text",
            source="tiny:tiny-gpt2",
            max_tokens=8,
            default_max_tokens=4,
            max_n=2,
            max_prompt_tokens=256,
        ),
        ModelSettings(
            name="tiny-sd",
            task="image",
            source="tiny:tiny-sd",
            sizes=["64x64"],
            max_n=2,
            default_steps=1,
            max_steps=3,
            max_prompt_chars=2000,
        ),
    ]
    settings = settings_for_tests(model_cache, tmp_path_factory.mktemp("fuzz"), models=models, auth="keys")
    key = add_key(settings.db_url(), "fuzzer", admin=True)
    server = LiveServer(settings).start()
    yield Live(server, {"Authorization": f"Bearer {key}"})
    server.stop()


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


@SCHEMA.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_operation_conforms(case: schemathesis.Case, live: Live, session: requests.Session) -> None:
    case.call_and_validate(
        base_url=live.base_url,
        session=session,
        headers=live.headers,
        timeout=30,
        additional_checks=[positive_data_within_limits],
    )


# -- the document itself --------------------------------------------------------------------------

PUBLIC = {"/healthz", "/readyz", "/openapi.json", "/metrics"}
ADMIN_ONLY = {"/v1/keys", "/v1/keys/{key_id}"}
# Routes that read a request body under the client timeout (408 when it does not arrive in time).
BODY_READERS = {"/v1/chat/completions", "/v1/completions", "/v1/images/generations"}


def _routes() -> list[tuple[str, str]]:
    """Every (method, path) the app serves, from its router (HEAD mirrors GET)."""
    app = create_app(Settings(models=embedded_models()))
    return sorted(
        {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
        - {("HEAD", r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    )


def _expected_statuses(method: str, path: str) -> set[str]:
    """The error statuses this route can answer with, by the design's rules (DESIGN.md, HTTP API)."""
    if path in PUBLIC:
        return {"503"} if path == "/readyz" else set()
    expected = {"401", "503"}  # a key is needed; while draining every non-public route answers 503
    if path in ADMIN_ONLY or path == "/v1/usage":
        expected.add("403")
    if method == "POST" or path == "/v1/usage":  # a body or query to validate
        expected.add("400")
    if "{" in path:  # names something that may not exist
        expected.add("404")
    if path in BODY_READERS:
        expected |= {"400", "404", "408", "413", "429", "500"}
    return expected


@pytest.mark.parametrize(("method", "path"), _routes(), ids=lambda v: str(v))
def test_every_route_is_documented_with_the_statuses_it_answers(method: str, path: str) -> None:
    operations = openapi_document()["paths"].get(path, {})
    assert method.lower() in operations, f"{method} {path} is served but not in /openapi.json"
    responses = operations[method.lower()]["responses"]
    assert any(code.startswith("2") for code in responses)
    missing = _expected_statuses(method, path) - set(responses)
    assert not missing, f"{method} {path} can answer {sorted(missing)}, which the document does not list"


def test_document_describes_the_energy_extension_and_the_error_envelope() -> None:
    doc = openapi_document()
    schemas = doc["components"]["schemas"]

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        ref = node.get("$ref") or next(
            (branch["$ref"] for branch in node.get("anyOf", []) if "$ref" in branch), None
        )
        assert ref is not None, node
        return schemas[ref.rsplit("/", 1)[1]]

    energy = schemas["EnergyUsage"]
    assert set(energy["required"]) >= {
        "kwh",
        "joules",
        "co2_grams",
        "measurement",
        "device",
        "uncertainty_kwh",
        "carbon_intensity_g_per_kwh",
        "pue",
    }
    assert set(energy["properties"]["measurement"]["enum"]) >= {"measured", "estimated", "synthetic"}
    for answer in ("ChatCompletion", "Completion", "ImagesResponse"):
        usage = resolve(schemas[answer]["properties"]["usage"])
        assert resolve(usage["properties"]["energy"]) is energy, answer

    detail = resolve(schemas["ErrorEnvelope"]["properties"]["error"])
    assert set(detail["required"]) == {"message", "type", "param", "code"}
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400 and path != "/readyz":
                    schema = response["content"]["application/json"]["schema"]
                    assert resolve(schema) is schemas["ErrorEnvelope"], (method, path, status)


# -- text the generators do not produce: bytes that are not UTF-8, JSON escapes of lone surrogates ----

NOT_UTF8 = b'{"prompt": "\xf7\xff"}'
# Bodies whose "@" becomes the JSON escape of a lone surrogate (valid JSON, not encodable text).
LONE_SURROGATE: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "@"}]}),
    (
        "/v1/chat/completions",
        {"model": "tiny-gpt2", "messages": [{"role": "user", "content": [{"type": "text", "text": "@"}]}]},
    ),
    ("/v1/completions", {"model": "tiny-gpt2", "prompt": "@"}),
    ("/v1/completions", {"model": "tiny-gpt2", "prompt": ["fine", "@"]}),
    ("/v1/images/generations", {"prompt": "@", "steps": 1}),
    ("/v1/images/generations", {"prompt": "fine", "negative_prompt": "@", "steps": 1}),
    ("/v1/keys", {"user": "@"}),
]


def _post_routes() -> list[str]:
    return sorted(path for method, path in _routes() if method == "POST")


@pytest.mark.parametrize("path", _post_routes())
def test_a_body_that_is_not_utf8_is_a_400(live: Live, path: str) -> None:
    resp = requests.post(
        live.base_url + path,
        data=NOT_UTF8,
        headers={**live.headers, "Content-Type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == 400, (resp.status_code, resp.text[:300])
    assert resp.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "body"), LONE_SURROGATE, ids=[f"{i}-{p}" for i, (p, _) in enumerate(LONE_SURROGATE)]
)
def test_a_lone_surrogate_in_text_is_a_400(live: Live, path: str, body: dict[str, Any]) -> None:
    raw = json.dumps(body).replace("@", "\\ud800").encode()
    resp = requests.post(
        live.base_url + path,
        data=raw,
        headers={**live.headers, "Content-Type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == 400, (resp.status_code, resp.text[:300])
    assert resp.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("user", ["-", ".", "_", "-._"])
def test_a_user_name_of_punctuation_only_is_refused_cleanly(live: Live, user: str) -> None:
    resp = requests.post(live.base_url + "/v1/keys", json={"user": user}, headers=live.headers, timeout=30)
    assert resp.status_code in (201, 400), (resp.status_code, resp.text[:300])
