"""Pydantic request and response models: the OpenAI shapes plus WattProxy's energy extension.

Requests are strict about types (a string where a number belongs is a 400 naming the field) and
ignore fields WattProxy does not use, as OpenAI-compatible servers commonly do. Fields that ask the
model for something (tools, JSON mode, log probabilities, penalties, content parts other than text)
are parsed: in proxy mode the upstream gets them as they were sent, and a model served in process
refuses a value it cannot honour (`unsupported`) instead of answering as if it had not been asked.
These models are also the source of /openapi.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

# Fields with a default that OpenAI's API also takes as null (what its clients send for a parameter
# passed as None): null means the default.
_NULL_MEANS_DEFAULT = frozenset({"temperature", "top_p", "n", "stream", "response_format", "include_usage"})


def _drop_null_defaults(data: Any) -> Any:
    if type(data) is dict and None in data.values():
        return {k: v for k, v in data.items() if v is not None or k not in _NULL_MEANS_DEFAULT}
    return data


def _nullable_in_schema(schema: dict[str, Any]) -> None:
    """The JSON schema (/openapi.json) says so: those fields also take null."""
    for name, prop in schema.get("properties", {}).items():
        if name in _NULL_MEANS_DEFAULT and "anyOf" not in prop:
            default = prop.pop("default", None)
            moved = {k: prop.pop(k) for k in list(prop) if k not in ("title", "description")}
            prop["anyOf"] = [moved, {"type": "null"}]
            if default is not None:
                prop["default"] = default


# (field, whether its value is one a model served in process honours, what those values are)
Neutral = tuple[tuple[str, Callable[[Any], bool], str], ...]


def _integral(v: object) -> object:
    """2.0 as 2 (an integer as JSON Schema has it); anything else as it is."""
    return int(v) if type(v) is float and v.is_integer() else v


class _NullMeansDefault(BaseModel):
    """A request part: strict, unknown fields ignored, null for the default of `_NULL_MEANS_DEFAULT`."""

    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra=_nullable_in_schema)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        return _drop_null_defaults(data)


class _Request(_NullMeansDefault):
    @field_validator(
        "n",
        "max_tokens",
        "max_completion_tokens",
        "seed",
        "steps",
        "best_of",
        "top_logprobs",
        "logprobs",
        "dimensions",
        mode="before",
        check_fields=False,
    )
    @classmethod
    def _integral(cls, v: object) -> object:
        """JSON Schema's integer includes 2.0; a string or 2.5 is still refused (strict)."""
        return _integral(v)

    # The fields that ask the model for something (see _ASKED_DOC), with their honoured values.
    NEUTRAL: ClassVar[Neutral] = ()
    ASKED: ClassVar[frozenset[str]] = frozenset()

    def unsupported(self, model: str, honoured: frozenset[str] = frozenset()) -> tuple[str, str] | None:
        """(param, message) for the first field whose value asks what `model`, served in process, does
        not do (it does the fields in `honoured`), or None. Answered as OpenAI answers a parameter a
        model does not take: 400 `unsupported_value`, "Only the default ... is supported"."""
        asked = self.model_fields_set.intersection(self.ASKED)
        if not asked:  # the usual request: none of them sent
            return None
        for name, neutral, supported in self.NEUTRAL:
            if name in asked and name not in honoured and not neutral(value := getattr(self, name)):
                return _unsupported(name, value, model, supported)
        return None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """A content part that is not text (`image_url`, `input_audio`, `file`, `refusal`, ...): sent on as it
    came in proxy mode, where the upstream's model may take it; a model served in process takes text
    only and refuses it (`ChatCompletionRequest.unsupported`)."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str = Field(
        description="Proxy mode: sent to the upstream as it is. A model served in process takes text parts "
        "only; another part is a 400 `unsupported_value`."
    )

    @field_validator("type")
    @classmethod
    def _not_text(cls, v: str) -> str:
        if v == "text":
            raise ValueError("a text part needs its 'text'")
        return v


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | OtherPart] | None = None
    # a turn that called tools (an assistant's), and a tool's answer to one: for the chat template
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text: its text parts (other parts have none)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if type(p) is TextPart)


class StreamOptions(_NullMeansDefault):
    include_usage: bool = False


# A stop string is checked against the text's tail at every token: bounded, as their number is (four
# 20,000-character stops made each token of a 4,000-character answer cost milliseconds).
StopString = Annotated[str, Field(max_length=512)]
Stop = StopString | Annotated[list[StopString], Field(max_length=4)] | None


# Fields that ask the model for something (tools, JSON mode, log probabilities, penalties, ...). An
# upstream in proxy mode gets them as they were sent; a model served in process refuses a value that
# asks for what its backend does not do (`_Request.unsupported`, the backend's `honours`), rather than
# answer as if it had not been asked.
# Their defaults (absent, null, 0, false, empty) are always fine. The OpenAPI document says so:
_ASKED_DOC = (
    "Proxy mode: sent to the upstream as it is. A model served in process takes the default (absent, "
    "null, 0, false or empty), and another value where it honours it (a transformers text model: the "
    "penalties, logit_bias, log probabilities, a completion's echo, a chat's response_format, and tools "
    "with tool_choice 'required' or a named function, or 'auto' where the model's settings name its call "
    "format, tool_call_parser); else a 400 `unsupported_value`."
)


def _shown(value: object) -> str:
    """`value` as JSON (as it was sent), cut to 80 characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _none_or_zero(v: object) -> bool:
    return v is None or v == 0


