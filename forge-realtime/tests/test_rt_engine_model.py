"""The live-query engine against a model: an in-memory table and an executor that computes each
query from a snapshot and reports its read set, with runs that yield at random points so changes
arrive mid-run. After things settle every live subscriber holds a fresh result and nothing of a
dropped query is left behind. Pure: no database, no plugin manager (the end-to-end property test
with PostgreSQL is test_rt_property.py)."""

from __future__ import annotations

import asyncio
import json
import random
import types
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge_kernel.db import TableRead
from forge_realtime.changes import Change
from forge_realtime.engine import LiveQueryEngine, Subscription

OWNERS = ["a", "b", "c"]
TOPICS = [0, 1, 2]


class Caller:
    def __init__(self, user: str) -> None:
        self.user = user

    def scope_key(self) -> str:
        return self.user


class NoCapture:
    async def ensure(self, needs, since=None) -> bool:
        return False

    def changed_since(self, tables, since) -> bool:
        return False


def _call(reads: list[TableRead]) -> types.SimpleNamespace:
    return types.SimpleNamespace(defn=types.SimpleNamespace(reads=()), reads=reads, used_auth=False)


class ModelExecutor:
    """Table ``t`` (id -> owner, topic) and table ``flags`` (one row, id 1: ``on``)."""

    def __init__(self, rnd: random.Random) -> None:
        self.rows: dict[int, dict] = {}
        self.flag = False
        self.registry: dict = {}
        self.rnd = rnd

    def compute(self, fn: str, args: dict, rows: dict[int, dict], flag: bool):
        if fn == "by_owner":
            return (sorted([i, r["owner"], r["topic"]] for i, r in rows.items() if r["owner"] == args["o"]),
                    [TableRead("t", (("owner", args["o"]),))])
        if fn == "by_both":
            return (sorted([i] for i, r in rows.items() if r["owner"] == args["o"] and r["topic"] == args["tp"]),
                    [TableRead("t", (("owner", args["o"]), ("topic", args["tp"])))])
        if fn == "by_topic":
            return (sorted([i] for i, r in rows.items() if r["topic"] == args["tp"]),
                    [TableRead("t", (("topic", args["tp"]),))])
        if fn == "by_id":
            r = rows.get(args["id"])
            return (r and [r["owner"], r["topic"]]), [TableRead("t", (("id", args["id"]),))]
        if fn == "flagged":  # reads t only while the flag is on: its read set grows and shrinks
            reads = [TableRead("flags", (("id", 1),))]
            if not flag:
                return None, reads
            return sorted(rows), reads + [TableRead("t")]
        return sorted(rows), [TableRead("t")]

    async def call(self, fn, args, auth, track_reads, call_out):
        rows, flag = {i: dict(r) for i, r in self.rows.items()}, self.flag  # the run's snapshot
        for _ in range(self.rnd.randint(0, 3)):
            await asyncio.sleep(0)
        result, reads = self.compute(fn, args, rows, flag)
        call_out.append(_call(reads))
        return result


class Sink:
    direct = None
    def __init__(self) -> None:
        self.last: dict[str, object] = {}

    def push(self, sub_id: str, message: tuple[bytes, ...], kind: str) -> None:
        if kind == "data":
            self.last[sub_id] = json.loads(b"".join(message))["data"]

    def end(self, sub_id: str, error) -> None:
        raise AssertionError(f"{sub_id} ended: {error}")


queries = st.one_of(
    st.tuples(st.just("by_owner"), st.fixed_dictionaries({"o": st.sampled_from(OWNERS)})),
    st.tuples(st.just("by_both"), st.fixed_dictionaries({"o": st.sampled_from(OWNERS), "tp": st.sampled_from(TOPICS)})),
    st.tuples(st.just("by_topic"), st.fixed_dictionaries({"tp": st.sampled_from(TOPICS)})),
    st.tuples(st.just("by_id"), st.fixed_dictionaries({"id": st.integers(1, 6)})),
    st.tuples(st.just("flagged"), st.just({})),
    st.tuples(st.just("all"), st.just({})))
steps = st.lists(st.one_of(
    st.tuples(st.just("sub"), queries, st.sampled_from(["u1", "u2"])),
    st.tuples(st.just("unsub"), st.integers(0, 20)),
    st.tuples(st.just("write"), st.integers(1, 6),
              st.one_of(st.none(), st.tuples(st.sampled_from(OWNERS), st.sampled_from(TOPICS)))),
    st.tuples(st.just("flip"),),
    st.tuples(st.just("yield"), st.integers(0, 4))), max_size=40)


