"""StreamPool: calls to one peer spread over several call streams (streams.py), each call's
answer, deadline and cancel on the stream it was sent on; protocol 4 carries the frames (and
results) that are ready together in one message. A fake grpc stream call stands in for the
network: what is under test is the pool's bookkeeping, not grpc."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from forge_mesh.protocol import mesh_pb2 as pb
from forge_mesh.streams import StreamPool, serve_stream


class FakeStreamCall:
    """The caller's end of one Calls (protocol 3) or Batches (protocol 4) stream: messages and
    frames written are kept; results are fed in."""

    def __init__(self, batched: bool = True) -> None:
        self.batched = batched
        self.frames: list[pb.CallFrame] = []
        self.messages: list[list[pb.CallFrame]] = []
        self.results: asyncio.Queue = asyncio.Queue()

    async def write(self, message) -> None:
        assert isinstance(message, pb.CallBatch if self.batched else pb.CallFrame), type(message)
        frames = list(message.frames) if self.batched else [message]
        self.messages.append(frames)
        self.frames.extend(frames)

    def answer(self, seq: int, text: str) -> None:
        self.answer_many([(seq, text)])

    def answer_many(self, answers: list[tuple[int, str]]) -> None:
        results = [pb.CallResult(seq=seq, reply=pb.CallReply(result_json=text.encode())) for seq, text in answers]
        if self.batched:
            self.results.put_nowait(pb.ResultBatch(results=results))
        else:
            for result in results:
                self.results.put_nowait(result)

    def __aiter__(self):
        return self

    async def __anext__(self) -> pb.CallResult:
        item = await self.results.get()
        if isinstance(item, Exception):
            raise item
        return item


def _req(name: str) -> pb.CallRequest:
    return pb.CallRequest(function=name, protocol=3)


async def _until(cond, what: str) -> None:
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(what)


def _pool(opened: list[FakeStreamCall], size: int, batched: bool) -> StreamPool:
    return StreamPool(lambda: opened.append(FakeStreamCall(batched)) or opened[-1], size=size, batched=batched)


both_protocols = pytest.mark.parametrize("batched", [True, False], ids=["protocol4", "protocol3"])


async def test_protocol3_concurrent_calls_go_on_separate_streams_and_get_their_own_answers():
    opened: list[FakeStreamCall] = []
    pool = _pool(opened, 3, False)
    calls = [asyncio.ensure_future(pool.request(_req(f"fn{i}"), timeout=30)) for i in range(4)]
    await _until(lambda: sum(len(s.frames) for s in opened) == 4, "all four frames written")
    # three streams for the first three calls in flight; the fourth shares the least busy one
    assert len(opened) == 3
    assert sorted(len(s.frames) for s in opened) == [1, 1, 2]
    for stream in opened:  # answer in reverse order on each stream
        for frame in reversed(stream.frames):
            stream.answer(frame.seq, f'"{frame.request.function}"')
    replies = await asyncio.gather(*calls)
    assert [r.result_json.decode() for r in replies] == ['"fn0"', '"fn1"', '"fn2"', '"fn3"']
    # all answered: the next call reuses an open stream
    nxt = asyncio.ensure_future(pool.request(_req("again"), timeout=30))
    await _until(lambda: sum(len(s.frames) for s in opened) == 5, "the fifth frame written")
    assert len(opened) == 3
    stream = next(s for s in opened if s.frames[-1].request.function == "again")
    stream.answer(stream.frames[-1].seq, '"again"')
    assert (await nxt).result_json == b'"again"'
    await pool.close()


@both_protocols
async def test_a_deadline_or_a_caller_going_away_cancels_on_the_stream_the_call_used(batched, monkeypatch):
    monkeypatch.setattr(StreamPool, "BATCH_SHARE", 1)  # two calls, two streams
    opened: list[FakeStreamCall] = []
    pool = _pool(opened, 2, batched)
    busy = asyncio.ensure_future(pool.request(_req("busy"), timeout=30))
    await _until(lambda: opened and opened[0].frames, "the first frame written")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await pool.request(_req("slow"), timeout=0.05)  # goes on the second stream, runs out of time
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _until(lambda: len(opened) == 2 and any(f.cancel for f in opened[1].frames), "a cancel frame")
    assert [f.seq for f in opened[1].frames if f.cancel] == [opened[1].frames[0].seq]
    assert not any(f.cancel for f in opened[0].frames)
    busy.cancel()  # the caller went away: its own stream carries the cancel
    await _until(lambda: any(f.cancel for f in opened[0].frames), "the busy call's cancel frame")
    await pool.close()


@both_protocols
async def test_a_broken_stream_fails_only_its_own_calls(batched, monkeypatch):
    monkeypatch.setattr(StreamPool, "BATCH_SHARE", 1)
    opened: list[FakeStreamCall] = []
    pool = _pool(opened, 2, batched)
    first = asyncio.ensure_future(pool.request(_req("a"), timeout=30))
    second = asyncio.ensure_future(pool.request(_req("b"), timeout=30))
    await _until(lambda: len(opened) == 2 and all(s.frames for s in opened), "two streams in use")
    opened[0].results.put_nowait(grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                                      grpc.aio.Metadata(), "Socket closed"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await first
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not second.done()
    opened[1].answer(opened[1].frames[0].seq, '"b"')
    assert (await second).result_json == b'"b"'
    await pool.close()


def test_a_pool_needs_a_stream():
    with pytest.raises(ValueError, match="at least one stream"):
        StreamPool(lambda: None, size=0)


async def test_protocol4_sends_the_calls_ready_together_in_one_message_and_takes_results_together():
    opened: list[FakeStreamCall] = []
    pool = _pool(opened, 1, True)
    calls = [asyncio.ensure_future(pool.request(_req(f"fn{i}"), timeout=30)) for i in range(5)]
    await _until(lambda: opened and len(opened[0].frames) == 5, "five frames written")
    stream = opened[0]
    assert [len(m) for m in stream.messages] == [5]  # one message, not five
    stream.answer_many([(f.seq, f'"{f.request.function}"') for f in reversed(stream.frames)])
    assert [r.result_json.decode() for r in await asyncio.gather(*calls)] == [f'"fn{i}"' for i in range(5)]
    # an idle stream sends a lone call at once (nothing waits to fill a batch)
    lone = asyncio.ensure_future(pool.request(_req("lone"), timeout=30))
    await _until(lambda: len(stream.messages) == 2, "the lone call's message")
    assert [f.request.function for f in stream.messages[1]] == ["lone"]
    stream.answer(stream.messages[1][0].seq, '"lone"')
    assert (await lone).result_json == b'"lone"'
    await pool.close()


async def test_protocol4_calls_share_a_stream_until_it_has_batch_share_in_flight(monkeypatch):
    monkeypatch.setattr(StreamPool, "BATCH_SHARE", 3)
    opened: list[FakeStreamCall] = []
    pool = _pool(opened, 2, True)
    calls = [asyncio.ensure_future(pool.request(_req(f"fn{i}"), timeout=30)) for i in range(8)]
    await _until(lambda: sum(len(s.frames) for s in opened) == 8, "all eight frames written")
    # three on the first stream, three on the second, then the least busy one
    assert [len(s.frames) for s in opened] == [4, 4]
    assert [f.request.function for f in opened[0].frames[:3]] == ["fn0", "fn1", "fn2"]
    for stream in opened:
        stream.answer_many([(f.seq, '"ok"') for f in stream.frames])
    await asyncio.gather(*calls)
    await pool.close()


async def test_calls_made_while_a_message_is_on_its_way_go_together_in_the_next():
    class SlowWrites(FakeStreamCall):
        def __init__(self) -> None:
            super().__init__(True)
            self.release = asyncio.Event()

        async def write(self, message) -> None:
            await super().write(message)
            await self.release.wait()  # grpc has not reported the write done yet
            self.release.clear()

    opened: list[SlowWrites] = []
    pool = StreamPool(lambda: opened.append(SlowWrites()) or opened[-1], size=1, batched=True)
    first = asyncio.ensure_future(pool.request(_req("first"), timeout=30))
    await _until(lambda: opened and opened[0].messages, "the first message")
    later = [asyncio.ensure_future(pool.request(_req(f"later{i}"), timeout=30)) for i in range(3)]
    await asyncio.sleep(0.01)
    stream = opened[0]
    assert len(stream.messages) == 1  # one write at a time on a stream
    stream.release.set()
    await _until(lambda: len(stream.messages) == 2, "the second message")
    assert [f.request.function for f in stream.messages[1]] == ["later0", "later1", "later2"]
    stream.release.set()
    stream.answer_many([(f.seq, '"ok"') for f in stream.frames])
    await asyncio.gather(first, *later)
    await pool.close()


async def _serve(frames_in: list, run, batched: bool = True, **kw) -> list:
    """Run serve_stream over the given incoming messages; returns what it sent back."""
    incoming: asyncio.Queue = asyncio.Queue()
    for m in frames_in:
        incoming.put_nowait(m)
    incoming.put_nowait(None)

    async def messages():
        while (m := await incoming.get()) is not None:
            yield m

    return [out async for out in serve_stream(messages(), run, batched, **kw)]


async def test_the_target_answers_the_results_ready_together_in_one_message():
    gate = asyncio.Event()

    async def run(req: pb.CallRequest) -> pb.CallReply:
        await gate.wait()
        return pb.CallReply(result_json=f'"{req.function}"'.encode())

    batch = pb.CallBatch(frames=[pb.CallFrame(seq=i, request=_req(f"fn{i}")) for i in range(1, 5)])
    serving = asyncio.ensure_future(_serve([batch], run))
    await asyncio.sleep(0.01)
    gate.set()  # all four finish in the same tick
    out = await serving
    assert [type(m) for m in out] == [pb.ResultBatch]
    assert sorted((r.seq, r.reply.result_json) for r in out[0].results) == [(i, f'"fn{i}"'.encode()) for i in range(1, 5)]


async def test_the_target_cancels_a_call_named_by_a_cancel_frame_in_a_batch():
    started, cancelled = asyncio.Event(), []

    async def run(req: pb.CallRequest) -> pb.CallReply:
        if req.function == "slow":
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.append(req.function)
                raise
        return pb.CallReply(result_json=b'"quick"')

    incoming: asyncio.Queue = asyncio.Queue()
    incoming.put_nowait(pb.CallBatch(frames=[pb.CallFrame(seq=1, request=_req("slow")),
                                             pb.CallFrame(seq=2, request=_req("quick"))]))

    async def messages():
        while (m := await incoming.get()) is not None:
            yield m

    out = []

    async def collect():
        async for m in serve_stream(messages(), run, True):
            out.append(m)

    serving = asyncio.ensure_future(collect())
    await asyncio.wait_for(started.wait(), 5)
    incoming.put_nowait(pb.CallBatch(frames=[pb.CallFrame(seq=1, cancel=True)]))
    incoming.put_nowait(None)
    await asyncio.wait_for(serving, 5)
    assert cancelled == ["slow"]
    assert [(r.seq, r.reply.result_json) for m in out for r in m.results] == [(2, b'"quick"')]


@both_protocols
async def test_a_caller_going_away_while_its_frame_is_written_leaves_the_stream_to_the_others(batched, monkeypatch):
    """grpcio cancels the whole stream when a write is cancelled (aio ``_write``): a caller that
    wrote its own frame and was cancelled then (its client went away) failed every other call
    on the stream. Frames are written by the stream's own writer, never by a caller."""

    class GrpcLikeWrites(FakeStreamCall):
        def __init__(self) -> None:
            super().__init__(batched)
            self.release = asyncio.Event()

        async def write(self, message) -> None:
            try:
                await self.release.wait()
            except asyncio.CancelledError:  # what grpc.aio does: the RPC is cancelled
                self.results.put_nowait(grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(),
                                                             grpc.aio.Metadata(), "Locally cancelled by application!"))
                raise
            await super().write(message)

    monkeypatch.setattr(StreamPool, "BATCH_SHARE", 4)
    opened: list[GrpcLikeWrites] = []
    pool = StreamPool(lambda: opened.append(GrpcLikeWrites()) or opened[-1], size=1, batched=batched)
    goes_away = asyncio.ensure_future(pool.request(_req("goes_away"), timeout=30))
    stays = asyncio.ensure_future(pool.request(_req("stays"), timeout=30))
    await asyncio.sleep(0.01)  # the first frame's write is under way
    goes_away.cancel()
    await asyncio.sleep(0.01)
    stream = opened[0]
    stream.release.set()
    await _until(lambda: any(f.request.function == "stays" for f in stream.frames), "the other call's frame")
    stream.answer_many([(f.seq, '"ok"') for f in stream.frames if f.request.function == "stays"])
    assert (await asyncio.wait_for(stays, 5)).result_json == b'"ok"'
    assert len(opened) == 1
    await pool.close()


async def test_protocol4_a_call_takes_an_idle_stream_before_sharing_a_busy_one(monkeypatch):
    """At low load nothing gathers to batch, and a shared stream's next message waits for the
    last one's completion hop through grpc's poller thread: an idle stream goes first."""
    opened: list[FakeStreamCall] = []
    pool = _pool(opened, 2, True)
    monkeypatch.setattr(StreamPool, "BATCH_SHARE", 1)  # open two streams
    x = asyncio.ensure_future(pool.request(_req("x"), timeout=30))
    y = asyncio.ensure_future(pool.request(_req("y"), timeout=30))
    await _until(lambda: len(opened) == 2 and all(s.frames for s in opened), "two streams in use")
    monkeypatch.setattr(StreamPool, "BATCH_SHARE", 16)
    opened[1].answer(opened[1].frames[0].seq, '"y"')
    await y  # the second stream is idle now, the first still busy
    z = asyncio.ensure_future(pool.request(_req("z"), timeout=30))
    await _until(lambda: len(opened[1].frames) == 2, "z's frame on the idle stream")
    assert [f.request.function for f in opened[0].frames] == ["x"]
    opened[1].answer(opened[1].frames[1].seq, '"z"')
    opened[0].answer(opened[0].frames[0].seq, '"x"')
    await asyncio.gather(x, z)
    await pool.close()


