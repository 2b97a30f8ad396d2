"""Helpers shared by the codegen tests (a uniquely named module: other packages' test folders have a
conftest.py too, so ``from conftest import ...`` would be ambiguous)."""

from __future__ import annotations

import os
from pathlib import Path

APPS = Path(__file__).parent / "apps"


def child_env() -> dict[str, str]:
    """Environment for forge-node children: the test apps importable."""
    return {"PYTHONPATH": os.pathsep.join([str(APPS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


class DevProcess:
    """``forge-node dev`` in a project folder, as a child process (stopped by pid)."""

    def __init__(self, root: Path, env: dict[str, str], *args: str) -> None:
        import subprocess
        import sys
        import time

        self.root = root
        self.log_path = root / f"dev-{time.monotonic_ns()}.log"
        self.ready_path = root / f"ready-{time.monotonic_ns()}.json"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "forge_kernel.cli", "dev", *args], cwd=root,
                env={**os.environ, **env, "FORGE_READY_FILE": str(self.ready_path)},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> "DevProcess":
        from forge_kernel.testing.procs import wait_for

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"forge-node dev exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            return self.ready_path.exists()

        wait_for(ready, timeout, what="forge-node dev to be ready")
        return self

    def stop(self) -> int:
        import signal
        import subprocess

        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode
