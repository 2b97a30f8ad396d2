"""CPU time of processes from /proc (Linux): steadier than throughput on a shared machine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields after the command name (which may hold spaces)


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """User + system CPU of ``pid`` (0 once it is gone); with ``reaped_children``, also that of its
    children that exited and were waited for (how a postmaster keeps its finished backends' time)."""
    f = _stat(pid)
    if f is None:
        return 0.0
    ticks = int(f[11]) + int(f[12])  # utime, stime
    if reaped_children:
        ticks += int(f[13]) + int(f[14])  # cutime, cstime
    return ticks / _TICK


def children(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            f = _stat(int(entry.name))
            if f is not None and int(f[1]) == pid:
                out.append(int(entry.name))
    return out


def server_cpu(postmaster: int) -> float:
    """CPU of a PostgreSQL server: the postmaster, its live processes and the ones that exited."""
    return cpu_seconds(postmaster, reaped_children=True) + sum(cpu_seconds(p) for p in children(postmaster))


class CpuMeter:
    """CPU seconds used by the worker processes (``workers()``: their pids, read at each sample)
    and by the PostgreSQL server between :meth:`start` and :meth:`stop`."""

    def __init__(self, workers: Callable[[], Iterable[int]], postmaster: int) -> None:
        self.workers = workers
        self.postmaster = postmaster
        self._start: dict[int, float] = {}
        self._pg = 0.0
        self.worker_cpu = self.pg_cpu = 0.0

    def start(self) -> None:
        self._start = {p: cpu_seconds(p) for p in self.workers()}
        self._pg = server_cpu(self.postmaster)

    def stop(self) -> None:
        self.worker_cpu = sum(cpu_seconds(p) - self._start.get(p, 0.0) for p in self.workers())
        self.pg_cpu = server_cpu(self.postmaster) - self._pg