async def test_a_batch_stays_within_its_byte_limit_on_both_ends():
    """A batch of large calls (or results) must not outgrow the largest message a peer takes:
    grpc would refuse it and break the stream with every call on it."""
    big = "x" * 400

    def req(i: int) -> pb.CallRequest:
        return pb.CallRequest(function=f"fn{i}", args_json=big.encode(), protocol=4)

    opened: list[FakeStreamCall] = []
    pool = StreamPool(lambda: opened.append(FakeStreamCall(True)) or opened[-1], size=1, batched=True, batch_bytes=1000)
    calls = [asyncio.ensure_future(pool.request(req(i), timeout=30)) for i in range(5)]
    await _until(lambda: opened and len(opened[0].frames) == 5, "five frames written")
    stream = opened[0]
    assert [len(m) for m in stream.messages] == [2, 2, 1]
    assert all(pb.CallBatch(frames=m).ByteSize() <= 1000 for m in stream.messages)
    stream.answer_many([(f.seq, '"ok"') for f in stream.frames])
    await asyncio.gather(*calls)
    await pool.close()

    async def run(r: pb.CallRequest) -> pb.CallReply:
        return pb.CallReply(result_json=f'"{big}"'.encode())

    out = await _serve([pb.CallBatch(frames=[pb.CallFrame(seq=i, request=req(i)) for i in range(1, 6)])], run,
                       batch_bytes=1000)
    assert sorted(r.seq for m in out for r in m.results) == [1, 2, 3, 4, 5]
    assert all(m.ByteSize() <= 1000 for m in out) and len(out) >= 3


