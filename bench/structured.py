"""Structured output's cost on a vocabulary of a real model's size (`backends/structured.py`).

A model served in process holds a row that asks for `response_format` (or tools that must be called) to
its JSON Schema with xgrammar: once a model, its vocabulary is indexed (`Grammars`); once a schema, the
schema is compiled over it (then cached); then at each decoding step each such row's matcher takes the
row's last token and fills the row's bitmask of allowed tokens, and the tokens outside it are masked
(`RowFormats`, on the CPU, one row after another). These costs grow with the vocabulary, and the
embedded tiny model's 1,019 tokens say little about a real model's 32,000-150,000.
No real tokenizer can be downloaded here, so this trains a byte-level BPE (GPT-2's kind) on the Python
standard library's sources (and, past 64,000 tokens, the installed packages') to a real model's
vocabulary size, and times, beside the tiny model's:

- indexing the vocabulary (`structured.Grammars`), once;
- compiling each answer's schema, the first time (not cached);
- each step of `RowFormats` for one row, as served (its matcher, the mask over the scores), while the
  row writes a fixed answer token by token (its natural tokenization), for answers of three shapes.

    python -m bench.structured                  # 32,000, 64,000 and 128,000 tokens (each trained once
                                                # in 10-20 s, and kept)
    python -m bench.structured --vocab 32000
    python -m bench.structured --smoke          # a 2,000-token vocabulary: proves the path, times nothing

Writes bench/results/structured.md (and .json) for `make bench`.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.common import (
    REPO_ROOT,
    common_args,
    default_cache_dir,
    fmt,
    machine_info,
    machine_markdown,
    md_table,
    median,
    percentile,
    reproduce_command,
    status_marker,
    write_result,
)

NAME = "structured"
WORK = REPO_ROOT / "bench" / "_work" / "structured"
CORPUS_CHARS = 24_000_000  # of the standard library's .py files, in path order
# the standard library has merges seen twice for about 65,000 tokens: a larger vocabulary is trained on
# more text, the installed packages' sources after the standard library's
LARGE_VOCAB, LARGE_CORPUS_CHARS = 64_000, 80_000_000
EOT = "<|endoftext|>"

_CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"}},
    "required": ["city", "days", "metric"],
}
# (name, schema, the answer the row writes): free text in a string, numbers and keys, and a list of
# objects (what lm-format-enforcer, the parser before xgrammar, walked the vocabulary's tree for).
ANSWERS: tuple[tuple[str, dict[str, Any], str], ...] = (
    (
        "object: a sentence, an integer, a boolean",
        _CITY,
        '{"city": "Oslo, the capital of Norway, on the inner end of the Oslofjord", '
        '"days": 14, "metric": true}',
    ),
    (
        "json_object: any object",
        {"type": "object"},
        '{"answer": "It depends on the weather and on the time of year.", "confidence": 0.75}',
    ),
    (
        "list of 3 objects (tool calls)",
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"enum": ["get_weather", "get_time"]}, "parameters": _CITY},
                "required": ["name", "parameters"],
            },
        },
        json.dumps(
            [
                {"name": "get_weather", "parameters": {"city": "Oslo", "days": 3, "metric": True}},
                {"name": "get_weather", "parameters": {"city": "Bergen", "days": 1, "metric": True}},
                {"name": "get_time", "parameters": {"city": "Tromsø", "days": 0, "metric": False}},
            ]
        ),
    ),
)


@dataclass(frozen=True)
class Row:
    tokenizer: str
    vocab: int
    index_s: float  # Grammars, once a model
    compile_ms: float  # the answer's schema compiled, the first time
    answer: str
    steps: int
    refused: int  # steps where the answer's own next token was not allowed (0: the schema takes it)
    step_ms_p50: float
    step_ms_p90: float
    step_ms_max: float
    total_ms: float  # every step of the answer, one row


def trained_bpe(vocab: int, out: Path, corpus_chars: int = CORPUS_CHARS) -> Any:
    """A byte-level BPE tokenizer (as GPT-2's) trained on `corpus_chars` of the standard library's
    sources, then the installed packages', to `vocab` tokens (or as many merges as the corpus has),
    saved in `out` and loaded from there next time."""
    from transformers import PreTrainedTokenizerFast

    if (out / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(out)
    from tokenizers import ByteLevelBPETokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [p for p in sorted(stdlib.rglob("*.py")) if "site-packages" not in p.parts]
    sources += sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py"))
    texts, size = [], 0
    for path in sources:
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        size += len(text)
        if size >= corpus_chars:
            break
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab, min_frequency=2, special_tokens=[EOT], show_progress=False
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOT)
    tokenizer.save_pretrained(out)
    return tokenizer


def measure(name: str, tokenizer: Any, rounds: int) -> list[Row]:
    import torch

    from backends import structured

    t0 = time.perf_counter()
    grammars = structured.Grammars(tokenizer, [tokenizer.eos_token_id])
    index_s = time.perf_counter() - t0
    vocab = len(tokenizer)
    rows = []
    for answer_name, schema, answer in ANSWERS:
        t0 = time.perf_counter()
        grammars.compiled(json.dumps(schema))
        compile_s = time.perf_counter() - t0
        target = [*tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
        times: list[float] = []
        refused = 0
        for _ in range(rounds):  # a new matcher a round, as a new request gets
            formats = structured.RowFormats([json.dumps(schema)], grammars, 1, lambda i: False)
            generated: list[int] = []
            for token in target:
                input_ids = torch.tensor([[0, *generated]], dtype=torch.long)
                scores = torch.zeros(1, vocab)
                t = time.perf_counter()
                out = formats(input_ids, scores)
                times.append(time.perf_counter() - t)
                if out[0, token] == float("-inf"):
                    refused += 1
                    break
                generated.append(token)
        steps = len(target)
        rows.append(
            Row(
                tokenizer=name,
                vocab=vocab,
                index_s=index_s,
                compile_ms=compile_s * 1e3,
                answer=answer_name,
                steps=steps,
                refused=refused,
                step_ms_p50=median(times) * 1e3,
                step_ms_p90=percentile(times, 90) * 1e3,
                step_ms_max=max(times) * 1e3,
                total_ms=sum(times) * 1e3 / rounds,
            )
        )
    return rows


def render(rows: Sequence[Row], info: dict[str, str], argv: Sequence[str], smoke: bool) -> str:
    lines = [
        "## Structured output's cost on a real vocabulary's size (bench/structured.py)",
        "",
        status_marker(NAME, "smoke" if smoke else "ok"),
        "",
        f"Command: `{reproduce_command('bench.structured', argv)}`",
        "",
        machine_markdown(info),
        "",
        f"- xgrammar {version('xgrammar')}, tokenizers {version('tokenizers')}. The BPE "
        "tokenizer is byte-level (GPT-2's kind), trained here on the Python standard library's sources "
        f"(24 million characters; {LARGE_CORPUS_CHARS // 1_000_000} million, the installed packages' after "
        "them, past 64,000 tokens; no real model's tokenizer can be downloaded here); its tokens are "
        "code's, not a chat model's, "
        "but the parser's work depends on how many tokens there are and which characters they start "
        "with, which a real vocabulary of the same size has too.",
        "- A step is one call of `backends.structured.RowFormats` for one row, as served: the row's "
        "matcher takes the last token and fills the row's bitmask of allowed tokens, and the mask is "
        "applied to the scores. The row writes the answer's own tokens; a batch's rows that ask pay it "
        "one after another, on the CPU. `refused`: steps where the answer's next token was not allowed "
        "(0: the schema took the whole answer).",
        "- Indexing: `structured.Grammars`, once a model (when its first structured row runs). Compiling: "
        "an answer's schema over the vocabulary, the first time a model sees it (later rows take it from "
        "the cache).",
        "",
        md_table(
            [
                "tokenizer",
                "vocabulary",
                "indexing s",
                "answer",
                "compile ms",
                "steps",
                "refused",
                "step ms p50 / p90 / max",
                "answer ms",
            ],
            [
                [
                    r.tokenizer,
                    f"{r.vocab:,}",
                    fmt(r.index_s),
                    r.answer,
                    fmt(r.compile_ms),
                    r.steps,
                    r.refused,
                    f"{fmt(r.step_ms_p50)} / {fmt(r.step_ms_p90)} / {fmt(r.step_ms_max)}",
                    fmt(r.total_ms),
                ]
                for r in rows
            ],
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common_args(parser)
    parser.add_argument(
        "--vocab",
        default="32000,64000,128000",
        help="the trained tokenizers' vocabulary sizes, comma-separated",
    )
    parser.add_argument("--rounds", type=int, default=3, help="answers written per shape and tokenizer")
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: the service's)")
    parser.add_argument("--work", type=Path, default=WORK, help="where trained tokenizers are kept")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    vocabs = [2_000] if args.smoke else [int(v) for v in args.vocab.split(",")]
    rounds, corpus = (1, 1_000_000) if args.smoke else (args.rounds, CORPUS_CHARS)
    from transformers import AutoTokenizer

    from backends.tiny import ensure_model

    tiny = AutoTokenizer.from_pretrained(
        ensure_model("tiny-gpt2", (args.cache_dir or default_cache_dir()) / "models")
    )
    bpes = {}
    for vocab in vocabs:
        chars = corpus if vocab <= LARGE_VOCAB or args.smoke else LARGE_CORPUS_CHARS
        bpes[vocab] = trained_bpe(vocab, args.work / f"bpe-{vocab}-{chars}", chars)
    info = machine_info()
    rows = measure("tiny-gpt2 (embedded)", tiny, rounds)
    for vocab, bpe in bpes.items():
        rows += measure(f"BPE trained to {vocab:,}", bpe, rounds)
    markdown = render(rows, info, argv, args.smoke)
    print(markdown)
    write_result(args.out, NAME, markdown, {"machine": info, "rows": [asdict(r) for r in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
