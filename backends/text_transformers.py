"""Text generation with transformers: one `generate` call per batch, streamed per row.

Any text requests batch together: each row samples with its own temperature, top_p and generator
(its seed's: `_RowSampler`), its own penalties and bias (`_RowPenalties`); the prompts are padded
on the left, generation runs to the largest `max_tokens`, and each row stops on its own (EOS, a stop
string, its own `max_tokens`) through a per-row stopping criterion. Rows that stop early cost the
padding of the later steps, which is why `work_units` counts only each row's own tokens.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from packaging.version import Version
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from backends import release_device_memory, synchronize_device, torch_dtype
from backends.base import (
    BackendRequest,
    BackendResult,
    Task,
    TextPiece,
    TextRequest,
    TextResult,
    TokenLogprob,
    flush_all,
    flushes_of,
)

logger = logging.getLogger(__name__)

# For tokenizers without a chat template (base models such as GPT-2): one "role: content" line per
# message (an assistant's tool calls after its content, as JSON), the tools offered first where there
# are any, then "assistant:" for the model to continue.
FALLBACK_CHAT_TEMPLATE = (
    "{% if tools %}tools: {{ tools | tojson }}\n{% endif %}"
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}"
    # (a newline right after a block tag is dropped: transformers renders with trim_blocks)
    "{% if message['tool_calls'] %}{{ message['tool_calls'] | tojson }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# transformers 4.56 renamed `torch_dtype` to `dtype`; before it, an unknown `dtype` was ignored.
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
_REPLACEMENT_CHAR = "\ufffd"  # what decoding shows for a multi-byte character cut short


# Below this, logits / temperature overflow float32 (inf, then NaN probabilities): sample greedily.
GREEDY_BELOW = 1e-5
# A log probability of -inf (a token the model rules out) as OpenAI and vLLM report it: JSON has no -inf.
LOGPROB_FLOOR = -9999.0

# (token id, its log probability, the top ids and their log probabilities) of a row's token
_Entry = tuple[int, float, list[int], list[float]]


class _Row:
    """One batch member's output: incremental decoding, stop strings, limits, streaming.

    `text` only ever grows by what is handed to `on_text`, so the streamed pieces concatenate to
    the final text by construction. Text that might be the start of a stop string, or the first
    bytes of a multi-byte character, is held back until it is resolved.
    """

    def __init__(
        self,
        request: TextRequest,
        tokenizer: Any,
        eos_ids: frozenset[int],
        token_text: Callable[[int], str] | None = None,
    ) -> None:
        self.request = request
        # where asked (`TextRequest.logprobs`): an entry a generated token, EOS excluded; `token_text`
        # gives a token's text as its log probabilities show it
        self.entries: list[_Entry] | None = [] if request.logprobs is not None else None
        self._token_text = token_text
        self._logprobs: list[TokenLogprob] = []  # the entries made TokenLogprob so far, in order
        self._given = 0  # entries given out with streamed pieces (TextPiece)
        self.cut = False  # its text was cut at a stop string
        self.completion_tokens = 0  # generated tokens, EOS included
        self.finish_reason: Literal["stop", "length"] | None = None
        self.text = ""  # emitted so far
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._on_text = request.on_text
        # Nobody reads the text before the end and no stop string can end the row early: its ids
        # are decoded once, when it finishes, rather than step by step.
        self._at_end = request.on_text is None and not request.stop
        self._ids: list[int] = []  # generated ids to decode (EOS excluded)
        self._decoded = ""  # complete characters decoded so far; `text` is a prefix of it
        # Decoding window (as in TGI): ids[prefix:read] were decoded already; decoding from `prefix`
        # again gives the new characters in context (tokenizers that strip a leading space).
        self._prefix = 0
        self._read = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_id: int, entry: _Entry | None = None) -> None:
        """Take the row's next generated token (with its log probabilities, where asked)."""
        if self.finished:
            return
        self.completion_tokens += 1
        if token_id in self._eos_ids:
            self._finish("stop")
            return
        self._ids.append(token_id)
        if self.entries is not None and entry is not None:
            self.entries.append(entry)
        if self._at_end:
            if self.completion_tokens >= self.request.max_tokens:
                self._finish("length")
            return
        self._decode(final=False)
        if self._cut_at_stop():
            self._finish("stop")
        elif self.completion_tokens >= self.request.max_tokens:
            self._finish("length")
        else:
            self._emit(len(self._decoded) - self._stop_prefix_len())

    def finish_if_running(self) -> None:
        """End a row that generation left unfinished (it ran out of new tokens)."""
        if not self.finished:
            self._finish("length")

    def _decode(self, *, final: bool) -> None:
        def decode(ids: list[int]) -> str:
            return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

        before = decode(self._ids[self._prefix : self._read])
        after = decode(self._ids[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith(_REPLACEMENT_CHAR)):
            self._decoded += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)

    def _cut_at_stop(self) -> bool:
        stops = self.request.stop
        if not stops:
            return False
        # A match cannot start inside the emitted text: any end of it that could begin a stop
        # string was held back (`_stop_prefix_len`), and a whole match would have ended the row.
        start = len(self.text)
        hits = [i for i in (self._decoded.find(s, start) for s in stops if s) if i >= 0]
        if not hits:
            return False
        self._decoded = self._decoded[: min(hits)]
        self.cut = True
        return True

    def _stop_prefix_len(self) -> int:
        """Length of the longest end of the text that could still grow into a stop string."""
        longest = 0
        for stop in self.request.stop:
            for size in range(min(len(stop) - 1, len(self._decoded)), longest, -1):
                if self._decoded.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _finish(self, reason: Literal["stop", "length"]) -> None:
        if reason == "length":
            self._decode(final=True)
            if self._cut_at_stop():
                reason = "stop"
        elif self._ids:
            self._decode(final=True)
        self.finish_reason = reason
        self._emit(len(self._decoded), final=True)

    def logprobs(self) -> tuple[TokenLogprob, ...]:
        """The tokens that make the text, once it is final: up to the token a stop string cuts into
        (the tokens wholly past the cut left out), and at least those given out with pieces."""
        n = max(self._kept(), self._given)
        self._convert(n)
        return tuple(self._logprobs[:n])

    def _kept(self) -> int:
        """How many of the entries stand for the text (its tokens' texts, until they cover it, where a
        stop string cut it; all of them otherwise)."""
        entries = self.entries or []
        if not self.cut:
            return len(entries)
        seen = 0  # characters of the text the tokens so far stand for
        for i in range(len(entries)):
            if seen >= len(self.text):
                return i
            self._convert(i + 1)
            seen += len(self._logprobs[i].token)
        return len(entries)

    def _convert(self, n: int) -> None:
        """Make the first `n` entries TokenLogprob (`_logprobs`), each once."""
        assert self.entries is not None and self._token_text is not None
        text = self._token_text
        for token_id, logprob, ids, values in self.entries[len(self._logprobs) : n]:
            top = tuple((text(i), v) for i, v in zip(ids, values, strict=True))
            self._logprobs.append(TokenLogprob(text(token_id), logprob, top))

    def _emit(self, end: int, *, final: bool = False) -> None:
        piece = self._decoded[len(self.text) : end]
        if not piece:
            return
        self.text += piece
        if self._on_text is None:
            return
        out: str | TextPiece = piece
        if self.entries is not None:  # with the tokens generated since the last piece
            upto = max(self._kept(), self._given) if final else len(self.entries)
            self._convert(upto)
            out = TextPiece(piece, tuple(self._logprobs[self._given : upto]))
            self._given = upto
        self._hand(out)

    def lead(self, text: str, logprobs: tuple[TokenLogprob, ...]) -> None:
        """Stream what an echo puts before the completion (the prompt, with its tokens' log
        probabilities where asked), before any of it; it is not part of `text`, on which stop strings
        and limits work."""
        if self._on_text is not None and (text or logprobs):
            self._hand(TextPiece(text, logprobs) if self.entries is not None else text)

    def _hand(self, out: str | TextPiece) -> None:
        assert self._on_text is not None
        try:
            self._on_text(out)
        except Exception:
            # One member's broken consumer must not fail its batch-mates: stop streaming to it.
            logger.warning("on_text callback failed; streaming to it stops", exc_info=True)
            self._on_text = None