async def play(script, seed: int) -> None:
    ex = ModelExecutor(random.Random(seed))
    engine = LiveQueryEngine(ex, NoCapture(), max_concurrent_runs=2)
    engine.start()
    sink, subs, n = Sink(), [], 0
    for step in script:
        if step[0] == "sub":
            n += 1
            sub = Subscription(sink, f"s{n}", step[1][0], dict(step[1][1]), Caller(step[2]))
            subs.append(sub)
            engine.subscribe(sub)
        elif step[0] == "unsub" and subs:
            sub = subs.pop(step[1] % len(subs))
            engine.unsubscribe(sub)
            sink.last.pop(sub.sub_id, None)
        elif step[0] == "write":
            i, new = step[1], step[2]
            old = ex.rows.get(i)
            if new is None and old is None:
                continue
            if new is None:
                del ex.rows[i]
                change = Change("t", "DELETE", ({"id": i, **old},), ())
            else:
                row = {"owner": new[0], "topic": new[1]}
                ex.rows[i] = row
                change = Change("t", "UPDATE" if old else "INSERT", ({"id": i, **old},) if old else (), ({"id": i, **row},))
            engine.on_changes([change], 0)
        elif step[0] == "flip":
            ex.flag = not ex.flag
            engine.on_changes([Change("flags", "UPDATE", ({"id": 1, "on": not ex.flag},), ({"id": 1, "on": ex.flag},))], 0)
        elif step[0] == "yield":
            for _ in range(step[1]):
                await asyncio.sleep(0)
    for _ in range(200):
        await asyncio.sleep(0)
    await engine.stop()
    for sub in subs:
        want, _ = ex.compute(sub.function, sub.args, ex.rows, ex.flag)
        assert sub.sub_id in sink.last, f"{sub.sub_id} never got data"
        assert sink.last[sub.sub_id] == json.loads(json.dumps(want)), (sub.function, sub.args, sink.last[sub.sub_id], want)
    live = {sub.query for sub in subs}
    indexed = set().union(*engine.index.whole.values(), *(qs for v in engine.index.keyed.values() for qs in v.values()))
    assert indexed <= live, "the read index holds dropped queries"
    assert not engine.running


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps, st.integers(0, 10**6))
def test_every_subscriber_settles_on_a_fresh_result(script, seed):
    asyncio.run(play(script, seed))


async def test_a_rerun_that_starts_reading_a_table_sees_changes_to_it_made_meanwhile():
    # regression: a re-run whose read set grew (the flag made it read t) kept only the changes to
    # the tables of its previous read set, so a write to t after its snapshot was never re-run
    ex = ModelExecutor(random.Random(0))
    gate: asyncio.Event | None = None
    compute = ex.call

    async def gated(fn, args, auth, track_reads, call_out):
        if gate is None:
            return await compute(fn, args, auth, track_reads, call_out)
        rows, flag = {i: dict(r) for i, r in ex.rows.items()}, ex.flag
        await gate.wait()  # the snapshot is taken; changes now commit after it
        result, reads = ex.compute(fn, args, rows, flag)
        call_out.append(_call(reads))
        return result

    ex.call = gated
    engine = LiveQueryEngine(ex, NoCapture(), max_concurrent_runs=1)
    engine.start()
    sink = Sink()
    sub = Subscription(sink, "s1", "flagged", {}, Caller("u1"))
    engine.subscribe(sub)
    for _ in range(20):
        await asyncio.sleep(0)
    assert sink.last["s1"] is None
    gate = asyncio.Event()
    ex.flag = True
    engine.on_changes([Change("flags", "UPDATE", ({"id": 1, "on": False},), ({"id": 1, "on": True},))], 1)
    for _ in range(5):
        await asyncio.sleep(0)
    assert sub.query.running
    ex.rows[7] = {"owner": "a", "topic": 0}
    engine.on_changes([Change("t", "INSERT", (), ({"id": 7, "owner": "a", "topic": 0},))], 2)
    gate.set()
    gate = None
    for _ in range(50):
        await asyncio.sleep(0)
    await engine.stop()
    assert sink.last["s1"] == [7], "the insert into t during the re-run was missed"


