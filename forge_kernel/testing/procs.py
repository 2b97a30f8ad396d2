"""Real ``forge-node`` processes for cluster tests: started with a config, stopped by pid."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

import attrs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_on_sigterm() -> None:
    """Make SIGTERM raise ``SystemExit`` (143) in the main thread, so a benchmark or harness stopped
    with ``kill PID`` runs its ``finally`` blocks and stops the servers and nodes it started; by
    default SIGTERM ends the process at once and leaves them running."""
    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # keep polling; report the last error on timeout
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 20.0, what: str = "condition",
                     interval: float = 0.05) -> Any:
    """Await ``check()`` until it returns something truthy; AssertionError (with the last value) on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")
        await asyncio.sleep(interval)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):  # inline table, e.g. a list of [gateway] api_keys entries
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def write_config(path: Path, config: Mapping[str, Mapping[str, Any]]) -> Path:
    lines = []
    for section, table in config.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@attrs.define
class NodeProcess:
    """A ``forge-node start`` child process with its own config file and log file."""

    workdir: Path
    config: dict[str, dict[str, Any]]
    env: dict[str, str] = attrs.field(factory=dict)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    ready_path: Path | None = None
    args: tuple[str, ...] = ()

    @property
    def node_id(self) -> str:
        return self.config.get("node", {}).get("id", "")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "NodeProcess":
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = write_config(self.workdir / "forge.toml", self.config)
        stamp = int(time.time() * 1000)
        self.log_path = self.workdir / f"node-{self.node_id or 'x'}-{stamp}.log"
        self.ready_path = self.workdir / f"ready-{stamp}.json"
        env = {**os.environ, "FORGE_CONFIG": str(cfg), "FORGE_READY_FILE": str(self.ready_path), **self.env}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "forge_kernel.cli", "start", *self.args],
                cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 60.0) -> "NodeProcess":
        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            return self.ready_path.exists()

        try:
            wait_for(ready, timeout, what=f"node {self.node_id} to be ready")
        except TimeoutError:
            raise TimeoutError(f"node {self.node_id} not ready after {timeout}s:\n{self.log()[-4000:]}") from None
        return self

    def ready_info(self) -> dict[str, Any]:
        """What the node reported when it became ready: id, pid, ports, roles, seconds, event_loop."""
        import json

        return json.loads(self.ready_path.read_text())

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode
