"""tool_choice "auto" on a model served in process: reading calls from a model's own text
(proxy/tool_calls.py), holding a stream's text back where calls may start (proxy/api.py's
`_AutoToolChunks`), and the whole path through a server with the `openai` client."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends import load_backend
from backends.base import BackendRequest, BackendResult, TextResult
from backends.tiny import ensure_model
from proxy.api import _AutoToolChunks
from proxy.config import ModelSettings
from proxy.tool_calls import PARSERS, ToolCallParser, hold_from, parse
from tests.conftest import BackendWrapper

FUNCTIONS = frozenset({"get_weather", "add"})


def _calls(parsed: Any) -> list[tuple[str, dict[str, Any]]]:
    assert parsed is not None
    for call in parsed.calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.calls]


def test_hermes_calls_after_text_and_one_a_block() -> None:
    text = (
        "Let me look.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>'
    )
    parsed = parse("hermes", text, FUNCTIONS)
    assert parsed is not None and parsed.content == "Let me look."
    assert _calls(parsed) == [("get_weather", {"city": "Oslo"}), ("add", {"a": 1, "b": 2})]
    # a model stopped at its end-of-turn token before the closing tag
    unclosed = parse("hermes", '<tool_call>{"name": "add", "arguments": {}}', FUNCTIONS)
    assert unclosed is not None and unclosed.content is None and _calls(unclosed) == [("add", {})]


def test_llama3_json_calls_are_the_whole_answer() -> None:
    one = parse("llama3_json", ' {"name": "get_weather", "parameters": {"city": "Oslo"}}', FUNCTIONS)
    assert one is not None and one.content is None
    assert _calls(one) == [("get_weather", {"city": "Oslo"})]
    two = '<|python_tag|>{"name": "add", "parameters": {"a": 1}}; {"name": "add", "parameters": {"a": 2}}'
    assert _calls(parse("llama3_json", two, FUNCTIONS)) == [("add", {"a": 1}), ("add", {"a": 2})]


def test_mistral_calls_with_or_without_their_marker() -> None:
    marked = parse("mistral", 'Sure. [TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}]', FUNCTIONS)
    assert marked is not None and marked.content == "Sure." and _calls(marked) == [("add", {"a": 1})]
    bare = parse("mistral", '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]', FUNCTIONS)
    assert bare is not None and _calls(bare) == [("get_weather", {"city": "Oslo"})]


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        ("hermes", "The weather is fine."),
        ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Os'),  # cut short
        ("hermes", '<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>'),  # not offered
        ("hermes", '<tool_call>{"name": "add", "arguments": [1]}</tool_call>'),  # not an object
        ("hermes", '<tool_call>{"name": "add", "arguments": {}}</tool_call> and then some text'),
        ("hermes", '<tool_call>{"name": "add"}</tool_call> mid <tool_call>{"name": "add"}</tool_call>'),
        ("llama3_json", 'I would call {"name": "add", "parameters": {}}'),
        ("llama3_json", '{"name": "add", "parameters": {}} and more'),
        ("llama3_json", '{"city": "Oslo"}'),  # JSON, not a call
        ("mistral", "[1, 2, 3]"),
        ("mistral", "[TOOL_CALLS] not json"),
        ("mistral", "[]"),
    ],
)
def test_text_that_is_not_only_calls_stays_text(parser: ToolCallParser, text: str) -> None:
    assert parse(parser, text, FUNCTIONS) is None


def test_where_a_stream_holds_its_text_back() -> None:
    assert hold_from("hermes", "It is") is None
    assert hold_from("hermes", "It is <tool") == 6  # may be the marker's start
    assert hold_from("hermes", "It is <b>") is None
    assert hold_from("hermes", "Ok <tool_call>{") == 3
    assert hold_from("llama3_json", "  ") == 0  # not known yet
    assert hold_from("llama3_json", ' {"na') == 0
    assert hold_from("llama3_json", "<|pyth") == 0
    assert hold_from("llama3_json", "Hello") is None
    assert hold_from("mistral", "[TOOL") == 0
    assert hold_from("mistral", "[ {") == 0
    assert hold_from("mistral", "[1, 2]") is None
    assert hold_from("mistral", "Hi [TOOL_") == 3


def _stream(parser: ToolCallParser, pieces: Sequence[str], reason: str = "stop") -> tuple[str, Any]:
    chunks = _AutoToolChunks("rid", "m", 1, parser=parser, functions=FUNCTIONS)
    content = ""
    for piece in pieces:
        data = chunks.piece(0, piece)
        if data:
            delta = json.loads(data)["choices"][0]["delta"]
            assert set(delta) == {"content"}
            content += delta["content"]
    last = chunks.finish(0, reason).choices[0]
    return content, last


def _split(text: str, cuts: list[int]) -> list[str]:
    at = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(at)]


_TEXTS = [
    "Plain words <b> and [brackets] with { braces }.",
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
    '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>',
    '<tool_call>{"name": "add", "arguments": {"a": 1',  # cut short: text
    ' {"name": "add", "parameters": {"a": 1}}',
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}',
    '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}]',
    'Sure. [TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}]',
    '[{"name": "add", "arguments": {"a": 1}}]',
    "[TOOL_CALLS are not] a thing here <tool_call",
]


@given(
    text=st.sampled_from(_TEXTS) | st.text(alphabet='ab<>[]{}|_ "TOOLCALS:', max_size=30),
    parser=st.sampled_from(PARSERS),
    cuts=st.lists(st.integers(0, 120), max_size=12),
    reason=st.sampled_from(["stop", "stop", "length"]),
)
def test_a_stream_gives_what_the_plain_answer_gives(
    text: str, parser: ToolCallParser, cuts: list[int], reason: str
) -> None:
    """However the text comes in pieces: where it is calls, the content sent is the text before them
    and the last chunk carries the same calls; where not, the content sent is the whole text."""
    content, last = _stream(parser, _split(text, cuts), reason)
    parsed = parse(parser, text, FUNCTIONS) if reason == "stop" else None
    if parsed is None:
        assert content + (last.delta.content or "") == text
        assert last.finish_reason == reason and last.delta.tool_calls is None
    else:
        assert last.finish_reason == "tool_calls" and last.delta.content is None
        assert (parsed.content or "") == content.strip()
        sent = [(c.function.name, json.loads(c.function.arguments)) for c in last.delta.tool_calls]
        assert sent == _calls(parsed)
        assert [c.index for c in last.delta.tool_calls] == list(range(len(sent)))


# --- through a server -----------------------------------------------------------------------------

_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


class _Scripted(BackendWrapper):
    """Test-only: the real tiny-gpt2 runs each batch, then each member's text is replaced by `script`
    (a model trained to call tools cannot be built offline: the tiny one has random weights)."""

    script: str | None = None

    def run(self, batch: Sequence[BackendRequest]) -> list[BackendResult]:
        results = self.inner.run(batch)
        if self.script is None:
            return results
        return [
            replace(r, text=self.script, finish_reason="stop") for r in results if isinstance(r, TextResult)
        ]


def test_auto_through_a_server(make_server, model_cache: Path) -> None:  # type: ignore[no-untyped-def]
    """A model whose settings name its call format answers tools without tool_choice ("auto", as in
    OpenAI's API): with a call where its text is one, with its text otherwise, in a stream as in a plain
    answer; without a format, "auto" stays a 400."""
    path = ensure_model("tiny-gpt2", model_cache / "models")
    scripted = _Scripted(load_backend("text", "tiny-gpt2", path))
    model = ModelSettings(name="tiny-gpt2", task="text", source="tiny:tiny-gpt2", tool_call_parser="hermes")
    server = make_server(models=[model], app_kwargs={"backends": {"tiny-gpt2": scripted}})
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    chat: dict[str, Any] = {
        "model": "tiny-gpt2",
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "max_tokens": 12,
        "temperature": 0,
        "tools": [_WEATHER],
    }

    text = c.chat.completions.create(**chat).choices[0]  # the random model's own words
    assert text.finish_reason in ("stop", "length") and text.message.tool_calls is None
    streamed = [ch.choices[0] for ch in c.chat.completions.create(**chat, stream=True) if ch.choices]
    assert "".join(ch.delta.content or "" for ch in streamed) == text.message.content
    assert streamed[-1].finish_reason == text.finish_reason

    scripted.script = (
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    answer = c.chat.completions.create(**chat, tool_choice="auto")
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
    assert answer.usage.energy["joules"] > 0  # type: ignore[attr-defined]
    # a call to a function that was not offered is text
    scripted.script = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    odd = c.chat.completions.create(**chat).choices[0]
    assert (
        odd.finish_reason == "stop" and odd.message.content == scripted.script and not odd.message.tool_calls
    )

    plain = make_server()  # tiny-gpt2 without a tool_call_parser
    with pytest.raises(openai.BadRequestError) as refused:
        openai.OpenAI(
            base_url=plain.base_url + "/v1", api_key="unused", max_retries=0
        ).chat.completions.create(**chat)
    assert refused.value.body["param"] == "tool_choice"  # type: ignore[index]
    assert "tool_call_parser" in refused.value.body["message"]  # type: ignore[index]
