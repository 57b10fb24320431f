"""The request path's shortcuts give exactly what the straightforward code they replace gives: answer
bytes and headers built without pydantic models, the body's text check without a second json.dumps,
request ids without uuid.UUID, the ledger's day without a datetime per record."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import math
import os
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from backends.base import TextRequest, TextResult, TokenLogprob
from proxy.api import (
    _ChatChunks,
    _CompletionChunks,
    _energy_fields,
    _json,
    _json_answer,
    _text_usage,
    chat_completion_json,
    completion_json,
    energy_headers,
    energy_usage,
    parse_body,
)
from proxy.app import new_request_id
from proxy.carbon import CarbonCharge
from proxy.energy.monitor import Charge
from proxy.errors import InvalidRequest
from proxy.ledger import _day, _utc
from proxy.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatLogprobs,
    ChatMessageOut,
    ChunkChoice,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    TokenLogprobOut,
    TopLogprob,
)
from proxy.scheduler import Outcome, RequestTag

REQUEST = TextRequest(prompt="hi", max_tokens=4)

# Values a charge can hold: floats of every kind (and the ints and bools a float field turns into floats)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1.29e-07, 0.1 + 0.2, 1e16, 123456789.125]),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.booleans(),
)
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
# a generated token's log probabilities, as a backend reports them (finite, at most 0; the floor -9999)
logprob_values = st.floats(min_value=-9999.0, max_value=0.0) | st.sampled_from([0.0, -0.0, -9999.0, -1e-300])
token_logprobs = st.builds(
    TokenLogprob,
    token=texts,
    logprob=logprob_values,
    top=st.lists(st.tuples(texts, logprob_values), max_size=3).map(tuple),
)


@st.composite
def outcomes(draw: st.DrawFn) -> list[Outcome]:
    members = []
    for i in range(draw(st.integers(min_value=1, max_value=3))):
        carbon = draw(
            st.none()
            | st.builds(
                CarbonCharge,
                co2_grams=numbers,
                operational_co2_grams=numbers,
                embodied_co2_grams=numbers,
                intensity_g_per_kwh=numbers,
                pue=numbers,
                zone=texts,
                source=texts,
            )
        )
        charge = Charge(
            joules=draw(numbers),
            idle_joules=draw(numbers),
            uncertainty_joules=draw(numbers),
            measurement=draw(st.sampled_from(["measured", "estimated", "synthetic", "unavailable"])),
            device=draw(st.sampled_from(["cpu", "cuda:0"])),
            start_s=0.0,
            end_s=1.0,
            device_seconds=1.0,
        )
        result = TextResult(
            text=draw(texts),
            prompt_tokens=draw(st.integers(min_value=0, max_value=10**6)),
            completion_tokens=draw(st.integers(min_value=0, max_value=10**6)),
            finish_reason=draw(st.sampled_from(["stop", "length"])),
            work_units=1.0,
            logprobs=draw(st.none() | st.lists(token_logprobs, max_size=4).map(tuple)),
        )
        tag = RequestTag(request_id=f"r{i}", model="m", task="text", user="u", carbon=carbon)
        members.append(Outcome(tag, REQUEST, result, None, charge, "ok", 0.0, 0.0, 1, 0.0))
    return members


def _same_json(a: bytes, b: bytes) -> None:
    assert a == b, (a, b)


@settings(max_examples=300, deadline=None)
@given(outcomes(), texts)
def test_chat_and_completion_answers_are_the_bytes_of_their_models(members: list[Outcome], rid: str) -> None:
    energy = _energy_fields(members)
    usage = _text_usage(members)
    results = [o.result for o in members]
    assert all(isinstance(r, TextResult) for r in results)

    chat = chat_completion_json(rid, "model-é", members, energy)
    model = ChatCompletion(
        id=f"chatcmpl-{rid}",
        created=chat["created"],
        model="model-é",
        choices=[
            ChatChoice(
                index=i,
                message=ChatMessageOut(content=r.text),  # type: ignore[union-attr]
                finish_reason=r.finish_reason,  # type: ignore[union-attr]
                logprobs=None
                if r.logprobs is None  # type: ignore[union-attr]
                else ChatLogprobs(
                    content=[
                        TokenLogprobOut(
                            token=t.token,
                            logprob=t.logprob,
                            bytes=list(t.token.encode()),
                            top_logprobs=[
                                TopLogprob(token=x, logprob=v, bytes=list(x.encode())) for x, v in t.top
                            ],
                        )
                        for t in r.logprobs  # type: ignore[union-attr]
                    ]
                ),
            )
            for i, r in enumerate(results)
        ],
        usage=usage,
    )
    _same_answer(chat, model, energy, rid)

    completion = completion_json(rid, "m", members, energy)
    model_c = Completion(
        id=f"cmpl-{rid}",
        created=completion["created"],
        model="m",
        choices=[
            CompletionChoice(
                index=i,
                text=r.text,  # type: ignore[union-attr]
                finish_reason=r.finish_reason,  # type: ignore[union-attr]
                logprobs=None
                if r.logprobs is None  # type: ignore[union-attr]
                else CompletionLogprobs(
                    tokens=[t.token for t in r.logprobs],  # type: ignore[union-attr]
                    token_logprobs=[t.logprob for t in r.logprobs],  # type: ignore[union-attr]
                    top_logprobs=[dict(t.top) for t in r.logprobs],  # type: ignore[union-attr]
                    text_offset=list(itertools.accumulate((len(t.token) for t in r.logprobs), initial=0))[
                        :-1
                    ],  # type: ignore[union-attr]
                ),
            )
            for i, r in enumerate(results)
        ],
        usage=usage,
    )
    _same_answer(completion, model_c, energy, rid)


def _same_answer(body: dict[str, Any], model: Any, energy: dict[str, Any], rid: str) -> None:
    """`_json_answer` of the dict answers what `_json` of the model did: body bytes and headers."""
    assert model.usage.energy is not None
    before = _json(model, headers=energy_headers(model.usage.energy, rid))
    after = _json_answer(body, energy_headers(energy, rid))
    _same_json(after.body, before.body)  # type: ignore[arg-type]
    assert list(after.headers.items()) == list(before.headers.items())
    assert after.status == before.status and after.content_type == before.content_type


@settings(max_examples=200, deadline=None)
@given(outcomes())
def test_energy_headers_of_the_fields_are_those_of_the_model(members: list[Outcome]) -> None:
    fields = _energy_fields(members)
    assert energy_headers(fields, "rid") == energy_headers(energy_usage(members), "rid")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0.001, max_value=1e4),  # joules
            st.sampled_from([56.0, 381.0, 475.0]),  # intensity, g/kWh
            st.floats(min_value=0.0, max_value=1.0),  # embodied g
        ),
        min_size=2,
        max_size=4,
    )
)
def test_an_answers_carbon_figures_agree_when_its_members_ran_under_different_intensities(
    members: list[tuple[float, float, float]],
) -> None:
    """co2 = kWh x intensity x PUE + embodied holds for the answer as a whole: with members charged at
    different intensities, the answer gives their energy-weighted intensity and names every source."""
    pue = 1.2
    outcomes = []
    for i, (joules, intensity, embodied) in enumerate(members):
        operational = joules / 3.6e6 * intensity * pue
        carbon = CarbonCharge(
            operational + embodied, operational, embodied, intensity, pue, "Z", f"csv:{intensity:g}"
        )
        charge = Charge(joules, 0.0, 0.0, "synthetic", "cpu", 0.0, 1.0, 1.0)
        tag = RequestTag(request_id=f"r{i}", model="m", task="text", user="u", carbon=carbon)
        result = TextResult("x", 1, 1, "stop", 1.0)
        outcomes.append(Outcome(tag, REQUEST, result, None, charge, "ok", 0.0, 0.0, 1, 0.0))
    e = _energy_fields(outcomes)
    operational = e["kwh"] * e["carbon_intensity_g_per_kwh"] * e["pue"]
    # the identity as a sum (co2 less embodied would cancel: embodied can be 1e7 times the operational)
    assert math.isclose(e["co2_grams"], operational + (e["embodied_co2_grams"] or 0.0), rel_tol=1e-9)
    embodied = sum(m[2] for m in members)
    assert math.isclose(operational, sum(j / 3.6e6 * i * pue for j, i, _ in members), rel_tol=1e-9)
    assert math.isclose(e["embodied_co2_grams"] or 0.0, embodied, rel_tol=1e-9, abs_tol=1e-300)
    assert set(e["carbon_source"].split(" + ")) == {f"csv:{m[1]:g}" for m in members}


# -- the body's text check: one json.loads, the full re-encoding only where a surrogate may hide --------


def _reference_parse(raw: bytes) -> Any:
    """The straightforward check: parse, then re-encode everything (which a lone surrogate fails)."""
    if not raw:
        raise InvalidRequest("request body is empty; send a JSON object", code="invalid_json")
    try:
        data = json.loads(raw)
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeError as e:
        raise InvalidRequest("request body is not valid UTF-8 text", code="invalid_json") from e
    except json.JSONDecodeError:
        raise
    except RecursionError as e:
        raise InvalidRequest("request body is nested too deeply", code="invalid_json") from e
    except ValueError as e:
        raise InvalidRequest("request body has a number too long to read", code="invalid_json") from e
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    return data


def _verdict(parse: Any, raw: bytes) -> tuple[str, Any]:
    try:
        data = parse(raw)
    except InvalidRequest as e:
        return "invalid", (e.message, e.code)
    except ValueError as e:  # json.JSONDecodeError; also int digit limits
        return type(e).__name__, str(e)
    except RecursionError:
        return "recursion", None
    return "ok", json.dumps(data, sort_keys=True, default=repr, allow_nan=True)


# Bodies that have hurt: surrogate escapes (lone, paired, reversed, upper case, an escaped backslash
# before "ud800"), UTF-8-encoded surrogates, bad UTF-8, BOMs, UTF-16 and UTF-32 (whose escapes hide
# between NULs), non-ASCII text, NaN.
SAMPLES = [
    b'{"a": "\\ud800"}',
    b'{"a": "\\uD800"}',
    b'{"a": "\\udfff x"}',
    b'{"a": "\\ud83d\\ude00"}',
    b'{"a": "\\ude00\\ud83d"}',
    b'{"a": "\\\\ud800"}',
    b'{"\\ud800": 1}',
    b'{"a": "\xed\xa0\x80"}',
    b'{"a": "\xff"}',
    b'{"a": "\xc3"}',
    b"\xef\xbb\xbf" + b'{"a": "x"}',
    b"\xef\xbb\xbf\xef\xbb\xbf" + b'{"a": "x"}',
    '{"a": "é ✓ 😀"}'.encode(),
    '{"a": "\\ud800"}'.encode("utf-16-le"),
    '{"a": "\\ud800"}'.encode("utf-16"),
    '{"a": "\\ud800"}'.encode("utf-32-be"),
    '{"a": "é"}'.encode("utf-16-be"),
    '{"a": "\ud800"}'.encode("utf-16-le", "surrogatepass"),
    b'{"a": NaN, "b": -Infinity}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a": ' + b"7" * 5000 + b"}",
    b'{"a": "x\x00"}',
    b'["not", "an", "object"]',
    b"{",
    b"   ",
    b"",
    b'{"model": "m", "messages": [{"role": "user", "content": "How much energy?"}], "max_tokens": 16}',
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """JSON objects, with text of any code point (lone surrogates included) escaped or not, in any of
    JSON's encodings, sometimes cut or spliced with stray bytes."""
    value = {draw(st.text(max_size=5)): draw(json_values) for _ in range(draw(st.integers(0, 3)))}
    value["s"] = draw(st.text(st.characters(), max_size=10))  # "Cs": lone surrogates too
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16-le", "utf-16-be", "utf-32-le"]))
    raw = text.encode(encoding, "surrogatepass")
    if draw(st.booleans()):
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(max_size=4)) + raw[at + draw(st.integers(0, 2)) :]
    return raw


