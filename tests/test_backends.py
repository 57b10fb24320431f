"""The model runners on real tiny models, through the real from_pretrained and generate paths."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from backends import load_backend, tiny
from backends.base import Backend, ChatMessage, ImageRequest, ImageResult, TextPiece, TextRequest, TextResult
from backends.cuda_graphs import GraphedDenoiser, as_kwargs, call_inputs, replay_key
from backends.image_diffusers import DiffusersImageBackend, image_work_units
from backends.text_transformers import (
    FALLBACK_CHAT_TEMPLATE,
    TransformersTextBackend,
    _fast_encode,
    _Row,
    _RowPenalties,
)
from proxy.config import ModelSettings

BACKENDS_DIR = Path(__file__).resolve().parent.parent / "backends"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def text(cache_dir: Path) -> Iterator[TransformersTextBackend]:
    backend = TransformersTextBackend("tiny-gpt2", tiny.ensure_model("tiny-gpt2", cache_dir))
    backend.load()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def image(cache_dir: Path) -> Iterator[DiffusersImageBackend]:
    backend = DiffusersImageBackend("tiny-sd", tiny.ensure_model("tiny-sd", cache_dir))
    backend.load()
    yield backend
    backend.close()


def _text(backend: TransformersTextBackend, *requests: TextRequest) -> list[TextResult]:
    results = backend.run(requests)
    assert all(isinstance(result, TextResult) for result in results)
    return [result for result in results if isinstance(result, TextResult)]


def _images(backend: DiffusersImageBackend, *requests: ImageRequest) -> list[ImageResult]:
    """The backend's results, encoded as the server encodes them (after the job)."""
    results = backend.run(requests)
    assert all(isinstance(result, ImageResult) for result in results)
    images = [result for result in results if isinstance(result, ImageResult)]
    # the device's thread hands the images back decoded: no PNG is made inside the job
    assert all(not r.images_png and len(r.images) == r.count == r.encoded().count for r in images)
    return [r.encoded() for r in images]


# --- tiny: the builder ------------------------------------------------------------------------------


def test_cached_model_is_reused_not_rebuilt(cache_dir: Path) -> None:
    first = tiny.ensure_model("tiny-gpt2", cache_dir)
    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert tiny.ensure_model("tiny-gpt2", cache_dir) == first
    assert weights.stat().st_mtime_ns == stamp
    assert first == tiny.model_dir("tiny-gpt2", cache_dir)
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_builds_are_deterministic_and_concurrent_builders_agree(cache_dir: Path, tmp_path: Path) -> None:
    paths: list[Path] = []

    def build() -> None:
        paths.append(tiny.ensure_model("tiny-gpt2", tmp_path))

    builders = [threading.Thread(target=build) for _ in range(2)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join()
    assert paths[0] == paths[1]
    reference = tiny.ensure_model("tiny-gpt2", cache_dir)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (paths[0] / name).read_bytes() == (reference / name).read_bytes()


def test_unknown_preset_and_dtype_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        tiny.ensure_model("gpt5", tmp_path)
    with pytest.raises(ValueError, match="unknown dtype"):
        tiny.ensure_model("tiny-gpt2", tmp_path, dtype="float8")


# Published parameter counts of the real models (e.g. SD 1.5's UNet: 859.52 M): the configs are real.
@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("gpt2-medium", {"model": 354_823_168}),
        ("sd15", {"text_encoder": 123_060_480, "unet": 859_520_964, "vae": 83_653_863}),
        ("sd21", {"text_encoder": 340_387_840, "unet": 865_910_724, "vae": 83_653_863}),
        (
            "sdxl",
            {
                "text_encoder": 123_060_480,
                "text_encoder_2": 694_659_840,
                "unet": 2_567_463_684,
                "vae": 83_653_863,
            },
        ),
    ],
)
def test_full_size_configs_have_the_real_sizes(preset: str, expected: dict[str, int]) -> None:
    assert tiny.PRESETS[preset].full_size
    components = tiny.build_components(preset, device="meta")
    counts = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in components.items()
        if isinstance(module, torch.nn.Module)
    }
    assert counts == expected


