"""Thin HTTP handlers: parse, validate against the model's limits, enqueue, await, respond (SSE when
streaming). The energy extension rides in every usage object and, for plain responses, in headers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel
from pydantic_core import to_json

from backends.base import (
    ChatMessage,
    ImageRequest,
    ImageResult,
    TextPiece,
    TextRequest,
    TextResult,
    TokenLogprob,
)
from proxy import tool_calls
from proxy.config import ModelSettings, parse_size
from proxy.errors import (
    STREAM,
    ApiError,
    InvalidRequest,
    NotFound,
    Overloaded,
    RateLimited,
    RequestTimeout,
    ServerError,
    sse_frame,
)
from proxy.openapi import openapi_document
from proxy.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChunkChoice,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    EmbeddingRequest,
    EnergyUsage,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ImageUsage,
    ModelCard,
    ModelList,
    StreamOptions,
    ToolCallDeltaOut,
    Usage,
)
from proxy.scheduler import (
    ModelQueue,
    NotRecorded,
    Outcome,
    Piece,
    PieceSink,
    QueueFull,
    RequestTag,
    WorkItem,
)
from proxy.state import (
    BUDGETS,
    METRICS,
    PRINCIPAL,
    REQUEST_ID,
    SERVICE,
    SETTINGS,
    UPSTREAM,
    USER,
    ServedModel,
    Service,
)
from proxy.tool_calls import ToolCallParser

JOULES_PER_KWH = 3.6e6
_R = TypeVar("_R")
_Body = TypeVar("_Body", ChatCompletionRequest, CompletionRequest, ImageGenerationRequest, EmbeddingRequest)


def _json(model: BaseModel, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=model.model_dump_json(exclude_none=False), content_type="application/json", headers=headers
    )


if sys.version_info >= (3, 11):

    async def _read_within(request: web.Request, timeout_s: float) -> bytes:
        async with asyncio.timeout(timeout_s):  # no task per request, unlike wait_for before 3.12
            return await request.read()

else:

    async def _read_within(request: web.Request, timeout_s: float) -> bytes:
        return await asyncio.wait_for(request.read(), timeout_s)


async def _read(request: web.Request) -> bytes:
    """The whole body, or 408 when it does not arrive within `client_timeout_s`."""
    if request.content.is_eof():  # already received whole (the usual small body): nothing to time
        return await request.read()
    try:
        return await _read_within(request, request.app[SETTINGS].client_timeout_s)
    except asyncio.TimeoutError as e:
        raise RequestTimeout("the request body did not arrive in time", code="request_timeout") from e


# The JSON escape of a UTF-16 surrogate (\\ud800-\\udfff): json.loads turns a lone one into a str that
# is not text (it cannot be encoded). A pair also matches, and is then checked in full.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _surely_text(raw: bytes) -> bool:
    """True when the strings `json.loads(raw)` gives cannot hold a surrogate, checked without a second
    pass over the parsed data: strict UTF-8 (json.loads lets encoded surrogates through) with no
    surrogate escape. A NUL means UTF-16 or UTF-32, whose escapes the pattern cannot see: not sure."""
    if b"\x00" in raw or _SURROGATE_ESCAPE.search(raw):
        return False
    if raw.isascii():
        return True
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def _body(request: web.Request) -> Any:
    if request.content_type not in ("application/json", "", "application/octet-stream", "text/plain"):
        raise InvalidRequest(f"unsupported content type {request.content_type!r}; send application/json")
    return parse_body(await _read(request))


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object. Raises InvalidRequest when it is empty, not text, nested too
    deeply, has a number too long to convert, or is not an object, and json.JSONDecodeError when it is
    not JSON (the error middleware words both as 400s)."""
    if not raw:
        raise InvalidRequest("request body is empty; send a JSON object", code="invalid_json")
    try:
        data = json.loads(raw)
        if not _surely_text(raw):
            json.dumps(data, ensure_ascii=False).encode("utf-8")  # lone surrogates (\\ud800) are not text
    except UnicodeError as e:
        raise InvalidRequest("request body is not valid UTF-8 text", code="invalid_json") from e
    except json.JSONDecodeError:
        raise
    except RecursionError as e:  # arrays or objects nested thousands deep
        raise InvalidRequest("request body is nested too deeply", code="invalid_json") from e
    except ValueError as e:  # an integer of more digits than Python converts (4,300 by default)
        raise InvalidRequest("request body has a number too long to read", code="invalid_json") from e
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    return data


def _model(service: Service, name: str | None, task: str) -> ServedModel:
    if name is None:
        served = next((m for m in service.models.values() if m.settings.task == task), None)
        if served is None:
            raise NotFound(f"no {task} model is served", param="model", code="model_not_found")
    else:
        served = service.models.get(name)
        if served is None:
            raise NotFound(f"The model '{name}' does not exist", param="model", code="model_not_found")
    if served.settings.task != task:
        raise InvalidRequest(
            f"model '{served.settings.name}' is a {served.settings.task} model, not a {task} model",
            param="model",
            code="wrong_task",
        )
    if served.queue is None and not served.upstream:
        raise Overloaded(f"model '{served.settings.name}' is still loading", retry_after_s=5)
    return served


def _tag(request: web.Request, served: ServedModel, member: int | None = None) -> RequestTag:
    """The accounting identity of one member; members of one HTTP request (n > 1, prompt lists) get
    ids `<request id>-<index>` so each has its own ledger record."""
    principal = request.get(PRINCIPAL)
    rid = request[REQUEST_ID]
    return RequestTag(  # positional, in field order (hot path: keywords cost more)
        rid if member is None else f"{rid}-{member}",  # request_id
        served.settings.name,  # model
        served.settings.task,  # task
        request.get(USER, "anonymous"),  # user
        principal.key_id if principal is not None else None,  # key_id
    )


async def _counted(request: web.Request, served: ServedModel, work: Awaitable[_R]) -> _R:
    """Count a request refused after its model was known (4xx/5xx before or instead of running) in
    wattproxy_requests_total with status = the error type; answered ones are counted when recorded."""
    try:
        return await work
    except ApiError as e:
        if e.recorded:  # counted when it was recorded (status "error")
            raise
        user = request.get(USER, "anonymous")
        request.app[METRICS].requests.labels(served.settings.name, served.settings.task, user, e.type).inc()
        raise


def _admit(request: web.Request) -> None:
    """Budget admission: 429 budget_exceeded when the user is at or over a limit."""
    request.app[BUDGETS].check(request.get(USER, "anonymous"))


async def _forward(
    request: web.Request,
    served: ServedModel,
    req: ChatCompletionRequest | CompletionRequest | ImageGenerationRequest | EmbeddingRequest,
) -> web.StreamResponse:
    """Proxy mode: the upstream server runs the request, WattProxy accounts it (proxy/upstream.py)."""
    _admit(request)
    return await request.app[UPSTREAM].forward(request, _tag(request, served), req)


def _submit(
    queue: ModelQueue, req: Any, tag: RequestTag, pieces: asyncio.Queue[Piece | None] | None = None
) -> WorkItem:
    try:
        return queue.submit(req, tag, pieces=pieces)
    except QueueFull as e:
        raise RateLimited(str(e), retry_after_s=e.retry_after_s) from e


async def _wait(queue: ModelQueue, items: Sequence[WorkItem]) -> list[Outcome]:
    """Await every item; if the client leaves, queued items are dropped and never run."""
    try:
        if len(items) == 1:  # the usual case: awaiting the one future is what gather of it does, cheaper
            return [await items[0].future]
        return list(await asyncio.gather(*(it.future for it in items)))
    except asyncio.CancelledError:
        _abandon(queue, items)
        raise
    except NotRecorded as e:
        raise Overloaded(
            "the request ran but its accounting record could not be stored; it is refused rather than "
            "answered unaccounted. Retry later.",
            code="ledger_unavailable",
            retry_after_s=5,
        ) from e


def _abandon(queue: ModelQueue, items: Sequence[WorkItem]) -> None:
    for it in items:
        queue.drop(it)
        if not it.future.done():
            it.future.cancel()


def _raise_failed(outcomes: Sequence[Outcome]) -> None:
    failed = next((o for o in outcomes if o.error is not None), None)
    if failed is not None:
        error = ServerError(f"the model failed while generating (request id {failed.tag.request_id})")
        error.recorded = True  # with its batch, status "error"
        raise error


def _energy_fields(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """The energy extension for one response, summed over its members: EnergyUsage's fields (but
    `usage_source`) in its order, from trusted internal values, as they are (an int stays an int)."""
    first = outcomes[0]
    c = first.tag.carbon
    if len(outcomes) == 1:  # one member (most answers): its own figures, no sums
        charge = first.charge
        joules, uncertainty_j, idle_j = charge.joules, charge.uncertainty_joules, charge.idle_joules
        co2, embodied = (c.co2_grams, c.embodied_co2_grams) if c is not None else (0, 0)
    else:
        joules = sum(o.charge.joules for o in outcomes)
        uncertainty_j = sum(o.charge.uncertainty_joules for o in outcomes)
        idle_j = sum(o.charge.idle_joules for o in outcomes)
        carbon = [o.tag.carbon for o in outcomes if o.tag.carbon is not None]
        co2 = sum(x.co2_grams for x in carbon)
        embodied = sum(x.embodied_co2_grams for x in carbon)
        c = carbon[0] if carbon else None
        if c is not None and any(
            x.intensity_g_per_kwh != c.intensity_g_per_kwh or x.source != c.source for x in carbon
        ):
            # members that ran under different intensities (a time series that moved between their
            # batches): the energy-weighted intensity, so that co2 = kWh x intensity x PUE + embodied
            # still holds for the answer as a whole
            operational = sum(x.operational_co2_grams for x in carbon)
            per_intensity = joules / JOULES_PER_KWH * c.pue  # g of CO2e a g/kWh of intensity
            intensity = operational / per_intensity if per_intensity > 0 else c.intensity_g_per_kwh
            sources = sorted({x.source for x in carbon})
            c = replace(c, intensity_g_per_kwh=intensity, source=" + ".join(sources))
    return {
        "kwh": joules / JOULES_PER_KWH,
        "joules": joules,
        "co2_grams": co2,
        "measurement": first.charge.measurement,
        "device": first.charge.device,
        "uncertainty_kwh": uncertainty_j / JOULES_PER_KWH,
        "carbon_intensity_g_per_kwh": c.intensity_g_per_kwh if c is not None else 0.0,
        "pue": c.pue if c is not None else 1.0,
        "idle_joules": idle_j,
        "embodied_co2_grams": embodied if c is not None and embodied else None,
        "carbon_source": c.source if c is not None else None,
    }


def energy_usage(outcomes: Sequence[Outcome]) -> EnergyUsage:
    """The energy extension for one response, summed over its members."""
    # built from trusted internal values: no validation needed
    return EnergyUsage.model_construct(**_energy_fields(outcomes))


def energy_headers(energy: EnergyUsage | Mapping[str, Any], request_id: str) -> dict[str, str]:
    """The X-Energy-* headers of `energy` (the model, or its fields as `_energy_fields` gives them)."""
    # a model's __dict__ holds its fields; `type(...) is dict` first: an ABC check costs 0.3 µs
    e = energy if type(energy) is dict or isinstance(energy, Mapping) else energy.__dict__
    return {
        "X-Energy-kWh": repr(e["kwh"]),
        "X-Energy-Joules": repr(e["joules"]),
        "X-CO2-Grams": repr(e["co2_grams"]),
        "X-Energy-Measurement": e["measurement"],
        "X-Request-Id": request_id,
    }


def _tokens(outcomes: Sequence[Outcome]) -> tuple[int, int]:
    """Prompt and completion tokens of an answer: each prompt once (as OpenAI counts them, however many
    choices `n` asks of it: its first choice's count), the completions of every member. The ledger and
    the metrics count each member's own tokens: every choice runs its prompt."""
    prompt = completion = 0
    for o in outcomes:
        r = o.result
        if isinstance(r, TextResult):
            completion += r.completion_tokens
            if o.request.choice == 0:  # type: ignore[union-attr]
                prompt += r.prompt_tokens
    return prompt, completion


def _text_usage(outcomes: Sequence[Outcome]) -> Usage:
    prompt, completion = _tokens(outcomes)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        energy=energy_usage(outcomes),
    )


# --- plain (non-streamed) text answers, serialized without pydantic models --------------------------
#
# These dicts mirror ChatCompletion and Completion field by field (names, order, defaults), hold only
# trusted internal values with each field's type (floats as floats: a float field dumps 1 as 1.0), and
# are serialized by pydantic's own serializer: the bytes model_dump_json gives, without building and
# validating the models on every answer (tests/test_fast_paths.py compares the bytes).


def _energy_json(e: Mapping[str, Any]) -> dict[str, Any]:
    """`_energy_fields` as EnergyUsage.model_dump gives them."""
    embodied = e["embodied_co2_grams"]
    return {
        "kwh": float(e["kwh"]),
        "joules": float(e["joules"]),
        "co2_grams": float(e["co2_grams"]),
        "measurement": e["measurement"],
        "device": e["device"],
        "uncertainty_kwh": float(e["uncertainty_kwh"]),
        "carbon_intensity_g_per_kwh": float(e["carbon_intensity_g_per_kwh"]),
        "pue": float(e["pue"]),
        "idle_joules": float(e["idle_joules"]),
        "embodied_co2_grams": None if embodied is None else float(embodied),
        "carbon_source": e["carbon_source"],
        "usage_source": None,
    }