async def test_many_writes_to_another_table_during_a_run_do_not_make_it_dirty(monkeypatch):
    # a running query keeps a bounded number of changes; past the bound it remembers only which
    # tables overflowed, so a flood of writes elsewhere does not re-run it (it would never settle)
    from forge_realtime import engine as engine_mod

    monkeypatch.setattr(engine_mod, "_PENDING_LIMIT", 5)
    ex = ModelExecutor(random.Random(0))
    gate = asyncio.Event()
    compute = ex.call

    async def gated(fn, args, auth, track_reads, call_out):
        await gate.wait()
        return await compute(fn, args, auth, track_reads, call_out)

    ex.call = gated
    engine = LiveQueryEngine(ex, NoCapture(), max_concurrent_runs=1)
    engine.start()
    sink = Sink()
    sub = Subscription(sink, "s1", "by_owner", {"o": "a"}, Caller("u1"))
    engine.subscribe(sub)
    for _ in range(5):
        await asyncio.sleep(0)
    assert sub.query.running
    engine.on_changes([Change("elsewhere", "INSERT", (), ({"id": i},)) for i in range(50)], 1)
    gate.set()
    for _ in range(50):
        await asyncio.sleep(0)
    assert engine.stats.runs == 1 and not sub.query.dirty
    # past the bound on a table it does read, it re-runs
    gate.clear()
    engine.on_changes([Change("t", "INSERT", (), ({"id": 1, "owner": "a", "topic": 0},))], 2)
    ex.rows[1] = {"owner": "a", "topic": 0}
    for _ in range(5):
        await asyncio.sleep(0)
    assert sub.query.running
    # (the change to t comes first: the bound drops the oldest changes, and a run keeps only the tables
    # they wrote; one that is still kept is checked against the new read set, and owner b would not match)
    engine.on_changes([Change("t", "INSERT", (), ({"id": 9, "owner": "b", "topic": 0},))]
                      + [Change("elsewhere", "INSERT", (), ({"id": i},)) for i in range(50)], 3)
    assert "t" in sub.query.overflow
    gate.set()
    for _ in range(50):
        await asyncio.sleep(0)
    await engine.stop()
    assert engine.stats.runs == 3  # the first run, the insert into t, and the overflowed t
    assert sink.last["s1"] == [[1, "a", 0]]


async def _first_run_then_an_insert(engine: LiveQueryEngine, ex: ModelExecutor, subs: list[Subscription]) -> None:
    """Start ``engine``, subscribe ``subs`` (their query's first run), then insert a row they read
    (the second run)."""
    engine.start()
    for sub in subs:
        engine.subscribe(sub)
    for _ in range(20):
        await asyncio.sleep(0)
    ex.rows[2] = {"owner": "a", "topic": 1}
    engine.on_changes([Change("t", "INSERT", (), ({"id": 2, "owner": "a", "topic": 1},))], 5)
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_result_is_encoded_once_and_the_same_bytes_go_to_every_subscriber():
    class Parts:
        direct = None

        def __init__(self) -> None:
            self.messages: dict[str, tuple[bytes, ...]] = {}

        def push(self, sub_id, message, kind) -> None:
            self.messages[sub_id] = message

        def end(self, sub_id, error) -> None:
            raise AssertionError(f"{sub_id} ended: {error}")

    ex = ModelExecutor(random.Random(0))
    ex.rows[1] = {"owner": "a", "topic": 0}
    engine = LiveQueryEngine(ex, NoCapture(), max_concurrent_runs=1)
    sink = Parts()
    subs = [Subscription(sink, f"s{i}", "by_owner", {"o": "a"}, Caller("u1")) for i in range(50)]
    await _first_run_then_an_insert(engine, ex, subs)
    await engine.stop()
    assert engine.stats.runs == 2
    tails = [m[-1] for m in sink.messages.values()]
    assert all(isinstance(t, bytes) and b'"data":[[1,' in t for t in tails)
    assert len({id(t) for t in tails}) == 1, "each subscriber got its own copy of the result"
    for sub in subs:
        msg = json.loads(b"".join(sink.messages[sub.sub_id]))
        assert msg == {"type": "data", "id": sub.sub_id, "hash": sub.query.hash, "position": 0,
                       "data": [[1, "a", 0], [2, "a", 1]]}