def test_cli_builds_into_the_given_directory(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tiny.main(["build", "tiny-gpt2", "--out", str(cache_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(tiny.model_dir("tiny-gpt2", cache_dir))


# --- text -------------------------------------------------------------------------------------------


def test_text_backend_satisfies_the_protocol(text: TransformersTextBackend) -> None:
    assert isinstance(text, Backend)
    assert text.task == "text"
    assert text.max_context_tokens == 512
    text.synchronize()  # a no-op on CPU, but callable


def test_greedy_is_deterministic_alone_or_batched(text: TransformersTextBackend) -> None:
    request = TextRequest(prompt="The energy of a kilowatt hour", max_tokens=12, temperature=0)
    (alone,) = _text(text, request)
    (again,) = _text(text, request)
    batched, _ = _text(text, request, TextRequest(prompt="A cat", max_tokens=4, temperature=0))
    assert alone == again == batched
    assert alone.completion_tokens == 12 and alone.finish_reason == "length"
    assert alone.prompt_tokens == text.count_prompt_tokens(request)


def test_each_member_stops_at_its_own_max_tokens(text: TransformersTextBackend) -> None:
    short = TextRequest(prompt="Once upon a time", max_tokens=3, temperature=0)
    long = TextRequest(prompt="The meter counts millijoules", max_tokens=9, temperature=0)
    a, b = _text(text, short, long)
    assert (a.completion_tokens, b.completion_tokens) == (3, 9)
    assert (a.finish_reason, b.finish_reason) == ("length", "length")
    assert a.prompt_tokens == text.count_prompt_tokens(short)
    assert b.prompt_tokens == text.count_prompt_tokens(long)
    assert a.work_units == a.prompt_tokens + 3 and b.work_units == b.prompt_tokens + 9
    assert _text(text, short)[0] == a  # a short member is not changed by a longer batch-mate


def test_a_request_that_carries_its_token_ids_is_not_tokenized_again(text: TransformersTextBackend) -> None:
    chat = TextRequest(messages=(ChatMessage("user", "What is a joule?"),), max_tokens=6, temperature=0)
    ids = text.prompt_ids(chat)
    carried = replace(chat, prompt_ids=ids)
    assert len(ids) == text.count_prompt_tokens(chat) == text.count_prompt_tokens(carried)
    (plain,) = _text(text, chat)
    assert _text(text, carried) == [plain]
    # run() feeds the ids it is given: another prompt's text with these ids answers as this chat does
    other = replace(TextRequest(prompt="A cat", max_tokens=6, temperature=0), prompt_ids=ids)
    assert _text(text, other) == [plain]


def test_streamed_pieces_concatenate_to_the_text(text: TransformersTextBackend) -> None:
    pieces: tuple[list[str], list[str]] = ([], [])
    requests = [
        TextRequest(prompt="Hello", max_tokens=16, temperature=0.9, seed=3, on_text=pieces[0].append),
        TextRequest(prompt="Numbers: 0 1 2", max_tokens=7, temperature=0.9, seed=3, on_text=pieces[1].append),
    ]
    results = _text(text, *requests)
    for streamed, result in zip(pieces, results, strict=True):
        assert len(streamed) > 1 and all(streamed)
        assert "".join(streamed) == result.text
    assert [r.completion_tokens for r in results] == [16, 7]


class StepLog:
    """One consumer of several streamed members, with a `flush` of its own (backends.base.TextRequest):
    `steps` holds what arrived between flushes, (member, piece) pairs."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[int, str]]] = [[]]

    def member(self, index: int) -> _StepMember:
        return _StepMember(self, index)

    def flush(self) -> None:
        self.steps.append([])

    def text(self, index: int) -> str:
        return "".join(piece for step in self.steps for i, piece in step if i == index)


class _StepMember:
    def __init__(self, log: StepLog, index: int) -> None:
        self.log, self.index, self.flush = log, index, log.flush

    def __call__(self, piece: str) -> None:
        self.log.steps[-1].append((self.index, piece))


def check_step_log(log: StepLog, results: Sequence[TextResult], members: int) -> None:
    """Each member's pieces make its text; a flush came after every step that handed out pieces (no
    step holds two pieces of a member) and after the last piece; the pieces went out over many steps."""
    for i in range(members):
        assert log.text(i) == results[i].text
    for step in log.steps:
        assert len({i for i, _ in step}) == len(step)
    assert log.steps[-1] == []
    assert sum(1 for step in log.steps if step) > 2


def test_a_streaming_consumer_is_flushed_after_every_step(text: TransformersTextBackend) -> None:
    log = StepLog()
    requests = [
        TextRequest(prompt="Hello", max_tokens=12, temperature=0, on_text=log.member(0)),
        TextRequest(prompt="Numbers: 0 1 2", max_tokens=5, temperature=0, on_text=log.member(1)),
        TextRequest(prompt="Not streamed", max_tokens=8, temperature=0),
    ]
    results = _text(text, *requests)
    check_step_log(log, results, members=2)
    # one flush a step for the two members together, not one each: 12 steps, and at the end (from
    # `generate`'s call to the streamer's `end` and the backend's own)
    assert len(log.steps) - 1 <= 12 + 2


def test_stop_string_truncates_text_and_stream(text: TransformersTextBackend) -> None:
    request = TextRequest(prompt="The quick brown fox", max_tokens=24, temperature=0)
    (free,) = _text(text, request)
    stop = free.text[len(free.text) // 2 :][:3]
    pieces: list[str] = []
    streamed = TextRequest(
        prompt="The quick brown fox", max_tokens=24, temperature=0, stop=(stop,), on_text=pieces.append
    )
    (stopped,) = _text(text, streamed)
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]
    assert "".join(pieces) == stopped.text
    assert stopped.completion_tokens < 24


def test_seeded_sampling_is_reproducible(text: TransformersTextBackend) -> None:
    def sample(seed: int) -> str:
        return _text(text, TextRequest(prompt="Paris", max_tokens=20, temperature=1.0, seed=seed))[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_a_checkpoints_generation_defaults_do_not_change_what_a_request_asked_for(
    text: TransformersTextBackend, tmp_path: Path
) -> None:
    """An instruct checkpoint's generation_config.json (sampling on, temperature 0.6, top_p 0.9, a
    repetition penalty...) is not applied over a request's own parameters: transformers 4.50-4.57 took
    it for whatever equalled its global default (so temperature 0 sampled), 5.x for what was unset."""
    import shutil

    copy = tmp_path / "instruct-like"
    shutil.copytree(text.source, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    config.update(
        do_sample=True, temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.5, no_repeat_ngram_size=2
    )
    (copy / "generation_config.json").write_text(json.dumps(config))
    instruct = TransformersTextBackend("instruct-like", copy)
    instruct.load()
    try:
        for asked in (
            TextRequest(prompt="Once upon a time", max_tokens=24, temperature=0.0),
            TextRequest(prompt="Once upon a time", max_tokens=24, temperature=1.0, top_p=1.0, seed=3),
        ):
            assert _text(instruct, asked)[0].text == _text(text, asked)[0].text
    finally:
        instruct.close()


def test_a_logit_bias_may_name_only_tokens_the_model_has_a_logit_for(
    text: TransformersTextBackend, tmp_path: Path
) -> None:
    """A tokenizer that gained tokens its checkpoint's embeddings were not resized for knows ids past the
    logits: a bias naming one must be refused (400), not index past the scores and fail the batch."""
    import shutil

    from transformers import AutoTokenizer

    copy = tmp_path / "grown-tokenizer"
    shutil.copytree(text.source, copy)
    tokenizer = AutoTokenizer.from_pretrained(copy)
    logits = len(tokenizer)
    tokenizer.add_tokens(["<tool>", "</tool>"])
    tokenizer.save_pretrained(copy)
    grown = TransformersTextBackend("grown", copy)
    grown.load_tokenizer()
    assert grown.vocab_size == logits == text.vocab_size


def test_every_text_request_shares_one_batch_key(text: TransformersTextBackend) -> None:
    """Sampling parameters, seeds, limits and stops are each row's own: any text requests batch."""
    greedy = TextRequest(prompt="a", temperature=0, top_p=0.5, seed=1, max_tokens=3)
    sampled = TextRequest(prompt="a", temperature=0.7, top_p=0.9, seed=1)
    chat = TextRequest(messages=(ChatMessage("user", "b"),), temperature=1.3, top_p=1.0, seed=2, max_tokens=5)
    assert text.batch_key(greedy) == text.batch_key(sampled) == text.batch_key(chat)
    assert len(text.run([greedy, sampled, chat])) == 3


def test_a_seeded_request_samples_the_same_alone_or_in_any_batch(text: TransformersTextBackend) -> None:
    """As OpenAI's seed (and vLLM's generator a request): the same seeded request gives the same text
    whatever its batch-mates and its place among them; its choices are different samples."""
    mine = TextRequest(prompt="Once upon a time", max_tokens=16, temperature=0.8, top_p=0.9, seed=42)
    alone = _text(text, mine)[0].text
    others = [
        TextRequest(prompt="other", max_tokens=16, temperature=1.0, seed=1),
        TextRequest(prompt="Once upon a time", max_tokens=16, temperature=0.0),
        TextRequest(prompt="x y z", max_tokens=4, temperature=0.5),
    ]
    assert _text(text, *others, mine)[3].text == alone
    assert _text(text, mine, *others)[0].text == alone
    assert _text(text, others[0], mine, mine)[1:] == _text(text, mine, mine)  # two of it: the same twice
    choices = {_text(text, replace(mine, choice=c))[0].text for c in range(3)}
    assert len(choices) == 3


def test_rows_are_sampled_from_their_own_distribution() -> None:
    """The sampler draws a row's token with the probabilities its temperature and top_p give (over a
    four-token vocabulary, 4,000 seeded draws: deterministic)."""
    from backends.text_transformers import _RowSampler

    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    cases = [
        ((1.0, 1.0), probs),
        ((0.5, 1.0), probs**2 / (probs**2).sum()),  # temperature 0.5: p^2, renormalized
        ((1.0, 0.65), torch.tensor([0.0, 0.0, 3 / 7, 4 / 7])),  # the most likely tokens reaching 0.65
    ]
    draws = 4000
    for (temperature, top_p), expected in cases:
        requests = [
            TextRequest(prompt="x", temperature=temperature, top_p=top_p, seed=seed) for seed in range(draws)
        ]
        scores = probs.log().expand(draws, 4).clone()
        out = _RowSampler(requests)(torch.zeros((draws, 1), dtype=torch.long), scores)
        assert torch.isfinite(out).sum(dim=1).eq(1).all()  # one token left a row
        counts = torch.bincount(out.argmax(dim=1), minlength=4).float() / draws
        assert torch.allclose(counts, expected, atol=0.03), (temperature, top_p, counts)
    greedy = TextRequest(prompt="x", temperature=0.0)
    scores = probs.log().expand(2, 4).clone()
    out = _RowSampler([greedy, TextRequest(prompt="x", temperature=1.0, seed=0)])(torch.zeros((2, 1)), scores)
    assert torch.equal(out[0], scores[0])  # a greedy row is left as it was


_SPECIAL_OR_TEXT = st.one_of(
    st.text(max_size=40), st.sampled_from(["<|endoftext|>", " <|endoftext|> ", "\n\n", "  "])
)


@given(parts=st.lists(_SPECIAL_OR_TEXT, max_size=6), special=st.booleans())
@hyp_settings(max_examples=150, deadline=None)
def test_the_fast_count_gives_the_tokenizers_ids(
    text: TransformersTextBackend, parts: list[str], special: bool
) -> None:
    """Prompts are counted on the event loop through the Rust tokenizer's `encode_batch_fast`: the same
    ids as the tokenizer's own `__call__` (the worker's tokenizer, a separate instance, as reference)."""
    encode = text._counting_encode
    assert encode is not None  # the tiny model's tokenizer is a fast one: the fast path is the one in use
    prompt = "".join(parts)
    assert encode(prompt, special) == text._tokenizer(prompt, add_special_tokens=special)["input_ids"]
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", prompt))
    for request in (TextRequest(prompt=prompt, max_tokens=1), TextRequest(messages=messages, max_tokens=1)):
        assert list(text.prompt_ids(request)) == text._prompt_ids(request, text._tokenizer)


def test_the_fast_count_ignores_a_tokenizers_own_truncation(text: TransformersTextBackend) -> None:
    """A tokenizer.json may carry truncation or padding; `tokenizer(text)` clears them for one text,
    and so does the fast count, once: every token of a long prompt is counted."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text.source)
    tokenizer.backend_tokenizer.enable_truncation(max_length=4)
    tokenizer.backend_tokenizer.enable_padding(length=64)
    encode = _fast_encode(tokenizer)
    assert encode is not None
    prompt = "one two three four five six seven eight nine ten"
    assert encode(prompt, True) == tokenizer(prompt)["input_ids"] == text._tokenizer(prompt)["input_ids"]
    assert 4 < len(encode(prompt, True)) < 64  # neither truncated nor padded


def test_chat_without_a_template_uses_the_fallback(text: TransformersTextBackend) -> None:
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "What is a joule?"))
    request = TextRequest(messages=messages, max_tokens=5, temperature=0)
    tokenizer = text._tokenizer
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        chat_template=FALLBACK_CHAT_TEMPLATE,
        add_generation_prompt=True,
        tokenize=False,
    )
    assert rendered == "system: Be brief.\nuser: What is a joule?\nassistant:"
    (result,) = _text(text, request)
    assert result.prompt_tokens == len(tokenizer(rendered)["input_ids"]) == text.count_prompt_tokens(request)
    assert result.completion_tokens == 5


def test_too_long_for_the_context_is_an_error(text: TransformersTextBackend) -> None:
    with pytest.raises(ValueError, match="context of 512 tokens"):
        text.run([TextRequest(prompt="Hello", max_tokens=510, temperature=0)])
    with pytest.raises(ValueError, match="max_tokens"):
        text.run([TextRequest(prompt="Hello", max_tokens=0, temperature=0)])


def test_row_holds_back_split_characters_and_stops_at_eos(text: TransformersTextBackend) -> None:
    tokenizer = text._tokenizer
    pieces = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("é€!")
    ids = [tokenizer.convert_tokens_to_ids(byte) for piece, _ in pieces for byte in piece]  # a byte a token
    assert len(ids) == 6
    streamed: list[str] = []
    eos = frozenset({tokenizer.eos_token_id})
    row = _Row(TextRequest(prompt="x", max_tokens=50, on_text=streamed.append), tokenizer, eos)
    for token in ids:
        row.push(token)
    row.push(tokenizer.eos_token_id)
    row.push(ids[0])  # after EOS: ignored
    assert streamed == ["é", "€", "!"]
    assert (row.text, row.finish_reason, row.completion_tokens) == ("é€!", "stop", 7)


@given(
    picks=st.lists(st.integers(min_value=0, max_value=2**20), max_size=40),
    eos_at=st.none() | st.integers(min_value=0, max_value=40),
)
@hyp_settings(max_examples=300, deadline=None)
def test_a_row_decoded_at_its_end_reads_as_one_decoded_step_by_step(
    text: TransformersTextBackend, picks: list[int], eos_at: int | None
) -> None:
    """A row nobody streams and no stop string ends is decoded once, at its end: its text, reason and
    count are those of the step-by-step decoding a streamed row gets, whatever the tokens (a quarter
    of the tiny vocabulary is GPT-2's byte tokens, which cut multi-byte characters and make invalid
    UTF-8)."""
    tokenizer = text._tokenizer
    tokens = [pick % len(tokenizer) for pick in picks]
    if eos_at is not None:
        tokens.insert(eos_at, tokenizer.eos_token_id)
    eos = frozenset({tokenizer.eos_token_id})
    streamed: list[str] = []
    step_by_step = _Row(TextRequest(prompt="x", max_tokens=12, on_text=streamed.append), tokenizer, eos)
    at_end = _Row(TextRequest(prompt="x", max_tokens=12), tokenizer, eos)
    for token in tokens:
        step_by_step.push(token)
        at_end.push(token)
    step_by_step.finish_if_running()
    at_end.finish_if_running()
    assert at_end._at_end and not step_by_step._at_end
    assert (at_end.text, at_end.finish_reason, at_end.completion_tokens) == (
        step_by_step.text,
        step_by_step.finish_reason,
        step_by_step.completion_tokens,
    )
    assert "".join(streamed) == step_by_step.text


@given(
    picks=st.lists(st.integers(min_value=0, max_value=2**20), max_size=30),
    stop_at=st.none()
    | st.tuples(st.integers(min_value=0, max_value=60), st.integers(min_value=1, max_value=4)),
)
@hyp_settings(max_examples=300, deadline=None)
def test_a_streamed_rows_pieces_carry_its_tokens_log_probabilities_in_order(
    text: TransformersTextBackend, picks: list[int], stop_at: tuple[int, int] | None
) -> None:
    """With log probabilities asked, each streamed piece carries the tokens generated since the one
    before (TextPiece); what the pieces carried, then the rest of the result's, are the result's, in
    order, whatever the tokens (byte tokens cut characters, which are held back) and wherever a stop
    string cuts the text (its possible start is held back too). The result is the one the same row
    gets unstreamed, but for tokens a piece already gave out (kept: a stream cannot take them back)."""
    tokenizer = text._tokenizer
    tokens = [pick % len(tokenizer) for pick in picks if pick % len(tokenizer) != tokenizer.eos_token_id]
    eos = frozenset({tokenizer.eos_token_id})
    whole = tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    stop = () if stop_at is None else (whole[stop_at[0] : stop_at[0] + stop_at[1]] or "\x00",)
    token_text = text._token_text_of(tokenizer)
    pieces: list[Any] = []
    ask = TextRequest(prompt="x", max_tokens=len(tokens) + 1, stop=stop, logprobs=0)
    streamed = _Row(replace(ask, on_text=pieces.append), tokenizer, eos, token_text)
    plain = _Row(ask, tokenizer, eos, token_text)
    for i, token in enumerate(tokens):
        for row in (streamed, plain):
            row.push(token, (token, -float(i), [], []))
    for row in (streamed, plain):
        row.finish_if_running()
    assert all(isinstance(piece, TextPiece) for piece in pieces)
    assert "".join(piece.text for piece in pieces) == streamed.text == plain.text
    given = [t for piece in pieces for t in piece.logprobs]
    result = streamed.logprobs()
    assert list(result[: len(given)]) == given  # the pieces' first, in order, then the rest
    assert [-t.logprob for t in result] == list(range(len(result)))  # the tokens in the order they came
    assert result[: len(plain.logprobs())] == plain.logprobs()
    assert len(result) == max(len(plain.logprobs()), len(given))
    if not plain.cut:
        assert len(result) == len(tokens)  # every token, when no stop string cut the text


def test_rows_asking_for_a_json_schema_get_a_value_of_it_in_a_batch_with_free_rows(
    text: TransformersTextBackend,
) -> None:
    """One batch: greedy and sampled rows held to a JSON Schema (backends.structured), one to any
    object, and free rows. Each held row's text is a value of its schema (random weights: the enforcing
    alone makes it so); each free row's is what it is alone; the enforced rows' log probabilities are
    still the model's own (raw, before the enforcing)."""
    schema = json.dumps(
        {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
            "required": ["ok", "n"],
            "additionalProperties": False,
        }
    )
    free = TextRequest(prompt="The lighthouse", max_tokens=12, temperature=0)
    held = TextRequest(prompt="hello", max_tokens=48, temperature=0, json_schema=schema, logprobs=0)
    sampled = TextRequest(prompt="a fox", max_tokens=48, temperature=1.0, seed=3, json_schema=schema)
    obj = TextRequest(prompt="x", max_tokens=8, temperature=0, json_schema='{"type": "object"}')
    results = _text(text, free, held, sampled, obj, replace(free, prompt="Another one"))
    assert (
        results[0] == _text(text, free)[0]
        and results[4] == _text(text, replace(free, prompt="Another one"))[0]
    )
    for r in results[1:3]:
        value = json.loads(r.text)
        assert r.finish_reason == "stop" and type(value["ok"]) is bool and value["n"] in (1, 2, 3), r.text
    assert results[3].text.lstrip().startswith("{")
    assert results[1].logprobs is not None and all(
        t.logprob is not None and t.logprob <= 0 for t in results[1].logprobs
    )
    assert "".join(t.token for t in results[1].logprobs) == results[1].text


def test_the_vocabulary_is_indexed_for_structured_output_when_the_model_loads(
    text: TransformersTextBackend,
) -> None:
    """Not at the first structured request, whose batch would wait for it (0.2-0.5 s)."""
    from backends.structured import Grammars

    assert isinstance(text._formats, Grammars) and text._formats.vocab_size >= len(text._tokenizer)


def test_a_rows_format_follows_its_grammar_step_by_step(text: TransformersTextBackend) -> None:
    """RowFormats step by step on a left-padded batch: the held row takes only allowed tokens and its
    text is an object's start; the free row's scores pass unchanged, and so do the held row's once it
    is finished; a row whose schema no value satisfies may only end its text."""
    from backends.structured import Grammars, RowFormats

    tokenizer = text._tokenizer
    eos = tokenizer.eos_token_id
    grammars = Grammars(tokenizer, [eos])
    finished = [False, False, False]
    formats = RowFormats(['{"type": "object"}', None, '{"anyOf": []}'], grammars, 3, lambda i: finished[i])
    input_ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 4]])
    vocab = len(tokenizer)
    steps = 0
    while not finished[0] and steps < 30:
        scores = torch.randn(3, vocab)
        free, after = scores[1].clone(), scores[2].clone()
        out = formats(input_ids, scores)
        assert torch.equal(out[1], free)
        if finished[2]:
            assert torch.equal(out[2], after)
        else:  # nothing satisfies its schema: the end of text alone
            assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [eos]
            finished[2] = True
        allowed = torch.isfinite(out[0]).nonzero().flatten().tolist()
        assert 0 < len(allowed) < vocab
        token = int(out[0].argmax())
        finished[0] = token == eos
        input_ids = torch.cat([input_ids, torch.tensor([[token], [1], [eos]])], dim=1)
        steps += 1
    held = tokenizer.decode(input_ids[0, 3:].tolist(), skip_special_tokens=True)
    assert held.lstrip().startswith("{")
    if finished[0]:  # a whole object: the grammar took every token
        json.loads(held)
    finished[0] = True
    scores = torch.randn(3, vocab)
    assert torch.equal(formats(input_ids, scores.clone()), scores)  # every row finished or free


