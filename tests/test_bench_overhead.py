"""The proxy-overhead benchmark in its `--smoke` mode: both servers run, the results are well formed,
and the full stack's ledger holds one record per request it answered. Nothing here times anything:
the figures are in bench/results/overhead.md, never asserted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import overhead
from tests.test_bench_smoke import check_result, tables


@pytest.mark.parametrize("no_wrk", [False, True], ids=["default-load-generator", "python-load-generator"])
def test_overhead_smoke(tmp_path: Path, no_wrk: bool) -> None:
    argv = ["--smoke", "--out", str(tmp_path), *(["--no-wrk"] if no_wrk else [])]
    assert overhead.main(argv) == 0
    markdown, data = check_result(tmp_path, "overhead", "smoke")

    rps, low, per_level, books = tables(markdown)
    labels = [overhead.LABELS[t] for t in overhead.TARGETS]
    assert rps[0] == ["server", "1 conn.", "4 conn."]
    assert [row[0] for row in rps[1:3]] == labels and rps[3][0] == "**ratio full / bare**"
    assert low[0] == ["server", "p50 ms", "p99 ms"]
    assert [row[0] for row in low[1:]] == [*labels, "**added (full − bare)**"]
    assert [row[0] for row in per_level[1:]] == [*labels, "**added (full − bare)**"]
    assert books[0] == ["count", "requests"]

    uses_wrk = not no_wrk and shutil.which("wrk") is not None
    assert data["settings"]["load_generator"] == ("wrk" if uses_wrk else "python")
    assert ("`wrk -t1 --latency`" in markdown) == uses_wrk
    targets = data["summary"]["targets"]
    assert set(targets) == {"full", "bare"}
    for per_c in targets.values():
        assert set(per_c) == {"1", "4"}
        assert all(row["rps"] > 0 and row["requests"] > 0 for row in per_c.values())
    assert {m["target"] for m in data["measurements"]} == {"full", "bare"}
    assert all(m["errors"] == 0 for m in data["measurements"])
    assert set(data["summary"]["compare"]) == {"1", "4"}
    assert set(data["verdict"]) == {"rps_ratio_min", "rps_ratio_met", "added_p50_ms", "added_p50_met"}

    # one ledger record per request the full stack answered, and one per answer the client counted
    b = data["books"]
    assert b["ledger"]["ok"] == b["server_answered"]["ok"] > 0
    assert b["ledger"] == b["server_answered"]
    assert (
        b["client_counted"]
        <= b["ledger"]["ok"]
        <= b["ledger_total"]
        <= b["client_counted"] + b["in_flight_bound"]
    )
    if not uses_wrk:  # closed-loop clients finish every request they send: the counts are equal
        assert b["in_flight_bound"] == 0 and b["ledger_total"] == b["client_counted"]
    assert f"| answers the load generator counted (200 only) | {b['client_counted']} |" in markdown
    assert f"| ledger records, status ok | {b['ledger']['ok']} |" in markdown
