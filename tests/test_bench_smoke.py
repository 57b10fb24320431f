"""The benchmarks' entry points, each in its tiny `--smoke` mode: they run end to end and write
well-formed results. Nothing here times anything: figures are in bench/RESULTS.md, never asserted."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from bench import (
    accounting,
    gpu_energy,
    gpu_graphs,
    gpu_logprobs,
    gpu_served,
    nvml_interference,
    run_all,
    serving,
    structured,
    upstream,
)
from bench.common import read_status


def tables(markdown: str) -> list[list[list[str]]]:
    """Every Markdown table: rows of cells, the header first, the separator row left out."""
    found: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            found.append(current)
            current = []
    out = []
    for table in found:
        header, separator, *rows = table
        assert all(re.fullmatch(r":?-{3,}:?", c) for c in separator), table
        assert len(separator) == len(header)
        assert rows, f"a table without rows: {header}"
        for row in rows:
            assert len(row) == len(header), (header, row)
            assert all(cell for cell in row), (header, row)
        out.append([header, *rows])
    return out


def check_result(out: Path, name: str, status: str) -> tuple[str, dict]:  # type: ignore[type-arg]
    markdown = (out / f"{name}.md").read_text(encoding="utf-8")
    assert markdown.startswith("## ")
    assert read_status(markdown, name) == status
    assert "Machine: " in markdown and "Command: `" in markdown
    assert "nan" not in markdown.lower().replace("nanos", "")
    return markdown, json.loads((out / f"{name}.json").read_text(encoding="utf-8"))


def test_serving_smoke(model_cache: Path, tmp_path: Path) -> None:
    assert serving.main(["--smoke", "--out", str(tmp_path), "--cache-dir", str(model_cache)]) == 0
    markdown, data = check_result(tmp_path, "serving", "smoke")
    found = tables(markdown)
    assert [t[0][0] for t in found] == ["workload", "workload", "path", "workload"]
    workloads = data["workloads"]
    assert set(workloads) == {
        f"{kind}-{level}"
        for kind in ("chat", "image")
        for level in (
            "c1",
            "c1-nowait",
            "c4-b1",
            "c8",
            "c24",
            "c1-nowait-own",
            "c4-b1-own",
            "c8-own",
            "c24-own",
        )
    } | {"stream-c8", "stream-c24", "stream-c24-own"}
    for key, w in workloads.items():
        assert w["served_rps"] > 0 and w["direct_rps"] > 0 and w["served_over_direct"] > 0
        assert w["clients_cpu_us_per_request"] > 0  # the raw client's CPU, measured in its process
        sizes = w["per_round"][0]["batch_sizes"]
        assert sum(sizes) == w["requests_per_round"]
        assert max(sizes) <= (1 if "-b1" in key else w["concurrency"])
    assert data["dynamic_batching"]["served_speedup"] > 0


def test_accounting_smoke(tmp_path: Path) -> None:
    profile = tmp_path / "profile.txt"
    assert accounting.main(["--smoke", "--out", str(tmp_path), "--profile", str(profile)]) == 0
    markdown, data = check_result(tmp_path, "accounting", "smoke")
    main_table, parts, inflight = tables(markdown)
    assert main_table[0] == ["per request", "CPU µs (process)", "CPU µs (this thread)", "wall µs"]
    assert len(parts) > 3
    assert inflight[0] == ["requests in flight on the device", "1", "8", "64", "256"]
    assert all(float(x) > 0 for x in inflight[1][1:])
    variants = data["variants"]
    assert all(v["cpu_us"] >= 0 and v["wall_us"] > 0 for v in variants.values())
    has_codecarbon = importlib.util.find_spec("codecarbon") is not None
    assert ("codecarbon" in variants) == has_codecarbon
    assert ("codecarbon_over_wattproxy_cpu" in data) == has_codecarbon
    assert profile.read_text(encoding="utf-8").strip()


def test_gpu_energy_smoke(model_cache: Path, tmp_path: Path) -> None:
    assert gpu_energy.main(["--smoke", "--out", str(tmp_path), "--cache-dir", str(model_cache)]) == 0
    markdown, data = check_result(tmp_path, "gpu_energy", "smoke")
    assert len(tables(markdown)) == 6
    assert data["counter"]["changes"] > 2
    phases = {p["name"]: p for p in data["phases"]}
    assert set(phases) == {"tiny-sd x1", "tiny-sd x8", "tiny-gpt2 x8", "tiny-gpt2 x8 own process"}
    for p in phases.values():
        assert p["measurement"] == "synthetic"
        assert p["measured_j"] > 0 and p["probe_delta_j"] > 0
        # the server's own books close exactly; the script's reads differ only by the start/stop gaps
        assert (
            abs(p["monitor_attributed_j"] + p["idle_j"] - p["monitor_delta_j"]) <= 1e-9 * p["monitor_delta_j"]
        )
        assert abs(p["responses_j"] - p["monitor_attributed_j"]) <= 1e-9 * p["monitor_delta_j"]
    assert phases["tiny-sd x1"]["j_per_image"] > 0 and phases["tiny-gpt2 x8"]["j_per_token"] > 0
    for p in phases.values():  # the direct replay ran the same batches and produced the same units
        assert p["direct_units"] == p["units"] > 0 and p["direct_wall_s"] > 0 and p["served_over_direct"] > 0
    proxy = data["proxy"]  # (g) the chats again, through a proxy-mode WattProxy in front of one serving them
    assert proxy["measurement"] == "synthetic-timeline" and proxy["usage_source"] == "upstream"
    assert proxy["completion_tokens"] > 0 and proxy["j_per_token"] > 0 and proxy["direct_tokens_per_s"] > 0
    assert abs(proxy["responses_j"] - proxy["monitor_attributed_j"]) <= 1e-9 * proxy["monitor_delta_j"]
    assert (
        abs(proxy["monitor_attributed_j"] + proxy["idle_j"] - proxy["monitor_delta_j"])
        <= 1e-9 * proxy["monitor_delta_j"]
    )


def test_gpu_served_smoke(model_cache: Path, tmp_path: Path) -> None:
    argv = ["--smoke", "--diagnostics", "--out", str(tmp_path), "--cache-dir", str(model_cache)]
    assert gpu_served.main(argv) == 0
    markdown, data = check_result(tmp_path, "gpu_served", "smoke")
    timing, ratios = tables(markdown)
    rows = {r["condition"]: r for r in data["conditions"]}
    assert [row[0] for row in timing[1:]] == list(rows)
    assert len(data["blocks"]) == data["rounds"] * len(rows)
    for block in data["blocks"]:  # every block's pipeline calls carried its images, at its batch size
        expected = rows[block["condition"]]["images_per_block"]
        assert sum(call[2] for call in block["calls"]) == block["images"] == expected
        assert all(call[1] > call[0] for call in block["calls"])
        # each call's thread: its CPU time over the call, its context switches (Linux)
        assert all(len(call) == 6 and 0 < call[3] <= 2 * (call[1] - call[0]) for call in block["calls"])
        assert block["cpu_s_median"] > 0 and block["voluntary_median"] >= 0
    assert {n for b in data["blocks"] if "batch 1" in b["condition"] for _, _, n, *_ in b["calls"]} == {1}
    compared = [r for r in rows.values() if "vs" in r]
    assert [row[0] for row in ratios[1:]] == [r["condition"] for r in compared]
    # the diagnostic conditions: direct calls with a counter poller, a server reading no NVML
    poll, synthetic = (
        "direct, batch 1, NVML read every 50 ms",
        "served, 2 clients, batches of 1, synthetic meter",
    )
    assert rows[poll]["vs"] == rows[synthetic]["vs"] == "direct, batch 1"
    assert sum(b["poll_reads"] for b in data["blocks"] if b["condition"] == poll) > 0
    assert {row[0] for row in ratios[1:] if row[6] == "(diagnostic)"} == {poll, synthetic}
    assert data["batch8_over_batch1"] == [
        "served, 16 clients, batches of 8",
        "served, 2 clients, batches of 1",
    ]
    served = [r for r in compared if r["condition"].startswith("served")]
    for r in served:
        assert r["measurement"] == "synthetic" and r["responses_j_per_image"] > 0
        assert len(r["cycle_ratio"]) == data["rounds"] and all(x > 0 for x in r["cycle_ratio"])
        # each server's responses and idle joules close against the script's reads of the same meter, exactly
        # for a meter drawing nothing while idle (a server reads the step after its last job before stopping)
        assert all(abs(e) < 1e-9 for e in r["conservation_errors"]), r["conservation_errors"]
        assert len(r["outside_j"]) == data["rounds"] and all(abs(j) < 1e-9 for j in r["outside_j"])
    assert ratios[0][-1] == "of which outside the server's first and last reads, J"
    assert data["batch8_over_batch1_responses_j_per_image"] > 0
    # the stored raw calls alone give the same analysis again (what --from-json does with a GPU run's JSON)
    again = tmp_path / "again"
    assert gpu_served.main(["--from-json", str(tmp_path / "gpu_served.json"), "--out", str(again)]) == 0
    redone = json.loads((again / "gpu_served.json").read_text(encoding="utf-8"))
    assert redone["conditions"] == data["conditions"] and "reanalysed" in redone
    assert tables((again / "gpu_served.md").read_text(encoding="utf-8")) == [timing, ratios]
    # a GPU run recorded before the outside joules were kept is analysed again with "-" for them
    recorded = json.loads(
        (Path(gpu_served.__file__).parent / "results" / "gpu_served.json").read_text(encoding="utf-8")
    )
    for block in recorded["blocks"]:
        block.pop("outside_j", None)
    old_json, old_run = tmp_path / "old.json", tmp_path / "old"
    old_json.write_text(json.dumps(recorded), encoding="utf-8")
    assert gpu_served.main(["--from-json", str(old_json), "--out", str(old_run)]) == 0
    _, old_ratios = tables((old_run / "gpu_served.md").read_text(encoding="utf-8"))
    assert {row[-1] for row in old_ratios[1:] if row[6] != "(diagnostic)"} == {
        ", ".join(["-"] * recorded["rounds"])
    }


def test_a_recorded_cuda_graphs_run_is_analysed_again(tmp_path: Path) -> None:
    """`--cuda-graphs` needs a CUDA GPU (no smoke run): its recorded run's raw calls go through the same
    analysis, the eager conditions as diagnostics against the graphed direct calls."""
    recorded = Path(gpu_served.__file__).parent / "results" / "gpu_served_graphs.json"
    assert gpu_served.main(["--from-json", str(recorded), "--out", str(tmp_path)]) == 0
    markdown = (tmp_path / "gpu_served_graphs.md").read_text(encoding="utf-8")
    check, timing, ratios = tables(markdown)
    assert check[0][:3] == ["batch", "images", "max abs difference (8-bit levels)"]
    assert [row[0] for row in check[1:]] == ["batch 1", "batch 8"]
    eager = {row[0]: row for row in ratios[1:] if "eager" in row[0]}
    assert set(eager) == {
        "direct, batch 1, eager (no CUDA graphs)",
        "direct, batch 8, eager (no CUDA graphs)",
    }
    assert all(row[1] == row[0].split(", eager")[0] and row[6] == "(diagnostic)" for row in eager.values())
    assert len(timing) - 1 == len(json.loads(recorded.read_text(encoding="utf-8"))["conditions"])


def test_gpu_served_default_conditions_smoke(model_cache: Path, tmp_path: Path) -> None:
    argv = ["--smoke", "--rounds", "1", "--out", str(tmp_path), "--cache-dir", str(model_cache)]
    assert gpu_served.main(argv) == 0
    markdown, data = check_result(tmp_path, "gpu_served", "smoke")
    rows = {r["condition"]: r for r in data["conditions"]}
    png = "direct, batch 8, PNGs made in the call"
    assert list(rows) == [
        "direct, batch 1",
        "served, 1 client, batch 1",
        "served, 2 clients, batches of 1",
        "direct, batch 8",
        png,
        "served, 16 clients, batches of 8",
    ]
    assert rows[png]["vs"] == "direct, batch 8" and rows[png]["diagnostic"]
    _, ratios = tables(markdown)
    assert [row[6] for row in ratios[1:] if row[0] == png] == ["(diagnostic)"]


def test_gpu_served_own_process_smoke(model_cache: Path, tmp_path: Path) -> None:
    argv = [
        "--smoke",
        "--own-process",
        "--rounds",
        "1",
        "--out",
        str(tmp_path),
        "--cache-dir",
        str(model_cache),
    ]
    assert gpu_served.main(argv) == 0
    markdown, data = check_result(tmp_path, "gpu_served_own", "smoke")
    assert "voluntary" in markdown
    assert "a process of its own" in markdown.splitlines()[0]
    rows = {r["condition"]: r for r in data["conditions"]}
    assert set(rows) == {
        "direct, batch 1",
        "served, 2 clients, batches of 1 (own process)",
        "direct, batch 8",
        "served, 16 clients, batches of 8 (own process)",
    }
    served = [r for r in rows.values() if "vs" in r]
    assert all(r["responses_j_per_image"] > 0 and r["measurement"] == "synthetic" for r in served)
    for block in data["blocks"]:  # the model process ran the served calls, at their batch sizes
        assert sum(call[2] for call in block["calls"]) == block["images"]


def test_gpu_graphs_smoke(model_cache: Path, tmp_path: Path) -> None:
    """SDXL's graphs script, eagerly on the CPU (tiny-sdxl): the same requests give the same images."""
    assert gpu_graphs.main(["--smoke", "--out", str(tmp_path), "--cache-dir", str(model_cache)]) == 0
    markdown, data = check_result(tmp_path, "gpu_graphs", "smoke")
    ((_, *rows),) = tables(markdown)
    assert [r[0] for r in rows] == ["batch 1", "batch 2"]
    for batch in data["batches"].values():
        assert batch["max_abs_level_diff"] == 0 and batch["images"] > 0
        assert len(batch["graphs"]["call_s"]) == len(batch["eager"]["call_s"]) == 3
    assert not data["fallback"]["run"] and "needs a CUDA device" in markdown