async def test_subscribers_with_the_same_id_get_the_very_same_message():
    """Clients number their subscriptions alike (ForgeClient's first is "s1" on every connection):
    a fan-out hands all of them one message object, so a push allocates nothing."""
    class Owner:
        direct = None

        def __init__(self) -> None:
            self.messages: list[tuple[bytes, ...]] = []

        def push(self, sub_id, message, kind) -> None:
            self.messages.append(message)

        def end(self, sub_id, error) -> None:
            raise AssertionError(f"{sub_id} ended: {error}")

    ex = ModelExecutor(random.Random(0))
    ex.rows[1] = {"owner": "a", "topic": 0}
    engine = LiveQueryEngine(ex, NoCapture(), max_concurrent_runs=1)
    owners = [Owner() for _ in range(30)]
    subs = [Subscription(o, "s1" if i % 3 else "other", "by_owner", {"o": "a"}, Caller("u1"))
            for i, o in enumerate(owners)]
    await _first_run_then_an_insert(engine, ex, subs)
    await engine.stop()
    last = [o.messages[-1] for o in owners]
    assert len({id(m) for m in last}) == 2  # one per distinct id, not one per subscriber
    assert {json.loads(b"".join(m))["id"] for m in last} == {"s1", "other"}
    assert engine.stats.pushes == 60


async def test_the_fan_out_writes_through_direct_and_pushes_only_what_it_refuses():
    """``Subscriber.direct``: a subscriber whose connection takes the message at once gets it
    there and no ``push``; one whose ``direct`` refuses (its peer is not reading) or is None
    (something is queued) gets the very same message through ``push``; each gets it once."""
    class Owner:
        def __init__(self, mode: str) -> None:
            self.mode, self.direct_writes, self.pushes = mode, [], []
            self.direct = None if mode == "none" else self._direct

        def _direct(self, message) -> bool:
            if self.mode == "refuse":
                return False
            self.direct_writes.append(message)
            return True

        def push(self, sub_id, message, kind) -> None:
            self.pushes.append((kind, message))

        def end(self, sub_id, error) -> None:
            raise AssertionError(f"{sub_id} ended: {error}")

    ex = ModelExecutor(random.Random(0))
    ex.rows[1] = {"owner": "a", "topic": 0}
    engine = LiveQueryEngine(ex, NoCapture(), max_concurrent_runs=1)
    owners = [Owner(("take", "refuse", "none")[i % 3]) for i in range(9)]
    await _first_run_then_an_insert(engine, ex, [Subscription(o, "s", "by_owner", {"o": "a"}, Caller("u1"))
                                                 for o in owners])
    await engine.stop()
    for o in owners:
        got = o.direct_writes if o.mode == "take" else [m for kind, m in o.pushes if kind == "data"]
        assert [sorted(json.loads(b"".join(m))["data"]) for m in got] == [[[1, "a", 0]], [[1, "a", 0], [2, "a", 1]]]
        if o.mode == "take":
            assert o.pushes == []
        else:
            assert o.direct_writes == []


async def test_telemetry_sees_a_fan_out_as_one_event_and_one_push_span():
    """A result pushed to many subscribers is one ``rt.push`` event carrying the count and one
    ``push`` span under the run's span: recording them per subscriber cost a hot query more than
    the sends (5,000 spans and events per run)."""
    from forge_kernel.telemetry import Telemetry

    traces = []
    tel = Telemetry()
    tel.attach(traces.append, sample_rate=1.0)
    ex = ModelExecutor(random.Random(0))
    ex.node = types.SimpleNamespace(telemetry=tel)
    ex.rows[1] = {"owner": "a", "topic": 0}
    engine = LiveQueryEngine(ex, NoCapture(), max_concurrent_runs=1)
    sink = Sink()
    await _first_run_then_an_insert(engine, ex, [Subscription(sink, f"s{i}", "by_owner", {"o": "a"}, Caller("u1"))
                                                 for i in range(40)])
    engine.subscribe(Subscription(sink, "late", "by_owner", {"o": "a"}, Caller("u1")))  # served from the result
    await engine.stop()
    assert engine.stats.runs == 2 and len(sink.last) == 41
    assert [f for k, f in tel.drain() if k == "rt.push"] == [("data", 40), ("data", 40), ("data", 1)]
    runs = [t for t in traces if any(s.name.startswith("live query") for s in t.spans)]
    assert len(runs) == 2
    for t in runs:
        run = next(s for s in t.spans if s.name.startswith("live query"))
        pushes = [s for s in t.spans if s.name == "push"]
        assert len(pushes) == 1 and pushes[0].parent_id == run.span_id
        assert pushes[0].attrs["live.pushes"] == 40 and pushes[0].end_ns >= pushes[0].start_ns


