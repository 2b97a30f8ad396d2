import asyncio
from dash_support import ENV, config, client, db, seed_jobs

PAGES = ["", "functions", "jobs", "queues", "crons", "realtime", "logs", "traces", "nodes", "migrations", "alerts", "audit"]

async def test_smoke(forge_processes):
    p = forge_processes(config(secured=False), env=ENV)
    conn = await db(forge_processes.db_url)
    ids = await seed_jobs(conn)
    async with client(p) as c:
        for page in PAGES:
            r = await c.get(f"/_forge/{page}")
            assert r.status_code == 200, (page, r.status_code, r.text[:2000])
            r = await c.get(f"/_forge/api/{page or 'overview'}")
            assert r.status_code == 200, (page, r.status_code, r.text[:2000])
        r = await c.get(f"/_forge/jobs/{ids['dead'][0]}")
        assert r.status_code == 200, p.log()[-4000:]
    await conn.close()