def test_gpu_logprobs_smoke(model_cache: Path, tmp_path: Path) -> None:
    """The log-probabilities check on the CPU (tiny-gpt2): every token compared, none apart."""
    assert gpu_logprobs.main(["--smoke", "--out", str(tmp_path), "--cache-dir", str(model_cache)]) == 0
    markdown, data = check_result(tmp_path, "gpu_logprobs", "smoke")
    assert len(tables(markdown)) == 2
    check = data["check"]
    assert check["tokens_compared"] == check["tokens_served"] > 0 and check["completions_that_diverged"] == 0
    assert check["max_abs_chosen_logprob_diff"] < 1e-4 and check["max_abs_top_logprob_diff"] < 1e-4
    assert data["ratio_with_over_without"] > 0


def test_nvml_interference_smoke(model_cache: Path, tmp_path: Path) -> None:
    assert nvml_interference.main(["--smoke", "--out", str(tmp_path), "--cache-dir", str(model_cache)]) == 0
    markdown, data = check_result(tmp_path, "nvml_interference", "smoke")
    (table,) = tables(markdown)
    conditions = data["conditions"]
    assert len(table) == 1 + len(conditions) and conditions[0]["condition"] == "no poller"
    assert all(c["nvml_calls"] > 0 for c in conditions[1:])


def test_upstream_smoke(tmp_path: Path) -> None:
    argv = ["--smoke", "--no-litellm", "--out", str(tmp_path), "--concurrency", "1,2", "--seconds", "1"]
    assert upstream.main(argv) == 0
    markdown, data = check_result(tmp_path, "upstream", "smoke")
    latency, rps, added, burst, paced = tables(markdown)
    floor = "aiohttp forwarder, no accounting (the floor)"
    assert [row[0] for row in latency[1:]] == ["stub, called directly", floor, "WattProxy"]
    assert rps[0] == ["target", "req/s at 1 conn.", "req/s at 2 conn."]
    assert [row[0] for row in added[1:]] == [floor, "WattProxy"]
    targets = data["summary"]["targets"]
    assert set(targets) == {"direct", "forwarder", "wattproxy"}
    assert "The floor at 1 connection: the aiohttp forwarder" in markdown
    for per_c in targets.values():
        assert all(row["rps"] > 0 and row["errors"] == 0 for row in per_c.values())
    # streams: through WattProxy in front of the burst stub, and of the paced one (2 at once here)
    assert [row[0] for row in burst[1:]] == ["stub, called directly", "WattProxy"]
    assert [row[0] for row in paced[1:]] == [
        "paced stub, called directly",
        "WattProxy in front of the paced stub",
    ]
    streams = data["streams"]
    for kind in ("burst", "paced"):
        for per_c in streams[kind].values():
            assert all(row["streams"] > 0 and row["errors"] == 0 for row in per_c.values())
    assert all(row["cpu_us_per_event"] > 0 for row in streams["burst"]["wattproxy"].values())
    assert (
        streams["paced"]["wattproxy_paced"]["2"]["cpu_us_per_event"] > 0 and streams["idle_cpu_ms_per_s"] >= 0
    )
    # every answer was accounted, streamed ones included
    plain = sum(m["requests"] for m in data["measurements"] if m["target"] == "wattproxy")
    assert data["ledger"]["recorded"] >= data["ledger"]["sent"] > plain > 0


