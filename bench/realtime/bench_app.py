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


@query(public=True)
async def bench_stats(ctx) -> dict:
    """How often this node re-ran live queries (the benchmark reads it over /rpc)."""
    from forge_realtime.service import for_node  # benchmark-only introspection

    rt = for_node(ctx.node)
    s = rt.engine.stats
    return {"runs": s.runs, "pushes": s.pushes, "changes": s.changes, "invalidations": s.invalidations,
            "polls": rt.reader.polls, "hints": rt.reader.hints, "sessions": len(rt.sessions),
            "queries": len(rt.engine.queries), "queued": len(rt.engine._queue), "running": len(rt.engine.running),
            "dirty": sum(q.dirty for q in rt.engine.queries.values()),
            "workers_alive": sum(not t.done() for t in rt.engine._workers)}


@query(public=True)
async def bench_gc(ctx) -> dict:
    """How long one full cyclic-GC collection (what ``[node] gc_collect_interval`` runs) pauses
    this node, and how many objects the collector tracks (benchmark-only introspection)."""
    import gc
    import time

    import collections

    objects = gc.get_objects()
    tracked = len(objects)
    top = collections.Counter(type(o).__qualname__ for o in objects).most_common(12)
    del objects
    frozen = gc.get_freeze_count()
    gens = [len(gc.get_objects(g)) for g in range(3)]
    t0, c0 = time.perf_counter(), time.thread_time()
    found = gc.collect()
    pause, cpu = time.perf_counter() - t0, time.thread_time() - c0
    return {"pause_ms": pause * 1000, "cpu_ms": cpu * 1000, "tracked": tracked, "generations": gens,
            "frozen": frozen, "collected": found, "top_types": top}