async def test_a_rerun_that_finds_the_database_gone_keeps_its_subscriptions_and_runs_again():
    # found by bench/soak: after a PostgreSQL restart the reader re-runs every live query; runs that
    # met the restarting server ended their subscriptions (INTERNAL) and clients got nothing more
    from forge_kernel.errors import DatabaseUnavailable

    ex = ModelExecutor(random.Random(0))
    compute, lost = ex.call, [2]

    async def flaky(fn, args, auth, track_reads, call_out):
        if lost[0]:
            lost[0] -= 1
            raise DatabaseUnavailable("the database is unavailable, retry")
        return await compute(fn, args, auth, track_reads, call_out)

    engine = LiveQueryEngine(ex, NoCapture(), max_concurrent_runs=1)
    engine.start()
    sink = Sink()  # its end() fails the test
    sub = Subscription(sink, "s1", "all", {}, Caller("u1"))
    engine.subscribe(sub)
    for _ in range(20):
        await asyncio.sleep(0)
    assert sink.last["s1"] == []
    ex.call = flaky
    ex.rows[3] = {"owner": "a", "topic": 0}
    engine.on_changes([Change("t", "INSERT", (), ({"id": 3, "owner": "a", "topic": 0},))], 1)
    for _ in range(300):
        if sink.last["s1"] == [3]:
            break
        await asyncio.sleep(0.01)
    await engine.stop()
    assert lost == [0] and sink.last["s1"] == [3]


class Recorder:
    """A subscriber that records every ``data`` push: (its name, the result's hash, its position)."""
    direct = None

    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def push(self, sub_id, message, kind) -> None:
        if kind == "data":
            msg = json.loads(b"".join(message))
            self.log.append((self.name, msg["hash"], msg["position"]))

    def end(self, sub_id, error) -> None:
        raise AssertionError(f"{sub_id} ended: {error}")


def _hot_engine(n: int, **kw: Any) -> tuple[LiveQueryEngine, ModelExecutor, list, list[Subscription]]:
    ex = ModelExecutor(random.Random(0))
    ex.rnd = random.Random(0)
    ex.rows[1] = {"owner": "a", "topic": 0}
    engine = LiveQueryEngine(ex, NoCapture(), max_concurrent_runs=2, **kw)
    log: list = []
    subs = [Subscription(Recorder(log, i), "s", "by_owner", {"o": "a"}, Caller("u1")) for i in range(n)]
    return engine, ex, log, subs


def _insert(engine: LiveQueryEngine, ex: ModelExecutor, i: int, position: int) -> None:
    ex.rows[i] = {"owner": "a", "topic": 0}
    engine._position = lambda: position
    engine.on_changes([Change("t", "INSERT", (), ({"id": i, "owner": "a", "topic": 0},))], position)


async def _subscribed(engine: LiveQueryEngine, log: list, subs: list[Subscription]) -> None:
    """Start ``engine`` and subscribe ``subs``; return once each has its first result."""
    engine.start()
    for sub in subs:
        engine.subscribe(sub)
    await _settle(log, engine)


async def _first_chunk_out(log: list) -> None:
    """Wait until the fan-out in progress has sent something."""
    for _ in range(200):
        await asyncio.sleep(0)
        if log:
            return
    raise AssertionError("nothing was pushed")


async def _settle(log: list, engine: LiveQueryEngine) -> None:
    for _ in range(2000):
        await asyncio.sleep(0)
        if not engine.running and not engine._queue and not any(getattr(q, "fanning", False) for q in engine.queries.values()):
            return
    raise AssertionError("the engine did not settle")


