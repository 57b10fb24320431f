"""Tool calls in a model's own text, for `tool_choice: "auto"` on a model served in process.

With "auto" the model chooses between answering and calling, so its text is generated freely and read
afterwards in the call format its family was trained on. The model's settings name that format
(`tool_call_parser`), as vLLM's `--tool-call-parser` does:

- `hermes` (Hermes 2 Pro and 3, Qwen 2.5 and 3, ...): `<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>`, once a call, after any text (the text is the message's content);
- `llama3_json` (Llama 3.1-3.3): the whole answer is one call `{"name": ..., "parameters": {...}}` (or
  several separated by `;`), after `<|python_tag|>` where the decoder kept it;
- `mistral` (Mistral 7B v0.3, Nemo, Small): `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}`
  (the marker is a special token a decoder may leave out: then the answer is the list itself).

A text that does not parse whole as calls to the request's functions is the answer's content, as it
came: nothing is dropped or half-taken.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

ToolCallParser = Literal["hermes", "llama3_json", "mistral"]
PARSERS: tuple[ToolCallParser, ...] = ("hermes", "llama3_json", "mistral")

_HERMES_START = "<tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"
_MISTRAL_START = "[TOOL_CALLS]"
_SPACE = re.compile(r"\s*")
_HEAD_CHARS = 16  # of an answer's start, after white space: enough to tell a marker or a call's start


@dataclass(frozen=True)
class Parsed:
    """A text read as calls: the content before them (None where there is none) and the calls, each
    as OpenAI's API gives them (`id`, `type` "function", `function` with `name` and `arguments`, JSON
    text)."""

    content: str | None
    calls: list[dict[str, Any]]


def parse(parser: ToolCallParser, text: str, functions: Collection[str]) -> Parsed | None:
    """The calls `text` makes in `parser`'s format, to functions among `functions`; None where it is
    not calls, or not only calls where the format puts them last."""
    if parser == "hermes":
        return _hermes(text, functions)
    if parser == "llama3_json":
        return _llama3_json(text, functions)
    return _mistral(text, functions)


def hold_from(parser: ToolCallParser, text: str, since: int = 0) -> int | None:
    """Where a stream's text so far must be held back from (calls start there, or may yet: its end may
    be the start of the marker, or, where calls are the whole answer, nothing but white space has come);
    None where all of it is content. `since`: the characters already sent as content (no call starts
    among them), so that each piece is looked at once, not the whole text again. The answer's whole
    text is `parse`d once it has ended."""
    if parser == "hermes":
        return _marker_start(text, _HERMES_START, since)
    if since:  # content went out: the answer's start was not calls
        return None if parser == "llama3_json" else _marker_start(text, _MISTRAL_START, since)
    at = _SPACE.match(text).end()  # type: ignore[union-attr]
    head = text[at : at + _HEAD_CHARS]
    if not head:
        return 0
    if parser == "llama3_json":
        return 0 if head.startswith("{") or _PYTHON_TAG.startswith(head[: len(_PYTHON_TAG)]) else None
    if head.startswith("[") and (
        head.startswith(_MISTRAL_START) or _MISTRAL_START.startswith(head) or re.match(r"\[\s*(\{|\Z)", head)
    ):
        return 0  # the marker, or a list of calls that a decoder left it out of
    return _marker_start(text, _MISTRAL_START, since)


def _marker_start(text: str, marker: str, since: int) -> int | None:
    """Where `marker` starts in `text` (not before `since`), or where a start of it ends `text`; else
    None."""
    at = text.find(marker, since)
    if at >= 0:
        return at
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return len(text) - k
    return None


def openai_call(name: str, arguments: Any) -> dict[str, Any]:
    """A call as OpenAI's API gives it: a new `id`, `type` "function", the arguments as JSON text."""
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


def _call(name: Any, arguments: Any, functions: Collection[str]) -> dict[str, Any] | None:
    if isinstance(arguments, str):  # some models write the arguments as JSON text, as OpenAI sends them
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(name, str) or name not in functions or not isinstance(arguments, dict):
        return None
    return openai_call(name, arguments)


def _object_call(value: Any, functions: Collection[str], *arg_keys: str) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    arguments = next((value[k] for k in arg_keys if k in value), {})
    return _call(value.get("name"), arguments, functions)


def _hermes(text: str, functions: Collection[str]) -> Parsed | None:
    start = text.find(_HERMES_START)
    if start < 0:
        return None
    calls = []
    rest_at = start
    for m in _HERMES_CALL.finditer(text, start):
        if text[rest_at : m.start()].strip():  # text between calls: not calls only
            return None
        try:
            call = _object_call(json.loads(m.group(1)), functions, "arguments", "parameters")
        except ValueError:
            return None
        if call is None:
            return None
        calls.append(call)
        rest_at = m.end()
    if not calls or text[rest_at:].strip():
        return None
    content = text[:start].strip()
    return Parsed(content or None, calls)


def _llama3_json(text: str, functions: Collection[str]) -> Parsed | None:
    body = text.strip().removeprefix(_PYTHON_TAG).lstrip()
    if not body.startswith("{"):
        return None
    decoder = json.JSONDecoder()
    calls, at = [], 0
    while at < len(body):
        try:
            value, at = decoder.raw_decode(body, at)
        except ValueError:
            return None
        call = _object_call(value, functions, "parameters", "arguments")
        if call is None:
            return None
        calls.append(call)
        tail = body[at:].lstrip()
        if tail.startswith(";"):
            tail = tail[1:].lstrip()
        at = len(body) - len(tail)
    return Parsed(None, calls) if calls else None


def _mistral(text: str, functions: Collection[str]) -> Parsed | None:
    at = text.find(_MISTRAL_START)
    content, body = (text[:at].strip(), text[at + len(_MISTRAL_START) :]) if at >= 0 else ("", text)
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        return None
    calls = [_object_call(v, functions, "arguments", "parameters") for v in value]
    if any(c is None for c in calls):
        return None
    return Parsed(content or None, calls)  # type: ignore[arg-type]