class _BatchStream(BaseStreamer):
    """Hands each step's new tokens (one per row) to the rows, from `put` or the stopping criterion.

    transformers 4.x calls `streamer.put` before the stopping criteria of a step and 5.x after;
    whichever sees a step first consumes it, so a row stops at once on a stop string or its own
    `max_tokens` and never costs the batch an extra step.
    """

    def __init__(
        self,
        rows: list[_Row],
        prompt_width: int,
        flushes: tuple[Callable[[], None], ...] = (),
        logprobs: _RowLogprobs | None = None,
    ) -> None:
        self.rows = rows
        self._logprobs = logprobs
        # the streamed members' consumers' flushes, called after every step (base.TextRequest)
        self._flushes = flushes
        self._prompt_width = prompt_width
        self._puts = 0
        self._steps = 0  # steps consumed

    def put(self, value: torch.Tensor) -> None:
        self._puts += 1
        if self._puts == 1:  # the first put is the prompt
            return
        self._consume(self._puts - 1, value.reshape(-1).tolist())

    def end(self) -> None:
        for row in self.rows:
            row.finish_if_running()
        if self._flushes:
            flush_all(self._flushes)

    def observe(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The stopping criterion's side: take the step from `input_ids`; which rows are done."""
        self._consume(input_ids.shape[1] - self._prompt_width, input_ids[:, -1].tolist())
        return torch.tensor([row.finished for row in self.rows], device=input_ids.device)

    def _consume(self, step: int, tokens: list[int]) -> None:
        if step <= self._steps:
            return
        self._steps = step
        if self._logprobs is not None:
            entries = self._logprobs.entries(tokens)
            for i, (row, token) in enumerate(zip(self.rows, tokens, strict=True)):
                row.push(token, entries.get(i))
        else:
            for row, token in zip(self.rows, tokens, strict=True):
                row.push(token)
        if self._flushes:
            flush_all(self._flushes)


class _RowLogprobs(LogitsProcessor):
    """The first of a batch's processors where a row asks for log probabilities: at each step, the
    raw log probabilities of those rows (the model's distribution, before penalties, bias, temperature
    and top_p) and their most likely tokens, kept for the step's tokens (`entries`). Scores pass on
    unchanged."""

    def __init__(self, requests: Sequence[TextRequest]) -> None:
        self._asked = [(i, r.logprobs or 0) for i, r in enumerate(requests) if r.logprobs is not None]
        self._rows = torch.tensor([i for i, _ in self._asked], dtype=torch.long)
        self._k = max(k for _, k in self._asked)
        self._step: tuple[torch.Tensor, list[list[float]], list[list[int]]] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(scores.index_select(0, self._rows.to(scores.device)).float(), dim=-1)
        values: list[list[float]] = [[] for _ in self._asked]
        ids: list[list[int]] = [[] for _ in self._asked]
        if self._k:
            top = logprobs.topk(min(self._k, logprobs.shape[-1]), dim=-1)
            values, ids = top.values.tolist(), top.indices.tolist()
        self._step = (logprobs, values, ids)
        return scores

    def entries(self, tokens: list[int]) -> dict[int, _Entry]:
        """The last step's entries, by row, for the tokens the rows took at it."""
        if self._step is None:
            return {}
        logprobs, values, ids = self._step
        self._step = None
        taken = [tokens[i] for i, _ in self._asked]
        index = torch.tensor(taken, dtype=torch.long, device=logprobs.device).unsqueeze(-1)
        chosen = logprobs.gather(-1, index).squeeze(-1).tolist()
        return {
            i: (
                taken[j],
                max(chosen[j], LOGPROB_FLOOR),
                ids[j][:k],
                [max(v, LOGPROB_FLOOR) for v in values[j][:k]],
            )
            for j, (i, k) in enumerate(self._asked)
        }


class _RowsFinished(StoppingCriteria):
    """Per-row stopping: a row is done at its EOS, stop string or own `max_tokens`."""

    def __init__(self, stream: _BatchStream) -> None:
        self._stream = stream

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return self._stream.observe(input_ids)


class _RowPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties and logit bias, each row its own: from a row's logits,
    subtract presence x (the token was generated yet) + frequency x (times it was generated), and add
    its bias. Counted over the generated tokens only (the columns past the left-padded prompts), as
    vLLM does; applied before sampling or the greedy choice."""

    def __init__(self, requests: Sequence[TextRequest], prompt_width: int) -> None:
        self._width = prompt_width
        self._presence = torch.tensor([[r.presence_penalty] for r in requests], dtype=torch.float32)
        self._frequency = torch.tensor([[r.frequency_penalty] for r in requests], dtype=torch.float32)
        self._penalised = any(r.presence_penalty or r.frequency_penalty for r in requests)
        self._bias_rows = [(i, r.logit_bias) for i, r in enumerate(requests) if r.logit_bias]
        self._bias: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._bias is None and self._bias_rows:
            self._bias = torch.zeros_like(scores)
            for i, pairs in self._bias_rows:
                ids = torch.tensor([t for t, _ in pairs], dtype=torch.long, device=scores.device)
                values = torch.tensor([b for _, b in pairs], dtype=scores.dtype, device=scores.device)
                self._bias[i].index_put_((ids,), values)
        generated = input_ids[:, self._width :]
        if self._penalised and generated.shape[1]:
            counts = torch.zeros_like(scores).scatter_add_(
                1, generated, torch.ones_like(generated, dtype=scores.dtype)
            )
            presence = self._presence.to(scores.device, scores.dtype)
            frequency = self._frequency.to(scores.device, scores.dtype)
            scores = scores - frequency * counts - presence * (counts > 0).to(scores.dtype)
        return scores + self._bias if self._bias is not None else scores


class _RowSampler(LogitsProcessor):
    """Draws each sampled row's next token with a generator of its own, at its own temperature and
    top_p, as OpenAI and vLLM sample: a generator seeded with `seed + choice` where the request has a
    seed (so that a seeded row's tokens depend on its own request, not on its batch-mates or its place
    in the batch), from fresh entropy where it has none. The drawn token is left the row's only finite
    score, so that `generate`'s greedy step takes it; greedy rows (temperature 0) are left as they are.

    Inverse-CDF sampling over the row's probabilities (sorted, for top_p: the smallest set of most
    likely tokens whose mass reaches top_p, as transformers' TopPLogitsWarper keeps), with one uniform
    number a row and step from its generator. The generators are the CPU's (one draw a row costs no
    device kernel), so a seed draws the same numbers on any device."""

    def __init__(self, requests: Sequence[TextRequest]) -> None:
        sampled = [(i, r) for i, r in enumerate(requests) if r.temperature >= GREEDY_BELOW]
        self._rows = torch.tensor([i for i, _ in sampled], dtype=torch.long)
        self._temperature = torch.tensor([[r.temperature] for _, r in sampled], dtype=torch.float32)
        self._top_p = torch.tensor([[r.top_p] for _, r in sampled], dtype=torch.float32)
        self._nucleus = any(r.top_p < 1.0 for _, r in sampled)
        self._generators = []
        for _, r in sampled:
            generator = torch.Generator()
            if r.seed is None:
                generator.seed()  # fresh entropy
            else:
                generator.manual_seed((r.seed + r.choice) % 2**64)  # an unsigned 64-bit number
            self._generators.append(generator)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        device = scores.device
        rows = self._rows.to(device)
        logits = scores.index_select(0, rows).float() / self._temperature.to(device)
        probs = torch.softmax(logits, dim=-1)
        order: torch.Tensor | None = None
        if self._nucleus:
            probs, order = probs.sort(dim=-1, descending=True)
            cut = (probs.cumsum(dim=-1) - probs) >= self._top_p.to(device)  # mass before it reaches top_p
            probs = probs.masked_fill(cut, 0.0)
        cumulative = probs.cumsum(dim=-1)
        draws = torch.cat([torch.rand(1, generator=g) for g in self._generators]).to(device)
        picked = torch.searchsorted(cumulative, (draws * cumulative[:, -1]).unsqueeze(-1), right=True)
        picked = picked.clamp_(max=probs.shape[-1] - 1)
        tokens = order.gather(-1, picked) if order is not None else picked
        out = scores.clone()
        out[rows] = -torch.inf
        out[rows.unsqueeze(-1), tokens] = 0.0
        return out


def _asks_penalties(requests: Sequence[TextRequest]) -> bool:
    return any(r.presence_penalty or r.frequency_penalty or r.logit_bias for r in requests)


_Encode = Callable[[str, bool], list[int]]  # (text, add special tokens) -> ids


def _fast_encode(tokenizer: Any) -> _Encode | None:
    """A fast tokenizer's ids for one text straight from its Rust tokenizer (`encode_batch_fast`,
    tokenizers 0.21 and later: no offsets kept), without `tokenizer(...)`'s wrapping: 14.6 µs against
    28.4 for a 43-token chat on the 2-core CPU machine, on the event loop for every text request.

    The Rust tokenizer's own settings are set once to what `tokenizer(text)` sets for one text (no
    truncation, no padding, its `split_special_tokens`): this tokenizer is the counting one, used
    only here. None (use `tokenizer(...)`) for a tokenizer without that path, or one whose ids differ
    from its own `__call__` on a probe text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    batch_fast = getattr(backend, "encode_batch_fast", None)
    if batch_fast is None:
        return None
    try:
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    except (AttributeError, TypeError, ValueError):
        return None

    def encode(text: str, special: bool) -> list[int]:
        return batch_fast([text], add_special_tokens=special)[0].ids

    probe = "Hello, world! A probe: 123 ünïcödé\n  spaced   text\t."
    for special in (True, False):
        if encode(probe, special) != tokenizer(probe, add_special_tokens=special)["input_ids"]:
            logger.warning(
                "%s: the fast token count differs from the tokenizer's; counting the slow way",
                type(tokenizer).__name__,
            )
            return None
    return encode