async def test_a_long_fan_out_yields_to_the_event_loop_and_the_unreached_get_the_newer_result():
    """A fan-out to thousands of sockets takes tens of milliseconds: it must not hold the event loop
    (the change-log reader and the next run wait behind it, p99 142 ms in bench (c)). A result that
    arrives meanwhile goes to the subscribers not reached yet (latest wins) and then to the others;
    nobody gets the older result after the newer, and everybody ends with the newest."""
    from forge_realtime.engine import FANOUT_CHUNK

    n = FANOUT_CHUNK * 4
    engine, ex, log, subs = _hot_engine(n, rerun_after=0.5)  # a run while the pass is out
    await _subscribed(engine, log, subs)
    assert len(log) == n
    first_hash = log[0][1]
    log.clear()
    _insert(engine, ex, 2, 10)
    await _first_chunk_out(log)  # the run finished and the fan-out sent its first chunk
    reached = len(log)
    assert 0 < reached < n, f"the fan-out sent {reached} of {n} results without yielding"
    _insert(engine, ex, 3, 20)
    await _settle(log, engine)
    await engine.stop()
    hashes = {h for _, h, _ in log}
    assert first_hash not in hashes and len(hashes) == 2
    latest = {}
    for name, h, position in log:
        assert position >= latest.get(name, (None, 0))[1], "a subscriber got an older result after a newer one"
        latest[name] = (h, position)
    assert {p for _, p in latest.values()} == {20} and len(latest) == n
    # latest wins: fewer pushes than two full fan-outs (the unreached skipped the intermediate result)
    assert len(log) < 2 * n
    assert engine.stats.runs == 3


async def test_a_fan_out_lets_the_event_loop_turn_every_64_subscribers():
    """The change-log reader and the re-run a write needs take several turns of the event loop, each
    waiting for the fan-out chunk in progress: with chunks of 256 sockets (about 3 ms) the node's loop
    stalled over 20 ms 40-52 times per bench (c) step on a busy machine. Another task gets the loop
    after at most 64 pushes."""
    from forge_realtime.engine import FANOUT_CHUNK

    n = max(FANOUT_CHUNK, 64) * 6
    engine, ex, log, subs = _hot_engine(n)
    await _subscribed(engine, log, subs)
    log.clear()
    turns: list[int] = []
    stop = False

    async def watch() -> None:  # how many pushes went out by each turn of the loop
        while not stop:
            turns.append(len(log))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    _insert(engine, ex, 2, 10)
    await _settle(log, engine)
    stop = True
    await watcher
    await engine.stop()
    assert len(log) == n
    turns.append(len(log))
    assert max(b - a for a, b in zip(turns, turns[1:])) <= 64


async def test_fan_out_passes_rotate_so_no_subscriber_is_always_last():
    from forge_realtime.engine import FANOUT_CHUNK

    n = FANOUT_CHUNK * 2 + 10
    engine, ex, log, subs = _hot_engine(n)
    await _subscribed(engine, log, subs)
    orders = []
    for i in range(2, 5):
        log.clear()
        _insert(engine, ex, i, i)
        await _settle(log, engine)
        assert len(log) == n
        orders.append([name for name, _, _ in log])
    await engine.stop()
    assert len({o[-1] for o in orders}) == 3 and len({o[0] for o in orders}) == 3


async def test_a_subscriber_gone_during_a_fan_out_gets_nothing_more():
    from forge_realtime.engine import FANOUT_CHUNK

    n = FANOUT_CHUNK * 3
    engine, ex, log, subs = _hot_engine(n)
    await _subscribed(engine, log, subs)
    log.clear()
    _insert(engine, ex, 2, 10)
    await _first_chunk_out(log)
    reached = {name for name, _, _ in log}
    gone = [s for s in subs if s.owner.name not in reached]
    assert gone
    for sub in gone:
        engine.unsubscribe(sub)
    await _settle(log, engine)
    await engine.stop()
    assert {name for name, _, _ in log} == reached


async def _runs_during_a_fan_out(**kw: Any) -> tuple[int, list[int], list]:
    """Five writes while a hot query's fan-out is out: the number of subscribers, how many pushes
    had gone out when each run started, and the pushes."""
    from forge_realtime.engine import FANOUT_CHUNK

    n = FANOUT_CHUNK * 8
    engine, ex, log, subs = _hot_engine(n, **kw)
    started_at: list[int] = []
    call = ex.call

    async def counted_call(*a, **kw):
        started_at.append(len(log))
        return await call(*a, **kw)

    ex.call = counted_call
    await _subscribed(engine, log, subs)
    log.clear()
    started_at.clear()
    _insert(engine, ex, 2, 10)
    await _first_chunk_out(log)
    for i in range(3, 8):  # five writes while the first chunk is out
        _insert(engine, ex, i, 10 + i)
    await _settle(log, engine)
    await engine.stop()
    return n, started_at, log


async def test_a_hot_query_runs_again_only_once_its_fan_out_has_reached_every_subscriber():
    """Writes during a long fan-out do not each re-run the query: the next run starts when the pass
    has sent to all its subscribers (one result per pass: with a run at half a pass a hot query ran
    0.45-0.51 times per write in bench (c), more than the fan-out that held the event loop did), and
    covers all of them at once."""
    n, started_at, log = await _runs_during_a_fan_out()
    assert len(started_at) == 2, started_at  # the first write's run, then one run for the five others
    assert started_at[1] >= n
    assert {p for name, h, p in log[-n:]} == {17}


async def test_rerun_after_pass_runs_a_hot_query_again_part_way_through_its_fan_out():
    """``[realtime] rerun_after_pass`` below 1: fresher results for more re-runs. At 0.5 the next run
    starts once the pass is half through, before it ends, and still covers every write since."""
    n, started_at, log = await _runs_during_a_fan_out(rerun_after=0.5)
    assert len(started_at) == 2, started_at
    assert n // 2 <= started_at[1] < n
    assert {p for name, h, p in log[-n:]} == {17}


async def test_a_hot_querys_next_run_starts_ahead_of_the_pass_end_by_what_the_last_run_took():
    """A run started by a pass used to start when the pass ended, and the fan-out then stood idle
    while it ran (a PostgreSQL round trip and the node's share of it; bench (c) measured it per
    pass). The next run starts that much earlier, so its result is ready as the pass ends; at most
    half a pass early (a run slower than that, as here, starts half way), and the first run, with
    nothing measured yet, waits for the end.

    That run is under way while the worker of the previous one is still in its fan-out: a change
    committed during it must still make the query run again when it finishes (the worker used to
    forget the query's running state and its journal of changes as its own fan-out ended)."""
    from forge_realtime.engine import FANOUT_CHUNK

    n = FANOUT_CHUNK * 8
    engine, ex, log, subs = _hot_engine(n)
    started_at: list[int] = []
    call = ex.call

    async def slow_call(*a, **kw):
        started_at.append(len(log))
        result = await call(*a, **kw)  # its snapshot
        await asyncio.sleep(0.05)  # far longer than a pass to these in-memory subscribers
        return result

    async def settled() -> None:
        for _ in range(2000):
            await asyncio.sleep(0.002)
            if not engine.running and not engine._queue and not any(q.fanning for q in engine.queries.values()):
                return
        raise AssertionError("the engine did not settle")

    async def pushed(count: int) -> None:  # a turn of the loop at a time: writes land mid-pass
        deadline = asyncio.get_running_loop().time() + 5
        while len(log) < count:
            assert asyncio.get_running_loop().time() < deadline, "the fan-out did not get there"
            await asyncio.sleep(0)

    ex.call = slow_call
    engine.start()
    for sub in subs:
        engine.subscribe(sub)
    await settled()
    log.clear()
    started_at.clear()
    _insert(engine, ex, 2, 10)  # run 1 (started by the change), pass 1
    await pushed(1)
    _insert(engine, ex, 3, 11)  # run 2, started by pass 1 at its end: its time is measured
    await pushed(n + 1)
    _insert(engine, ex, 4, 12)  # pass 2 is out: run 3 starts half way through it
    await pushed(2 * n)
    await asyncio.sleep(0.01)
    assert len(started_at) == 3 and len(log) == 2 * n  # pass 2 is over, run 3 under way
    _insert(engine, ex, 5, 13)  # a change during run 3, after its snapshot: run 4
    await settled()
    await engine.stop()
    assert len(started_at) == 4, started_at
    assert started_at[1] == n
    assert n + n // 2 <= started_at[2] < 2 * n - FANOUT_CHUNK
    assert 3 * n - n // 2 <= started_at[3] < 4 * n - FANOUT_CHUNK
    assert engine.stats.rerun_lags == 3 and engine.stats.rerun_lag_ns >= 3 * 50_000_000
    assert len(log) == 4 * n and {p for _, _, p in log[-n:]} == {13}
    latest: dict = {}
    for name, _, position in log:
        assert position > latest.get(name, 0), "a subscriber got an older result after a newer one"
        latest[name] = position