# --- images -----------------------------------------------------------------------------------------


def test_image_backend_satisfies_the_protocol(image: DiffusersImageBackend) -> None:
    assert isinstance(image, Backend)
    assert image.task == "image"
    assert image.default_size == (64, 64)


def test_one_call_serves_members_with_their_own_counts_and_seeds(image: DiffusersImageBackend) -> None:
    one = ImageRequest(prompt="a red fox in the snow", n=1, width=96, height=64, seed=5)
    two = ImageRequest(prompt="a lighthouse", n=2, width=96, height=64, seed=9, negative_prompt="blurry")
    a, b = _images(image, one, two)
    assert (a.seeds, b.seeds) == ((5,), (9, 10))
    for png in (*a.images_png, *b.images_png):
        picture = Image.open(io.BytesIO(png))
        assert picture.format == "PNG" and picture.size == (96, 64)
    assert len({*a.images_png, *b.images_png}) == 3
    assert a.work_units == 4 * 96 * 64 * 1 * 2 == image_work_units(one)
    assert b.work_units == 4 * 96 * 64 * 2 * 2


def test_encoded_makes_the_pngs_once() -> None:
    picture = Image.new("RGB", (8, 4), (200, 10, 10))
    decoded = ImageResult(images_png=(), seeds=(3, 4), work_units=1.0, images=(picture, picture))
    done = decoded.encoded()
    assert done.images == () and done.count == 2 and done.seeds == (3, 4) and done.work_units == 1.0
    assert [Image.open(io.BytesIO(png)).size for png in done.images_png] == [(8, 4), (8, 4)]
    assert done.encoded() is done  # nothing left to encode
    assert decoded.images == (picture, picture)  # frozen: the decoded result is unchanged


