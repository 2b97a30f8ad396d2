"""RunJournal: the changes that arrive while queries run, kept once and indexed by value. A finishing
run's check must say exactly what checking every change since its start against its read set says
(hypothesis), and must not cost a check per change for every running query (the work that made
bench/realtime (b)'s latency climb past 2,000 writes/s)."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from forge_kernel.db import TableRead
from forge_realtime import engine as engine_mod
from forge_realtime.changes import Change
from forge_realtime.engine import LiveQueryEngine, RunJournal, Subscription, change_touches

from test_rt_engine_model import Caller, ModelExecutor, NoCapture, Sink

TABLES = ["t", "u"]
VALUES = st.one_of(st.sampled_from(["a", "b", "1", "2.0"]), st.integers(0, 2), st.booleans(), st.none(),
                   st.sampled_from([2.0, 1.5]))


class Holder:
    """What the journal needs of a query: something hashable with ``overflow``."""

    def __init__(self) -> None:
        self.overflow: set[str] = set()


def _image(draw) -> dict:
    cols = draw(st.sets(st.sampled_from(["owner", "n", "done"]), max_size=3))
    return {"id": draw(st.integers(0, 9)), **{c: draw(VALUES) for c in cols}}


@st.composite
def changes(draw) -> Change:
    table = draw(st.sampled_from(TABLES))
    op = draw(st.sampled_from(["INSERT", "UPDATE", "DELETE", "TRUNCATE"]))
    if op == "TRUNCATE":
        return Change(table, op)
    old = tuple(_image(draw) for _ in range(draw(st.integers(0 if op == "INSERT" else 1, 2)))) \
        if op != "INSERT" else ()
    new = tuple(_image(draw) for _ in range(draw(st.integers(1, 2)))) if op != "DELETE" else ()
    return Change(table, op, old, new)


@st.composite
def reads(draw) -> list[TableRead]:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        filters = draw(st.one_of(st.none(), st.lists(st.tuples(st.sampled_from(["owner", "n", "done"]), VALUES),
                                                     min_size=1, max_size=2)))
        out.append(TableRead(draw(st.sampled_from(TABLES)), tuple(filters) if filters is not None else None))
    return out


@settings(max_examples=300, deadline=None)
@given(before=st.lists(changes(), max_size=5), during=st.lists(changes(), max_size=12), read_set=reads(),
       limit=st.integers(4, 40))
def test_a_finishing_run_sees_exactly_the_changes_since_it_started_that_touch_its_reads(before, during, read_set, limit):
    journal = RunJournal(limit)
    other = Holder()
    journal.start(other)  # an older run keeps earlier changes in the journal
    for c in before:
        journal.add(c)
    q = Holder()
    journal.start(q)
    for c in during:
        journal.add(c)
    expected = any(change_touches(r, c) for c in during for r in read_set)
    found = journal.touches(q, read_set) or any(r.table in q.overflow for r in read_set)
    if len(during) <= limit // 2:  # within the bound: exact
        assert not q.overflow
        assert found == expected
    else:  # past it: never a missed change (a dropped one counts for its whole table)
        assert found or not expected
    journal.end(q)
    journal.end(other)
    assert journal.entries == [] and journal.holders == {}


def test_changes_before_a_run_started_or_after_it_ended_are_not_its_own():
    journal = RunJournal(100)
    q, other = Holder(), Holder()
    journal.start(other)
    journal.add(Change("t", "INSERT", (), ({"id": 1, "owner": "a"},)))
    journal.start(q)
    journal.add(Change("t", "INSERT", (), ({"id": 2, "owner": "b"},)))
    assert not journal.touches(q, [TableRead("t", (("owner", "a"),))])
    assert journal.touches(q, [TableRead("t", (("owner", "b"),))])
    assert journal.touches(other, [TableRead("t", (("owner", "a"),))])
    journal.end(other)
    journal.end(q)
    journal.add(Change("t", "TRUNCATE"))  # nobody runs: nothing is kept
    assert journal.entries == []


async def test_finishing_runs_check_only_the_changes_that_may_touch_them(monkeypatch):
    # 60 queries on 60 owners run at once while every owner's row is written: each finishing run
    # used to check all 60 changes (3,600 checks); with the index it checks its own owner's
    checks = [0]

    def counted(read, change):
        checks[0] += 1
        return change_touches(read, change)

    monkeypatch.setattr(engine_mod, "change_touches", counted)
    owners = [f"o{i}" for i in range(60)]
    ex = ModelExecutor(__import__("random").Random(0))
    gate = asyncio.Event()
    compute = ex.call

    async def gated(fn, args, auth, track_reads, call_out):
        await gate.wait()
        return await compute(fn, args, auth, track_reads, call_out)

    engine = LiveQueryEngine(ex, NoCapture(), max_concurrent_runs=len(owners))
    engine.start()
    sink = Sink()
    subs = [Subscription(sink, f"s{i}", "by_owner", {"o": o}, Caller("u1")) for i, o in enumerate(owners)]
    for sub in subs:
        engine.subscribe(sub)
    for _ in range(20):
        await asyncio.sleep(0)
    assert all(s.query.reads is not None and not s.query.running for s in subs)  # first runs done
    ex.call = gated
    for s in subs:
        s.query.dirty = True
        engine._schedule(s.query)
    for _ in range(20):
        await asyncio.sleep(0)
    assert all(s.query.running for s in subs)
    checks[0] = 0
    engine.on_changes([Change("t", "INSERT", (), ({"id": 100 + i, "owner": o, "topic": 0},))
                       for i, o in enumerate(owners)], 5)
    for i, o in enumerate(owners):
        ex.rows[100 + i] = {"owner": o, "topic": 0}
    gate.set()
    for _ in range(1000):
        await asyncio.sleep(0)
        if not engine.running and not engine._queue:
            break
    await engine.stop()
    # each run started before its owner's write: it is dirty at the end and runs once more, on the row
    assert [sink.last[s.sub_id] for s in subs] == [[[100 + i, o, 0]] for i, o in enumerate(owners)]
    assert all(s.query.runs == 3 for s in subs)
    assert checks[0] <= 2 * len(owners), checks[0]