class TransformersTextBackend:
    """A causal language model served with `transformers` (safetensors, no remote code).

    `dtype="auto"`: float32 off CUDA; on CUDA the checkpoint's own dtype. Sampling takes the
    request's temperature and top_p with no top-k (OpenAI's semantics); anything else (e.g. a
    repetition penalty) comes from the checkpoint's `generation_config`. `completion_tokens` counts
    every generated token, a final EOS included (it cost a forward pass). A prompt that leaves no
    room for `max_tokens` in the context is a `ValueError`, never silently shortened.
    """

    task: Task = "text"
    # the request fields that ask the model for something (`proxy.protocol._ASKED_DOC`) it does, and
    # "prompt_token_ids": a completion's prompt given as token ids (run on `prompt_ids` as they are)
    honours: frozenset[str] = frozenset(
        {
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "prompt_token_ids",
            "logprobs",
            "top_logprobs",
            "echo",
            "response_format",
            "tools",
            "tool_choice",
        }
    )

    def __init__(
        self,
        name: str,
        source: str | Path,
        device: str = "cpu",
        dtype: str = "auto",
        max_batch_size: int | None = None,
    ) -> None:
        if dtype != "auto":
            torch_dtype(dtype)  # fail at construction on a bad name
        self.name = name
        self.source = str(source)
        self.device = device
        self.dtype = dtype
        self.max_batch_size = max_batch_size  # a hint for the scheduler; `run` takes any size
        self._lock = threading.Lock()  # one batch at a time
        self._model: Any = None
        self._tokenizer: Any = None  # the worker's, used under `_lock`
        # A fast tokenizer must not be used from two threads at once ("Already borrowed"), and
        # prompts are counted on the proxy's threads while a batch decodes: they get their own.
        self._counting_tokenizer: Any = None
        self._counting_encode: _Encode | None = None  # its fast path, where it has one
        self._counting_lock = threading.Lock()
        self._eos_ids: frozenset[int] = frozenset()
        self._pad_id = 0
        self._max_context_tokens: int | None = None
        self._logits_size: int | None = None  # the model's output vocabulary (config.vocab_size)
        self._token_texts: dict[int, str] = {}  # token id -> its text alone (log probabilities; `run` only)
        self._formats: Any = None  # structured output's view of the tokenizer: built on first use

    def load(self) -> None:
        """Load tokenizer and weights onto `device` (blocking)."""
        dtype: Any = torch_dtype(self.dtype) if self.dtype != "auto" else "auto"
        if dtype == "auto" and torch.device(self.device).type != "cuda":
            dtype = torch.float32
        tokenizer = AutoTokenizer.from_pretrained(self.source, trust_remote_code=False)
        counting_tokenizer = AutoTokenizer.from_pretrained(self.source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            self.source,
            use_safetensors=True,
            trust_remote_code=False,
            device_map=self.device,
            **{_DTYPE_KWARG: dtype},
        )
        model.eval()
        generation = model.generation_config
        model.generation_config = self._neutral(generation)
        self._set_up(model, tokenizer, counting_tokenizer, model.config, generation)
        self._index_vocabulary()

    def _index_vocabulary(self) -> None:
        """Structured output's view of the vocabulary (backends.structured), built with the model: the
        import and the index take 0.2-0.5 s, which a first structured request would otherwise add to its
        batch. A tokenizer the grammar compiler cannot read is logged; plain text is served all the
        same, and a structured request fails its batch as it would have."""
        from backends.structured import Grammars

        try:
            formats = Grammars(self._tokenizer, sorted(self._eos_ids), self._logits_size)
        except Exception as e:  # xgrammar's reading of an unusual tokenizer
            logger.warning(
                "model %s: its vocabulary could not be indexed for structured output: %s", self.name, e
            )
            return
        with self._lock:
            self._formats = formats

    def _neutral(self, generation: GenerationConfig) -> GenerationConfig:
        """The checkpoint's generation config with its token ids only. A request's own parameters
        define its sampling, as in OpenAI's API: `generate` would otherwise take the checkpoint's
        defaults (an instruct model's `do_sample`, `temperature` 0.6, `top_p` 0.9, `repetition_penalty`,
        ...) for whatever equals transformers' global default in the config passed to it: so in
        4.50-4.57 a temperature-0 request sampled, and in 5.x a checkpoint's repetition penalty changed
        every answer."""
        ids = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
        dropped = {
            k: v
            for k, v in generation.to_diff_dict().items()
            if k not in ids
            and k not in ("transformers_version", "use_cache", "return_dict_in_generate")
            and not k.startswith(("_", "output_"))
        }
        if dropped:
            logger.info("%s: the checkpoint's generation defaults are not applied: %s", self.name, dropped)
        return GenerationConfig(**{k: getattr(generation, k, None) for k in ids})

    def load_tokenizer(self) -> None:
        """Load what counting prompts needs (the tokenizer and the model's config), not the weights:
        the front of a model that runs in a process of its own (`backends.process`). `run` then
        refuses; `prompt_ids`, `count_prompt_tokens`, `max_context_tokens` and `batch_key` work."""
        config = AutoConfig.from_pretrained(self.source, trust_remote_code=False)
        try:
            generation = GenerationConfig.from_pretrained(self.source)
        except OSError:  # no generation_config.json: what from_pretrained derives from the config
            generation = GenerationConfig.from_model_config(config)
        counting_tokenizer = AutoTokenizer.from_pretrained(self.source, trust_remote_code=False)
        self._set_up(None, None, counting_tokenizer, config, generation)

    def _set_up(
        self, model: Any, tokenizer: Any, counting_tokenizer: Any, config: Any, generation: Any
    ) -> None:
        eos = generation.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if counting_tokenizer.eos_token_id is not None:
            eos_ids.add(counting_tokenizer.eos_token_id)
        pad = counting_tokenizer.pad_token_id
        pad = pad if pad is not None else min(eos_ids, default=None)
        if pad is None:
            raise ValueError(f"{self.source}: the tokenizer has neither a pad nor an end-of-sequence token")
        positions = getattr(config, "max_position_embeddings", None)
        if not isinstance(positions, int):
            limit = getattr(counting_tokenizer, "model_max_length", None)
            positions = limit if isinstance(limit, int) and limit < 10**9 else None
        with self._lock:
            self._model, self._tokenizer = model, tokenizer
            self._counting_tokenizer = counting_tokenizer
            self._counting_encode = _fast_encode(counting_tokenizer)
            self._eos_ids, self._pad_id = frozenset(eos_ids), pad
            self._max_context_tokens = positions
            logits = getattr(config, "vocab_size", None)
            self._logits_size = logits if isinstance(logits, int) and logits > 0 else None

    @property
    def vocab_size(self) -> int:
        """Token ids a logit bias may name, 0 to vocab_size - 1: those the tokenizer knows and the model
        has a logit for (a checkpoint whose tokenizer gained tokens its embeddings were not resized
        for has fewer logits than tokens)."""
        self._counting()
        known = len(self._counting_tokenizer)
        return min(known, self._logits_size) if self._logits_size is not None else known

    @property
    def max_context_tokens(self) -> int | None:
        """Prompt + completion tokens the model can attend to; None where the config does not say."""
        self._counting()
        return self._max_context_tokens

    def prompt_ids(self, request: TextRequest) -> tuple[int, ...]:
        """The token ids of the prompt (or of the chat, rendered by its template), as `run` feeds
        them to the model. Thread-safe (a tokenizer of its own, not the one `run` uses)."""
        self._counting()
        self._check_request(request)
        with self._counting_lock:
            return tuple(self._prompt_ids(request, self._counting_tokenizer, self._counting_encode))

    def count_prompt_tokens(self, request: TextRequest) -> int:
        """Tokens the prompt (or the chat, rendered by its template) takes. Thread-safe."""
        return len(request.prompt_ids if request.prompt_ids is not None else self.prompt_ids(request))

    def batch_key(self, request: BackendRequest) -> Hashable:
        """Every text request batches with every other: sampling parameters, seeds, penalties,
        `max_tokens` and `stop` are each row's own (`_RowSampler`, `_RowPenalties`, `_Row`)."""
        if not isinstance(request, TextRequest):
            raise TypeError(f"{self.name} serves text requests, not {type(request).__name__}")
        return ("text",)

    def run(self, batch: Sequence[BackendRequest]) -> list[BackendResult]:
        """Generate for every member; results in batch order. Blocks: call from the device's worker."""
        requests = self._check_batch(batch)
        with self._lock, torch.inference_mode():
            model, tokenizer = self._loaded()
            prompts = [self._ids(request, tokenizer) for request in requests]
            limit = self.max_context_tokens
            for request, prompt in zip(requests, prompts, strict=True):
                if limit is not None and len(prompt) + request.max_tokens > limit:
                    raise ValueError(
                        f"{self.name}: prompt ({len(prompt)} tokens) + max_tokens ({request.max_tokens}) "
                        f"exceeds the model's context of {limit} tokens"
                    )
            width = max(map(len, prompts))
            input_ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, prompt in enumerate(prompts):  # left padding: every row's last token is aligned
                input_ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
                attention_mask[i, width - len(prompt) :] = 1
            token_text = self._token_text_of(tokenizer)
            rows = [_Row(request, tokenizer, self._eos_ids, token_text) for request in requests]
            echoed = [
                self._echoed(model, tokenizer, request, prompt, token_text) if request.echo else None
                for request, prompt in zip(requests, prompts, strict=True)
            ]
            for row, echo in zip(rows, echoed, strict=True):
                if echo is not None:
                    row.lead(*echo)
            recorder = _RowLogprobs(requests) if any(r.logprobs is not None for r in requests) else None
            stream = _BatchStream(rows, prompt_width=width, flushes=flushes_of(requests), logprobs=recorder)
            # Greedy steps: every row's sampling is done by the processors, each row its own
            config = GenerationConfig(
                max_new_tokens=max(request.max_tokens for request in requests),
                do_sample=False,
                eos_token_id=sorted(self._eos_ids),
                pad_token_id=self._pad_id,
            )
            processors: list[LogitsProcessor] = [recorder] if recorder is not None else []
            if _asks_penalties(requests):
                processors.append(_RowPenalties(requests, width))  # before temperature, as OpenAI's
            if any(request.json_schema is not None for request in requests):  # before choosing
                from backends.structured import Grammars, RowFormats  # the compiler: where asked

                if self._formats is None:  # once a model (`run` holds `_lock`)
                    self._formats = Grammars(tokenizer, sorted(self._eos_ids), self._logits_size)
                processors.append(
                    RowFormats(
                        [request.json_schema for request in requests],
                        self._formats,
                        width,
                        lambda i: rows[i].finished,
                    )
                )
            if any(request.temperature >= GREEDY_BELOW for request in requests):
                processors.append(_RowSampler(requests))
            model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                generation_config=config,
                logits_processor=LogitsProcessorList(processors),
                stopping_criteria=StoppingCriteriaList([_RowsFinished(stream)]),
                streamer=stream,
            )
            stream.end()  # idempotent: rows already finished keep their reason
        results = []
        for row, prompt, echo in zip(rows, prompts, echoed, strict=True):
            logprobs = None if row.entries is None else row.logprobs()
            work_units = float(len(prompt) + row.completion_tokens)
            text = row.text
            if echo is not None:
                text = echo[0] + text
                if logprobs is not None:  # the prompt ran through the model once more for them
                    logprobs = echo[1] + logprobs
                    work_units += len(prompt)
            results.append(
                TextResult(
                    text=text,
                    prompt_tokens=len(prompt),
                    completion_tokens=row.completion_tokens,
                    finish_reason=row.finish_reason or "length",
                    work_units=work_units,
                    logprobs=logprobs,
                )
            )
        return results

    def _echoed(
        self,
        model: Any,
        tokenizer: Any,
        request: TextRequest,
        prompt: list[int],
        token_text: Callable[[int], str],
    ) -> tuple[str, tuple[TokenLogprob, ...]]:
        """What an echo puts before the completion: the prompt's text (as sent; decoded, special tokens
        left out, where it came as token ids), and where log probabilities are asked its tokens' under
        the model: none for the first, each other's from the model's distribution at the position
        before it, with the `logprobs` most likely there. One more pass of the prompt alone through the
        model, whose logits it holds at once (prompt tokens x vocabulary x 4 bytes)."""
        text = request.prompt or tokenizer.decode(  # token ids (an empty prompt: the start token)
            prompt, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        if request.logprobs is None:
            return text, ()
        k = request.logprobs
        ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        chosen = logprobs.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1).tolist()
        top_ids: list[list[int]] = [[] for _ in chosen]
        top_values: list[list[float]] = [[] for _ in chosen]
        if k and chosen:
            top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
            top_ids, top_values = top.indices.tolist(), top.values.tolist()
        out = [TokenLogprob(token_text(prompt[0]), None)]
        for token, value, ids_at, values_at in zip(prompt[1:], chosen, top_ids, top_values, strict=True):
            alternatives = tuple(
                (token_text(i), max(v, LOGPROB_FLOOR)) for i, v in zip(ids_at, values_at, strict=True)
            )
            out.append(TokenLogprob(token_text(token), max(value, LOGPROB_FLOOR), alternatives))
        return text, tuple(out)

    def _token_text_of(self, tokenizer: Any) -> Callable[[int], str]:
        """A token's text as OpenAI's log probabilities show it: decoded alone (cached)."""
        texts = self._token_texts

        def token_text(token_id: int) -> str:
            text = texts.get(token_id)
            if text is None:
                text = tokenizer.decode(
                    [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
                )
                texts[token_id] = text
            return text  # type: ignore[no-any-return]

        return token_text

    def synchronize(self) -> None:
        """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
        synchronize_device(self.device)

    def close(self) -> None:
        """Drop the model and return its device memory."""
        with self._lock:
            self._model = self._tokenizer = self._counting_tokenizer = self._counting_encode = None
            self._formats = None  # xgrammar's objects: freed now, not reported leaked at the exit
        release_device_memory(self.device)

    def _loaded(self) -> tuple[Any, Any]:
        if self._model is None:
            raise RuntimeError(f"backend {self.name!r} is not loaded")
        return self._model, self._tokenizer

    def _counting(self) -> None:
        if self._counting_tokenizer is None:
            raise RuntimeError(f"backend {self.name!r} is not loaded")

    def _check_batch(self, batch: Sequence[BackendRequest]) -> list[TextRequest]:
        if not batch:
            raise ValueError("empty batch")
        keys = {self.batch_key(request) for request in batch}
        if len(keys) > 1:
            raise ValueError(f"a batch must share one batch key, got {sorted(map(str, keys))}")
        requests = [request for request in batch if isinstance(request, TextRequest)]
        for request in requests:
            self._check_request(request)
        return requests

    @staticmethod
    def _check_request(request: TextRequest) -> None:
        if (request.prompt is None) == (request.messages is None):
            raise ValueError("a text request needs exactly one of prompt and messages")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if request.temperature < 0:
            raise ValueError(f"temperature must not be negative, got {request.temperature}")

    def _ids(self, request: TextRequest, tokenizer: Any) -> list[int]:
        """The ids the server left on the request (`prompt_ids`), or the prompt tokenized now."""
        if request.prompt_ids is not None:
            return list(request.prompt_ids)
        return self._prompt_ids(request, tokenizer)

    def _prompt_ids(self, request: TextRequest, tokenizer: Any, encode: _Encode | None = None) -> list[int]:
        """The prompt's ids through `tokenizer`, or through `encode` (`_fast_encode` of it), which gives
        the same ids."""
        if encode is None:
            encode = lambda text, special: tokenizer(text, add_special_tokens=special)["input_ids"]  # noqa: E731
        if request.messages is not None:
            rendered = tokenizer.apply_chat_template(
                [m.as_template_message() for m in request.messages],
                chat_template=None if tokenizer.chat_template else FALLBACK_CHAT_TEMPLATE,
                add_generation_prompt=True,
                tokenize=False,
                **({"tools": json.loads(request.tools)} if request.tools is not None else {}),
            )
            ids = encode(rendered, False)  # the template has the special tokens
        else:
            ids = encode(request.prompt or "", True)
        # An empty prompt starts from the beginning-of-text token, as GPT-2-style models expect.
        return ids or [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self._pad_id]