def _usage_json(outcomes: Sequence[Outcome], energy: Mapping[str, Any]) -> dict[str, Any]:
    """Usage.model_dump of `_text_usage(outcomes)`."""
    prompt, completion = _tokens(outcomes)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "energy": _energy_json(energy),
    }


def _text_results(outcomes: Sequence[Outcome]) -> list[TextResult]:
    results = [o.result for o in outcomes]
    assert all(isinstance(r, TextResult) for r in results)
    return results  # type: ignore[return-value]


def _chat_logprobs(tokens: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
    """ChatLogprobs.model_dump of a choice's tokens (None where they were not asked)."""
    if tokens is None:
        return None
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.token.encode()),
                "top_logprobs": [{"token": x, "logprob": v, "bytes": list(x.encode())} for x, v in t.top],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def _completion_logprobs(tokens: Sequence[TokenLogprob] | None, at: int = 0) -> dict[str, Any] | None:
    """CompletionLogprobs.model_dump of a choice's tokens (None where they were not asked); `at`, the
    first one's offset in the choice's text (a stream's piece: the tokens' before it)."""
    if tokens is None:
        return None
    offsets = []
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [None if t.logprob is None else dict(t.top) for t in tokens],  # an echo's first
        "text_offset": offsets,
    }


def chat_completion_json(
    request_id: str, model: str, outcomes: Sequence[Outcome], energy: Mapping[str, Any]
) -> dict[str, Any]:
    """ChatCompletion.model_dump of the answer to a chat request whose members are `outcomes`."""
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "finish_reason": r.finish_reason,
                "logprobs": _chat_logprobs(r.logprobs),
            }
            for i, r in enumerate(_text_results(outcomes))
        ],
        "usage": _usage_json(outcomes, energy),
    }


def completion_json(
    request_id: str, model: str, outcomes: Sequence[Outcome], energy: Mapping[str, Any]
) -> dict[str, Any]:
    """Completion.model_dump of the answer to a completion request whose members are `outcomes`."""
    return {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "text": r.text,
                "finish_reason": r.finish_reason,
                "logprobs": _completion_logprobs(r.logprobs),
            }
            for i, r in enumerate(_text_results(outcomes))
        ],
        "usage": _usage_json(outcomes, energy),
    }


def _json_answer(body: dict[str, Any], headers: dict[str, str]) -> web.Response:
    """What `_json` answers for the model that `body` mirrors (same bytes, same headers)."""
    headers["Content-Type"] = "application/json; charset=utf-8"  # after the others, as `_json` puts it
    return web.Response(body=to_json(body, inf_nan_mode="null"), headers=headers)


def _check_supported(
    served: ServedModel, req: ChatCompletionRequest | CompletionRequest | ImageGenerationRequest
) -> None:
    """400 `unsupported_value` for a parameter asking what a model served in process does not do (tools,
    JSON mode, log probabilities, penalties, ...; an upstream in proxy mode gets them as sent)."""
    refused = req.unsupported(served.settings.name, served.honours())
    if refused is not None:
        raise InvalidRequest(refused[1], param=refused[0], code="unsupported_value")


