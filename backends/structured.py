"""Structured output for the transformers text models: OpenAI's `response_format` (`json_object`, and
`json_schema` with a JSON Schema), enforced while the text is generated.

At every decoding step each row that asks for it may take only the tokens that keep its text a prefix
of a JSON value its schema accepts (end of text included once the value is whole). The schema is
compiled by xgrammar (as vLLM's default guided decoding backend, `xgrammar`) into a grammar over the
model's vocabulary, whose token masks are mostly precomputed: each row then keeps a matcher that takes
the row's tokens one by one and fills the row's bitmask of allowed tokens for the next step. The
model's own distribution picks among them: greedy or sampled, with penalties, bias, temperature and
top_p as the row asked. A text cut by `max_tokens` or a stop string is a prefix, not a whole value
(finish_reason "length"/"stop"), as OpenAI's JSON mode's is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import xgrammar as xgr
from transformers import LogitsProcessor

# Whitespace characters a row may emit in a row between JSON's tokens: a space, or a newline and a space,
# not a model's padding forever (outlines, vLLM's first guided decoding backend, allowed one space).
MAX_CONSECUTIVE_WHITESPACE = 2

# What `response_format: {"type": "json_object"}` asks: any JSON object.
JSON_OBJECT_SCHEMA = '{"type": "object"}'

# Compiled schemas a model keeps (about 0.16 MB each on a 32,000-token vocabulary): a server whose
# clients send a new schema a request does not grow without bound.
CACHE_LIMIT_BYTES = 64 << 20

# xgrammar's errors start with a time and its C++ source's place: "[00:24:05] /project/cpp/x.cc:83: "
_WHERE = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def _reason(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return _WHERE.sub("", lines[-1] if lines else type(error).__name__)


# strict: an object takes the properties its schema names (and others only where `additionalProperties`
# allows them), as OpenAI's strict structured outputs and vLLM do
_GRAMMAR_OPTIONS: dict[str, Any] = {
    "any_whitespace": True,
    "max_whitespace_cnt": MAX_CONSECUTIVE_WHITESPACE,
    "strict_mode": True,
}


def check_schema(schema: str) -> None:
    """Raise ValueError where `schema` (JSON text) is not a JSON Schema that can be enforced (no
    vocabulary needed: the schema's grammar alone, as compiling for a model makes it)."""
    try:
        xgr.Grammar.from_json_schema(schema, **_GRAMMAR_OPTIONS)
    except Exception as e:  # xgrammar's are RuntimeError, with the converter's reason
        raise ValueError(_reason(e)) from e


class Grammars:
    """A model's vocabulary as the grammar compiler sees it (each token's bytes, the tokens that end a
    text: the model's, as its generation config may name more than the tokenizer), and the schemas
    compiled over it (kept, up to CACHE_LIMIT_BYTES). Built once a model: 0.1 s for 32,000 tokens.
    `vocab_size` is the model's scores' width, which may exceed the tokenizer's (padded heads)."""

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int], vocab_size: int | None = None) -> None:
        self.vocab_size = max(len(tokenizer), vocab_size or 0)
        self.eos = list(eos_ids) or [int(tokenizer.eos_token_id)]
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos
        )
        self._compiler = xgr.GrammarCompiler(
            self.info, max_threads=min(8, os.cpu_count() or 1), cache_limit_bytes=CACHE_LIMIT_BYTES
        )

    def compiled(self, schema: str) -> xgr.CompiledGrammar:
        """`schema` compiled over the vocabulary: 10-100 ms the first time on a real model's vocabulary
        (without the interpreter lock), then from the cache."""
        return self._compiler.compile_json_schema(schema, **_GRAMMAR_OPTIONS)


class RowFormats(LogitsProcessor):
    """A batch's processor for its rows that ask for a format (`schemas[i]`, JSON Schema text, or None):
    each such row's scores keep only the tokens its grammar allows; other rows, and rows already
    finished (`finished(i)`), pass unchanged. Put after the raw log probabilities are recorded (they
    are the model's) and before sampling. A row whose grammar allows nothing more (a schema no value
    satisfies, or a token it could not take) may only end its text."""

    def __init__(
        self,
        schemas: Sequence[str | None],
        grammars: Grammars,
        prompt_width: int,
        finished: Callable[[int], bool],
    ) -> None:
        # (row, its matcher): a row's tokens are those it generated, after the batch's prompt width
        self._rows = [
            (i, xgr.GrammarMatcher(grammars.compiled(schema)))
            for i, schema in enumerate(schemas)
            if schema is not None
        ]
        self._taken = 0  # generated tokens the matchers have been given (every row has as many)
        self._dead: set[int] = set()  # rows whose matcher refused a token: they may only end
        self._width = prompt_width
        self._finished = finished
        self._vocab = grammars.vocab_size
        self._eos = torch.tensor(grammars.eos, dtype=torch.long)
        self._mask = xgr.allocate_token_bitmask(len(schemas), grammars.vocab_size)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        new = input_ids[:, self._width + self._taken :].tolist()
        self._taken += len(new[0]) if new else 0
        masked: list[int] = []
        ending: list[int] = []
        for i, matcher in self._rows:
            if self._finished(i):
                continue
            if i not in self._dead:
                for token in new[i]:
                    if not matcher.accept_token(token):
                        self._dead.add(i)
                        break
            if i in self._dead:
                ending.append(i)
                continue
            matcher.fill_next_token_bitmask(self._mask, i)
            if not bool(self._mask[i].any()):  # nothing allowed: the text ends there
                ending.append(i)
            else:
                masked.append(i)
        if masked:
            size = scores.shape[-1]
            xgr.apply_token_bitmask_inplace(
                scores,
                self._mask.to(scores.device, non_blocking=True),
                vocab_size=min(size, self._vocab),
                indices=masked,
                backend="cpu" if scores.device.type == "cpu" else "torch_native",
            )
            if size > self._vocab:  # a head wider than the grammar's vocabulary: never its tail
                scores[masked, self._vocab :] = float("-inf")
        for i in ending:
            eos = self._eos[self._eos < scores.shape[-1]].to(scores.device)
            kept = scores[i, eos]
            scores[i] = float("-inf")
            scores[i, eos] = kept
        return scores