def _empty(v: object) -> bool:
    return not v


def _no_bias(v: dict[str, float] | None) -> bool:
    return not v or not any(v.values())


def _unsupported(name: str, value: object, model: str, supported: str) -> tuple[str, str]:
    """(param, message) as OpenAI words a value a model does not take (400 `unsupported_value`)."""
    return name, (
        f"Unsupported value: '{name}' does not support {_shown(value)} with model '{model}', which "
        f"WattProxy serves itself. Only {supported} is supported."
    )


# OpenAI's logit bias: token ids (as JSON keys) to a bias from -100 to 100
LogitBias = Annotated[
    dict[
        Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")],
        Annotated[float, Field(ge=-100.0, le=100.0)],
    ],
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {"pattern": "^[0-9]{1,9}$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        }
    ),
]


def _sampling_schema(schema: dict[str, Any]) -> None:
    """As `_nullable_in_schema`, and: stream_options (an object) only with stream true."""
    _nullable_in_schema(schema)
    schema["if"] = {"properties": {"stream_options": {"type": "object"}}, "required": ["stream_options"]}
    schema["then"] = {"properties": {"stream": {"const": True}}, "required": ["stream"]}


class _Sampling(_Request):
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra=_sampling_schema)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # int64, as OpenAI and vLLM take it
    user: str | None = Field(None, max_length=256)  # accepted, never used as a metric label
    # asked of the model (see _ASKED_DOC)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description=_ASKED_DOC)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description=_ASKED_DOC)
    logit_bias: LogitBias | None = Field(None, description=_ASKED_DOC)

    @field_validator("stream_options")
    @classmethod
    def _options_of_a_stream(cls, options: StreamOptions | None, info: ValidationInfo) -> Any:
        # as OpenAI's API and vLLM: options of a stream that is not asked for are a mistake, not a no-op
        if options is not None and not info.data.get("stream", False):
            raise ValueError("The 'stream_options' parameter is only allowed when 'stream' is enabled.")
        return options

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """`logit_bias` as (token id, bias) pairs in token order, zero biases left out."""
        return tuple(sorted((int(key), float(bias)) for key, bias in (self.logit_bias or {}).items() if bias))

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in stops if s)


_SAMPLING_NEUTRAL: Neutral = (
    ("presence_penalty", _none_or_zero, "the default (0)"),
    ("frequency_penalty", _none_or_zero, "the default (0)"),
    ("logit_bias", _no_bias, "the default (no bias)"),
)