def _sampling(served: ServedModel, req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    """A text request's penalties and logit bias as TextRequest takes them (what `_check_supported`
    let through); 400 for a logit bias naming no token of the model."""
    if req.presence_penalty is None and req.frequency_penalty is None and req.logit_bias is None:
        return {}  # the usual request
    bias = req.logit_bias_pairs()
    if bias:
        _check_token_id(served, bias[-1][0], "logit_bias")
    return {
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "logit_bias": bias,
    }


COMPLETION_DEFAULT_MAX_TOKENS = 16  # a completion's max_tokens where it sends none (OpenAI's, vLLM's)


def _max_tokens(ms: ModelSettings, *, chat: bool, **candidates: int | None) -> tuple[int, str | None]:
    """The completion-token limit, and the parameter that asked for it (None: the model's default,
    which `_check_prompt` caps at what the context leaves rather than refusing)."""
    param, asked = next(((k, c) for k, c in candidates.items() if c is not None), ("max_tokens", None))
    if asked is None:
        default = ms.default_max_tokens
        if default is None:
            default = ms.max_tokens if chat else min(COMPLETION_DEFAULT_MAX_TOKENS, ms.max_tokens)
        return default, None
    if asked > ms.max_tokens:
        raise InvalidRequest(
            f"{param} is {asked}, above this model's limit of {ms.max_tokens}",
            param=param,
            code="max_tokens_exceeded",
        )
    return asked, param


def _check_n(ms: ModelSettings, n: int, prompts: int = 1, *, queued: bool = True) -> None:
    """At most `max_n` choices (n x prompts) a request; where each choice is queued on its own (text),
    at most what the queue holds, which would otherwise refuse the request as full (429) forever."""
    choices = n * prompts
    what = f"n is {n}" if prompts == 1 else f"n ({n}) x {prompts} prompts is {choices} choices"
    param = "n" if prompts == 1 or n > 1 else "prompt"
    if choices > ms.max_n:
        raise InvalidRequest(
            f"{what}, above this model's limit of {ms.max_n}", param=param, code="n_exceeded"
        )
    if queued and choices > ms.max_queue:
        raise InvalidRequest(
            f"{what}, more than this model's queue holds (max_queue {ms.max_queue})",
            param=param,
            code="n_exceeded",
        )


# Prompts longer than this (characters) are tokenized on a worker thread rather than on the event loop:
# a fast tokenizer takes about 0.5 µs a character (a 1 MB prompt 0.5 s), with the interpreter lock
# released, so a long prompt does not hold up every other request and stream meanwhile.
TOKENIZE_ON_LOOP_MAX_CHARS = 4096


async def _check_prompt(
    served: ServedModel, req: TextRequest, param: str, limit_param: str | None
) -> TextRequest:
    """The request, with its prompt's token ids where the backend gives them, once its length is
    within the model's limits; a default max_tokens (`limit_param` None) capped at what the context
    leaves."""
    chars = len(req.prompt) if req.prompt is not None else sum(len(m.content) for m in req.messages or ())
    try:
        if chars > TOKENIZE_ON_LOOP_MAX_CHARS:
            req, counted = await asyncio.to_thread(served.tokenized, req)
        else:
            req, counted = served.tokenized(req)
    except Exception as e:
        if not type(e).__module__.startswith("jinja2"):
            raise
        # the model's chat template refused the messages (`raise_exception` in it: roles that do not
        # alternate, more tool calls in a turn than it renders, ...): the request's fault, not the server's
        raise InvalidRequest(
            f"model '{served.settings.name}''s chat template refused these messages: {str(e)[:300]}",
            param=param,
            code="invalid_value",
        ) from e
    if counted > served.settings.max_prompt_tokens:
        raise InvalidRequest(
            f"the prompt has {counted} tokens, above this model's limit "
            f"of {served.settings.max_prompt_tokens}",
            param=param,
            code="context_length_exceeded",
        )
    context = served.max_context_tokens()
    if context is not None and counted + req.max_tokens > context:
        if limit_param is None and counted < context:  # nobody asked for that many: as many as fit
            return replace(req, max_tokens=context - counted)
        if limit_param is None:
            raise InvalidRequest(
                f"the prompt has {counted} tokens, which leaves no room in the model's context of "
                f"{context} tokens",
                param=param,
                code="context_length_exceeded",
            )
        raise InvalidRequest(
            f"prompt ({counted} tokens) plus {limit_param} ({req.max_tokens}) exceeds the model's context "
            f"of {context} tokens",
            param=limit_param,
            code="context_length_exceeded",
        )
    return req


async def _sse(resp: web.StreamResponse, payload: BaseModel | dict[str, Any] | str | bytes) -> None:
    """Send one server-sent event (`payload` as its data: a model or dict as JSON, text or bytes as
    they are)."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json(exclude_none=True).encode()
    elif isinstance(payload, dict):
        data = json.dumps(payload).encode()
    elif isinstance(payload, str):
        data = payload.encode()
    else:
        data = payload
    await _send_event(resp, sse_frame(data))


async def _send_event(resp: web.StreamResponse, frame: bytes) -> None:
    """Write `frame`; a client that takes none of it for the response's write timeout is gone
    (ConnectionResetError).

    A write waits only while the connection's send buffer is past its high-water mark (aiohttp's
    drain). While the buffer is at its low-water mark or under it (the protocol is not paused then)
    and this frame cannot take it past the high one, the write cannot wait, and is sent with no timer:
    `asyncio.wait_for` costs a task and a timer handle a call, which was 13% of the event loop's CPU
    when streaming through proxy mode (bench/results/profiles.md)."""
    limits = resp.get(_SSE_LIMITS)
    if limits is not None:
        transport, low, high = limits
        buffered = transport.get_write_buffer_size()
        if buffered <= low and buffered + len(frame) + _FRAMING_MARGIN_BYTES <= high:
            await resp.write(frame)
            return
    try:
        await asyncio.wait_for(resp.write(frame), resp_timeout(resp))
    except asyncio.TimeoutError as e:  # a client that stopped reading: treat it as gone
        raise ConnectionResetError("client did not read the stream in time") from e


WRITE_TIMEOUT_S = web.ResponseKey("write_timeout_s", float)
# the connection's transport and its write buffer's low- and high-water marks (bytes)
_SSE_LIMITS = web.ResponseKey("sse_limits", tuple)
_FRAMING_MARGIN_BYTES = 4096  # what may go out with a frame: its chunk size line and CRLFs, the headers


def resp_timeout(resp: web.StreamResponse) -> float:
    return resp.get(WRITE_TIMEOUT_S, 60.0)


async def _start_sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Request-Id": request[REQUEST_ID],
        }
    )
    resp[WRITE_TIMEOUT_S] = request.app[SETTINGS].client_timeout_s
    transport = request.transport
    if transport is not None:
        with contextlib.suppress(AttributeError, NotImplementedError):  # without them, every write is timed
            resp[_SSE_LIMITS] = (transport, *transport.get_write_buffer_limits())
    request[STREAM] = resp
    await resp.prepare(request)
    return resp


async def _stream_text(
    request: web.Request,
    queue: ModelQueue,
    items: Sequence[WorkItem],
    streamers: Sequence[PieceSink],
    make_chunk: Any,
    include_usage: bool,
) -> web.StreamResponse:
    """Stream each member's pieces in order (index by index), then finish reasons and usage."""
    resp = await _start_sse(request)
    try:
        await make_chunk.start(resp)
        for index, streamer in enumerate(streamers):
            pieces = streamer.pieces
            while (piece := await pieces.get()) is not None:
                data = make_chunk.piece(index, piece)  # b"": held (a stream that must call tools)
                frame = sse_frame(data) if data else b""
                # pieces handed over together go out in one write (up to the end of the text, None)
                while not pieces.empty() and (piece := pieces.get_nowait()) is not None:
                    if data := make_chunk.piece(index, piece):
                        frame += sse_frame(data)
                if frame:
                    await _send_event(resp, frame)
                if piece is None:
                    break
        try:
            outcomes = await _wait(queue, items)
        except ApiError as e:
            outcomes, failure = [], e
        else:
            failure = None
            if any(o.error is not None for o in outcomes):
                failure = ServerError(f"the model failed while generating (request id {request[REQUEST_ID]})")
        if failure is not None:
            await _sse(resp, failure.body())
        else:
            for index, o in enumerate(outcomes):
                assert isinstance(o.result, TextResult)
                await _sse(resp, make_chunk.finish(index, o.result.finish_reason, o.result.logprobs))
            if include_usage:
                await _sse(resp, make_chunk.usage(_text_usage(outcomes)))
        await _sse(resp, "[DONE]")
        await resp.write_eof()
    except ConnectionResetError:  # the client left mid-stream (a write failed): aiohttp closes quietly
        _abandon(queue, items)
    except asyncio.CancelledError:
        _abandon(queue, items)
        raise
    return resp


# A JSON string, as pydantic writes one (non-ASCII characters as they are): C code, 0.3 µs.
_json_string = json.JSONEncoder(ensure_ascii=False).encode