@pytest.mark.parametrize("raw", SAMPLES)
def test_the_body_check_answers_as_the_full_check_on_known_bodies(raw: bytes) -> None:
    assert _verdict(parse_body, raw) == _verdict(_reference_parse, raw)


@settings(max_examples=1000, deadline=None)
@given(bodies())
@example(b'{"s": "\\ud800"}')
def test_the_body_check_answers_as_the_full_check(raw: bytes) -> None:
    assert _verdict(parse_body, raw) == _verdict(_reference_parse, raw)


# -- request ids and the ledger's day -------------------------------------------------------------------


def test_request_ids_are_uuid7_hex_in_time_order() -> None:
    before_ms = time.time_ns() // 1_000_000
    made = [new_request_id() for _ in range(10_000)]
    after_ms = time.time_ns() // 1_000_000
    assert len(set(made)) == 10_000
    for rid in made:
        u = uuid.UUID(hex=rid)
        assert u.hex == rid and len(rid) == 32 and u.version == 7 and u.variant == uuid.RFC_4122
        assert before_ms <= u.int >> 80 <= after_ms  # 48 bits of Unix time in ms
    # one thread's ids come in time order, to the 12 bits of the millisecond's fraction
    stamps = [int(rid[:15], 16) for rid in made]  # 48 bits of ms, the version digit, 12 bits of fraction
    assert stamps == sorted(stamps)
    # the 62 random bits: across many ids each of them takes both values
    mask = (1 << 62) - 1
    ored, anded = 0, mask
    for rid in made:
        ored, anded = ored | (int(rid, 16) & mask), anded & int(rid, 16)
    assert ored == mask and anded & mask == 0


def test_request_ids_are_unique_across_threads_and_forks() -> None:
    """Ids are drawn 256 at a time into a shared deque: threads that take them together (refilling it
    together) get no id twice, and a forked child draws its own rather than the parent's spares."""
    new_request_id()  # spares are left in the parent
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(lambda _: [new_request_id() for _ in range(2_000)], range(8)))
    taken = [rid for batch in batches for rid in batch]
    assert len(set(taken)) == len(taken) == 16_000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent, then out without cleanup
        os.write(write, "".join(new_request_id() for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as f:
        child = f.read().decode()
    child_ids = {child[i : i + 32] for i in range(0, 128, 32)}
    parent_ids = {new_request_id() for _ in range(4)}
    assert len(child_ids) == 4 and not child_ids & parent_ids


day_edges = st.integers(min_value=-3000, max_value=60_000).flatmap(
    lambda d: st.sampled_from([-1e-3, -1e-6, -5e-7, -4e-7, 0.0, 4e-7, 5e-7, 1e-6, 1e-3]).map(
        lambda o: d * 86_400 + o
    )
)


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.floats(min_value=-1e10, max_value=4e9) | day_edges, min_size=1, max_size=20))
def test_the_ledger_day_is_the_utc_date(times: list[float]) -> None:
    for t in [*times, *sorted(times)]:  # in any order, then day by day
        assert _day(t) == _utc(t).strftime("%Y-%m-%d"), t


