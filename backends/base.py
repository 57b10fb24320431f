"""The `Backend` protocol: what the proxy asks of a model runner.

A backend is loaded once, then runs *batches* of compatible requests (equal `batch_key`) one at a
time on its device, from the device's worker thread. It never imports `proxy`: the proxy measures
energy around `run()` and splits it by the `work_units` each result reports.
"""

from __future__ import annotations

import atexit
import gc
import io
import json
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

log = logging.getLogger(__name__)

Task = Literal["text", "image"]


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    # an assistant's calls of tools (OpenAI's `tool_calls`, as JSON text, each call's arguments an
    # object), and a tool's answer's `tool_call_id`: what a chat template renders of a tool call's turn
    tool_calls: str | None = None
    tool_call_id: str | None = None

    def as_template_message(self) -> dict[str, Any]:
        """The message as chat templates take it (transformers' `apply_chat_template`)."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls is not None:
            message["tool_calls"] = json.loads(self.tool_calls)
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


@dataclass(frozen=True)
class TextRequest:
    """One completion (`prompt`) or chat (`messages`) request, already validated."""

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Called from the worker thread with each new piece of text as it is generated (streaming). Where
    # it has a `flush` method, the backend calls that after every decoding step and once the batch
    # ends (`flush_all`): the consumer may hold a step's pieces and pass them on together. Where it
    # also has `interval_s` (seconds), it takes pieces no more often than that: a backend that sends
    # them from another process may hold them that long too (backends/process.py). A piece is the text
    # (str), or, where the request asks for log probabilities, a TextPiece: the text with the tokens
    # given out with it.
    on_text: Callable[[str | TextPiece], None] | None = field(default=None, compare=False, hash=False)
    # The prompt's token ids, where the server already tokenized it with this model's tokenizer to
    # check its length (`prompt_ids` of the backend): `run` then does not tokenize it a second time.
    prompt_ids: tuple[int, ...] | None = field(default=None, compare=False, hash=False, repr=False)
    # Which of its prompt's n choices this is (0 for the first; an OpenAI request's `n`). A seeded batch
    # draws from one stream seeded with `seed + choice` of its first member, so that choices of one
    # request that land in different batches do not repeat each other.
    choice: int = 0
    # OpenAI's presence and frequency penalties and its logit bias ((token id, bias) pairs), applied to
    # this row's logits before each token is chosen, greedy included (a backend that honours them says
    # so in its `honours`; the server refuses them for one that does not).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Log probabilities: None, not asked; k (0-20): each generated token's, with the k most likely
    # tokens at its position (OpenAI's `logprobs`/`top_logprobs`; a backend that gives them says so in
    # its `honours`).
    logprobs: int | None = None
    # A completion's `echo`: the result's text starts with the prompt's, and its log probabilities (where
    # asked) with the prompt's tokens', the first of which has none (nothing comes before it).
    echo: bool = False
    # Structured output (OpenAI's `response_format`): a JSON Schema, as JSON text, that the text must be a
    # value of (`{"type": "object"}` for `json_object`); each step takes only tokens that keep it a
    # prefix of one (backends/structured.py). None: free text.
    json_schema: str | None = None
    # The tools a chat offers (OpenAI's `tools`, as JSON text), for its chat template to render.
    tools: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, its log probability under the model (its raw distribution:
    before penalties, bias, temperature and top_p, as vLLM gives them by default), and the `k` most
    likely tokens at its position with theirs, most likely first."""

    token: str
    logprob: float | None  # None: an echoed prompt's first token, which nothing comes before
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TextPiece:
    """A streamed piece of text with the log probabilities of the tokens given out with it: those
    generated since the previous piece, whose text this piece releases or begins (text held back, a
    possible stop string or a character's first bytes, comes with a later piece, and so do its
    tokens). A stream's pieces' tokens, followed by the rest of its result's (`TextResult.logprobs`
    past them), are that result's, in order."""

    text: str
    logprobs: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class TextResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    work_units: float  # prompt + generated tokens: the share of the batch's energy this member gets
    # where asked (`TextRequest.logprobs`): the tokens that make `text`, in order (the stop token and
    # tokens wholly past a stop string left out; the token a stop string cuts into kept; a streamed
    # member's also every token its pieces gave out, TextPiece), after the prompt's where it is echoed
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    n: int = 1
    width: int = 64
    height: int = 64
    steps: int = 4
    guidance_scale: float = 7.5
    seed: int | None = None
    negative_prompt: str | None = None