def test_same_seed_same_bytes_other_seed_other_bytes(image: DiffusersImageBackend) -> None:
    def png(seed: int | None) -> ImageResult:
        return _images(image, ImageRequest(prompt="a cat on books", seed=seed))[0]

    assert png(11).images_png == png(11).images_png
    assert png(11).images_png != png(12).images_png
    drawn = png(None)  # a drawn seed is reported, and reproduces the image
    assert png(drawn.seeds[0]).images_png == drawn.images_png


def test_work_units_without_guidance_are_not_doubled() -> None:
    request = ImageRequest(prompt="x", steps=10, width=64, height=128, n=3, guidance_scale=1.0)
    assert image_work_units(request) == 10 * 64 * 128 * 3


def test_image_batch_key_and_mixed_batches(image: DiffusersImageBackend) -> None:
    base = ImageRequest(prompt="a", width=64, height=64, steps=4, guidance_scale=7.5, seed=1, n=1)
    assert image.batch_key(base) == image.batch_key(ImageRequest(prompt="b", n=3, seed=None))
    assert image.batch_key(base) != image.batch_key(ImageRequest(prompt="a", steps=5))
    with pytest.raises(ValueError, match="batch key"):
        image.run([base, ImageRequest(prompt="a", width=128)])


def test_sdxl_layout_loads_and_generates(cache_dir: Path) -> None:
    backend = load_backend("image", "tiny-sdxl", tiny.ensure_model("tiny-sdxl", cache_dir))
    try:
        assert isinstance(backend, DiffusersImageBackend)
        (result,) = _images(backend, ImageRequest(prompt="a watercolour café", seed=1))
        assert Image.open(io.BytesIO(result.images_png[0])).size == (64, 64)
    finally:
        backend.close()