@pytest.mark.parametrize("seed", range(12))
async def test_hot_query_writes_at_random_during_passes_and_runs_leave_every_subscriber_on_the_latest(seed: int):
    """Writes landing anywhere in passes, runs of random length started ahead of the pass end or by
    the change itself, results overtaking passes (latest wins), several workers: every subscriber
    ends with the result of the last write and never gets an older result after a newer one."""
    from forge_realtime.engine import FANOUT_CHUNK

    rnd = random.Random(seed)
    n = FANOUT_CHUNK * rnd.randint(2, 8) + rnd.randint(0, FANOUT_CHUNK - 1)
    engine, ex, log, subs = _hot_engine(n, rerun_after=rnd.choice([1.0, 0.75, 0.5]))
    engine.max_concurrent_runs = 8
    call = ex.call

    async def slow_call(*a, **kw):
        result = await call(*a, **kw)
        await asyncio.sleep(rnd.random() * 0.004)
        return result

    async def settled() -> None:
        for _ in range(5000):
            await asyncio.sleep(0.001)
            if not engine.running and not engine._queue and not any(q.fanning or q.dirty for q in engine.queries.values()):
                return
        raise AssertionError("the engine did not settle")

    ex.call = slow_call
    engine.start()
    for sub in subs:
        engine.subscribe(sub)
    await settled()
    last = 0
    for i in range(2, 2 + rnd.randint(5, 60)):
        last = 10 + i
        _insert(engine, ex, i, last)
        for _ in range(rnd.randint(0, 40)):
            await asyncio.sleep(0 if rnd.random() < 0.8 else 0.0005)
    await settled()
    await engine.stop()
    latest: dict = {}
    for name, _, position in log:
        assert position >= latest.get(name, 0), "a subscriber got an older result after a newer one"
        latest[name] = position
    assert {latest.get(i) for i in range(n)} == {last}


def test_rerun_after_pass_outside_0_to_1_is_refused_naming_the_key():
    import pytest

    from forge_kernel.convert import InvalidValue
    from forge_realtime.config import RealtimeConfig

    for bad in (-0.1, 1.5):
        with pytest.raises(InvalidValue, match="rerun_after_pass"):
            RealtimeConfig(rerun_after_pass=bad)
    assert RealtimeConfig(rerun_after_pass=0).rerun_after_pass == 0


@pytest.mark.parametrize("while_running", [False, True])
async def test_a_subscriber_that_joins_during_a_pass_gets_the_result_when_the_run_it_waits_for_finds_it_unchanged(
        while_running: bool):
    """A subscribe that arrives while a hot query is dirty or running waits for that run's result,
    and the pass in progress does not know it (its subscribers were taken when it began). When that
    run ends during the pass with the result the pass is sending (a write that did not change it),
    the pass is not restarted: the subscriber must still get the result, not be left with nothing."""
    from forge_realtime.engine import FANOUT_CHUNK

    n = FANOUT_CHUNK * 16
    engine, ex, log, subs = _hot_engine(n, rerun_after=0.5)
    call = ex.call

    async def call_of_three_turns(*a, **kw):  # a few turns of the loop, well within half a pass
        result = await call(*a, **kw)
        for _ in range(3):
            await asyncio.sleep(0)
        return result

    ex.call = call_of_three_turns
    await _subscribed(engine, log, subs)
    log.clear()
    q = subs[0].query
    _insert(engine, ex, 2, 10)  # a run, then a pass of its result
    await _first_chunk_out(log)
    assert q.fanning and q.holding
    # a write that touches the query's rows without changing its result: it runs again half way
    engine.on_changes([Change("t", "UPDATE", (), ({"id": 1, "owner": "a", "topic": 0},))], 11)
    assert q.dirty
    if while_running:
        for _ in range(1000):
            await asyncio.sleep(0)
            if q.running:
                break
        assert q.running and q.fanning, (q.running, q.fanning, q.runs, len(log))
    late = Subscription(Recorder(log, "late"), "s-late", "by_owner", {"o": "a"}, Caller("u1"))
    engine.subscribe(late)
    for _ in range(1000):
        await asyncio.sleep(0)
        if not engine.running and not engine._queue and not q.fanning:
            break
    assert q.runs >= 3 and not q.fanning
    await engine.stop()
    assert [h for name, h, _ in log if name == "late"] == [q.hash], "the late subscriber got no result"
