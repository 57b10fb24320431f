"""Rerun the benchmarks and rewrite bench/RESULTS.md from every results file in bench/results.

    make bench                                   # = python -m bench.run_all
    python -m bench.run_all --summary-only       # only reassemble RESULTS.md from bench/results/*.md

Runs `bench.serving`, `bench.accounting`, `bench.overhead`, `bench.upstream` (with LiteLLM where it is
installed: see that module), `bench.ledger_bench`, `bench.metrics_render` and `bench.structured`, and
the GPU benchmarks (`bench/gpu_energy.py`, `bench/gpu_served.py` plain, with `--own-process` and with
`--cuda-graphs`, `bench/gpu_graphs.py` (SDXL with CUDA graphs), `bench/gpu_logprobs.py`,
`bench/nvml_interference.py`; `bench/gpu_check.sh` runs `gpu_served` on a bare GPU machine, and the
others where asked) where a CUDA GPU is visible to torch and NVML. Where none is, earlier GPU
results in the results directory are kept as they are; if there is no `gpu_energy` result, a clearly
marked "not run here: no GPU" section is written instead. Each benchmark runs
in a process of its own (the accounting benchmark measures process CPU time, so nothing else may run
in its process). RESULTS.md gathers every `*.md` in the results directory, those of other benchmarks
too, in a fixed order for the known ones and by name for the rest.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import REPO_ROOT, RESULTS_DIR, machine_info, print_flush, read_status

SUMMARY = REPO_ROOT / "bench" / "RESULTS.md"
ORDER = (
    "serving",
    "accounting",
    "overhead",
    "upstream",
    "ledger",
    "metrics_render",
    "structured",
    "gpu_energy",
    "gpu_served",
    "gpu_served_own",
    "gpu_served_graphs",
    "gpu_graphs",
    "gpu_logprobs",
    "nvml_interference",
)
CPU_BENCHMARKS = ("serving", "accounting", "overhead", "upstream", "ledger", "metrics_render", "structured")
GPU = "gpu_energy"
GPU_BENCHMARKS = tuple(name for name in ORDER if name not in CPU_BENCHMARKS)
# a GPU benchmark that is another one's script with arguments of its own
GPU_COMMANDS = {
    "gpu_served_own": ("gpu_served", "--own-process"),
    "gpu_served_graphs": ("gpu_served", "--cuda-graphs"),
}

HEADER = """# WattProxy benchmark results

Rewritten by `make bench` (`python -m bench.run_all`), which reruns the benchmarks and gathers every
results file of `bench/results/` here, one section each. Every section names the machine, the date and
the command that reproduces it. These are measurements, never test assertions. Where a machine is shared
or small, compare the ratios measured side by side within one run rather than absolute figures across
runs.
"""


def _heading_level(markdown: str) -> int | None:
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#{1,6}) ", line)):
            return len(m.group(1))
    return None


def section(name: str, markdown: str) -> str:
    """A results file as a section of RESULTS.md: its headings shifted so that its top one is `##`."""
    level = _heading_level(markdown)
    if level is None:
        return f"## {name}\n\n{markdown.strip()}\n"
    shift = 2 - level
    if shift <= 0:
        return markdown.strip() + "\n"
    out, fenced = [], False
    for line in markdown.strip().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            line = "#" * shift + line
        out.append(line)
    return "\n".join(out) + "\n"


def results_files(results_dir: Path) -> list[Path]:
    """Every results file: the known benchmarks in their order, then the others by name."""
    files = {p.stem: p for p in results_dir.glob("*.md")}
    known = [files.pop(name) for name in ORDER if name in files]
    return known + [files[k] for k in sorted(files)]


def summarize(results_dir: Path, summary: Path) -> str:
    """The summary's text (to be written at `summary`) from the results files in `results_dir`."""
    paths = results_files(results_dir)
    links = [f"- [{p.stem}]({os.path.relpath(p, summary.parent)})" for p in paths]
    contents = "\n".join(links) or "- (no results yet)"
    sections = [section(p.stem, p.read_text(encoding="utf-8")) for p in paths]
    return "\n".join([HEADER, "Results files:\n", contents + "\n", *sections])