def _unet_call_keys(backend: DiffusersImageBackend, *requests: ImageRequest) -> list[set[object]]:
    """For each request run alone: the graphs its UNet calls would replay (`replay_key`)."""
    unet = backend._loaded().unet
    eager = unet.forward
    keys: list[object] = []

    def recording(sample, timestep, encoder_hidden_states=None, *args, **kwargs):
        keys.append(replay_key(sample, timestep, encoder_hidden_states, args, kwargs))
        out = eager(sample, timestep, encoder_hidden_states, *args, **kwargs)
        inputs = call_inputs(sample, timestep, encoder_hidden_states, args, kwargs)
        if inputs is not None:  # a graph is captured from the inputs put back as keywords: the same call
            again = eager(**as_kwargs({k: v.clone() for k, v in inputs.items()}), return_dict=False)
            assert torch.equal(again[0], out[0])
        return out

    unet.forward = recording
    found = []
    try:
        for request in requests:
            keys.clear()
            backend.run([request])
            found.append(set(keys))
    finally:
        del unet.forward
    return found


def test_sd_pipelines_call_their_unet_as_a_graph_replays_it(
    image: DiffusersImageBackend, cache_dir: Path
) -> None:
    """With cuda_graphs, a graph replays a UNet call whose inputs are tensors of known roles: the real
    pipelines' calls must all be such, with one shape per batch (a diffusers release that passed more
    would silently run eagerly)."""
    guided, plain = _unet_call_keys(
        image,
        ImageRequest(prompt="a boat", steps=3, seed=1, n=2),  # guidance 7.5: two copies of each image
        ImageRequest(prompt="a boat", steps=2, seed=1, guidance_scale=1.0),
    )
    assert None not in guided | plain
    assert len(guided) == len(plain) == 1  # every step's call has the same inputs' shapes
    names = {name: shape for name, _, shape, _ in next(iter(guided))}
    assert set(names) == {"sample", "timestep", "encoder_hidden_states"}
    assert names["sample"][0] == 4 and dict((n, s) for n, _, s, _ in next(iter(plain)))["sample"][0] == 1

    sdxl = load_backend("image", "tiny-sdxl", tiny.ensure_model("tiny-sdxl", cache_dir))
    try:
        assert isinstance(sdxl, DiffusersImageBackend)
        (keys,) = _unet_call_keys(sdxl, ImageRequest(prompt="a café", steps=2, seed=1))
    finally:
        sdxl.close()
    assert None not in keys and len(keys) == 1
    assert {name for name, *_ in next(iter(keys))} == {
        "sample",
        "timestep",
        "encoder_hidden_states",
        "added_cond_kwargs.text_embeds",
        "added_cond_kwargs.time_ids",
    }


def test_a_call_a_graph_cannot_replay_has_no_replay_key() -> None:
    sample, text = torch.zeros(2, 4, 8, 8), torch.zeros(2, 77, 32)
    t = torch.tensor(981)
    plain = {"return_dict": False, "timestep_cond": None, "cross_attention_kwargs": None}
    with torch.inference_mode():
        key = replay_key(sample, t, text, (), plain)
        assert key is not None
        assert replay_key(sample, t, text, (), {**plain, "cross_attention_kwargs": {}}) == key
        assert replay_key(sample, torch.tensor([1, 2]), text, (), plain) not in (None, key)  # one per row
        sdxl = {
            **plain,
            "added_cond_kwargs": {"text_embeds": torch.zeros(2, 8), "time_ids": torch.zeros(2, 6)},
        }
        assert replay_key(sample, t, text, (), sdxl) not in (None, key)
        assert replay_key(sample, t, text, (), {**plain, "timestep_cond": torch.zeros(2, 4)}) not in (
            None,
            key,
        )
        assert replay_key(torch.zeros(1, 4, 8, 8), t, text[:1], (), plain) != key  # another shape
        refused = [
            (t, (), {}),  # return_dict defaults to True
            (t, (), {**plain, "return_dict": True}),
            (t, (), {**plain, "cross_attention_kwargs": {"scale": 0.5}}),  # LoRA scale
            (t, (), {**plain, "mid_block_additional_residual": sample}),  # ControlNet
            (t, (), {**plain, "down_block_additional_residuals": (sample,)}),
            (t, (), {**plain, "added_cond_kwargs": {"text_embeds": text, "scale": 1.0}}),
            (t, (), {**plain, "timestep_cond": torch.zeros(2, 4, device="meta")}),  # another device
            (t, (), {**plain, "something_new": 1}),
            (t, (None,), plain),
            (981, (), plain),  # a Python number
            (torch.tensor([1, 2, 3]), (), plain),
        ]
        for timestep, args, kwargs in refused:
            assert replay_key(sample, timestep, text, args, kwargs) is None, (timestep, args, kwargs)
    assert replay_key(sample, t, text, (), plain) is None  # autograd on


