"""An outage longer than the catch-up bound: the newest missed slots run, older ones are
dropped and counted, and nothing runs twice."""

import asyncio
import datetime as dt

from sched_helpers import eventually

from forge_scheduler import scheduler_of

SECOND = dt.timedelta(seconds=1)


async def test_outage_longer_than_the_bound_runs_only_the_newest_missed_slots(sched_node):
    # sched_app.every_second: catch_up=3, grace=1
    a = await sched_node(node={"id": "a"})
    await eventually(lambda: a.pool.fetchval("SELECT count(*) >= 2 FROM forge_cron_runs WHERE leader = 'a'"),
                     what="a enqueues")
    await a.stop()
    await asyncio.sleep(6)  # nobody leads: about six slots are missed
    b = await sched_node(node={"id": "b"})
    assert scheduler_of(b) is not None
    await eventually(lambda: b.pool.fetchval("SELECT count(*) >= 6 FROM forge_cron_runs WHERE leader = 'b'"),
                     what="b enqueues")
    runs = await b.pool.fetch("SELECT slot, leader FROM forge_cron_runs WHERE cron = 'every_second' ORDER BY slot")
    slots = [r["slot"] for r in runs]
    assert len(set(slots)) == len(slots)
    last_a = max(r["slot"] for r in runs if r["leader"] == "a")
    first_b = min(r["slot"] for r in runs if r["leader"] == "b")
    missed = int((first_b - last_a) / SECOND) - 1
    dropped = await b.pool.fetchval("SELECT dropped_total FROM forge_cron_state WHERE cron = 'every_second'")
    # b's first decision: the 3 newest missed slots plus the on-time ones; the older ones dropped
    assert missed == dropped >= 1
    after = [s for s in slots if s > last_a]
    assert all(y - x == SECOND for x, y in zip(after, after[1:]))  # no hole after the dropped ones
    state = await b.pool.fetchrow("SELECT last_dropped FROM forge_cron_state WHERE cron = 'every_second'")
    assert state["last_dropped"] == dropped
