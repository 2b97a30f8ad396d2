"""``forge-node start`` for ``obs_costs.py``: counts the cyclic GC's collections by generation and the
time they took (``gc.callbacks``), and writes the counts with ``gc.get_stats()`` to ``gc-<pid>.json``
in the working directory when sent SIGUSR2."""
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

from forge_kernel.cli import main

counts = {"collections": [0, 0, 0], "seconds": [0.0, 0.0, 0.0]}
_started: list[float] = []


def _on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _started.append(time.perf_counter())
    elif _started:
        gen = info["generation"]
        counts["collections"][gen] += 1
        counts["seconds"][gen] += time.perf_counter() - _started.pop()


def _dump(signum: int, frame: object) -> None:
    Path(f"gc-{os.getpid()}.json").write_text(json.dumps({**counts, "stats": gc.get_stats(), "count": gc.get_count()}))


gc.callbacks.append(_on_gc)
signal.signal(signal.SIGUSR2, _dump)

if __name__ == "__main__":
    sys.exit(main())