def test_cuda_graphs_need_a_cuda_device_and_an_image_model(cache_dir: Path) -> None:
    source = tiny.ensure_model("tiny-sd", cache_dir)
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        DiffusersImageBackend("tiny-sd", source, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs is for image models"):
        load_backend("text", "tiny-gpt2", tiny.ensure_model("tiny-gpt2", cache_dir), cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA graphs need the denoiser on a CUDA device"):
        GraphedDenoiser(torch.nn.Linear(2, 2))
    base = {"name": "m", "task": "image", "source": "tiny:tiny-sd", "cuda_graphs": True}
    with pytest.raises(ValidationError, match="cuda_graphs needs a CUDA device, not 'cpu'"):
        ModelSettings.model_validate(base)
    with pytest.raises(ValidationError, match="cuda_graphs is for image models"):
        ModelSettings.model_validate({**base, "task": "text", "device": "cuda:0"})
    assert ModelSettings.model_validate({**base, "device": "cuda:1"}).cuda_graphs
    assert not ModelSettings.model_validate({**base, "cuda_graphs": False}).cuda_graphs


def test_backends_never_import_the_proxy() -> None:
    for source in BACKENDS_DIR.glob("*.py"):
        lines = source.read_text().splitlines()
        assert not [line for line in lines if line.startswith(("import proxy", "from proxy"))], source


def test_row_penalties_are_openais_arithmetic_row_by_row() -> None:
    """logits - frequency x count - presence x (count > 0) + bias, over the generated columns only."""
    rows = [
        TextRequest(prompt="a", presence_penalty=0.5, frequency_penalty=0.25),
        TextRequest(prompt="b", logit_bias=((1, 100.0), (4, -3.0))),
        TextRequest(prompt="c"),
    ]
    # prompts padded to 2 columns (token 3 there is not counted), then 3 generated tokens each
    input_ids = torch.tensor([[3, 3, 2, 2, 0], [3, 0, 1, 1, 1], [3, 3, 2, 4, 4]])
    scores = torch.arange(15, dtype=torch.float32).reshape(3, 5)
    out = _RowPenalties(rows, prompt_width=2)(input_ids, scores.clone())
    expected = scores.clone()
    expected[0, 2] -= 0.25 * 2 + 0.5  # generated twice
    expected[0, 0] -= 0.25 * 1 + 0.5  # once; token 3 only in the prompt: untouched
    expected[1, 1] += 100.0  # row 1: its bias only (no penalties asked)
    expected[1, 4] -= 3.0
    assert torch.equal(out, expected)
    # before any token is generated: the bias alone
    first = _RowPenalties(rows, prompt_width=2)(input_ids[:, :2], scores.clone())
    assert torch.equal(first - scores, torch.tensor([[0, 0, 0, 0, 0], [0, 100, 0, 0, -3], [0, 0, 0, 0, 0]]))
