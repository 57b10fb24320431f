"""A throwaway PostgreSQL server for tests and benchmarks.

Finds the Debian binaries (/usr/lib/postgresql/<version>/bin, installed by .ci/deps-postgres.sh),
runs initdb into a temporary directory, and starts the server on 127.0.0.1 on a free port with
trust authentication, as an unprivileged user when running as root (PostgreSQL refuses root).
Nothing listens beyond loopback; everything is deleted at `stop()`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SUPERUSER = "postgres"


def find_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/*/bin holding initdb. RuntimeError (never a skip) if none."""
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda d: _version_key(d.parent.name),
    )
    if not found:
        raise RuntimeError(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: "
            "run `bash .ci/deps-postgres.sh` (as `make test` does) to install the Debian package"
        )
    return found[-1]


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresCluster:
    """One PostgreSQL server in a temporary directory. `durable=False` (tests) turns fsync off for
    speed; benchmarks keep the production defaults (fsync on, synchronous_commit on)."""

    def __init__(self, *, durable: bool = False) -> None:
        self.bin_dir = find_bin_dir()
        self.durable = durable
        self.port = 0
        self._user: pwd.struct_passwd | None = _unprivileged_user() if os.geteuid() == 0 else None
        parent = tempfile.gettempdir()
        if self._user is not None and not _world_traversable(Path(parent)):
            parent = "/tmp"  # the server's user must reach its directory
        self.root = Path(tempfile.mkdtemp(prefix="wattproxy-pg-", dir=parent))
        self.data_dir = self.root / "data"
        self.log_file = self.root / "server.log"
        if self._user is not None:
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)

    @property
    def version(self) -> str:
        return self.bin_dir.parent.name

    def url(self, database: str = "postgres") -> str:
        """A `--db` URL for `database` on this server."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self._user is not None:
            cmd = ["runuser", "-u", self._user.pw_name, "--", *cmd]
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
        if result.returncode != 0:
            log = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({result.returncode}): {result.stderr.strip()}\n{log}"
            )
        return result

    def init(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
            *([] if self.durable else ["--no-sync"]),
        )

    def start(self) -> None:
        """Start the server (on the same port after a stop, else a free one)."""
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self.root}",
            "-c max_connections=200",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c full_page_writes=off"]
        attempts = 1 if self.port else 3
        for attempt in range(attempts):
            port = self.port or _free_port()
            try:
                self._run(
                    "pg_ctl",
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-w",
                    "-t",
                    "30",
                    "-l",
                    str(self.log_file),
                    "-o",
                    " ".join([*options, f"-p {port}"]),
                )
            except RuntimeError:
                if attempt + 1 == attempts:
                    raise
                continue
            self.port = port
            return

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are ended); the data stays."""
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30")

    def destroy(self) -> None:
        """Stop the server and delete its directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _world_traversable(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in (path.resolve(), *path.resolve().parents))


def _unprivileged_user() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists")


@contextmanager
def postgres_cluster(*, durable: bool = False) -> Iterator[PostgresCluster]:
    """A started throwaway server; stopped and deleted on exit."""
    cluster = PostgresCluster(durable=durable)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
