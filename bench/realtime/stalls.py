"""Event-loop stall watch for the benchmark's processes (the node, the writer, the client processes).

A task wakes every ``tick`` seconds and records how late it woke. For each stall it also records
what the loop's thread did meanwhile, from ``/proc/<pid>/task/<tid>/schedstat`` (CPU time, time
runnable but waiting for a core): a stall is then

- ``cpu``: the thread ran Python (a long synchronous stretch: a GC pass, a big batch),
- ``runq``: the thread was runnable and the scheduler gave the core to someone else (starved),
- the rest (``late - cpu - runq``): it slept in the kernel (a blocking system call, a page fault
  from disk, waiting for the GIL held by another thread).

Times are ``time.perf_counter()`` (CLOCK_MONOTONIC: one clock for every process on the machine), so
the harness can line up the stalls of every process with the commit and receive time of each delivery.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time


def _schedstat_fd() -> int | None:
    try:
        return os.open(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)
    except OSError:  # not Linux, or no schedstats: stalls are still timed, not explained
        return None


class LoopWatch:
    """Stalls of the running loop longer than ``over`` seconds: (end, late, cpu, runq) in seconds,
    the last ``keep`` of them."""

    def __init__(self, tick: float = 0.005, over: float = 0.02, keep: int = 2000) -> None:
        self.tick, self.over, self.keep = tick, over, keep
        self.stalls: list[tuple[float, float, float, float]] = []
        self.count = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        fd = _schedstat_fd()
        tick, over = self.tick, self.over
        read = (lambda: os.pread(fd, 64, 0).split()) if fd is not None else (lambda: (b"0", b"0"))
        try:
            while True:
                t0 = time.perf_counter()
                s0 = read()
                await asyncio.sleep(tick)
                late = time.perf_counter() - t0 - tick
                if late > over:
                    s1 = read()
                    self.stalls.append((time.perf_counter(), late, (int(s1[0]) - int(s0[0])) / 1e9,
                                        (int(s1[1]) - int(s0[1])) / 1e9))
                    self.count += 1
                    del self.stalls[:-self.keep]
        finally:
            if fd is not None:
                os.close(fd)

    def since(self, t0: float) -> list[list[float]]:
        """Stalls that ended after ``t0``, rounded: [end, late ms, cpu ms, runq ms]."""
        return [[end, round(late * 1000, 1), round(cpu * 1000, 1), round(runq * 1000, 1)]
                for end, late, cpu, runq in self.stalls if end >= t0]


def summary(stalls: list[list[float]]) -> dict:
    """How many stalls, the longest, and where the time of those over 50 ms went."""
    big = [s for s in stalls if s[1] > 50]
    return {"over_20ms": len(stalls), "over_100ms": sum(s[1] > 100 for s in stalls),
            "longest_ms": max((s[1] for s in stalls), default=0.0),
            # of the stalls over 50 ms: ms late in total, of which on CPU and waiting for a core
            "over_50ms_late_ms": round(sum(s[1] for s in big), 1), "over_50ms_cpu_ms": round(sum(s[2] for s in big), 1),
            "over_50ms_runq_ms": round(sum(s[3] for s in big), 1)}