def test_the_ledger_day_of_now() -> None:
    now = datetime.now(timezone.utc)
    assert _day(now.timestamp()) == now.strftime("%Y-%m-%d")
    assert math.isfinite(now.timestamp())


@settings(max_examples=100, deadline=None)
@given(outcomes(), st.sampled_from(["upstream", "estimate"]))
def test_proxy_mode_energy_fields_are_the_model_dump(members: list[Outcome], source: str) -> None:
    """Proxy mode answers `{**_energy_fields(...), "usage_source": ...}` for EnergyUsage's model_dump."""
    model = energy_usage(members[:1]).model_copy(update={"usage_source": source})
    fields = {**_energy_fields(members[:1]), "usage_source": source}
    assert list(fields) == list(model.model_dump())
    assert _same_values(fields, model.model_dump())
    present = {k: v for k, v in fields.items() if v is not None}
    assert list(present) == list(model.model_dump(exclude_none=True))
    assert _same_values(present, model.model_dump(exclude_none=True))  # NaN != NaN: compare by value


def _same_values(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal, NaN included (NaN != NaN)."""
    return all(
        (x != x and y != y) or (x == y and type(x) is type(y))
        for x, y in zip(a.values(), b.values(), strict=True)
    )


# Any JSON value (integers of any size, NaN and the infinities included)
any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(any_json)
def test_proxy_answers_read_back_as_what_was_written(obj: object) -> None:
    """orjson writes the proxy's answers; json writes what orjson refuses (integers past 64 bits) or
    would change (NaN and Infinity, from an upstream whose answer has them)."""
    from proxy.upstream import _dumps

    source = json.dumps(obj).encode()
    # compared as json writes them: NaN is not equal to itself
    assert json.dumps(json.loads(_dumps(json.loads(source), source))) == json.dumps(json.loads(source))


# --- proxy mode's streams: events read in whatever pieces they arrive, inspected with orjson -----------

sse_text = st.binary(max_size=12).filter(lambda b: b"\n" not in b and b"\r" not in b)


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A server-sent-events answer as upstreams write it, and the data of its events."""
    newline = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    out, events = b"", []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            out += b": keep-alive" + newline  # a comment
        if draw(st.booleans()):
            out += b"event: message" + newline  # a field other than data
        lines = draw(st.lists(sse_text, min_size=1, max_size=3))
        values = []
        for line in lines:
            spaced = draw(st.booleans())  # "data: x" or "data:x"; one space after the colon is dropped
            out += (b"data: " if spaced else b"data:") + line + newline
            values.append(line if spaced or not line.startswith(b" ") else line[1:])
        out += newline
        events.append(b"\n".join(values))  # dispatched even when empty (the SSE rule)
    return out, events


@settings(max_examples=500, deadline=None)
@given(sse_streams(), st.lists(st.integers(0, 400), max_size=8))
def test_sse_events_are_the_same_however_the_answer_is_cut(
    stream: tuple[bytes, list[bytes]], cuts: list[int]
) -> None:
    """`SseParser` gives each event once, whole, in order, whatever pieces the bytes arrive in (cuts
    inside lines and inside a CRLF included); an event re-sent with `sse_frame` reads back the same."""
    from backends.openai_upstream import SseParser
    from proxy.errors import sse_frame

    raw, expected = stream
    bounds = sorted({min(c, len(raw)) for c in cuts} | {0, len(raw)})
    parser = SseParser()
    got = [e for a, b in itertools.pairwise(bounds) for e in parser.feed(raw[a:b])] + parser.close()
    assert got == expected
    again = SseParser()
    assert again.feed(b"".join(sse_frame(e) for e in got)) + again.close() == got


def test_an_sse_line_past_the_limit_is_refused() -> None:
    from backends.openai_upstream import SseParser

    parser = SseParser(max_line_bytes=100)
    assert parser.feed(b"data: " + b"x" * 90) == []
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        parser.feed(b"x" * 20)
    cut = SseParser(max_line_bytes=100)  # the events completed before the long line come first
    assert cut.feed(b"data: a\n\ndata: " + b"x" * 200) == [b"a"]
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        cut.close()
    ending = SseParser()
    assert ending.feed(b"data: last") == [] and ending.close() == [b"last"]  # no blank line before the end


def _read_alike(got: object, want: object) -> bool:
    """Equal as JSON values, NaN equal to itself; an integer past 64 bits may be read as its float."""
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and got.keys() == want.keys()
            and all(_read_alike(got[k], v) for k, v in want.items())
        )
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_read_alike, got, want))
    if isinstance(want, float) and want != want:
        return isinstance(got, float) and got != got
    if isinstance(want, int) and not isinstance(want, bool) and abs(want) >= 2**63 and isinstance(got, float):
        return got == float(want)
    return type(got) is type(want) and got == want