@dataclass(frozen=True)
class ImageResult:
    """One request's images. A backend may hand them back decoded (`images`: objects with Pillow's
    `save`) rather than as PNGs: the server calls `encoded()` on a worker thread after the job and
    before recording it, so that the device's thread starts the next batch while the PNGs are made
    (Pillow's encoder lets go of the interpreter lock), and a request whose PNGs cannot be made is
    recorded as the error it is answered with. `images_png` is then filled and `images` emptied."""

    images_png: tuple[bytes, ...]
    seeds: tuple[int, ...]  # the seed of each image's own torch.Generator (reproducible)
    work_units: float  # steps x pixels x images (x2 with classifier-free guidance)
    images: tuple[Any, ...] = ()  # decoded images not yet encoded

    @property
    def count(self) -> int:
        """How many images (one seed each), encoded or not."""
        return len(self.seeds)

    def encoded(self) -> ImageResult:
        """This result with its decoded images made PNGs (itself when there are none)."""
        if not self.images:
            return self
        return replace(self, images_png=tuple(map(png_bytes, self.images)), images=())


def png_bytes(image: Any) -> bytes:
    """A decoded image (Pillow's `Image`) as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


BackendRequest = TextRequest | ImageRequest
BackendResult = TextResult | ImageResult


def flushes_of(batch: Sequence[BackendRequest]) -> tuple[Callable[[], None], ...]:
    """The distinct `flush` methods of the batch's streamed members' `on_text` consumers (TextRequest).
    Members streamed to one consumer share its method: it is called once a step, not once a member."""
    flushes: list[Callable[[], None]] = []
    for request in batch:
        flush = getattr(getattr(request, "on_text", None), "flush", None)
        if flush is not None and flush not in flushes:
            flushes.append(flush)
    return tuple(flushes)


def flush_all(flushes: Sequence[Callable[[], None]]) -> None:
    """Call each of `flushes` (a step ended, or the batch did). One that fails is logged: a broken
    consumer must not fail the batch its members are in."""
    for flush in flushes:
        try:
            flush()
        except Exception:
            log.warning("a stream's flush failed", exc_info=True)


@runtime_checkable
class Backend(Protocol):
    """A model runner. `load`, `run` and `synchronize` block: call them from a worker thread."""

    name: str
    task: Task
    device: str  # "cpu", "cuda:0", ...

    def load(self) -> None:
        """Load weights (from_pretrained, safetensors only, no remote code) onto `device`."""

    def batch_key(self, request: BackendRequest) -> Hashable:
        """Requests with equal keys may run in one batch."""

    def run(self, batch: Sequence[BackendRequest]) -> list[BackendResult]:
        """Run one batch; results are in the order of `batch`."""

    def synchronize(self) -> None:
        """Wait until the device has finished the work queued so far (before a meter read)."""

    def close(self) -> None:
        """Release the model and its device memory."""


_UNFREEZE_AT_EXIT: list[bool] = []


def freeze_heap() -> int:
    """Take what is alive now (the libraries, torch, a model) out of the cyclic collector's reach, whose
    full passes over it stall generation and the event loop; the objects set aside, counted. They are
    given back at the interpreter's exit, so that its last collection frees them: nanobind's modules
    (triton's, which torch imports where it is installed; xgrammar's) otherwise report every instance
    still alive then as a leak, hundreds of lines on stderr at each stop."""
    gc.collect()
    gc.freeze()
    if not _UNFREEZE_AT_EXIT:
        _UNFREEZE_AT_EXIT.append(True)
        atexit.register(gc.unfreeze)
    return gc.get_freeze_count()