def _shown(path: Path) -> str:
    """`path` relative to the repository root where it lies inside it (the benchmarks run there and
    print the command that reproduces them)."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(resolved)


def run(cmd: Sequence[str]) -> bool:
    print_flush("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    rc = subprocess.run(list(cmd), cwd=REPO_ROOT, check=False).returncode
    print_flush(f"  exit {rc} after {time.perf_counter() - t0:.0f} s")
    return rc == 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    parser.add_argument("--summary", type=Path, default=SUMMARY, help="the summary file to rewrite")
    parser.add_argument("--smoke", action="store_true", help="run every benchmark in its smoke mode")
    parser.add_argument("--summary-only", action="store_true", help="run nothing; only rewrite the summary")
    parser.add_argument("--gpu", choices=("auto", "yes", "no"), default="auto", help="run the GPU benchmark")
    parser.add_argument(
        "--benchmarks", default=",".join(ORDER), help=f"comma-separated subset of {', '.join(ORDER)}"
    )
    args = parser.parse_args(argv)
    chosen = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    unknown = sorted(set(chosen) - set(ORDER))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(ORDER)}")
    ok = True
    if not args.summary_only:
        extra = ["--smoke"] if args.smoke else []
        for name in CPU_BENCHMARKS:
            if name in chosen:
                ok &= run([sys.executable, "-m", *cpu_command(name, args.out, args.smoke)])
        gpu = [name for name in GPU_BENCHMARKS if name in chosen]
        if gpu:
            ok &= gpu_benchmarks(args.out, args.gpu, gpu, extra)
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(summarize(args.out, args.summary), encoding="utf-8")
    print_flush(f"wrote {args.summary}")
    return 0 if ok else 1


def cpu_command(name: str, out_dir: Path, smoke: bool) -> list[str]:
    """The module and arguments of one CPU benchmark (the ledger's takes a file and no --smoke)."""
    if name == "ledger":
        levels = ["--seconds", "0.3", "--concurrency", "1,16", "--grown", "20000"] if smoke else []
        return ["bench.ledger_bench", "--out", _shown(out_dir / "ledger.md"), *levels]
    return [f"bench.{name}", "--out", _shown(out_dir), *(["--smoke"] if smoke else [])]


def gpu_benchmarks(out_dir: Path, mode: str, names: Sequence[str], extra: Sequence[str]) -> bool:
    """Run the GPU benchmarks where a GPU is visible (or `mode` says so); else keep earlier GPU
    results, or write the "not run here" section. False if a benchmark failed."""
    from bench.gpu_energy import gpu_visible, not_run_markdown

    wanted = gpu_visible() if mode == "auto" else mode == "yes"
    if wanted:
        commands = [GPU_COMMANDS.get(name, (name,)) for name in names]
        if "--smoke" in extra:  # CUDA graphs need a CUDA device: there is no smoke run of them
            commands = [c for c in commands if "--cuda-graphs" not in c]
        return all(
            [
                run([sys.executable, f"bench/{script}.py", *args, "--out", _shown(out_dir), *extra])
                for script, *args in commands
            ]
        )
    if GPU not in names:
        return True
    existing = out_dir / f"{GPU}.md"
    if existing.exists() and read_status(existing.read_text(encoding="utf-8"), GPU) == "ok":
        print_flush(f"no GPU here: keeping the GPU result in {existing}")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        existing.write_text(not_run_markdown(machine_info()), encoding="utf-8")
        print_flush(f"no GPU here: wrote a 'not run here' section to {existing}")
    return True


if __name__ == "__main__":
    raise SystemExit(main())