def _chat_schema(schema: dict[str, Any]) -> None:
    """As `_sampling_schema`, and: top_logprobs (above 0) only with logprobs true."""
    _sampling_schema(schema)
    schema["allOf"] = [
        {
            "if": {
                "properties": {"top_logprobs": {"type": "integer", "minimum": 1}},
                "required": ["top_logprobs"],
            },
            "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
        }
    ]


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra=_chat_schema)

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # asked of the model (see _ASKED_DOC): tools, structured output, log probabilities, audio
    tools: list[dict[str, Any]] | None = Field(None, description=_ASKED_DOC)
    tool_choice: str | dict[str, Any] | None = Field(None, description=_ASKED_DOC)
    parallel_tool_calls: bool | None = None  # false: at most one call (tool_choice "required")
    functions: list[dict[str, Any]] | None = Field(None, description=_ASKED_DOC)
    function_call: str | dict[str, Any] | None = Field(None, description=_ASKED_DOC)
    response_format: dict[str, Any] | None = Field(None, description=_ASKED_DOC)
    logprobs: bool | None = Field(None, description=_ASKED_DOC)
    top_logprobs: int | None = Field(None, ge=0, le=20, description=_ASKED_DOC)
    modalities: list[str] | None = Field(None, description=_ASKED_DOC)
    audio: dict[str, Any] | None = Field(None, description=_ASKED_DOC)

    @field_validator("top_logprobs")
    @classmethod
    def _top_with_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        # as OpenAI's API and vLLM: alternatives of log probabilities that are not asked for are a mistake
        if top and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    NEUTRAL: ClassVar[Neutral] = (
        ("tools", _empty, "the default (no tools)"),
        ("tool_choice", lambda v: v in (None, "none", "auto"), 'the default ("none" without tools)'),
        ("functions", _empty, "the default (no functions)"),
        ("function_call", lambda v: v in (None, "none", "auto"), 'the default ("none" without functions)'),
        ("response_format", lambda v: v is None or v == {"type": "text"}, 'the default ({"type": "text"})'),
        ("logprobs", _empty, "the default (false)"),
        ("top_logprobs", _none_or_zero, "the default (0)"),
        ("modalities", lambda v: v is None or v == ["text"], 'the default (["text"])'),
        ("audio", lambda v: v is None, "the default (no audio)"),
        *_SAMPLING_NEUTRAL,
    )
    ASKED: ClassVar[frozenset[str]] = frozenset(n for n, _, _ in NEUTRAL)

    def unsupported(self, model: str, honoured: frozenset[str] = frozenset()) -> tuple[str, str] | None:
        """As `_Request.unsupported`, and content parts other than text: a model served in process
        takes text."""
        for i, m in enumerate(self.messages):
            if type(m.content) is list:
                for j, part in enumerate(m.content):
                    if type(part) is OtherPart:
                        return f"messages.{i}.content.{j}.type", (
                            f"Unsupported value: content part type {_shown(part.type)} with model "
                            f"'{model}', a text model that WattProxy serves itself. Only 'text' parts "
                            "are supported."
                        )
        return super().unsupported(model, honoured)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
# a text, texts, or token ids (one's or several's): a completion's prompt, an embeddings request's input
TextsOrIds = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)


def _integral_ids(v: object) -> object:
    """Token ids as JSON Schema's integers, which include 2.0 (as `_integral`)."""
    if type(v) is not list or not v or type(v[0]) is str:
        return v
    return [[_integral(x) for x in p] if type(p) is list else _integral(p) for p in v]


def _texts(value: Any) -> list[str]:
    """A `TextsOrIds` value's texts (none where it is token ids)."""
    if isinstance(value, str):
        return [value]
    return value if type(value[0]) is str else []  # type: ignore[no-any-return]


def _id_lists(value: Any) -> list[list[int]]:
    """A `TextsOrIds` value's token-id lists (none where it is text)."""
    if isinstance(value, str) or type(value[0]) is str:
        return []
    return value if type(value[0]) is list else [value]  # type: ignore[no-any-return]