class _ChatChunks:
    """A stream's chunks. A piece's chunk (one a token: the stream's hot path) is put together from a
    head made once a stream (0.2 µs, against 3.9 for pydantic's model and its JSON); the rest are
    pydantic's. A test holds the two to the same JSON."""

    def __init__(self, rid: str, model: str, n: int) -> None:
        self.id, self.model, self.n, self.created = f"chatcmpl-{rid}", model, n, int(time.time())
        self._head = self._piece_head("chat.completion.chunk")
        # by choice: how many tokens its pieces carried, and their characters
        self._given: dict[int, tuple[int, int]] = {}

    def _piece_head(self, kind: str) -> str:
        return (
            f'{{"id":{_json_string(self.id)},"object":"{kind}","created":{self.created},'
            f'"model":{_json_string(self.model)},"choices":[{{"index":'
        )

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    async def start(self, resp: web.StreamResponse) -> None:
        for i in range(self.n):
            await _sse(
                resp, self._chunk([ChunkChoice(index=i, delta=ChunkDelta(role="assistant", content=""))])
            )

    def piece(self, index: int, piece: Piece) -> bytes:
        if type(piece) is str:
            return f'{self._head}{index},"delta":{{"content":{_json_string(piece)}}}}}]}}'.encode()
        assert isinstance(piece, TextPiece)
        lp = ChatLogprobs.model_validate(_chat_logprobs(self._give(index, piece)))
        choice = ChunkChoice(index=index, delta=ChunkDelta(content=piece.text), logprobs=lp)
        return self._chunk([choice]).model_dump_json(exclude_none=True).encode()

    def _give(self, index: int, piece: TextPiece) -> tuple[TokenLogprob, ...]:
        """The tokens a piece carries, noted as given for its choice."""
        count, chars = self._given.get(index, (0, 0))
        self._given[index] = (count + len(piece.logprobs), chars + sum(len(t.token) for t in piece.logprobs))
        return piece.logprobs

    def _rest(self, index: int, logprobs: Sequence[TokenLogprob] | None) -> Sequence[TokenLogprob] | None:
        """The tokens of a choice's result that none of its pieces carried (those of text no piece
        gave out, or of none: the token a stop string cut into); None where its pieces carried them
        all, or none were asked."""
        given = self._given.get(index, (0, 0))[0]
        if logprobs is None or (given and len(logprobs) <= given):
            return None
        return logprobs[given:]

    def finish(
        self, index: int, reason: str, logprobs: Sequence[TokenLogprob] | None = None
    ) -> ChatCompletionChunk:
        """A member's last chunk: its finish reason, and where asked the log probabilities of its
        tokens that no piece carried (each piece carries those of the tokens given out with it)."""
        rest = self._rest(index, logprobs)
        lp = None if rest is None else ChatLogprobs.model_validate(_chat_logprobs(rest))
        return self._chunk([ChunkChoice(index=index, delta=ChunkDelta(), finish_reason=reason, logprobs=lp)])  # type: ignore[arg-type]

    def usage(self, usage: Usage) -> dict[str, Any]:
        chunk = self._chunk([], usage).model_dump(exclude_none=True)
        chunk["choices"] = []
        chunk["usage"] = usage.model_dump()  # whole, as a plain answer's: `energy` with its null fields
        return chunk


class _CallChunks(_ChatChunks):
    """The chunks of a stream whose text may be tool calls: its text goes out as content up to where
    `hold` says calls start or may start, which is held; at the choice's end `read` reads the whole
    text, and its calls go out in one delta with finish_reason "tool_calls", or the held text as
    content with the choice's own finish_reason (a text cut short is never read as calls). Log
    probabilities, where asked, come with the choice's last chunk."""

    def __init__(self, rid: str, model: str, n: int) -> None:
        super().__init__(rid, model, n)
        self._texts: dict[int, str] = {}
        self._sent: dict[int, int] = {}  # characters of each choice's text sent as content

    def hold(self, text: str, since: int) -> int | None:
        """Where `text` (a stream's so far, `since` characters of it sent) is held from; None: not."""
        raise NotImplementedError

    def read(self, text: str) -> tool_calls.Parsed | None:
        """The calls a whole answer's text makes; None where it is text."""
        raise NotImplementedError

    def piece(self, index: int, piece: Piece) -> bytes:
        text = self._texts.get(index, "") + (piece if type(piece) is str else piece.text)  # type: ignore[union-attr]
        self._texts[index] = text
        sent = self._sent.get(index, 0)
        held = self.hold(text, sent)
        upto = len(text) if held is None else max(held, sent)
        if upto == sent:
            return b""
        self._sent[index] = upto
        return (
            self._chunk([ChunkChoice(index=index, delta=ChunkDelta(content=text[sent:upto]))])
            .model_dump_json(exclude_none=True)
            .encode()
        )

    def finish(
        self, index: int, reason: str, logprobs: Sequence[TokenLogprob] | None = None
    ) -> ChatCompletionChunk:
        text, sent = self._texts.pop(index, ""), self._sent.pop(index, 0)
        parsed = self.read(text) if reason == "stop" else None
        lp = None if logprobs is None else ChatLogprobs.model_validate(_chat_logprobs(logprobs))
        if parsed is None:
            delta = ChunkDelta(content=text[sent:] or None)
        else:
            calls = [ToolCallDeltaOut(index=i, **call) for i, call in enumerate(parsed.calls)]
            delta = ChunkDelta(tool_calls=calls)
            reason = "tool_calls"
        return self._chunk([ChunkChoice(index=index, delta=delta, finish_reason=reason, logprobs=lp)])  # type: ignore[arg-type]


class _ToolCallChunks(_CallChunks):
    """A stream that must call tools (`called`, or any of them where None): all of its text, the calls'
    JSON, is held."""

    def __init__(self, rid: str, model: str, n: int, called: str | None = None) -> None:
        super().__init__(rid, model, n)
        self.called = called

    def hold(self, text: str, since: int) -> int | None:
        return 0

    def read(self, text: str) -> tool_calls.Parsed | None:
        return _schema_calls(text, self.called)


class _AutoToolChunks(_CallChunks):
    """A stream whose model chooses whether to call: held from where calls start or may start in the
    model's format (`tool_calls.hold_from`)."""

    def __init__(
        self, rid: str, model: str, n: int, parser: ToolCallParser, functions: frozenset[str]
    ) -> None:
        super().__init__(rid, model, n)
        self.parser, self.functions = parser, functions

    def hold(self, text: str, since: int) -> int | None:
        return tool_calls.hold_from(self.parser, text, since)

    def read(self, text: str) -> tool_calls.Parsed | None:
        return tool_calls.parse(self.parser, text, self.functions)


