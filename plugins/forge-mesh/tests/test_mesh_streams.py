"""StreamPool: calls to one peer spread over several call streams (streams.py), each call's
answer, deadline and cancel on the stream it was sent on. A fake grpc stream call stands in
for the network: what is under test is the pool's bookkeeping, not grpc."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from forge_mesh.protocol import mesh_pb2 as pb
from forge_mesh.streams import StreamPool


class FakeStreamCall:
    """The caller's end of one Calls stream: frames written are kept; results are fed in."""

    def __init__(self) -> None:
        self.frames: list[pb.CallFrame] = []
        self.results: asyncio.Queue = asyncio.Queue()

    async def write(self, frame: pb.CallFrame) -> None:
        self.frames.append(frame)

    def answer(self, seq: int, text: str) -> None:
        self.results.put_nowait(pb.CallResult(seq=seq, reply=pb.CallReply(result_json=text.encode())))

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


async def test_concurrent_calls_go_on_separate_streams_and_get_their_own_answers():
    opened: list[FakeStreamCall] = []
    pool = StreamPool(lambda: opened.append(FakeStreamCall()) or opened[-1], size=3)
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


async def test_a_deadline_or_a_caller_going_away_cancels_on_the_stream_the_call_used():
    opened: list[FakeStreamCall] = []
    pool = StreamPool(lambda: opened.append(FakeStreamCall()) or opened[-1], size=2)
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


async def test_a_broken_stream_fails_only_its_own_calls():
    opened: list[FakeStreamCall] = []
    pool = StreamPool(lambda: opened.append(FakeStreamCall()) or opened[-1], size=2)
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
