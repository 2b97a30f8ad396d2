from sched_helpers import eventually

from forge_scheduler import scheduler_of


async def test_leader_enqueues_each_slot_once_with_its_run(sched_node):
    node = await sched_node()
    sched = scheduler_of(node)
    await eventually(lambda: _true(sched.election.is_leader), what="leadership")
    row = await node.pool.fetchrow("SELECT * FROM forge_leaders WHERE name = 'scheduler'")
    assert row["node_id"] == node.id and row["term"] == 1 and row["since"] is not None

    async def runs():
        return await node.pool.fetchval("SELECT count(*) FROM forge_cron_runs WHERE cron = 'every_second'") >= 3

    await eventually(runs, what="three runs of every_second")
    runs = await node.pool.fetch("SELECT id, slot, job_id, status FROM forge_cron_runs WHERE cron = 'every_second'")
    jobs = await node.pool.fetch("SELECT id, name, options FROM sched_fake_jobs WHERE name = 'every_second'")
    by_job = {j["id"]: j for j in jobs}
    # every run has exactly one job, and the job carries the run's metadata back to the outcome hook
    assert len(jobs) >= len(runs)
    for r in runs:
        job = by_job[r["job_id"]]
        assert job["options"]["cron_run"] == r["id"]
        assert job["options"]["slot"] == r["slot"].isoformat()
        assert job["options"]["cron"] == "every_second"
        assert r["slot"].microsecond == 0
    assert len({r["slot"] for r in runs}) == len(runs)


async def _true(v):
    return v