class _CompletionChunks(_ChatChunks):
    def __init__(self, rid: str, model: str, n: int) -> None:
        super().__init__(rid, model, n)
        self.id = f"cmpl-{rid}"
        self._head = self._piece_head("text_completion")

    async def start(self, resp: web.StreamResponse) -> None:
        return None

    def piece(self, index: int, piece: Piece) -> bytes:
        if type(piece) is str:
            text_json = _json_string(piece)
            return (
                f'{self._head}{index},"text":{text_json},"finish_reason":null,"logprobs":null}}]}}'.encode()
            )
        assert isinstance(piece, TextPiece)
        lp = CompletionLogprobs.model_validate(_completion_logprobs(piece.logprobs, self._offset(index)))
        self._give(index, piece)
        choice = CompletionChoice(index=index, text=piece.text, finish_reason=None, logprobs=lp)
        return json.dumps(self._completion([choice])).encode()

    def _offset(self, index: int) -> int:
        """Where the next token of a choice starts in its text: after those its pieces carried."""
        return self._given.get(index, (0, 0))[1]

    def finish(
        self, index: int, reason: str, logprobs: Sequence[TokenLogprob] | None = None
    ) -> dict[str, Any]:  # type: ignore[override]
        rest = self._rest(index, logprobs)
        lp = (
            None
            if rest is None
            else CompletionLogprobs.model_validate(_completion_logprobs(rest, self._offset(index)))
        )
        return self._completion([CompletionChoice(index=index, text="", finish_reason=reason, logprobs=lp)])  # type: ignore[arg-type]

    def usage(self, usage: Usage) -> dict[str, Any]:
        return self._completion([], usage)

    def _completion(self, choices: list[CompletionChoice], usage: Usage | None = None) -> dict[str, Any]:
        c = Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        return c.model_dump(exclude_none=False, exclude={"usage"} if usage is None else set())


async def _stream_members(
    request: web.Request,
    served: ServedModel,
    bases: Sequence[TextRequest],
    chunks: type[_ChatChunks],
    stream_options: StreamOptions | None,
) -> web.StreamResponse:
    """Queue a text request's members with a streamer each and answer them as server-sent events."""
    assert served.queue is not None
    assert served.queue.step_pieces is not None
    streamers = [served.queue.step_pieces.sink() for _ in bases]
    items = _submit_all(served.queue, bases, request, served, streamers)
    include_usage = bool(stream_options and stream_options.include_usage)
    maker = chunks(request[REQUEST_ID], served.settings.name, len(bases))
    return await _stream_text(request, served.queue, items, streamers, maker, include_usage)


async def _answer_members(
    request: web.Request,
    served: ServedModel,
    bases: Sequence[TextRequest],
    body: Callable[[str, str, Sequence[Outcome], Mapping[str, Any]], dict[str, Any]],
) -> web.Response:
    """Queue a text request's members, await them all, and answer `body` of them with energy headers."""
    assert served.queue is not None
    outcomes = await _wait(served.queue, _submit_all(served.queue, bases, request, served))
    _raise_failed(outcomes)
    rid = request[REQUEST_ID]
    energy = _energy_fields(outcomes)
    return _json_answer(body(rid, served.settings.name, outcomes, energy), energy_headers(energy, rid))


async def _chat_completions(
    request: web.Request, served: ServedModel, req: ChatCompletionRequest
) -> web.StreamResponse:
    ms = served.settings
    _check_supported(served, req)
    _check_n(ms, req.n)
    max_tokens, limit_param = _max_tokens(
        ms, chat=True, max_completion_tokens=req.max_completion_tokens, max_tokens=req.max_tokens
    )
    messages = tuple(
        ChatMessage(
            role=m.role,
            content=m.text(),
            tool_calls=None if m.tool_calls is None else _template_calls(m.tool_calls, i),
            tool_call_id=m.tool_call_id,
        )
        for i, m in enumerate(req.messages)
    )
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    tools, call_schema, called, auto = _tool_choice(req, ms.name, ms.tool_call_parser)
    base = TextRequest(
        messages=messages,
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop_list(),
        seed=req.seed,
        logprobs=logprobs,
        json_schema=call_schema if call_schema is not None else _json_schema(req.response_format),
        tools=tools,
        **_sampling(served, req),
    )
    base = await _check_prompt(served, base, "messages", limit_param)
    _admit(request)
    bases = _choices(base, req.n)
    if req.stream:
        if auto is not None:
            chunks: Any = functools.partial(_AutoToolChunks, parser=ms.tool_call_parser, functions=auto)
        elif call_schema is not None:
            chunks = functools.partial(_ToolCallChunks, called=called)
        else:
            chunks = _ChatChunks
        return await _stream_members(request, served, bases, chunks, req.stream_options)
    if auto is not None:
        parser = ms.tool_call_parser
        assert parser is not None
        return await _answer_members(
            request, served, bases, _calls_json(lambda text: tool_calls.parse(parser, text, auto))
        )
    if call_schema is not None:
        return await _answer_members(
            request, served, bases, _calls_json(lambda text: _schema_calls(text, called))
        )
    return await _answer_members(request, served, bases, chat_completion_json)


def _template_calls(calls: list[dict[str, Any]], at: int) -> str:
    """An assistant turn's `tool_calls` as chat templates take them (JSON text): each call's arguments
    an object (OpenAI sends them as JSON text); 400 naming one that is not."""
    out = []
    for j, call in enumerate(calls):
        function = call.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(
                f"messages.{at}.tool_calls.{j}.function needs a name",
                param=f"messages.{at}.tool_calls.{j}.function",
                code="unsupported_value",
            )
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError:
                arguments = None
        if not isinstance(arguments, dict):
            raise InvalidRequest(
                f"messages.{at}.tool_calls.{j}.function.arguments must be a JSON object",
                param=f"messages.{at}.tool_calls.{j}.function.arguments",
                code="unsupported_value",
            )
        out.append({**call, "type": "function", "function": {**function, "arguments": arguments}})
    return json.dumps(out)