def test_structured_smoke(model_cache: Path, tmp_path: Path) -> None:
    argv = ["--smoke", "--out", str(tmp_path), "--cache-dir", str(model_cache), "--work", str(tmp_path / "w")]
    assert structured.main(argv) == 0
    markdown, data = check_result(tmp_path, "structured", "smoke")
    (table,) = tables(markdown)
    assert len(table) == 1 + 2 * len(structured.ANSWERS)  # each answer, on both tokenizers
    vocabularies = {row["tokenizer"]: row["vocab"] for row in data["rows"]}
    assert (
        vocabularies["tiny-gpt2 (embedded)"] == 1019 and 1000 < vocabularies["BPE trained to 2,000"] <= 2000
    )
    assert all(row["steps"] > 5 and 0 <= row["refused"] <= 1 for row in data["rows"])  # one round


def test_run_all_assembles_every_results_file(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "serving.md").write_text("## Serving\n\n<!-- bench:serving status=ok -->\n\nfigures\n")
    (results / "ledger.md").write_text("# Ledger\n\ntext\n\n## Group commit\n\n```\n# kept as is\n```\n")
    summary = tmp_path / "RESULTS.md"
    argv = ["--benchmarks", "gpu_energy", "--gpu", "no", "--out", str(results), "--summary", str(summary)]
    assert run_all.main(argv) == 0
    gpu = (results / "gpu_energy.md").read_text(encoding="utf-8")
    assert read_status(gpu, "gpu_energy") == "not-run" and "Not run here: no GPU" in gpu
    text = summary.read_text(encoding="utf-8")
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == [
        "# WattProxy benchmark results",
        "## Serving",
        "## Ledger",
        "### Group commit",
        "# kept as is",
        "## GPU energy: NVML counter step, J/image, J/token, conservation (bench/gpu_energy.py)",
    ]
    assert "- [ledger](results/ledger.md)" in text

    # an earlier real GPU result survives a run on a machine without a GPU
    (results / "gpu_energy.md").write_text("## GPU energy\n\n<!-- bench:gpu_energy status=ok -->\n\n42 J\n")
    assert run_all.main(argv) == 0
    assert "42 J" in (results / "gpu_energy.md").read_text(encoding="utf-8")
    assert "42 J" in summary.read_text(encoding="utf-8")
