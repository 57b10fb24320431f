"""A real Prometheus server for tests: locate `prometheus` / `promtool` (Debian package, installed by
.ci/deps-prometheus.sh), write a scrape config, run the server on a free loopback port with a temporary
storage dir, query its HTTP API, stop it."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

# Where Debian (and the upstream tarball, and Homebrew) put the binaries when PATH lacks them.
_SEARCH_DIRS = ("/usr/bin", "/usr/local/bin", "/opt/prometheus", "/opt/homebrew/bin")


def find_binary(name: str) -> str | None:
    """Path of `prometheus` or `promtool`, or None when it is not installed."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _SEARCH_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_config(
    target: str,
    *,
    scrape_interval_s: float = 1.0,
    job: str = "wattproxy",
    metrics_path: str = "/metrics",
    bearer_token: str | None = None,
) -> dict[str, Any]:
    """One job scraping `target` ("host:port"). Written as JSON, which YAML (and Prometheus) reads."""
    interval = f"{int(scrape_interval_s * 1000)}ms"
    scrape: dict[str, Any] = {
        "job_name": job,
        "scrape_interval": interval,
        "scrape_timeout": interval,
        "metrics_path": metrics_path,
        "static_configs": [{"targets": [target]}],
    }
    if bearer_token is not None:
        scrape["authorization"] = {"type": "Bearer", "credentials": bearer_token}
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [scrape],
    }


class PromError(RuntimeError):
    """Prometheus answered a query with an error, or did not start."""


@dataclass
class Prometheus:
    """A running Prometheus server and a small client for its HTTP API (v1)."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, params: Mapping[str, str | float] | None = None) -> Any:
        r = requests.get(f"{self.base_url}/api/v1/{path}", params=params, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise PromError(f"{path} {dict(params or {})}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query at `at` (Unix seconds; now by default); the vector's samples or a scalar as one."""
        params: dict[str, str | float] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", params)
        if data["resultType"] == "vector":
            return list(data["result"])
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        raise PromError(f"{expr!r}: expected an instant vector or scalar, got {data['resultType']}")

    def values(self, expr: str, at: float | None = None) -> list[float]:
        return [float(sample["value"][1]) for sample in self.query(expr, at)]

    def scalar(self, expr: str, at: float | None = None) -> float:
        found = self.values(expr, at)
        if len(found) != 1:
            raise PromError(f"{expr!r}: expected one sample, got {len(found)}")
        return found[0]

    def exemplars(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        return list(self.api("query_exemplars", {"query": expr, "start": start, "end": end}))

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["activeTargets"])

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PromError(f"prometheus exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if requests.get(f"{self.base_url}/-/ready", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise PromError(f"prometheus not ready after {timeout_s} s: {self.log_tail()}")

    def wait_scraped(self, job: str, timeout_s: float = 30.0) -> None:
        """Until every target of `job` has been scraped successfully at least once."""
        deadline = time.monotonic() + timeout_s
        last: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            last = [t for t in self.targets() if t["labels"].get("job") == job]
            if last and all(t["health"] == "up" for t in last):
                return
            time.sleep(0.2)
        raise PromError(f"targets of {job} not up after {timeout_s} s: {last}")

    def wait_for(self, expr: str, expected: float, timeout_s: float = 30.0) -> float:
        """Until `expr` (one sample) equals `expected` (relative 1e-9); returns the Unix time it did."""
        deadline = time.monotonic() + timeout_s
        seen: float | None = None
        while time.monotonic() < deadline:
            at = time.time()
            found = self.values(expr, at)
            if len(found) == 1:
                seen = found[0]
                if math.isclose(seen, expected, rel_tol=1e-9):
                    return at
            time.sleep(0.2)
        raise PromError(f"{expr!r} stayed at {seen}, not {expected}, for {timeout_s} s")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@contextmanager
def running_prometheus(
    binary: str, workdir: Path, config: Mapping[str, Any], *, attempts: int = 3
) -> Iterator[Prometheus]:
    """Prometheus on 127.0.0.1:<free port> with `config`, its storage under `workdir`; stopped on exit.

    Exemplar storage is on, so exemplars scraped over OpenMetrics can be queried."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(json.dumps(config, indent=2))
    error: PromError | None = None
    for attempt in range(attempts):  # another process may take the port between probe and bind
        port = free_port()
        log_path = workdir / f"prometheus-{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={workdir / f'data-{attempt}'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                    "--enable-feature=exemplar-storage",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        prom = Prometheus(process, port, log_path)
        try:
            prom.wait_ready()
        except PromError as e:
            prom.stop()
            error = e
            continue
        try:
            yield prom
        finally:
            prom.stop()
        return
    raise error or PromError("prometheus did not start")


def promtool(binary: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run `promtool ARGS`, feeding `stdin`; returns the finished process (text output)."""
    return subprocess.run(
        [binary, *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