@settings(max_examples=300, deadline=None)
@given(any_json)
@example(float("nan"))
@example({"big": 2**70, "nested": [-(2**64), "\ud800"]})
def test_stream_events_are_inspected_as_json_reads_them(obj: object) -> None:
    """orjson reads the events proxy mode only looks at; json reads what orjson refuses (NaN,
    Infinity, lone surrogates). Integers past 64 bits may come back as floats: such an event is never
    sent on from what was read (a held usage chunk is read again with json)."""
    from proxy.upstream import _inspect_event

    source = json.dumps(obj).encode()
    assert _read_alike(_inspect_event(source), json.loads(source))


def test_a_stream_event_that_is_not_json_inspects_as_none() -> None:
    from proxy.upstream import _inspect_event

    assert _inspect_event(b"<html>hello</html>") is None
    assert _inspect_event(b"\xff\xfe") is None


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(max_size=40),
    index=st.integers(0, 127),
    rid=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12),
    model=st.text(min_size=1, max_size=20),
)
@example(text='é"\\\n\x01 ☃ 𝄞 </script>', index=0, rid="x", model='tiny"gpt2')
def test_a_streamed_pieces_chunk_is_the_json_pydantic_writes(
    text: str, index: int, rid: str, model: str
) -> None:
    """A piece's chunk is put together from a template (the stream's hot path); the other chunks,
    and the reference here, are pydantic's."""
    chat = _ChatChunks(rid, model, 1)
    reference = chat._chunk([ChunkChoice(index=index, delta=ChunkDelta(content=text))])
    assert json.loads(chat.piece(index, text)) == reference.model_dump(mode="json", exclude_none=True)
    completion = _CompletionChunks(rid, model, 1)
    expected = completion._completion([CompletionChoice(index=index, text=text, finish_reason=None)])
    assert json.loads(completion.piece(index, text)) == expected
