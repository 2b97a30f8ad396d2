"""Property-based checks of batch enqueueing against a model (hypothesis, real PostgreSQL)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge_kernel import migrations as migmod
from forge_kernel.db import connect
from forge_kernel.executor import JobRequest
from forge_kernel.kernel_plugin import forge_migrations as kernel_migrations
from forge_worker import store_jobs
from forge_worker.hooks import forge_migrations as worker_migrations

request_st = st.builds(
    lambda key, mode, prio, value, delayed: JobRequest(
        name="record", args={"value": value}, priority=prio, unique_key=key, on_conflict=mode,
        run_at=None),
    key=st.one_of(st.none(), st.sampled_from(["a", "b", "c"])),
    mode=st.sampled_from(["skip", "replace"]),
    prio=st.integers(-5, 5),
    value=st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=5),
    delayed=st.booleans(),
)
batches_st = st.lists(st.lists(request_st, min_size=1, max_size=12), min_size=1, max_size=4)


def _db(base: str) -> str:
    name = f"forge_p_{uuid.uuid4().hex[:10]}"

    async def make() -> None:
        admin = await asyncpg.connect(base)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        conn = await connect(base.rsplit("/", 1)[0] + "/" + name)
        try:
            await migmod.migrate(conn, kernel_migrations() + worker_migrations())
        finally:
            await conn.close()

    asyncio.run(make())
    return base.rsplit("/", 1)[0] + "/" + name


def test_batches_match_the_model(forge_database_url):
    url = _db(forge_database_url)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(batches=batches_st)
    def check(batches):
        asyncio.run(run(batches))

    async def run(batches):
        conn = await connect(url)
        try:
            await conn.execute("TRUNCATE forge_jobs")
            live: dict[str, tuple[int, dict]] = {}  # the model: unique key -> (id, args)
            for n_batch, batch in enumerate(batches):
                ids = await store_jobs(conn, batch)
                assert len(ids) == len(batch) and all(i > 0 for i in ids)
                plain = [i for r, i in zip(batch, ids) if r.unique_key is None]
                assert plain == sorted(plain) and len(set(plain)) == len(plain)
                # the model: skip requests run first (first per key wins), then replace (last wins)
                for r, i in zip(batch, ids):
                    if r.unique_key is not None and r.on_conflict == "skip":
                        if r.unique_key in live:
                            assert i == live[r.unique_key][0]
                        else:
                            live[r.unique_key] = (i, dict(r.args))
                replaced = {}
                for r in batch:
                    if r.unique_key is not None and r.on_conflict == "replace":
                        replaced[r.unique_key] = dict(r.args)
                for key, args in replaced.items():
                    if key in live:
                        live[key] = (live[key][0], args)
                    else:
                        first = next(i for r, i in zip(batch, ids) if r.unique_key == key and r.on_conflict == "replace")
                        live[key] = (first, args)
                for r, i in zip(batch, ids):
                    if r.unique_key is not None:
                        assert i == live[r.unique_key][0], (r, i, live)
                rows = await conn.fetch("SELECT id, unique_key, args FROM forge_jobs WHERE unique_key IS NOT NULL")
                assert {r["unique_key"]: (r["id"], r["args"]) for r in rows} == live
                assert await conn.fetchval("SELECT count(*) FROM forge_jobs WHERE unique_key IS NULL") == \
                    sum(1 for b in batches[: n_batch + 1] for r in b if r.unique_key is None)
        finally:
            await conn.close()

    check()


def test_nul_characters_are_rejected_clearly():
    import pytest

    from forge_kernel.errors import InvalidArgument
    from forge_worker.queue import _json

    with pytest.raises(InvalidArgument, match="NUL"):
        _json({"v": "a\x00b"}, "record", "args")
    with pytest.raises(InvalidArgument, match="JSON-safe"):
        _json({"v": "\udc00"}, "record", "args")
    assert _json({"v": "\\u0000"}, "record", "args") == '{"v":"\\\\u0000"}'