def _tool_choice(
    req: ChatCompletionRequest, model: str, parser: ToolCallParser | None
) -> tuple[str | None, str | None, str | None, frozenset[str] | None]:
    """A chat's tools as its template takes them (JSON text), the JSON Schema its answer is held to
    where it must call one (`tool_choice` "required": a list of calls, one where `parallel_tool_calls`
    is false; a named function: that function's arguments), that function's name, and, where the model
    chooses ("auto", or tools without a tool_choice, as in OpenAI's API), the functions its answer may
    call, read from its text in the model's own format (`parser`, the model's `tool_call_parser`);
    without a parser "auto" is refused, as vLLM refuses it. "none" renders the tools alone."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none", "auto"):
            raise InvalidRequest(
                f"Unsupported value: 'tool_choice' with model '{model}' is only allowed when 'tools' are "
                "given",
                param="tool_choice",
                code="unsupported_value",
            )
        return None, None, None, None
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(req.tools):
        function = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise InvalidRequest(
                f"Unsupported value: tools.{i} is not a function tool; model '{model}', which WattProxy "
                "serves itself, supports functions only",
                param=f"tools.{i}",
                code="unsupported_value",
            )
        name, parameters = function.get("name"), function.get("parameters") or {"type": "object"}
        if not isinstance(name, str) or not name or not isinstance(parameters, dict):
            raise InvalidRequest(
                f"tools.{i}.function needs a name and, where it has parameters, a JSON Schema object",
                param=f"tools.{i}.function",
                code="unsupported_value",
            )
        functions[name] = parameters
    tools = json.dumps(req.tools)
    if choice == "none":
        return tools, None, None, None
    if choice in (None, "auto") and parser is not None:
        return tools, None, None, frozenset(functions)
    called: str | None = None
    if choice == "required":
        calls = [
            {
                "type": "object",
                "properties": {"name": {"enum": [name]}, "parameters": parameters},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, parameters in functions.items()
        ]
        schema: dict[str, Any] = {
            "type": "array",
            "minItems": 1,
            "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
        }
        if req.parallel_tool_calls is False:
            schema["maxItems"] = 1
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        called = choice["function"].get("name")
        if called not in functions:
            raise InvalidRequest(
                f"tool_choice names function {json.dumps(called)[:80]}, which is not one of the tools",
                param="tool_choice.function.name",
                code="unsupported_value",
            )
        schema = functions[called]
    else:
        raise InvalidRequest(
            f"Unsupported value: 'tool_choice' does not support {json.dumps(choice or 'auto')[:80]} with "
            f"model '{model}', which WattProxy serves itself: choosing between text and a call needs the "
            "model family's call format, which its settings do not name (tool_call_parser). Supported: "
            "'required', a named function, or 'none'.",
            param="tool_choice",
            code="unsupported_value",
        )
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise InvalidRequest(
            f"Unsupported value: 'response_format' with a tool_choice that calls a tool, with model "
            f"'{model}': the call's arguments are what its schema holds",
            param="response_format",
            code="unsupported_value",
        )
    schema_text = _enforceable(schema, "tools", f"the tools' parameters, with model '{model}', are")
    return tools, schema_text, called, None


def _enforceable(schema: dict[str, Any], param: str, what: str) -> str:
    """`schema` as JSON text, where structured output can hold a text to it (backends.structured); else
    a 400 `unsupported_value` naming `param` (`what` says what the schema is)."""
    from backends import structured  # torch and the parser: not in a server that serves none of it

    text = json.dumps(schema)
    try:
        structured.check_schema(text)
    except ValueError as e:
        raise InvalidRequest(
            f"Unsupported value: {what} not a JSON Schema WattProxy can enforce ({str(e)[:300]})",
            param=param,
            code="unsupported_value",
        ) from e
    return text


def _calls_json(
    read: Callable[[str], tool_calls.Parsed | None],
) -> Callable[[str, str, Sequence[Outcome], Mapping[str, Any]], dict[str, Any]]:
    """chat_completion_json for a chat whose answer may be tool calls: each choice whose whole text
    `read` reads as calls becomes them (with the text before them, if any, as its content), with
    finish_reason "tool_calls"; any other text, or one cut short (max_tokens), stays as it is."""

    def body(rid: str, model: str, outcomes: Sequence[Outcome], energy: Mapping[str, Any]) -> dict[str, Any]:
        answer = chat_completion_json(rid, model, outcomes, energy)
        for choice, result in zip(answer["choices"], _text_results(outcomes), strict=True):
            parsed = read(result.text) if result.finish_reason == "stop" else None
            if parsed is not None:
                choice["message"] = {
                    "role": "assistant",
                    "content": parsed.content,
                    "tool_calls": parsed.calls,
                }
                choice["finish_reason"] = "tool_calls"
        return answer

    return body


def _schema_calls(text: str, called: str | None) -> tool_calls.Parsed | None:
    """The calls a text held to the tools' schema makes (`called`'s arguments, or a list of
    `{"name", "parameters"}`); None where it is not a whole value (cut short by a stop string)."""
    try:
        value = json.loads(text)
        pairs = [(called, value)] if called is not None else [(c["name"], c["parameters"]) for c in value]
    except (ValueError, KeyError, TypeError):  # cut short (a stop string): text, as it came
        return None
    return tool_calls.Parsed(None, [tool_calls.openai_call(name, arguments) for name, arguments in pairs])


def _json_schema(response_format: dict[str, Any] | None) -> str | None:
    """The JSON Schema (JSON text) a chat's `response_format` asks its text to be a value of, where the
    model honours it (`_check_supported` let it through): None for text, any object for `json_object`,
    the given one for `json_schema`. Anything else is a format the model cannot be held to: 400
    `unsupported_value` naming the part (proxy mode sends any on to its upstream as it came)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    from backends import structured  # torch and the parser: not in a server that serves none of it

    if kind == "json_object":
        return structured.JSON_OBJECT_SCHEMA
    if kind != "json_schema":
        raise InvalidRequest(
            f"Unsupported value: 'response_format.type' does not support {json.dumps(kind)[:80]}; "
            "supported: 'text', 'json_object' or 'json_schema'",
            param="response_format.type",
            code="unsupported_value",
        )
    spec = (response_format or {}).get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise InvalidRequest(
            "'response_format.json_schema.schema' is a required property: the JSON Schema (an object) that "
            "the answer must follow",
            param="response_format.json_schema.schema",
            code="unsupported_value",
        )
    return _enforceable(
        schema, "response_format.json_schema.schema", "'response_format.json_schema.schema' is"
    )


def _choices(base: TextRequest, n: int) -> list[TextRequest]:
    """A prompt's `n` choices: members of their own, numbered (`TextRequest.choice`)."""
    return [base] if n == 1 else [replace(base, choice=i) for i in range(n)]


def _with_stream(base: TextRequest, streamer: PieceSink) -> TextRequest:
    return replace(base, on_text=streamer)


def _submit_all(
    queue: ModelQueue,
    reqs: Sequence[TextRequest],
    request: web.Request,
    served: ServedModel,
    streamers: Sequence[PieceSink] | None = None,
) -> list[WorkItem]:
    """Queue every member of one HTTP request, or none of them (all-or-nothing on 429)."""
    items: list[WorkItem] = []
    many = len(reqs) > 1
    tags = [_tag(request, served, i if many else None) for i in range(len(reqs))]
    if many:
        try:
            queue.check_room(len(reqs), tags[0].user)
        except QueueFull as e:
            raise RateLimited(str(e), retry_after_s=e.retry_after_s) from e
    try:
        for i, (r, tag) in enumerate(zip(reqs, tags, strict=True)):
            if streamers is None:
                items.append(_submit(queue, r, tag))
            else:
                items.append(_submit(queue, _with_stream(r, streamers[i]), tag, streamers[i].pieces))
    except ApiError:
        _abandon(queue, items)
        raise
    return items


