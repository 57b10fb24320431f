"""The real `wattproxy serve` process: start, readiness, SIGTERM drain (new requests 503, in-flight ones
finish, exit 0), and bad configuration failing at start."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests


class ServeProcess:
    def __init__(self, args: list[str], env: dict[str, str], new_session: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--port", "0", *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=new_session,  # a process group of its own, as under a terminal
        )
        self.lines: list[str] = []
        self.stdout: list[str] = []
        self.port: int | None = None
        self._found = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout.append(line)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"listening on http://[\d.]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                self._found.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 120) -> None:
        assert self._found.wait(timeout_s), "".join(self.lines)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if requests.get(self.url + "/readyz", timeout=5).status_code == 200:
                return
            time.sleep(0.1)
        raise TimeoutError("".join(self.lines))


@pytest.fixture
def serve_env(model_cache: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = dict(os.environ)
    env.update(
        {
            "WATTPROXY_CACHE_DIR": str(model_cache),
            "WATTPROXY_DATA_DIR": str(tmp_path),
            "WATTPROXY_TORCH_THREADS": "1",
            # the drain tests' work takes 5-15 s on these 2-core machines: a drain cut off at the default
            # 30 s on a slow one would close the in-flight connections these tests expect answered
            "WATTPROXY_DRAIN_TIMEOUT_S": "120",
        }
    )
    yield env


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_sigterm_drains_in_flight_requests_and_exits_zero(serve_env: dict[str, str], loop: str) -> None:
    server = ServeProcess(["--meter", "synthetic", "--auth", "none", "--event-loop", loop], serve_env)
    try:
        server.wait_ready()
        body = {"model": "tiny-sd", "prompt": "slow", "size": "256x256", "steps": 8, "n": 4}
        with ThreadPoolExecutor(2) as pool:
            in_flight = [
                pool.submit(requests.post, server.url + "/v1/images/generations", json=body, timeout=120)
                for _ in range(2)
            ]
            time.sleep(0.5)  # both are queued or running (each takes seconds on a CPU)
            server.proc.send_signal(signal.SIGTERM)
            late = None
            while not all(f.done() for f in in_flight):
                r = requests.get(server.url + "/v1/models", timeout=10)
                if r.status_code == 503:
                    late = r
                    break
                time.sleep(0.01)
            assert late is not None, "no request was refused while draining"
            assert late.json()["error"]["type"] == "overloaded"
            assert not all(f.done() for f in in_flight)  # refused while the others were still running
            assert [f.result().status_code for f in in_flight] == [200, 200]
        assert server.proc.wait(timeout=60) == 0
        assert any("draining" in line for line in server.lines)
        assert not any("drain timed out" in line for line in server.lines), "".join(server.lines)
        assert any(f"event loop: {loop}" in line for line in server.lines)
        # without torchvision (not a dependency), transformers' notice of its PIL image processors is
        # left out of the log (`backends._PilFallbackNotice`)
        assert not any("requires torchvision" in line for line in server.lines), "".join(server.lines)
        # the heap is set aside from the cyclic GC once set up, and again with the models loaded
        frozen = [
            int(m.group(1)) for line in server.lines if (m := re.search(r"(\d+) objects set aside", line))
        ]
        assert len(frozen) == 2 and 0 < frozen[0] < frozen[1], frozen
        assert not any("nanobind" in line for line in server.lines), "".join(server.lines)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


def _model_processes(server_pid: int) -> list[int]:
    """The model processes (`python -m backends.process`) the server started."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # not a process, or gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == server_pid and b"backends.process" in cmdline:
            pids.append(int(entry.name))
    return pids


def test_ctrl_c_to_the_whole_process_group_drains_then_stops_the_model_processes(
    serve_env: dict[str, str],
) -> None:
    """A terminal's Ctrl-C sends SIGINT to every process of its foreground group. The embedded models
    run in model processes of their own (the default): they must leave the signal to the server, whose
    drain lets the running batch finish in them, and stop once the server does."""
    server = ServeProcess(["--meter", "synthetic", "--auth", "none"], serve_env, new_session=True)
    try:
        server.wait_ready()
        children = _model_processes(server.proc.pid)
        assert len(children) == 2, children  # tiny-gpt2 and tiny-sd, each in a process of its own
        body = {"model": "tiny-sd", "prompt": "slow", "size": "256x256", "steps": 8, "n": 4}
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(
                requests.post, server.url + "/v1/images/generations", json=body, timeout=120
            )
            time.sleep(0.5)  # running (seconds on a CPU)
            os.killpg(server.proc.pid, signal.SIGINT)  # the group's id is the server's pid
            answer = in_flight.result()
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["data"]) == 4
        assert server.proc.wait(timeout=60) == 0
        assert not any("Traceback" in line or "drain timed out" in line for line in server.lines), "".join(
            server.lines
        )
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]  # the server reaped them
        # their heaps, set aside from the GC, are given back at the exit: nanobind's modules (triton's,
        # xgrammar's) report none of their objects as leaked on the shared stderr
        assert not any("nanobind" in line for line in server.lines), "".join(server.lines)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


def test_bad_configuration_fails_at_start_with_a_clear_message(
    serve_env: dict[str, str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'meter = "synthetic"\n[[models]]\nname = "m"\ntask = "text"\nsource = "x"\nmax_batch_size = 0\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(bad)],
        env=serve_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "models.0.max_batch_size" in proc.stderr


def test_bad_carbon_settings_fail_at_start_before_anything_is_created(
    serve_env: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "fresh-data"
    env = dict(serve_env, WATTPROXY_DATA_DIR=str(data))
    for flags, words in ((["--carbon-zone", "XX"], "zone = 'XX'"), (["--pue", "0.5"], "pue must be")):
        proc = subprocess.run(
            [sys.executable, "-m", "proxy", "serve", "--port", "0", *flags],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert words in proc.stderr
        assert "wp-" not in proc.stdout  # no admin key was made for a server that never started
    assert not data.exists()


def _serve(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_a_model_that_fails_to_load_stops_the_server(serve_env: dict[str, str], tmp_path: Path) -> None:
    """A bad model setting found only when loading (a preset that does not exist) stops the server, the
    cause in the log, instead of serving on with /readyz at 503 for ever."""
    config = tmp_path / "models.toml"
    config.write_text(
        'meter = "synthetic"\nauth = "none"\n[[models]]\nname = "m"\ntask = "text"\nsource = "tiny:nope"\n'
    )
    proc = _serve(["--config", str(config), "--port", "0"], serve_env)
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"model m failed to load \(tiny:nope\).*; stopping", proc.stderr)


def test_start_problems_are_messages_not_tracebacks(serve_env: dict[str, str], tmp_path: Path) -> None:
    """A port already taken and a meter the device cannot have: a message naming the problem, before
    anything is made (no admin key printed), and no traceback."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve(["--port", str(port)], dict(serve_env, WATTPROXY_DATA_DIR=str(tmp_path / "a")))
    assert proc.returncode == 1 and "cannot serve" in proc.stderr and "Traceback" not in proc.stderr
    assert "wp-" not in proc.stdout
    proc = _serve(["--port", "0", "--meter", "nvml"], dict(serve_env, WATTPROXY_DATA_DIR=str(tmp_path / "b")))
    assert proc.returncode == 2 and "meter" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_environment_variables_that_name_no_setting_are_ignored(tmp_path: Path) -> None:
    from proxy.config import ConfigError, load_settings

    env = {
        "WATTPROXY_KEY": "wp-a-client-key",
        "WATTPROXY_CORS_ORIGINS": "https://a.example, https://b.example",
    }
    assert load_settings(env=env).cors_origins == ["https://a.example", "https://b.example"]
    assert load_settings(env={"WATTPROXY_CORS_ORIGINS": '["https://c.example"]'}).cors_origins == [
        "https://c.example"
    ]
    # lists and tables as JSON, as the README says: models, an upstream's devices and models
    listed = load_settings(
        env={
            "WATTPROXY_MODELS": '[{"name": "m", "task": "text", "source": "tiny:tiny-gpt2"}]',
            "WATTPROXY_UPSTREAM__URL": "http://127.0.0.1:8000",
            "WATTPROXY_UPSTREAM__DEVICES": "[0, 1]",
            "WATTPROXY_UPSTREAM__MODELS": '[{"name": "llama"}]',
        }
    )
    assert [m.name for m in listed.models] == ["m"]
    assert listed.upstream is not None and listed.upstream.devices == [0, 1]
    assert [m.name for m in listed.upstream.models] == ["llama"]
    commas = {"WATTPROXY_UPSTREAM__URL": "http://127.0.0.1:8000", "WATTPROXY_UPSTREAM__DEVICES": "0,1"}
    assert load_settings(env=commas).upstream.devices == [0, 1]  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"carbon\.zonex"):
        load_settings(
            env={"WATTPROXY_CARBON__ZONEX": "FR"}
        )  # a wrong name inside a section is still an error
    # `keys` and `usage` have no upstream: a partial one in the environment does not stop them
    env = {"WATTPROXY_UPSTREAM__API_KEY": "k", "WATTPROXY_DATA_DIR": str(tmp_path)}
    with pytest.raises(ConfigError, match="upstream"):
        load_settings(env=env)
    assert load_settings(env=env, ignore=("upstream",)).upstream is None
