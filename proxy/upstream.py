"""Proxy mode: WattProxy stands in front of an OpenAI-compatible server (vLLM, TGI, another WattProxy)
on the same host, forwards each validated request to it, and gives every request its measured share
of the upstream GPUs' energy, with the same usage extension, headers, ledger records, metrics and
budgets as the in-process models.

Attribution without seeing the batches. WattProxy's meters sample the upstream's GPUs (the configured
`devices`; each has its own `DeviceMonitor`). Each request is an *activity* from the moment it is sent
to the last byte of its answer, recorded on every upstream device's monitor as a sequence of pieces
(`begin`, then `split` at a piece boundary, `end` at the last byte), each piece weighted by the work it
represents. Each sampled interval's energy is shared among the pieces that overlap it by weight x
overlap (`proxy.energy.attribution`), idle energy is handled as for in-process jobs, and the
conservation identity holds per device: sum(requests) + idle == meter delta.

- Text, streamed: the first piece runs from sending to the first chunk boundary and weighs the prompt
  tokens plus the tokens of the chunks in it; then a piece closes at the first chunk received at least
  `split_interval_s` after the last boundary, weighing the completion tokens that arrived in it; the
  last piece ends at the last byte. Chunk tokens are WattProxy's estimate (its tokenizer, or about 4
  characters a token) because an upstream reports usage only at the end. Short pieces matter: an open
  piece that overlaps another request holds back the processing of that shared time, so no request's
  energy waits on a long stream for more than about one piece.
- Text, plain: its work (prompt + completion tokens, the upstream's usage where it reports it) is
  known only at its end, so it is cut into `split_interval_s` pieces weighted at an estimated rate
  (a moving average of the tokens per second per request seen in earlier answers: a continuous-
  batching server advances every running sequence at about the same pace); the last piece takes the
  rest of its real work. Requests that overlap it therefore need not wait for it to end.
- Images: weighing steps x pixels x images (x2 with guidance > 1), like in-process images; cut into
  pieces like a plain text request, at an estimated rate of image work units a second.
- Every request in flight, streams waiting for their next token included, is cut by one ticker
  (`_tick_all`), so that no request's energy waits on another's for more than about one piece.

Usage source. The token counts (image figures) in the answer and the ledger are the upstream's own
usage where it reports it (a stream is asked for it with `stream_options.include_usage`), else
WattProxy's estimate; `usage.energy.usage_source` says which ("upstream" or "estimate"). The
measurement label is the meter's with `-timeline` appended (e.g. `measured-timeline`): the device
energy is measured as labelled, the split among requests is inferred from the request timeline.
Several upstream devices: a request's pieces run on every one of them; its charge is the sum over
devices, its device label e.g. `cuda:0+cuda:1`.

Errors. Transport errors come typed from `backends.openai_upstream` and are mapped here, in one
place (`_api_error`): unreachable -> 502 `upstream_unreachable`, a broken or malformed answer -> 502
`upstream_bad_response`, a connect or read timeout -> 504 `upstream_timeout`. An upstream's non-2xx
answer passes through with its status, in the OpenAI envelope (built from vLLM's flat or TGI's shape
when it is not one already), except 401/403, which mean the upstream refused WattProxy's own
credentials: those are a 502 `upstream_auth_failed`, not the client's fault. An answered error charges
no one (its energy is idle) unless pieces of it were cut before it came (then what they were given is
final: it is charged); a request the upstream may have worked on (read timeout, broken answer, client
gone) is charged and recorded with status `error` or `cancelled`. Generation requests are never
retried.

Cancellation. A client that disconnects cancels its handler (`handler_cancellation`); the upstream
connection is then closed, so the upstream cancels the request. What the request had used so far is
still charged and recorded (status `cancelled`), in the background, since nobody waits for it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import ValidationError

from backends.base import BackendRequest, BackendResult, ImageRequest, ImageResult, TextRequest, TextResult
from backends.openai_upstream import (
    OpenAIUpstream,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.api import (
    TOKENIZE_ON_LOOP_MAX_CHARS,
    _energy_fields,
    _send_event,
    _sse,
    _start_sse,
    energy_headers,
)
from proxy.carbon import CarbonCharge
from proxy.config import ModelSettings, Settings, UpstreamSettings, parse_size
from proxy.energy.monitor import Charge, DeviceMonitor, JobHandle
from proxy.errors import ApiError, BadGateway, GatewayTimeout, Overloaded, sse_frame
from proxy.metrics import JOULES_PER_KWH
from proxy.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ImageGenerationRequest
from proxy.scheduler import Outcome, Recorder, RequestTag, Status
from proxy.state import MONITORS, RECORDER, REQUEST_ID, SERVICE, UPSTREAM, ServedModel, Service

log = logging.getLogger(__name__)

UsageSource = Literal["upstream", "estimate"]
ForwardedRequest = ChatCompletionRequest | CompletionRequest | ImageGenerationRequest | EmbeddingRequest
TextForwarded = ChatCompletionRequest | CompletionRequest | EmbeddingRequest

CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English text, where no tokenizer is configured
# Image requests that leave these out get the upstream's defaults, unknown here: assume OpenAI's size
# and diffusers' default steps and guidance for the work weight (said as usage_source "estimate").
DEFAULT_IMAGE_SIZE = (1024, 1024)
DEFAULT_IMAGE_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 7.5
# Until image answers teach better, the work units a second an image request is estimated to get:
# a 512x512 image with guidance (x2) at 20 denoising steps a second, about SD-1.5's on a current GPU.
IMAGE_UNITS_PER_S = 512 * 512 * 2 * 20.0
SETTLE_TIMEOUT_S = 30.0  # at shutdown: how long to wait for the records of requests whose clients left
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
}


# -- errors -----------------------------------------------------------------------------------------


def _default_type(status: int) -> str:
    """The error type of an upstream's status where its answer names none (and the status label of
    wattproxy_requests_total: bounded, it follows the status, not the upstream)."""
    return _ERROR_TYPES.get(status, "upstream_error" if status >= 500 else "invalid_request_error")


class UpstreamAnswered(ApiError):
    """An upstream's non-2xx answer, passed through with its status and OpenAI envelope. `type` (the
    status label of wattproxy_requests_total) is bounded: it follows the status, not the upstream."""

    def __init__(self, status: int, envelope: dict[str, Any], retry_after_s: float | None) -> None:
        error = envelope["error"]
        super().__init__(str(error.get("message", "")), retry_after_s=retry_after_s)
        self.status = status
        self.type = _default_type(status)
        self._envelope = envelope

    def body(self) -> dict[str, object]:
        return self._envelope


def _envelope(status: int, body: bytes) -> dict[str, Any]:
    """The OpenAI envelope of an upstream's error body (`_envelope_of` its JSON object), or of a
    plain-text one."""
    default_type = _default_type(status)
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        return _envelope_of(status, obj)
    # Not JSON: an error page. Its text goes no further than a short 4xx message; a 5xx page (which
    # can be a stack trace) is not passed on.
    text = body.decode("utf-8", errors="replace").strip()[:300] if status < 500 else ""
    return {
        "error": {
            "message": text or f"the upstream answered {status}",
            "type": default_type,
            "param": None,
            "code": None,
        }
    }


def _envelope_of(status: int, obj: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI envelope `{"error": {"message", "type", "param", "code"}}` of an upstream's error
    object, every field there and of its type (a string message, a string type, ...), whether it is
    one already or vLLM's flat `{"object": "error", "message", ...}`, TGI's `{"error": "...",
    "error_type"}` or FastAPI's `{"detail": ...}`."""
    inner = obj.get("error")
    if isinstance(inner, dict):
        source, message, kind = inner, inner.get("message"), inner.get("type")
    else:
        source = obj
        message = obj.get("message") or inner or obj.get("detail")
        kind = obj.get("type") or obj.get("error_type")
    if message is None or message == "":
        message = f"the upstream answered {status}"
    param, code = source.get("param"), source.get("code")
    return {
        "error": {
            "message": message if isinstance(message, str) else json.dumps(message),
            "type": kind if isinstance(kind, str) and kind else _default_type(status),
            "param": param if isinstance(param, str) else None,
            "code": code if isinstance(code, str | int) and not isinstance(code, bool) else None,
        }
    }


def _api_error(e: UpstreamError) -> ApiError:
    """The one mapping of upstream failures to client-facing errors (statuses in the module doc)."""
    if isinstance(e, UpstreamStatus):
        if e.status in (401, 403):
            return BadGateway(
                f"the upstream refused WattProxy's credentials ({e.status}); check the upstream API key",
                code="upstream_auth_failed",
            )
        return UpstreamAnswered(e.status, _envelope(e.status, e.body), e.retry_after_s)
    if isinstance(e, UpstreamTimeout):
        return GatewayTimeout(str(e))
    if isinstance(e, UpstreamUnreachable):
        return BadGateway(str(e))
    return BadGateway(str(e), code="upstream_bad_response")


def _may_have_run(e: UpstreamError) -> bool:
    """Whether the upstream may have worked on a request that failed this way (then it is charged)."""
    if isinstance(e, UpstreamTimeout):
        return e.phase == "read"
    return isinstance(e, UpstreamBadResponse)


def _charged(activity: Activity, e: UpstreamError) -> bool:
    """Whether a failed request is charged (and recorded, status "error"): where the upstream may have
    worked on it, and where pieces of it have been given energy already (it was in flight longer than
    a piece: what they were given is final, so it is charged, not taken back)."""
    return _may_have_run(e) or bool(activity.pieces)


# -- token estimates --------------------------------------------------------------------------------


class TokenCounter:
    """Token counts of text for the upstream's requests: exact for the configured tokenizer (if it is
    the upstream model's), else about 4 characters a token. Units: tokens."""

    def __init__(self, tokenizer: Any | None = None) -> None:
        self._tokenizer = tokenizer

    @property
    def method(self) -> str:
        return "tokenizer" if self._tokenizer is not None else f"{CHARS_PER_TOKEN} characters per token"

    @classmethod
    def load(cls, spec: str | None, cache_dir: Path) -> TokenCounter:
        """Load the tokenizer `spec` names (a directory, a cached hub name, or `tiny:PRESET`). Blocking."""
        if spec is None:
            return cls()
        from transformers import AutoTokenizer

        source: str | Path = spec
        if spec.startswith("tiny:"):
            from backends.tiny import ensure_model

            source = ensure_model(spec.removeprefix("tiny:"), cache_dir / "models")
        return cls(AutoTokenizer.from_pretrained(source))

    @property
    def exact(self) -> bool:
        """Counting with a tokenizer (else by characters, at once)."""
        return self._tokenizer is not None

    def count(self, text: str) -> int:
        if not text:
            return 0
        if self._tokenizer is not None:
            return len(self._tokenizer.encode(text, add_special_tokens=False))
        return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def _chars(req: TextForwarded) -> int:
    """The characters of a text request's prompts, messages or inputs."""
    if isinstance(req, ChatCompletionRequest):
        return sum(len(m.text()) for m in req.messages)
    return sum(map(len, _texts_and_ids(req)[0]))


def _texts_and_ids(req: CompletionRequest | EmbeddingRequest) -> tuple[list[str], list[list[int]]]:
    """A completion's prompts, or an embeddings request's inputs: those given as text, and as token ids."""
    if isinstance(req, EmbeddingRequest):
        return req.texts(), req.token_inputs()
    return req.prompts(), req.token_prompts()


def _choices_text(choices: Any, finished: set[Any] | None = None) -> str:
    """The generated text in a chunk's or an answer's choices: content, reasoning, tool arguments.
    `finished`: the indexes of the choices that come to their finish_reason here are added to it."""
    if not isinstance(choices, list):
        return ""
    parts: list[str] = []
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if finished is not None and choice.get("finish_reason"):
            index = choice.get("index", 0)
            finished.add(index if type(index) is int else repr(index))
        text = choice.get("text")
        if isinstance(text, str):
            parts.append(text)
        message = choice.get("delta") or choice.get("message")
        if not isinstance(message, dict):
            continue
        for key in ("content", "reasoning_content", "reasoning"):
            value = message.get(key)
            if isinstance(value, str):
                parts.append(value)
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if isinstance(arguments, str):
                parts.append(arguments)
    return "".join(parts)


def _less_echo(req: TextForwarded, prompt: int, counted: int) -> int:
    """Completion tokens counted in a completion's text, less its prompts' where the text echoes them
    (`echo`: each choice's text starts with its prompt)."""
    if isinstance(req, CompletionRequest) and req.echo:
        return max(counted - req.n * prompt, 0)
    return counted


def _token_usage(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an upstream usage object, or None if it reports none."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return prompt, completion
    return None


def _png_size(b64: Any) -> tuple[int, int] | None:
    """(width, height) of a base64 PNG from its header (the first 32 characters), or None."""
    if not isinstance(b64, str) or len(b64) < 32:
        return None
    try:
        head = base64.b64decode(b64[:32])
    except ValueError:
        return None
    if head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


# -- one request on the upstream devices' timelines ---------------------------------------------------


class Activity:
    """One upstream request as a sequence of pieces on every upstream device's monitor.

    Each piece is a job of its own with one member, a copy of the request's tag (the commit sets that
    copy's carbon), weighing the work units it represents (tokens, or image work units)."""

    __slots__ = (
        "client_left",
        "collect",
        "concurrency",
        "credit",
        "ended",
        "handles",
        "image",
        "last_split_s",
        "monitors",
        "pending",
        "pieces",
        "started_s",
        "tag",
    )

    def __init__(
        self,
        monitors: Sequence[DeviceMonitor],
        tag: RequestTag,
        now_s: float,
        concurrency: int,
        *,
        image: bool = False,
    ) -> None:
        self.tag = tag
        self.monitors = monitors
        self.handles: list[JobHandle] = [m.begin(on_loop=True) for m in monitors]
        self.pieces: list[tuple[JobHandle, RequestTag]] = []
        self.pending = 0.0  # work units of the open piece
        self.credit = 0.0  # estimated work units given to pieces and not yet matched by real work
        self.image = image  # its estimates are at the image rate (work units a second), not tokens
        self.collect: Callable[[], None] | None = None  # adds the real work that came in (a stream's)
        self.started_s = self.last_split_s = now_s
        self.concurrency = concurrency  # requests in flight to the upstream when this one was sent
        self.client_left = False
        self.ended = False

    def add(self, units: float) -> None:
        """Real work: first it pays back what estimates gave pieces ahead of it, the rest is the open
        piece's (so a request weighs its real work or its estimates, whichever is more)."""
        if self.credit:
            paid = min(units, self.credit)
            self.credit -= paid
            units -= paid
        self.pending += units

    def estimate(self, units: float) -> None:
        """Work the open piece is given at an estimated rate, before the real work is known."""
        self.pending += units
        self.credit += units

    def _piece_tag(self) -> RequestTag:
        """The member of the next piece: the request's own tag for its first piece (the one a plain
        request on one device has), a copy for the others (each commit sets its member's carbon)."""
        return replace(self.tag) if self.pieces else self.tag

    def split(self, now_s: float) -> None:
        """Close the open piece with the work it holds and open the next one at the same instant."""
        units = self.pending
        for i, monitor in enumerate(self.monitors):
            piece = self._piece_tag()
            self.pieces.append((self.handles[i], piece))
            self.handles[i] = monitor.split(self.handles[i], [(piece, units)], units)
        self.pending = 0.0
        self.last_split_s = now_s

    def end(self, *, charged: bool) -> None:
        """Close the last piece. Uncharged (the upstream refused the request), its energy is idle."""
        if self.ended:
            return
        self.ended = True
        units = self.pending
        for i, monitor in enumerate(self.monitors):
            if charged:
                piece = self._piece_tag()
                self.pieces.append((self.handles[i], piece))
                monitor.end(self.handles[i], [(piece, units)], units)
            else:
                monitor.end(self.handles[i], [], 0.0)

    async def charges(self) -> list[tuple[Charge, RequestTag]]:
        """Every piece's charge on every device, once final (each with the tag its carbon is on)."""
        out: list[tuple[Charge, RequestTag]] = []
        for handle, piece in self.pieces:
            charges = handle.charges
            if charges is None:
                charges = await handle.final()
            charge = charges.get(piece)
            if charge is not None:
                out.append((charge, piece))
        return out


def _timeline_label(measurements: set[str]) -> str:
    """The weakest of the pieces' meter labels, marked as a timeline split ("measured-timeline")."""
    for label in ("unavailable", "synthetic", "estimated"):
        if label in measurements:
            return label if label == "unavailable" else f"{label}-timeline"
    return "measured-timeline"


def _sum_carbon(carbons: Sequence[CarbonCharge], kwh: float) -> CarbonCharge | None:
    """The carbon of several pieces: grams add up; the intensity is their energy-weighted mean."""
    if not carbons:
        return None
    first = carbons[0]
    operational = sum(c.operational_co2_grams for c in carbons)
    embodied = sum(c.embodied_co2_grams for c in carbons)
    intensity = operational / (kwh * first.pue) if kwh > 0 and first.pue > 0 else first.intensity_g_per_kwh
    return CarbonCharge(
        co2_grams=operational + embodied,
        operational_co2_grams=operational,
        embodied_co2_grams=embodied,
        intensity_g_per_kwh=intensity,
        pue=first.pue,
        zone=first.zone,
        source=first.source,
    )


def _sum_charges(parts: Sequence[tuple[Charge, RequestTag]], device: str, activity: Activity) -> Charge:
    charges = [c for c, _ in parts]
    return Charge(
        joules=sum(c.joules for c in charges),
        idle_joules=sum(c.idle_joules for c in charges),
        uncertainty_joules=sum(c.uncertainty_joules for c in charges),
        measurement=_timeline_label({c.measurement for c in charges}),
        device=device,
        start_s=min((c.start_s for c in charges), default=activity.started_s),
        end_s=max((c.end_s for c in charges), default=activity.started_s),
        device_seconds=sum(c.device_seconds for c in charges),
    )


# -- serving ----------------------------------------------------------------------------------------


class UpstreamServing:
    """Forwards validated requests to the upstream and accounts them (see the module docstring)."""

    def __init__(
        self,
        client: OpenAIUpstream,
        monitors: Sequence[DeviceMonitor],
        record: Recorder,
        counter: TokenCounter,
        *,
        split_interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not monitors:
            raise ValueError("proxy mode needs at least one upstream device to meter")
        self.client = client
        self.monitors = list(monitors)
        self.device = "+".join(m.device for m in self.monitors)
        self.record = record
        self.counter = counter
        self.split_interval_s = split_interval_s
        self.clock = clock
        self.inflight = 0
        self.tokens_per_s = 50.0  # per request, until answers teach better (see `_tick_all`)
        self.image_units_per_s = IMAGE_UNITS_PER_S  # per image request, likewise
        self._background: set[asyncio.Task[Outcome]] = set()
        self._ticking: set[Activity] = set()  # requests in flight (see `_tick_all`)
        self._ticker: asyncio.Task[None] | None = None
        # Prompt token counts of long prompts in flight, made on a worker thread (see `forward`)
        self._prompt_counts: dict[int, int] = {}
        # Set when a request finds the upstream unreachable: readiness is asked again at once
        self.unreachable = asyncio.Event()

    async def close(self, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
        """Wait (bounded) for the records of requests whose clients left."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout_s)
        if self._ticker is not None:
            self._ticker.cancel()

    async def forward(
        self, request: web.Request, tag: RequestTag, req: ForwardedRequest
    ) -> web.StreamResponse:
        """Answer one validated, admitted request through the upstream."""
        if (
            not self.counter.exact
            or isinstance(req, ImageGenerationRequest)
            or _chars(req) <= TOKENIZE_ON_LOOP_MAX_CHARS
        ):
            return await self._forward(request, tag, req)
        # A long prompt is tokenized once, on a worker thread: not on the event loop, where a 1 MB
        # prompt would hold every other request for half a second.
        self._prompt_counts[id(req)] = await asyncio.to_thread(self._count_prompt, req)
        try:
            return await self._forward(request, tag, req)
        finally:
            del self._prompt_counts[id(req)]

    async def _forward(
        self, request: web.Request, tag: RequestTag, req: ForwardedRequest
    ) -> web.StreamResponse:
        raw = await request.read()  # the body as the client sent it (aiohttp keeps it once read)
        headers = {"X-Request-Id": request[REQUEST_ID]}
        if isinstance(req, ImageGenerationRequest):
            if req.model is None:
                raw = json.dumps({**json.loads(raw), "model": tag.model}).encode()
            return await self._plain(request, tag, "/v1/images/generations", raw, headers, req)
        if isinstance(req, EmbeddingRequest):
            return await self._plain(request, tag, "/v1/embeddings", raw, headers, req)
        path = "/v1/chat/completions" if isinstance(req, ChatCompletionRequest) else "/v1/completions"
        if not req.stream:
            return await self._plain(request, tag, path, raw, headers, req)
        payload = json.loads(raw)
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
        return await self._stream(request, tag, path, json.dumps(payload).encode(), headers, req)

    # -- accounting -------------------------------------------------------------------------------

    def _begin(self, tag: RequestTag, *, image: bool = False) -> Activity:
        """The request's activity, from now (it is sent) to its end; cut into pieces by `_tick_all`
        while it is in flight."""
        self.inflight += 1
        activity = Activity(self.monitors, tag, self.clock(), self.inflight, image=image)
        self._ticking.add(activity)
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_all())
        return activity

    def _prompt_tokens(self, req: TextForwarded) -> int:
        counted = self._prompt_counts.get(id(req))
        return counted if counted is not None else self._count_prompt(req)

    def _count_prompt(self, req: TextForwarded) -> int:
        if isinstance(req, ChatCompletionRequest):
            return sum(self.counter.count(m.text()) for m in req.messages)
        texts, ids = _texts_and_ids(req)
        return sum(self.counter.count(t) for t in texts) + sum(map(len, ids))

    def _unfinished(self, activity: Activity, req: ForwardedRequest) -> tuple[BackendRequest, BackendResult]:
        """What a request that got no answer is recorded with: the work it asked for as far as it is
        known before any answer (the prompt's tokens; an image request's own work units)."""
        if isinstance(req, ImageGenerationRequest):
            width, height = parse_size(req.size) if req.size not in (None, "auto") else DEFAULT_IMAGE_SIZE
            steps = req.steps if req.steps is not None else DEFAULT_IMAGE_STEPS
            guidance = req.guidance_scale if req.guidance_scale is not None else DEFAULT_GUIDANCE_SCALE
            work = float(steps * width * height * req.n * (2 if guidance > 1.0 else 1))
            activity.add(work)
            image = ImageRequest(prompt=req.prompt, n=0, width=width, height=height, steps=steps)
            return image, ImageResult(images_png=(), seeds=(), work_units=work)
        prompt = self._prompt_tokens(req)
        activity.add(prompt)
        return TextRequest(), _text_result(prompt, 0)

    async def _settle(
        self,
        activity: Activity,
        request_obj: BackendRequest,
        result: BackendResult | None,
        status: Status,
        error: BaseException | None = None,
    ) -> Outcome:
        """Wait for the activity's energy to be final, then record it like a finished batch member."""
        parts = await activity.charges()
        charge = _sum_charges(parts, self.device, activity)
        if len(parts) == 1:  # one piece on one device: its member is the request's tag, carbon set
            tag = parts[0][1]
        else:
            carbons = [t.carbon for _, t in parts if t.carbon is not None]
            tag = replace(activity.tag, carbon=_sum_carbon(carbons, charge.joules / JOULES_PER_KWH))
        now = self.clock()
        outcome = Outcome(
            tag=tag,
            request=request_obj,
            result=result,
            error=error,
            charge=charge,
            status="cancelled" if activity.client_left and status == "ok" else status,
            queue_wait_s=0.0,  # WattProxy keeps no queue for upstream models; the upstream's is unseen
            run_s=max(charge.end_s - charge.start_s, 0.0),
            batch_size=activity.concurrency,
            duration_s=max(now - activity.started_s, 0.0),
        )
        await self.record([outcome])
        return outcome

    def _settle_later(
        self,
        activity: Activity,
        request_obj: BackendRequest,
        result: BackendResult | None,
        status: Status,
        error: BaseException | None = None,
    ) -> asyncio.Task[Outcome]:
        """Settle in a task of its own, which a cancelled handler does not take down with it."""
        task = asyncio.create_task(self._settle(activity, request_obj, result, status, error))
        self._background.add(task)
        task.add_done_callback(self._settled)
        return task

    def _settled(self, task: asyncio.Task[Outcome]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            log.error("recording an upstream request failed: %s", e)

    def _sent(self, activity: Activity) -> None:
        """The request is no longer in flight to the upstream (answered, failed or abandoned)."""
        self.inflight -= 1
        self._ticking.discard(activity)

    async def _settled_for_answer(self, task: asyncio.Task[Outcome], activity: Activity) -> Outcome:
        """The outcome an answer is built from; a client that leaves meanwhile leaves the record to the
        task (status `cancelled`); a record that cannot be stored refuses the answer (503)."""
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            activity.client_left = True
            raise
        except Exception as e:
            raise Overloaded(
                "the request ran but its accounting record could not be stored; it is refused rather than "
                "answered unaccounted. Retry later.",
                code="ledger_unavailable",
                retry_after_s=5,
            ) from e

    def _abandoned(self, activity: Activity, req: ForwardedRequest) -> None:
        """The client left before the answer came: charge what ran, record it as cancelled."""
        activity.client_left = True
        if not activity.ended:
            request_obj, result = self._unfinished(activity, req)
            activity.end(charged=True)
            self._settle_later(activity, request_obj, result, "cancelled")

    # -- plain answers ----------------------------------------------------------------------------

    async def _plain(
        self,
        request: web.Request,
        tag: RequestTag,
        path: str,
        raw: bytes,
        headers: dict[str, str],
        req: ForwardedRequest,
    ) -> web.Response:
        activity = self._begin(tag, image=isinstance(req, ImageGenerationRequest))
        try:
            return await self._plain_activity(request, activity, path, raw, headers, req)
        except Exception as e:
            if not activity.ended:  # a fault of WattProxy's own: what ran is charged, and recorded
                self._failed_unexpectedly(activity, *self._unfinished(activity, req), e)
            raise

    async def _plain_activity(
        self,
        request: web.Request,
        activity: Activity,
        path: str,
        raw: bytes,
        headers: dict[str, str],
        req: ForwardedRequest,
    ) -> web.Response:
        image = isinstance(req, ImageGenerationRequest)
        embedding = isinstance(req, EmbeddingRequest)
        try:
            try:
                answer = await self.client.post(path, raw, headers)
                body = json.loads(answer.body)
                if not isinstance(body, dict):
                    raise ValueError("not a JSON object")
                if not isinstance(body.get("data" if image or embedding else "choices"), list):
                    # a 200 that is no answer (an error object, vLLM's flat one, `{}`): not passed on
                    error = body.get("error") if "error" in body else body.get("message")
                    raise UpstreamBadResponse(
                        f"the upstream {self.client.shown_url} answered 200 without "
                        + ("images" if image else "embeddings" if embedding else "choices")
                        + (f": {json.dumps(error)[:300]}" if error is not None else "")
                    )
            except ValueError:
                raise UpstreamBadResponse(
                    f"the upstream {self.client.shown_url} sent an answer that is not JSON"
                ) from None
            except asyncio.CancelledError:
                self._abandoned(activity, req)
                raise
        except UpstreamError as e:
            error = _api_error(e)
            error.recorded = self._failed(activity, req, e)
            raise error from e
        finally:
            self._sent(activity)
        result: BackendResult
        if image:
            assert isinstance(req, ImageGenerationRequest)
            usage, source, request_obj, result = self._image_usage(req, body)
        else:
            usage, source, request_obj, result = self._text_usage(req, body)
        self._learn_rate(result, self.clock() - activity.started_s)
        activity.add(result.work_units)
        activity.end(charged=True)
        outcome = await self._settled_for_answer(
            self._settle_later(activity, request_obj, result, "ok"), activity
        )
        energy = {**_energy_fields([outcome]), "usage_source": source}  # EnergyUsage.model_dump()'s
        usage["energy"] = energy
        body["usage"] = usage
        return web.Response(
            body=_dumps(body, answer.body),
            content_type="application/json",
            headers=energy_headers(energy, request[REQUEST_ID]),
        )

    async def _tick_all(self) -> None:
        """Every request in flight is cut into pieces of `split_interval_s` (up to 1.5 times that), so
        that the requests that overlap it need not wait for its end to have their energy final (an
        open piece holds back the attribution of the time it shares). A piece weighs the real work
        that came in during it (a stream's tokens) or, where none did (a plain answer's work is known
        only at its end; a stream's first token can take long), the current estimate of the rate one
        request gets from the upstream (tokens a second for text: a continuous-batching server
        advances every running sequence by about one token a step; image work units a second for
        images). Real work pays the estimates back first (`Activity.add`): the last piece takes the
        rest of it (nothing when the estimate ran ahead). A stream also cuts its own pieces as its
        chunks come. One task does this for every request in flight (a task each cost more than the
        rest of a request's accounting), and stops when none is left."""
        try:
            while self._ticking:
                await asyncio.sleep(self.split_interval_s / 2)
                now = self.clock()
                for activity in list(self._ticking):
                    elapsed_s = now - activity.last_split_s
                    if elapsed_s >= self.split_interval_s and not activity.ended:
                        if activity.collect is not None:
                            activity.collect()
                        if not activity.pending:
                            rate = self.image_units_per_s if activity.image else self.tokens_per_s
                            activity.estimate(rate * elapsed_s)
                        activity.split(now)
        finally:
            self._ticker = None

    def _learn_rate(self, result: BackendResult, duration_s: float) -> None:
        """Moving estimates of the work a second one request gets from the upstream."""
        if duration_s <= 0 or result.work_units <= 0:
            return
        observed = result.work_units / duration_s
        if isinstance(result, ImageResult):
            self.image_units_per_s = 0.9 * self.image_units_per_s + 0.1 * observed
        elif isinstance(result, TextResult) and result.completion_tokens > 0:
            self.tokens_per_s = 0.9 * self.tokens_per_s + 0.1 * observed

    def _failed_unexpectedly(
        self, activity: Activity, request_obj: BackendRequest, result: BackendResult, e: Exception
    ) -> None:
        """An exception no path expects (a fault of WattProxy's own) before the activity ended: it is
        ended, charged and recorded as an error, so that no piece stays open on the device's timeline
        (an open piece would hold back the attribution of every request overlapping it). The error
        middleware logs the exception."""
        if not activity.ended:
            activity.end(charged=True)
            self._settle_later(activity, request_obj, result, "error", e)

    def _failed(self, activity: Activity, req: ForwardedRequest, e: UpstreamError) -> bool:
        """End a failed request's activity; True when it is recorded (charged, status "error")."""
        if isinstance(e, UpstreamUnreachable):
            self.unreachable.set()
        if activity.ended:
            return False
        if _charged(activity, e):
            request_obj, result = self._unfinished(activity, req)
            activity.end(charged=True)
            self._settle_later(activity, request_obj, result, "error", e)
            return True
        activity.end(charged=False)
        return False

    def _text_usage(
        self, req: TextForwarded, body: dict[str, Any]
    ) -> tuple[dict[str, Any], UsageSource, BackendRequest, TextResult]:
        upstream = body.get("usage")
        if isinstance(req, EmbeddingRequest):  # its inputs' tokens are all its work
            reported = upstream.get("prompt_tokens") if isinstance(upstream, dict) else None
            known = type(reported) is int and reported >= 0
            prompt = reported if known else self._prompt_tokens(req)
            usage = dict(upstream) if isinstance(upstream, dict) else {}
            usage.update(prompt_tokens=prompt, total_tokens=prompt)
            return usage, "upstream" if known else "estimate", TextRequest(), _text_result(prompt, 0)
        tokens = _token_usage(upstream)
        source: UsageSource
        if tokens is not None:
            prompt, completion = tokens
            source = "upstream"
        else:
            prompt = self._prompt_tokens(req)
            completion = _less_echo(req, prompt, self.counter.count(_choices_text(body.get("choices"))))
            source = "estimate"
        usage = dict(upstream) if isinstance(upstream, dict) else {}
        usage.update(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        return usage, source, TextRequest(), _text_result(prompt, completion, body.get("choices"))

    def _image_usage(
        self, req: ImageGenerationRequest, body: dict[str, Any]
    ) -> tuple[dict[str, Any], UsageSource, BackendRequest, ImageResult]:
        data: list[Any] = body["data"] if isinstance(body.get("data"), list) else []
        images = len(data)
        upstream: dict[str, Any] = body["usage"] if isinstance(body.get("usage"), dict) else {}
        if req.size not in (None, "auto"):
            width, height = parse_size(req.size)
        else:
            first = data[0] if data and isinstance(data[0], dict) else {}
            width, height = _png_size(first.get("b64_json")) or DEFAULT_IMAGE_SIZE
        reported = upstream.get("steps")
        source: UsageSource = "upstream" if isinstance(reported, int) and reported > 0 else "estimate"
        if isinstance(reported, int) and reported > 0:
            steps = reported
        else:
            steps = req.steps if req.steps is not None else DEFAULT_IMAGE_STEPS
        guidance = req.guidance_scale if req.guidance_scale is not None else DEFAULT_GUIDANCE_SCALE
        pixels = width * height * images
        work = float(steps * pixels * (2 if guidance > 1.0 else 1))
        usage = {**upstream, "images": images, "pixels": pixels, "steps": steps}
        request_obj = ImageRequest(
            prompt=req.prompt, n=images, width=width, height=height, steps=steps, guidance_scale=guidance
        )
        # The images stay in the answer; the recorder only counts them.
        result = ImageResult(images_png=(b"",) * images, seeds=(0,) * images, work_units=work)
        return usage, source, request_obj, result

    # -- streams ----------------------------------------------------------------------------------

    async def _stream(
        self,
        request: web.Request,
        tag: RequestTag,
        path: str,
        body: bytes,
        headers: dict[str, str],
        req: ChatCompletionRequest | CompletionRequest,
    ) -> web.StreamResponse:
        wants_usage = bool(req.stream_options and req.stream_options.include_usage)
        prompt_estimate = self._prompt_tokens(req)
        completion_estimate = 0
        held_usage: dict[str, Any] | None = None  # the upstream's usage chunk, sent on with the energy
        last_data = b""  # the last chunk with choices (its id, model... go into a usage chunk built here)
        failure: ApiError | None = None
        upstream_failed = False
        resp: web.StreamResponse | None = None
        activity = self._begin(tag)
        activity.add(prompt_estimate)
        piece_text: list[str] = []  # the open piece's generated text: counted once, when it closes
        finished: set[Any] = set()  # the choices (by index) that have come to their finish_reason
        choices_asked = req.n * (
            1 if isinstance(req, ChatCompletionRequest) else sum(map(len, _texts_and_ids(req)))
        )

        def count_piece() -> None:  # one tokenizer call a piece, not an event
            nonlocal completion_estimate
            if piece_text:
                tokens = self.counter.count("".join(piece_text))
                piece_text.clear()
                completion_estimate += tokens
                activity.add(tokens)

        activity.collect = count_piece  # for the pieces `_tick_all` cuts

        try:
            async with self.client.stream(path, body, headers) as events:
                resp = await _start_sse(request)
                try:
                    done = False
                    async for batch in events.batches():
                        frames: list[bytes] = []  # what the client gets of this batch, in one write
                        bad: UpstreamBadResponse | None = None
                        for data in batch:
                            if data == b"[DONE]":  # the stream's end, whether or not the body ends
                                done = True
                                break
                            chunk = _inspect_event(data)
                            if not isinstance(chunk, dict):
                                bad = UpstreamBadResponse("the upstream sent a stream event that is not JSON")
                                break
                            if "error" in chunk or chunk.get("object") == "error":
                                # passed on in the OpenAI envelope (the client's library reads that
                                # one); the upstream ends the stream
                                upstream_failed = True
                                data = json.dumps(_envelope_of(500, chunk)).encode()
                            elif chunk.get("usage") and not chunk.get("choices"):
                                held_usage = json.loads(data)  # sent on: read exactly (see _inspect_event)
                                continue
                            else:
                                if chunk.get("usage"):  # usage on a chunk with choices: the last one wins
                                    exact = json.loads(data)  # read exactly (see _inspect_event)
                                    held_usage = {**exact, "choices": []}
                                    data = json.dumps({**exact, "usage": None}).encode()
                                last_data = data
                                piece_text.append(_choices_text(chunk.get("choices"), finished))
                            frames.append(sse_frame(data))  # the bytes as they came
                        if frames:
                            await _send_event(resp, b"".join(frames))
                        if bad is not None:
                            raise bad
                        if done:
                            break
                        now = self.clock()
                        if now - activity.last_split_s >= self.split_interval_s:
                            count_piece()
                            activity.split(now)
                    if not done and not upstream_failed and len(finished) < choices_asked:
                        # the body ended before [DONE] with a choice unfinished: cut short (an upstream
                        # that ends its streams without [DONE] after every choice's finish_reason is
                        # taken at its word)
                        raise UpstreamBadResponse("the upstream's stream ended before its end ([DONE])")
                except UpstreamError as e:
                    failure = _api_error(e)
                    log.warning("upstream stream for request %s broke off: %s", tag.request_id, e)
        except UpstreamError as e:  # before the stream started: nothing was sent to the client
            error = _api_error(e)
            if isinstance(e, UpstreamUnreachable):
                self.unreachable.set()
            if _charged(activity, e):
                activity.end(charged=True)  # its open piece holds the prompt's tokens already
                result = _text_result(prompt_estimate, 0)
                self._settle_later(activity, TextRequest(), result, "error", e)
                error.recorded = True
            else:
                activity.end(charged=False)
            self._sent(activity)
            raise error from e
        except (asyncio.CancelledError, ConnectionResetError) as e:
            self._sent(activity)
            activity.client_left = True
            if not activity.ended:
                count_piece()
                activity.end(charged=True)
                result = _text_result(prompt_estimate, completion_estimate)
                self._settle_later(activity, TextRequest(), result, "cancelled")
            if isinstance(e, ConnectionResetError) and resp is not None:
                return resp  # the client left mid-stream (a write failed): aiohttp closes quietly
            raise
        except Exception as e:  # a fault of WattProxy's own: what ran is charged, and recorded
            self._sent(activity)
            if not activity.ended:
                count_piece()
            self._failed_unexpectedly(
                activity, TextRequest(), _text_result(prompt_estimate, completion_estimate), e
            )
            raise
        self._sent(activity)
        assert resp is not None
        count_piece()
        activity.end(charged=True)
        reported = _token_usage(held_usage.get("usage") if held_usage else None)
        source: UsageSource = "upstream" if reported is not None else "estimate"
        prompt, completion = reported or (
            prompt_estimate,
            _less_echo(req, prompt_estimate, completion_estimate),
        )
        failed = failure is not None or upstream_failed
        if not failed:
            self._learn_rate(_text_result(prompt, completion), self.clock() - activity.started_s)
        settle = self._settle_later(
            activity, TextRequest(), _text_result(prompt, completion), "error" if failed else "ok", failure
        )
        try:
            outcome = await self._settled_for_answer(settle, activity)
        except ApiError as e:
            failure = e
        try:
            if failure is not None:
                await _sse(resp, failure.body())
            elif wants_usage and not upstream_failed:
                energy = {**_energy_fields([outcome]), "usage_source": source}
                await _sse(
                    resp,
                    _usage_chunk(
                        held_usage,
                        json.loads(last_data) if held_usage is None and last_data else None,
                        prompt,
                        completion,
                        {k: v for k, v in energy.items() if v is not None},
                    ),
                )
            await _sse(resp, "[DONE]")
            await resp.write_eof()
        except ConnectionResetError:  # the client left once the upstream had finished: it is recorded
            pass
        return resp


def _inspect_event(data: bytes) -> Any:
    """A stream event's JSON, read to be looked at (its keys, its text), never sent on: orjson's (a
    fifth of json.loads's CPU on a chunk), which reads integers past 64 bits as floats; json's for
    what orjson refuses (NaN, lone surrogates); None if it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            return json.loads(data)
        except ValueError:
            return None


def _dumps(obj: Any, source: bytes = b"") -> bytes:
    """JSON bytes of an answer read from `source`: orjson's (a tenth of json.dumps's CPU on a chat
    answer), else json.dumps's, for what orjson refuses (integers past 64 bits) or would change (it
    writes NaN and Infinity, which json reads and writes, as null). Not for reading: orjson reads
    integers past 64 bits as floats, silently."""
    if b"NaN" in source or b"Infinity" in source:
        return json.dumps(obj).encode()
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj).encode()


def _text_result(prompt: int, completion: int, choices: Any = None) -> TextResult:
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    reason = first.get("finish_reason")
    return TextResult(
        text="",  # the text stays in the answer; the recorder only counts tokens
        prompt_tokens=prompt,
        completion_tokens=completion,
        finish_reason="length" if reason == "length" else "stop",
        work_units=float(prompt + completion),
    )


def _usage_chunk(
    held: dict[str, Any] | None,
    last: dict[str, Any] | None,
    prompt: int,
    completion: int,
    energy: dict[str, Any],
) -> dict[str, Any]:
    """The final usage chunk: the upstream's own (tokens as it counted them) or one built like it."""
    if held is not None:
        chunk = dict(held)
        usage = dict(held["usage"])
    else:
        base = last or {}
        chunk = {k: base[k] for k in ("id", "object", "created", "model") if k in base}
        chunk["choices"] = []
        usage = {}
    usage.update(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
    usage["energy"] = energy
    chunk["usage"] = usage
    return chunk


# -- lifecycle --------------------------------------------------------------------------------------


def upstream_ctx(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    """The cleanup context of proxy mode: the token counter, the shared client session, the serving
    object (under `UPSTREAM`), and the models, discovered in the background (or listed in the config).
    Needs the monitors (`MONITORS`) and the recorder (`RECORDER`) set up before it."""
    up = settings.upstream
    assert up is not None

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        counter = await loop.run_in_executor(None, TokenCounter.load, up.tokenizer, settings.cache_dir)
        client = OpenAIUpstream(
            up.url,
            api_key=up.api_key.get_secret_value() if up.api_key is not None else None,
            connect_timeout_s=up.connect_timeout_s,
            read_timeout_s=up.read_timeout_s,
            max_connections=up.max_connections,
            keepalive_timeout_s=up.keepalive_timeout_s,
        )
        await client.start()
        monitors = [app[MONITORS][d] for d in up.device_names()]
        serving = UpstreamServing(
            client, monitors, app[RECORDER], counter, split_interval_s=up.split_interval_s
        )
        app[UPSTREAM] = serving
        service = app[SERVICE]
        log.info(
            "proxy mode: upstream %s metered on %s; token estimates by %s",
            client.shown_url,
            serving.device,
            counter.method,
        )
        if up.models:
            for m in up.models:
                _serve(service, m.name, m.task, client, serving.device)
            service.upstream = "ready"
        else:
            service.upstream = "discovering"
        discovery = asyncio.create_task(_discover(client, service, up, serving))
        yield
        discovery.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await discovery
        await serving.close()
        await client.close()

    return ctx


def _serve(service: Service, name: str, task: str, client: OpenAIUpstream, device: str) -> None:
    existing = service.models.get(name)
    if existing is not None and not existing.upstream:
        log.warning("upstream model %s is not served: a local model has that name", name)
        return
    try:
        ms = ModelSettings.model_validate(
            {
                "name": name,
                "task": task,
                "source": f"upstream:{client.shown_url}",
                "device": device,
            }
        )
    except ValidationError as e:
        log.warning("upstream model %r is not served: %s", name, e.errors()[0]["msg"])
        return
    service.models[name] = ServedModel(settings=ms, upstream=True)


async def _discover(
    client: OpenAIUpstream, service: Service, up: UpstreamSettings, serving: UpstreamServing
) -> None:
    """Ask the upstream for its models until it answers (readiness flips to ready then), then again
    every `models_refresh_s`, and at once when a request found it unreachable: models it starts
    serving are served, those it stops serving are not (an upstream restarted with other models,
    adapters loaded at run time). While it cannot be asked, the last list stands and readiness says
    "unreachable" (asked again sooner, with backoff). Models listed in the configuration stay as
    listed: the upstream is only asked whether it can be reached (any answer says it can)."""
    delay_s = 0.25
    listed: set[str] = set()
    device = serving.device
    while True:
        try:
            models = await client.models()
        except UpstreamError as e:
            if up.models and not isinstance(e, UpstreamUnreachable | UpstreamTimeout):
                models = None  # it answered (an upstream without /v1/models, say): reachable
            else:
                if service.upstream == "ready":  # it answered before: unreachable now, until it answers
                    service.upstream = "unreachable"
                log.warning(
                    "upstream %s: listing its models failed (%s); again in %.1f s",
                    client.shown_url,
                    e,
                    delay_s,
                )
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 10.0)
                continue
        delay_s = 0.25
        if up.models:
            if service.upstream != "ready":
                log.info("upstream %s can be reached again", client.shown_url)
            service.upstream = "ready"
            await _until_next_ask(serving, up.models_refresh_s)
            continue
        assert models is not None
        names = {m.id for m in models}
        for m in models:
            if m.id not in listed:
                _serve(service, m.id, m.task if m.task in ("text", "image") else "text", client, device)
        for gone in listed - names:
            served = service.models.get(gone)
            if served is not None and served.upstream:
                del service.models[gone]
        if service.upstream != "ready" or names != listed:
            log.info("upstream %s serves %s", client.shown_url, ", ".join(sorted(names)) or "no models")
        listed = names
        service.upstream = "ready"
        await _until_next_ask(serving, up.models_refresh_s)


async def _until_next_ask(serving: UpstreamServing, refresh_s: float) -> None:
    """Wait `refresh_s`, or until a request finds the upstream unreachable."""
    serving.unreachable.clear()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(serving.unreachable.wait(), refresh_s)