async def _completions(
    request: web.Request, served: ServedModel, req: CompletionRequest
) -> web.StreamResponse:
    ms = served.settings
    _check_supported(served, req)
    prompts: list[tuple[str, tuple[int, ...] | None]] = [(p, None) for p in req.prompts()]
    if not prompts:  # token ids (the backend takes them: `_check_supported`)
        prompts = [("", tuple(ids)) for ids in req.token_prompts()]
        _check_token_id(served, max(max(ids) for _, ids in prompts), "prompt")
    _check_n(ms, req.n, len(prompts))
    max_tokens, limit_param = _max_tokens(ms, chat=False, max_tokens=req.max_tokens)
    bases = []
    sampling = _sampling(served, req)
    for p, ids in prompts:
        base = TextRequest(
            prompt=p,
            prompt_ids=ids,
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop_list(),
            seed=req.seed,
            logprobs=req.logprobs,
            echo=bool(req.echo),
            **sampling,
        )
        base = await _check_prompt(served, base, "prompt", limit_param)
        bases.extend(_choices(base, req.n))
    _admit(request)
    if req.stream:
        return await _stream_members(request, served, bases, _CompletionChunks, req.stream_options)
    return await _answer_members(request, served, bases, completion_json)


def _check_token_id(served: ServedModel, largest: int, param: str) -> None:
    """400 `invalid_token_id` where `param`'s largest token id is past the model's vocabulary."""
    vocab = served.vocab_size()
    if vocab is not None and largest >= vocab:
        raise InvalidRequest(
            f"{param} names token {largest}; model '{served.settings.name}' has tokens 0 to {vocab - 1}",
            param=param,
            code="invalid_token_id",
        )


async def _images_generations(
    request: web.Request, served: ServedModel, req: ImageGenerationRequest
) -> web.Response:
    ms = served.settings
    if req.response_format == "url":
        raise InvalidRequest(
            "response_format 'url' is not supported: WattProxy stores no images; use 'b64_json'",
            param="response_format",
            code="unsupported_value",
        )
    _check_supported(served, req)
    if len(req.prompt) > ms.max_prompt_chars:
        raise InvalidRequest(
            f"the prompt has {len(req.prompt)} characters, above this model's limit of {ms.max_prompt_chars}",
            param="prompt",
            code="prompt_too_long",
        )
    _check_n(ms, req.n, queued=False)  # one queued item makes all its images
    size = ms.default_size if req.size in (None, "auto") else req.size
    assert size is not None
    width, height = parse_size(size)
    if width % 8 or height % 8:
        raise InvalidRequest(
            f"size {size}: width and height must be multiples of 8", param="size", code="invalid_size"
        )
    if size not in ms.sizes:
        raise InvalidRequest(
            f"size {size} is not allowed for this model; allowed: {', '.join(ms.sizes)}",
            param="size",
            code="invalid_size",
        )
    steps = req.steps if req.steps is not None else ms.default_steps
    if steps > ms.max_steps:
        raise InvalidRequest(
            f"steps is {steps}, above this model's limit of {ms.max_steps}",
            param="steps",
            code="steps_exceeded",
        )
    guidance = req.guidance_scale if req.guidance_scale is not None else ms.default_guidance_scale
    image_req = ImageRequest(
        prompt=req.prompt,
        n=req.n,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance,
        seed=req.seed,
        negative_prompt=req.negative_prompt,
    )
    _admit(request)
    assert served.queue is not None
    queue = served.queue
    items = [_submit(queue, image_req, _tag(request, served))]
    outcomes = await _wait(queue, items)
    _raise_failed(outcomes)
    result = outcomes[0].result
    assert isinstance(result, ImageResult) and not result.images  # PNGs made before the record
    energy = energy_usage(outcomes)
    body = ImagesResponse(
        data=[
            ImageData(b64_json=base64.b64encode(png).decode("ascii"), seed=seed)
            for png, seed in zip(result.images_png, result.seeds, strict=True)
        ],
        usage=ImageUsage(
            images=len(result.images_png),
            pixels=width * height * len(result.images_png),
            steps=steps,
            energy=energy,
        ),
    )
    return _json(body, headers=energy_headers(energy, request[REQUEST_ID]))


def _generation(
    schema: type[_Body],
    task: str,
    run: Callable[[web.Request, ServedModel, _Body], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A generation endpoint: validate the body, resolve the model, then run it here (the model's
    queue) or forward it (proxy mode); refusals after the model is known are counted."""

    async def handler(request: web.Request) -> web.StreamResponse:
        req = schema.model_validate(await _body(request))
        served = _model(request.app[SERVICE], req.model, task)
        work = _forward(request, served, req) if served.upstream else run(request, served, req)  # type: ignore[arg-type]
        return await _counted(request, served, work)

    return handler


async def _embeddings(request: web.Request, served: ServedModel, req: EmbeddingRequest) -> web.StreamResponse:
    """A model WattProxy serves itself makes no embeddings (they are forwarded in proxy mode)."""
    raise InvalidRequest(
        f"model '{served.settings.name}' is a text generation model that WattProxy serves itself, which "
        "makes no embeddings (embeddings are served in proxy mode, by the upstream's embedding models)",
        param="model",
        code="wrong_task",
    )


chat_completions = _generation(ChatCompletionRequest, "text", _chat_completions)
embeddings = _generation(EmbeddingRequest, "text", _embeddings)
completions = _generation(CompletionRequest, "text", _completions)
images_generations = _generation(ImageGenerationRequest, "image", _images_generations)


async def list_models(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    cards = [
        ModelCard(id=m.settings.name, created=m.created, task=m.settings.task)
        for m in service.models.values()
    ]
    return _json(ModelList(data=cards))


async def get_model(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    m = service.models.get(request.match_info["model"])
    if m is None:
        raise NotFound(
            f"The model '{request.match_info['model']}' does not exist", param="model", code="model_not_found"
        )
    return _json(ModelCard(id=m.settings.name, created=m.created, task=m.settings.task))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    models = {
        name: ("ready" if m.queue is not None or m.upstream else (m.load_error and "failed") or "loading")
        for name, m in service.models.items()
    }
    ready = (
        all(v == "ready" for v in models.values())
        and service.upstream in (None, "ready")
        and not service.draining
    )
    if service.draining:
        status = "draining"
    elif ready:
        status = "ready"
    else:
        status = "unavailable" if service.upstream == "unreachable" else "loading"
    body: dict[str, object] = {"status": status, "models": models}
    if service.upstream is not None:
        body["upstream"] = service.upstream
    return web.json_response(body, status=200 if ready else 503)


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/images/generations", images_generations)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", openapi_json)