class CompletionRequest(_Sampling):
    # text, texts, or token ids (one prompt's or several's); token ids only where the backend takes them
    # (`unsupported`)
    prompt: TextsOrIds
    # asked of the model (see _ASKED_DOC)
    logprobs: int | None = Field(None, ge=0, le=20, description=_ASKED_DOC)
    echo: bool | None = Field(None, description=_ASKED_DOC)
    best_of: int | None = Field(None, ge=1, description=_ASKED_DOC)
    suffix: str | None = Field(None, description=_ASKED_DOC)

    NEUTRAL: ClassVar[Neutral] = (
        ("logprobs", lambda v: v is None, "the default (null)"),
        ("echo", _empty, "the default (false)"),
        ("suffix", _empty, "the default (none)"),
        *_SAMPLING_NEUTRAL,
    )
    ASKED: ClassVar[frozenset[str]] = frozenset([*(n for n, _, _ in NEUTRAL), "best_of"])

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_ids(cls, v: object) -> object:
        return _integral_ids(v)

    def unsupported(self, model: str, honoured: frozenset[str] = frozenset()) -> tuple[str, str] | None:
        """As `_Request.unsupported`, a prompt of token ids where the backend does not take them
        (`prompt_token_ids` not in `honoured`), and `best_of` other than 1 or `n` (the best of more
        candidates than are returned)."""
        if "prompt_token_ids" not in honoured and self.token_prompts():
            return "prompt", (
                f"Unsupported value: 'prompt' as token ids with model '{model}', which WattProxy serves "
                "itself. Only text prompts are supported."
            )
        if self.best_of is not None and self.best_of not in (1, self.n):
            return _unsupported("best_of", self.best_of, model, f"1 or n ({self.n})")
        return super().unsupported(model, honoured)

    def prompts(self) -> list[str]:
        """The prompts given as text (none where they are token ids)."""
        return _texts(self.prompt)

    def token_prompts(self) -> list[list[int]]:
        """The prompts given as token ids (none where they are text)."""
        return _id_lists(self.prompt)


class EmbeddingRequest(_Request):
    """OpenAI's embeddings request. Served in proxy mode only (a model WattProxy serves itself makes no
    embeddings): forwarded as the client sent it, its `input` counted as prompt tokens."""

    model: str
    input: TextsOrIds
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=256)  # accepted, never used as a metric label

    @field_validator("input", mode="before")
    @classmethod
    def _input_ids(cls, v: object) -> object:
        return _integral_ids(v)

    def texts(self) -> list[str]:
        """The inputs given as text (none where they are token ids)."""
        return _texts(self.input)

    def token_inputs(self) -> list[list[int]]:
        """The inputs given as token ids (none where they are text)."""
        return _id_lists(self.input)


class ImageGenerationRequest(_Request):
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = Field(None, pattern=r"^(auto|[0-9]+x[0-9]+)$")
    # "url" is parsed so that it gets a clear 400; the document offers only what is served
    response_format: Literal["b64_json", "url"] = Field("b64_json", json_schema_extra={"enum": ["b64_json"]})
    user: str | None = Field(None, max_length=256)
    # asked of the model (see _ASKED_DOC): the served pipeline makes PNGs at the steps and guidance asked
    quality: str | None = Field(None, description=_ASKED_DOC)
    style: str | None = Field(None, description=_ASKED_DOC)
    output_format: str | None = Field(None, description=_ASKED_DOC)
    background: str | None = Field(None, description=_ASKED_DOC)
    # WattProxy extensions
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # int64, as OpenAI and vLLM take it
    negative_prompt: str | None = None

    @field_validator("size")
    @classmethod
    def _size_shape(cls, size: str | None) -> str | None:
        if size is None or size == "auto":
            return size
        parts = size.split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError("size must look like 'WIDTHxHEIGHT', e.g. '512x512'")
        return size

    NEUTRAL: ClassVar[Neutral] = (
        ("quality", lambda v: v in (None, "auto", "standard"), 'the default ("auto"; use steps)'),
        ("style", lambda v: v is None, "the default (none)"),
        ("output_format", lambda v: v in (None, "png"), '"png"'),
        ("background", lambda v: v in (None, "auto", "opaque"), 'the default ("auto")'),
    )
    ASKED: ClassVar[frozenset[str]] = frozenset(n for n, _, _ in NEUTRAL)


