"""The app the realtime benchmark subscribes to (served by a real forge-node process)."""

from __future__ import annotations

from forge_kernel import model, query
from forge_kernel.migrations import Migration

MIGRATIONS = [Migration("bench_realtime", 1, "items", """
CREATE TABLE bench_items (
    id      bigserial PRIMARY KEY,
    topic   integer NOT NULL,
    payload text NOT NULL
);
CREATE INDEX bench_items_topic ON bench_items (topic, id DESC);
""")]


@model(table="bench_items")
class BenchItem:
    id: int | None
    topic: int
    payload: str


@query(public=True)
async def topic_latest(ctx, topic: int) -> list[BenchItem]:
    """The five newest items of one topic (an equality filter: precise invalidation)."""
    return await ctx.db.select(BenchItem, topic=topic, order_by="-id", limit=5)


# every cyclic-GC collection in the node, timed (benchmark-only): do pauses show in the tail?
_gc_started = [0.0]
GC_PAUSES: list[tuple[int, float, float]] = []  # (generation, seconds, end), the last 1,000
GC_COUNT = [0]


def _gc_timer(phase: str, info: dict) -> None:
    import time

    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        end = time.perf_counter()
        GC_PAUSES.append((info["generation"], end - _gc_started[0], end))
        GC_COUNT[0] += 1
        del GC_PAUSES[:-1000]


__import__("gc").callbacks.append(_gc_timer)

# BENCH_SAVEALL=1 (diagnostic, benchmark-only): keep what the cyclic GC finds, so bench_stats can
# name the kinds of cyclic garbage the node leaves per write (what drives its young collections)
if __import__("os").environ.get("BENCH_SAVEALL"):
    __import__("gc").set_debug(__import__("gc").DEBUG_SAVEALL)


# the node's event-loop stalls (benchmark-only): how late a 5 ms timer woke, and whether the loop's
# thread was on a CPU, waiting for one, or asleep meanwhile (stalls.py)
import stalls as _stalls  # noqa: E402 - bench/realtime is on the node's PYTHONPATH

WATCH = _stalls.LoopWatch()


@query(public=True)
async def bench_stats(ctx) -> dict:
    """How often this node re-ran live queries (the benchmark reads it over /rpc)."""
    from forge_realtime.service import for_node  # benchmark-only introspection

    WATCH.start()
    rt = for_node(ctx.node)
    s = rt.engine.stats
    return {"runs": s.runs, "pushes": s.pushes, "changes": s.changes, "invalidations": s.invalidations,
            "polls": rt.reader.polls, "hints": rt.reader.hints, "streams": getattr(rt.reader, "streams", None),
            "batches": getattr(s, "batches", None), "batched_runs": getattr(s, "batched_runs", None),
            "fanout_cpu_ns": getattr(s, "fanout_cpu_ns", None), "sessions": len(rt.sessions),
            **{k: getattr(s, k, None) for k in ("fanout_passes", "fanout_wall_ns", "fanout_idle_ns", "rerun_lags",
                                                 "rerun_lag_ns")},
            "queries": len(rt.engine.queries), "queued": len(rt.engine._queue), "running": len(rt.engine.running),
            "dirty": sum(q.dirty for q in rt.engine.queries.values()),
            "workers_alive": sum(not t.done() for t in rt.engine._workers),
            "lag_count": WATCH.count, "stalls": WATCH.since(0.0),
            "gc_count": GC_COUNT[0], "gc_pauses": [[g, round(p * 1000, 2), end] for g, p, end in GC_PAUSES],
            "garbage": _garbage_kinds()}


def _garbage_kinds() -> list:
    """With BENCH_SAVEALL: the most common kinds of cyclic garbage collected since the last call."""
    import collections
    import gc

    kinds = collections.Counter(_describe(o) for o in gc.garbage).most_common(40)
    n = len(gc.garbage)
    gc.garbage.clear()
    return [["total", n], *kinds] if n else []


@query(public=True)
async def bench_gc(ctx, timed: bool = False) -> dict:
    """How long one full cyclic-GC collection (what ``[node] gc_collect_interval`` runs) pauses
    this node, and how many objects the collector tracks (benchmark-only introspection).
    ``timed``: the pass the node's timer would run now; otherwise one that walks everything."""
    import gc
    import time

    import collections

    objects = gc.get_objects()
    tracked = len(objects)
    top = collections.Counter(type(o).__qualname__ for o in objects).most_common(12)
    # who holds the most common kinds (the first few of each, by referrer type and name)
    held_by = {}
    for name, _ in top[:6]:
        sample = [o for o in objects[-20_000:] if type(o).__qualname__ == name][:5]
        held_by[name] = sorted({_describe(r) for o in sample for r in gc.get_referrers(o) if r is not objects
                                and r is not sample})[:8]
    del objects
    frozen = gc.get_freeze_count()
    gens = [len(gc.get_objects(g)) for g in range(3)]
    # the node's own timed pass when it has one (a full rescan: since 2026-12-07 its timed passes freeze
    # what survives them, so this leaves the node as a node that has run at this size for a while)
    timer = getattr(ctx.node, "gc_timer", None)
    t0, c0 = time.perf_counter(), time.thread_time()
    found = timer.collect(rescan=None if timed else True) if timer is not None else gc.collect()
    pause, cpu = time.perf_counter() - t0, time.thread_time() - c0
    return {"pause_ms": pause * 1000, "cpu_ms": cpu * 1000, "tracked": tracked, "generations": gens,
            "frozen": frozen, "collected": found, "top_types": top, "held_by": held_by,
            "frozen_after": gc.get_freeze_count(), "node_timer": timer is not None,
            "rescans": timer.rescans if timer is not None else None}


def _describe(obj) -> str:
    name = type(obj).__qualname__
    if name == "coroutine":
        return f"coroutine {obj.__qualname__}"
    if name == "frame":
        return f"frame {obj.f_code.co_qualname}"
    if name == "method":
        return f"method {obj.__qualname__}"
    if name == "dict":
        return "dict(" + ",".join(sorted(map(str, obj))[:4]) + ")"
    return name
