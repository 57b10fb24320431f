"""Log probabilities on a GPU: against transformers run alone, and what asking for them costs a batch.

    python bench/gpu_logprobs.py --out DIR            # an NVIDIA GPU: gpt2-medium, float16
    python bench/gpu_logprobs.py --smoke --out DIR    # any CPU: tiny-gpt2, float32

A batch of 8 greedy completions asking for 5 alternatives a token, served by the transformers backend
(`backend.run`, left-padded and batched as the server runs them), against each prompt decoded greedily
by transformers alone (no padding, no batch): the tokens agree up to the first place where the two
differ (batched float16 kernels can move a near-tie), and over that stretch the largest difference
of a chosen token's log probability and of the top alternatives' is reported. Then batches of 8
sampled completions with and without log probabilities, alternated, timed to the device's
synchronization: their ratio is what asking for them costs.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/gpu_logprobs.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import time
from collections.abc import Sequence
from typing import Any

from bench.common import (
    common_args,
    default_cache_dir,
    machine_info,
    machine_markdown,
    md_table,
    median,
    print_flush,
    quiet_logging,
    status_marker,
    write_result,
)

NAME = "gpu_logprobs"
PROMPTS = [
    "The lighthouse keeper wrote in his log that",
    "A joule is the energy",
    "Once upon a time, in a small village,",
    "The best way to measure power is",
    "def fibonacci(n):",
    "Dear diary, today",
    "The GPU drew",
    "In 1905, Einstein",
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_logprobs.py", description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: the service's)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated batches with and without them")
    parser.add_argument("--tokens", type=int, default=None, help="tokens a completion (default 64; smoke 8)")
    args = parser.parse_args(argv)
    quiet_logging()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backends import load_backend, torch_dtype
    from backends.base import TextRequest
    from backends.tiny import ensure_model

    smoke = args.smoke
    device, dtype, preset = ("cpu", "float32", "tiny-gpt2") if smoke else ("cuda:0", "float16", "gpt2-medium")
    tokens = args.tokens or (8 if smoke else 64)
    k = 5
    info = machine_info(gpu=not smoke)
    cache = (args.cache_dir or default_cache_dir()) / "models"
    print_flush(f"building/loading {preset} ...")
    path = ensure_model(preset, cache, dtype=dtype)
    backend = load_backend("text", preset, path, device=device, dtype=dtype)

    def batch(logprobs: int | None, temperature: float, seed: int) -> list[TextRequest]:
        return [
            TextRequest(
                prompt=p, max_tokens=tokens, temperature=temperature, seed=seed + i, logprobs=logprobs
            )
            for i, p in enumerate(PROMPTS)
        ]

    served = backend.run(batch(k, 0.0, 0))
    # transformers alone, one prompt at a time, greedy, on the same device and dtype
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).to(device).eval()
    compared = chosen_diff = top_diff = 0.0
    diverged = 0
    with torch.inference_mode():
        for prompt, result in zip(PROMPTS, served, strict=True):
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
            past = None
            step_ids = ids
            for entry in result.logprobs or ():
                out = model(step_ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                token = int(logprobs.argmax())
                text = tokenizer.decode(
                    [token], skip_special_tokens=False, clean_up_tokenization_spaces=False
                )
                if text != entry.token:
                    diverged += 1
                    break
                compared += 1
                chosen_diff = max(chosen_diff, abs(float(logprobs[token]) - entry.logprob))
                top = logprobs.topk(k).values.tolist()
                top_diff = max(top_diff, max(abs(a - b) for a, (_, b) in zip(top, entry.top, strict=True)))
                step_ids = torch.tensor([[token]], device=device)
    del model
    check = {
        "completions": len(PROMPTS),
        "tokens_compared": int(compared),
        "tokens_served": sum(len(r.logprobs or ()) for r in served),
        "completions_that_diverged": diverged,
        "max_abs_chosen_logprob_diff": chosen_diff,
        "max_abs_top_logprob_diff": top_diff,
    }
    print_flush(f"against transformers alone: {check}")

    timings: dict[str, list[float]] = {"without": [], "with": []}
    backend.run(batch(None, 1.0, 100))  # warm
    for r in range(args.rounds):
        for mode in ("without", "with") if r % 2 == 0 else ("with", "without"):
            requests = batch(k if mode == "with" else None, 1.0, 1000 + 10 * r)
            backend.synchronize()
            t0 = time.perf_counter()
            results = backend.run(requests)
            backend.synchronize()
            seconds = time.perf_counter() - t0
            made = sum(x.completion_tokens for x in results)
            timings[mode].append(seconds / max(made, 1))
    cost = {
        mode: {"s_per_token": values, "s_per_token_median": median(values)}
        for mode, values in timings.items()
    }
    backend.close()
    data = {
        "benchmark": NAME,
        "smoke": smoke,
        "machine": info,
        "command": "python bench/gpu_logprobs.py" + (" --smoke" if smoke else ""),
        "model": {
            "preset": preset,
            "dtype": dtype,
            "device": device,
            "tokens": tokens,
            "batch": len(PROMPTS),
            "k": k,
        },
        "check": check,
        "cost": cost,
        "ratio_with_over_without": cost["with"]["s_per_token_median"] / cost["without"]["s_per_token_median"],
    }
    md_path, _ = write_result(args.out, NAME, render(data), data)
    print_flush(f"wrote {md_path}")
    return 0


def render(data: dict[str, Any]) -> str:
    m, c, cost = data["model"], data["check"], data["cost"]
    check = md_table(
        [
            "completions",
            "tokens served",
            "tokens compared",
            "completions that diverged",
            "max abs diff, chosen token's logprob",
            "max abs diff, top logprobs",
        ],
        [
            [
                c["completions"],
                c["tokens_served"],
                c["tokens_compared"],
                c["completions_that_diverged"],
                f"{c['max_abs_chosen_logprob_diff']:.2e}",
                f"{c['max_abs_top_logprob_diff']:.2e}",
            ]
        ],
    )
    timing = md_table(
        ["batch of 8, sampled", "ms a generated token (median)", "each round"],
        [
            [
                f"{mode} log probabilities" + (f" (top {m['k']})" if mode == "with" else ""),
                cost[mode]["s_per_token_median"] * 1000,
                ", ".join(f"{x * 1000:.3f}" for x in cost[mode]["s_per_token"]),
            ]
            for mode in ("without", "with")
        ],
    )
    return f"""## Log probabilities on a GPU: against transformers alone, their cost (bench/gpu_logprobs.py)

{status_marker(NAME, "smoke" if data["smoke"] else "ok")}

Command: `{data["command"]}`

{machine_markdown(data["machine"])}

- `{m["preset"]}` ({m["dtype"]}, random weights of the real architecture) on `{m["device"]}`, through
  the transformers backend (`backend.run`, a left-padded batch of {m["batch"]}, {m["tokens"]} tokens
  each, top {m["k"]} alternatives a token), against each prompt decoded greedily by transformers alone
  (no padding, no batch, a KV cache), compared token by token up to the first place where they differ.

{check}

Batches of {m["batch"]} sampled completions (temperature 1, seeded) with and without log probabilities,
alternated, timed to the device's synchronization, over the tokens they generated:

{timing}

With log probabilities over without: **{data["ratio_with_over_without"]:.3f}x** the time a token.
"""


if __name__ == "__main__":
    raise SystemExit(main())