def test_a_lone_frame_goes_whatever_its_size():
    from forge_mesh.streams import take_batch

    huge = pb.CallFrame(seq=1, request=pb.CallRequest(args_json=b"x" * 5000))
    small = pb.CallFrame(seq=2, request=pb.CallRequest(function="f"))
    assert take_batch([huge, small], 1000) == ([huge], [small])
    assert take_batch([small, small], 1000) == ([small, small], [])
    assert take_batch([], 1000) == ([], [])


async def test_protocol4_calls_join_a_message_that_is_still_gathering(monkeypatch):
    """Calls forwarded in the same turn of the loop (or the next) go out in one message, even
    when another stream is idle: under a closed-loop load G's messages carried one call each
    before (the requests of one epoll round reach the forwarder a turn apart)."""
    opened: list[FakeStreamCall] = []
    pool = _pool(opened, 2, True)
    monkeypatch.setattr(StreamPool, "BATCH_SHARE", 1)  # open two streams, then let both go idle
    first = [asyncio.ensure_future(pool.request(_req(f"w{i}"), timeout=30)) for i in range(2)]
    await _until(lambda: len(opened) == 2 and all(s.frames for s in opened), "two streams in use")
    for stream in opened:
        stream.answer(stream.frames[0].seq, '"w"')
    await asyncio.gather(*first)
    monkeypatch.setattr(StreamPool, "BATCH_SHARE", 16)
    a = asyncio.ensure_future(pool.request(_req("a"), timeout=30))
    await asyncio.sleep(0)  # a is on its way to the writer
    b = asyncio.ensure_future(pool.request(_req("b"), timeout=30))
    await _until(lambda: sum(len(s.frames) for s in opened) == 4, "a's and b's frames")
    assert [f.request.function for f in opened[0].messages[-1]] == ["a", "b"]
    assert len(opened[1].messages) == 1
    opened[0].answer_many([(f.seq, '"ok"') for f in opened[0].messages[-1]])
    await asyncio.gather(a, b)
    await pool.close()


async def test_the_target_gathers_results_finishing_a_turn_apart_into_one_message():
    async def run(req: pb.CallRequest) -> pb.CallReply:
        if req.function == "later":
            await asyncio.sleep(0)  # its database answer came in the next turn of the loop
        return pb.CallReply(result_json=f'"{req.function}"'.encode())

    batch = pb.CallBatch(frames=[pb.CallFrame(seq=1, request=_req("now")), pb.CallFrame(seq=2, request=_req("later"))])
    out = await _serve([batch], run)
    assert [sorted(r.seq for r in m.results) for m in out] == [[1, 2]]