# -- responses ----------------------------------------------------------------------------------


class EnergyUsage(BaseModel):
    """The energy extension of every usage object. Units in the names (kWh, J, g, g/kWh)."""

    kwh: float
    joules: float
    co2_grams: float
    # "unavailable": the meter could not be read past the end of this request's work; `joules` is only
    # what was measured before the outage (never an invented figure).
    # "...-timeline" (proxy mode): the device's energy was measured as labelled, and each request's
    # share of it inferred from the timeline of the requests in flight on the upstream, by work.
    measurement: Literal[
        "measured",
        "estimated",
        "synthetic",
        "unavailable",
        "measured-timeline",
        "estimated-timeline",
        "synthetic-timeline",
    ]
    device: str
    uncertainty_kwh: float
    carbon_intensity_g_per_kwh: float
    pue: float
    idle_joules: float = 0.0
    embodied_co2_grams: float | None = None
    carbon_source: str | None = None
    # proxy mode: where the usage figures (tokens; images, pixels, steps) came from: the upstream's own
    # usage, or WattProxy's estimate (its tokenizer, the request). None for in-process models.
    usage_source: Literal["upstream", "estimate"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    energy: EnergyUsage | None = None


class ImageUsage(BaseModel):
    images: int
    pixels: int
    steps: int
    energy: EnergyUsage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ToolCallMessageOut(BaseModel):
    """An answer that calls tools (`tool_choice` "required" or a named function: no content; "auto": the
    text the model wrote before its calls, if any)."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's text as UTF-8


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]  # the most likely tokens at its position, most likely first


class ChatLogprobs(BaseModel):
    """A chat choice's log probabilities (`logprobs: true`; `top_logprobs` alternatives a token)."""

    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None


class CompletionLogprobs(BaseModel):
    """A completion choice's log probabilities (`logprobs: k`), in OpenAI's legacy shape."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]  # each token's start in the choice's text


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut | ToolCallMessageOut
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDeltaOut(ToolCallOut):
    index: int  # the call's place among the choice's calls


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None  # a stream that must call tools: all at its end


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    energy: EnergyUsage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a base64 string with encoding_format "base64"


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int


class ImagesResponse(BaseModel):
    created: int = Field(default_factory=lambda: int(time.time()))
    data: list[ImageData]
    usage: ImageUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "wattproxy"
    task: Literal["text", "image"]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    error: ErrorDetail


# -- accounting -------------------------------------------------------------------------------------


class KeyCreate(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    user: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    admin: bool = False
    budget_kwh: float | None = Field(None, gt=0)
    budget_co2_grams: float | None = Field(None, gt=0)
    period: Literal["day", "month", "total"] = "total"


class ApiKey(BaseModel):
    """A key as admins see it: never the hash; `key` (the secret) only in the answer that created it."""

    id: str
    object: Literal["api_key"] = "api_key"
    user: str
    admin: bool
    created: str
    revoked: str | None
    budget_kwh: float | None
    budget_co2_grams: float | None
    budget_period: Literal["day", "month", "total"]
    key: str | None = None


class ApiKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ApiKey]


class KeyRevoked(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    revoked: Literal[True] = True


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    user: str | None
    data: list[dict[str, object]]
    total: dict[str, object]


class Readiness(BaseModel):
    status: Literal[
        "ready", "loading", "draining", "unavailable"
    ]  # unavailable: the upstream cannot be reached
    models: dict[str, Literal["ready", "loading", "failed"]]
    upstream: Literal["discovering", "ready", "unreachable"] | None = None  # proxy mode
