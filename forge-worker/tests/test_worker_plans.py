"""The plans of the worker's hot statements, as PostgreSQL caches them (generic plans).

asyncpg prepares each statement once per connection and PostgreSQL soon switches to a generic
plan, made without the parameters' values (so with 10 rows guessed for every array) and with
whatever statistics the table had. A plan that is only fast for some statistics shows up as a
throughput collapse under load, not as a failed test: these tests pin the shape instead.
"""

from __future__ import annotations

from forge_worker import JobQueue
from forge_worker import runtime


async def _bound_like_table(pool, registry) -> None:
    """What the worker-bound bench looks like to the planner: many pending rows (node_id NULL)
    and a few hundred running on one node, with fresh statistics."""
    queue = JobQueue(pool, registry)
    await queue.enqueue_many([queue.request("record", {"value": str(i)}) for i in range(3000)])
    await pool.execute("""UPDATE forge_jobs SET status = 'running', node_id = 'n1', attempt = 1,
                                 lease_until = now() + interval '1 minute', started_at = now()
                          WHERE id IN (SELECT id FROM forge_jobs ORDER BY id LIMIT 250)""")
    await pool.execute("ANALYZE forge_jobs")


async def _generic_plan(conn, statement: str) -> str:
    """EXPLAIN (GENERIC_PLAN) of ``statement``, parameters left as parameters (sent through the
    extended protocol, bound values would be folded into the plan as constants)."""
    await conn.execute("""CREATE OR REPLACE FUNCTION pg_temp.generic_plan(q text) RETURNS SETOF text
                          LANGUAGE plpgsql AS $$ BEGIN RETURN QUERY EXECUTE 'EXPLAIN (GENERIC_PLAN) ' || q; END $$""")
    return "\n".join(await conn.fetchval("SELECT array_agg(p) FROM pg_temp.generic_plan($1) AS p", statement))


async def test_results_find_their_rows_through_the_primary_key_whatever_the_statistics(forge_node):
    # the generic plan of a literal `status = 'running'` drove these joins from the partial index of
    # running rows (estimated: one row of this node) and scanned the whole batch of results once
    # per running row - quadratic, most of the claim statement's time in the worker-bound bench
    node = await forge_node(modules=["worker_jobs"], config={"node": {"roles": ["realtime"]}})
    await _bound_like_table(node.pool, node.registry)
    async with node.pool.acquire() as conn:
        await conn.execute(runtime.PLANNER_SETTINGS)
        for name in ("WRITE_AND_CLAIM", "REPORT", "RENEW", "CHECK_LEASES"):
            plan = await _generic_plan(conn, getattr(runtime, name))
            assert "forge_jobs_running" not in plan, f"{name} scans the running rows' index: {plan}"
            assert "forge_jobs_pkey" in plan, name


async def test_results_find_their_rows_through_the_primary_key_in_custom_plans_too(forge_node):
    # PostgreSQL plans a prepared statement's first five executions (and any later one it judges
    # cheaper so) with the parameters' values: `status = $n` then reads `status = 'running'`, which
    # matches the partial index of running rows, and the results' DELETE was driven from it - every
    # running row of the node compared with every result (EXPLAIN ANALYZE in a drain: 100 running
    # rows x 51 results, 5,049 rows removed by the join filter, 0.8-1.7 ms of a 2.3 ms statement).
    # The results compare status with a column of their own instead, which no index predicate matches.
    node = await forge_node(modules=["worker_jobs"], config={"node": {"roles": ["realtime"]}})
    await _bound_like_table(node.pool, node.registry)
    plans = await _custom_plans(node.pool)
    for name, plan in plans.items():
        assert "'n1'" in plan, f"{name}: not a custom plan: {plan}"  # the values were planned with
        assert "forge_jobs_running" not in plan, f"{name} scans the running rows' index: {plan}"


async def test_starts_written_with_a_claim_find_their_rows_through_the_primary_key(forge_node):
    # statistics taken before the node leased anything (a backlog just stored) say almost no row is
    # running: a custom plan then drove the starts' UPDATE (written with a claim, usually none) from
    # the partial index of running rows and visited every row leased to the node in every statement
    node = await forge_node(modules=["worker_jobs"], config={"node": {"roles": ["realtime"]}})
    queue = JobQueue(node.pool, node.registry)
    await queue.enqueue_many([queue.request("record", {"value": str(i)}) for i in range(3000)])
    await node.pool.execute("ANALYZE forge_jobs")
    await node.pool.execute("""UPDATE forge_jobs SET status = 'running', node_id = 'n1', attempt = 1,
                                      lease_until = now() + interval '1 minute'
                               WHERE id IN (SELECT id FROM forge_jobs ORDER BY id LIMIT 250)""")
    plan = (await _custom_plans(node.pool))["WRITE_AND_CLAIM"]
    assert "'n1'" in plan, f"not a custom plan: {plan}"
    assert "forge_jobs_running" not in plan, f"WRITE_AND_CLAIM scans the running rows' index: {plan}"


async def _custom_plans(pool) -> dict[str, str]:
    """EXPLAIN of WRITE_AND_CLAIM and REPORT writing the results of 50 running rows as node ``n1``,
    and of CHECK_LEASES reading them, planned with the parameters' values (custom plans)."""
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM forge_jobs WHERE status = 'running' LIMIT 50")]
    cols = runtime.Worker._result_columns([(i, 1, "succeeded", 0.0, None, None) for i in ids])
    async with pool.acquire() as conn:
        await conn.execute(runtime.PLANNER_SETTINGS + "; SET plan_cache_mode = force_custom_plan")
        async with conn.transaction():
            return {
                "WRITE_AND_CLAIM": "\n".join(r[0] for r in await conn.fetch(
                    "EXPLAIN " + runtime.WRITE_AND_CLAIM, *cols[:5], "n1", True, 30, [], [], [], [], 50, False,
                    cols[5], "{}", "{}", "{}", 50, "running")),
                "REPORT": "\n".join(r[0] for r in await conn.fetch(
                    "EXPLAIN " + runtime.REPORT, *cols[:5], "n1", True, cols[5], "running")),
                "CHECK_LEASES": "\n".join(r[0] for r in await conn.fetch(
                    "EXPLAIN " + runtime.CHECK_LEASES, runtime._array(ids), runtime._array([1] * len(ids)),
                    "n1", "running")),
            }
