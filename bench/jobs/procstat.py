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


class RoleMeter:
    """CPU seconds of everything on the machine that takes part in a worker-bound window, by role:
    the worker processes, the producer process, and the PostgreSQL server split into the workers'
    backends, the producers' backends and the rest (background processes: checkpointer, WAL writer,
    autovacuum, ...). A process that exits in the window counts through the postmaster with the CPU of its
    whole life (the kernel adds it to the parent when reaped): a backend of an earlier run ending late lands there."""

    def __init__(self, workers: Callable[[], Iterable[int]], postmaster: int) -> None:
        self.workers, self.postmaster = workers, postmaster
        self.producer = 0
        self.producer_backends: set[int] = set()
        self.skip: set[int] = set()
        self._start: dict[int, float] = {}
        self.roles: dict[str, float] = {}
        self.exited: list[str] = []
        #: pg_stat_activity's backend_type by pid, read just after :meth:`start`
        self.kinds_at_start: dict[int, str] = {}
        #: CPU seconds of every process on the machine (other users' too), beside the sum of the roles
        self.machine = 0.0

    def _snapshot(self) -> dict[int, float]:
        snap = {p: cpu_seconds(p) for p in children(self.postmaster)}
        snap[-self.postmaster] = cpu_seconds(self.postmaster, reaped_children=True)  # itself + exited
        return snap

    def start(self) -> None:
        self._start = self._snapshot()
        self._wstart = {p: cpu_seconds(p) for p in self.workers()}
        self._pstart = cpu_seconds(self.producer) if self.producer else 0.0
        self._machine = machine_busy()

    def stop(self) -> None:
        """The end of the window (the roles are told apart afterwards by :meth:`classify`)."""
        self._end = self._snapshot()
        self._wend = {p: cpu_seconds(p) for p in self.workers()}
        self._pend = cpu_seconds(self.producer) if self.producer else 0.0
        self.machine = machine_busy() - self._machine

    def classify(self, kinds: dict[int, str]) -> None:
        """Split the window's CPU by role, ``kinds`` naming each server process (pg_stat_activity)."""
        end = self._end
        roles = {"worker process": sum(t - self._wstart.get(p, 0.0) for p, t in self._wend.items()),
                 "producer process": self._pend - self._pstart}
        for pid, t in end.items():
            used = t - self._start.get(pid, 0.0)
            if pid in self.skip:
                continue
            if pid in self.producer_backends:
                role = "pg: producer backends"
            elif kinds.get(pid) == "client backend":
                role = "pg: worker backends"
            elif pid < 0:
                role = "pg: postmaster + exited (whole life)"
            else:
                role = "pg: " + kinds.get(pid, "other")
            roles[role] = roles.get(role, 0.0) + used
        self.roles = roles
        # gone by the end: its time in the window is lost, its whole life's lands on the postmaster
        self.exited = [self.kinds_at_start.get(p, "?") for p in self._start if p > 0 and p not in end]


def machine_busy() -> float:
    """CPU seconds all CPUs spent not idle since boot (/proc/stat: user..steal, without idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICK
