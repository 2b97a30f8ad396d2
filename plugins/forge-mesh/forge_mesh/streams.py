"""Forwarded calls on long-lived bidirectional streams per peer (protocols 3 and 4).

grpcio's asyncio stack spends about three times the CPU on a unary call that it spends on one
message of an open stream (measured: ~410 vs ~120 us per round trip, both sides), and each
stream message costs both ends a hop through grpc's poller thread to the event loop. Protocol 3
sends one ``CallFrame`` per message; protocol 4 (``Batches``) sends every frame that is ready
when the stream's writer gets to write in one ``CallBatch``, and the target answers every
result that is ready in one ``ResultBatch``. Nothing waits on a clock to fill a batch: a writer
that wakes takes one more turn of the event loop (the calls, or results, that this turn brings
join: a closed-loop load's requests reach the forwarder a turn apart), and while one message is
on its way the next ones gather, so under load the messages (and the hops) per call fall with
the load instead of limiting it.

The stream changes nothing in the rules: each call still has its own deadline (kept here), a
caller that gives up sends a cancel frame so the target stops the work, and a stream that
breaks fails every call on it as a transport failure (the forwarder then retries as for a dead
node). Writes are made by one writer task per stream, never by a caller, so a caller that is
cancelled mid-write cannot leave the stream with half a write.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from loguru import logger

from .protocol import mesh_pb2 as pb

#: the first protocol whose streams carry batches (the Batches method)
BATCHED_PROTOCOL = 4
#: most bytes of frames (or results) gathered into one message: beyond this batching saves nothing,
#: and a batch must stay under grpc's max message size (a lone frame goes as it is)
BATCH_BYTES = 1 << 20
#: bytes a frame's own framing adds inside a batch (field tag and length)
_FRAMING = 16


def take_batch(queue: list, limit: int) -> tuple[list, list]:
    """The leading messages of ``queue`` that fit in ``limit`` bytes together (at least one),
    and the rest."""
    size = 0
    for i, message in enumerate(queue):
        size += message.ByteSize() + _FRAMING
        if size > limit and i:
            return queue[:i], queue[i:]
    return queue, []


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class _Expired(Exception):
    """A call's deadline passed while it waited for its result."""


class CallStream:
    """The caller's end: ``await request(req, timeout)`` returns the CallReply or raises AioRpcError.

    ``batched``: the stream is a protocol-4 ``Batches`` stream (CallBatch out, ResultBatch in);
    otherwise a protocol-3 ``Calls`` stream (one CallFrame / CallResult per message).
    """

    def __init__(self, open_call: Callable[[], Any], batched: bool = True, batch_bytes: int = BATCH_BYTES) -> None:
        self._open_call = open_call
        self.batched = batched
        self.batch_bytes = batch_bytes
        self._call: Any = None
        self._reader: asyncio.Task | None = None
        self._writer: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._outbox: list[pb.CallFrame] = []
        self._wakeup: asyncio.Future | None = None
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        #: stream messages written (each carries one frame, or one batch of frames)
        self.messages = 0

    def _ensure(self) -> Any:
        if self._call is None:
            # kept: on Python 3.11 every asyncio.get_running_loop() is a getpid() system call
            # (a py-spy profile of a forwarding node under load: ~10 % of its busy samples)
            self._loop = loop = asyncio.get_running_loop()
            self._call = call = self._open_call()
            self._outbox = []
            self._reader = loop.create_task(self._read(call))
            self._writer = loop.create_task(self._write(call))
        return self._call

    async def _read(self, call: Any) -> None:
        error = _error(grpc.StatusCode.UNAVAILABLE, "the call stream ended")
        pending = self._pending
        try:
            async for message in call:
                for result in (message.results if self.batched else (message,)):
                    fut = pending.get(result.seq)
                    if fut is not None and not fut.done():
                        fut.set_result(result.reply)
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            error = _error(grpc.StatusCode.UNAVAILABLE, "the call stream was closed")
            raise
        finally:
            self._end(call, error)

    async def _write(self, call: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._outbox:
                    self._wakeup = loop.create_future()
                    await self._wakeup
                    if self.batched:
                        # one more turn of the loop: the calls this tick brings join the message
                        await asyncio.sleep(0)
                    continue
                if self.batched:
                    frames, self._outbox = take_batch(self._outbox, self.batch_bytes)
                    self.messages += 1
                    await call.write(pb.CallBatch(frames=frames))
                else:
                    frame = self._outbox.pop(0)
                    self.messages += 1
                    await call.write(frame)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            self._end(call, _error(grpc.StatusCode.UNAVAILABLE, f"the call stream broke: {exc}"))

    def _end(self, call: Any, error: grpc.aio.AioRpcError) -> None:
        """The stream ``call`` is over: fail its calls; the next request opens a new stream."""
        if self._call is not call:
            return
        self._call = None
        for task in (self._reader, self._writer):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        for fut in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(error)

    def _send(self, frame: pb.CallFrame) -> None:
        self._outbox.append(frame)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    @property
    def gathering(self) -> bool:
        """Frames wait for this stream's writer (the next message has not gone yet)."""
        return bool(self._outbox)

    @property
    def in_flight(self) -> int:
        """Calls sent on this stream and not answered yet."""
        return len(self._pending)

    async def request(self, req: pb.CallRequest, timeout: float) -> pb.CallReply:
        call = self._ensure()
        self._seq += 1
        seq = self._seq
        loop = self._loop
        fut = loop.create_future()
        self._pending[seq] = fut
        # the deadline is a timer on the call's own future (asyncio.timeout costs several times more
        # per call: a context manager, and a cancel of the task that it then has to take back)
        timer = loop.call_at(loop.time() + timeout, self._expire, fut)
        try:
            self._send(pb.CallFrame(seq=seq, request=req))
            try:
                return await fut
            except _Expired:
                self._cancel(call, seq)
                raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            except asyncio.CancelledError:
                self._cancel(call, seq)  # the caller went away: the target stops the work
                raise
        finally:
            timer.cancel()
            self._pending.pop(seq, None)

    @staticmethod
    def _expire(fut: asyncio.Future) -> None:
        if not fut.done():
            fut.set_exception(_Expired())

    def _cancel(self, call: Any, seq: int) -> None:
        if self._call is call:  # a broken stream's calls are gone with it
            self._send(pb.CallFrame(seq=seq, cancel=True))

    async def close(self) -> None:
        for task in (self._reader, self._writer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


class StreamPool:
    """The call streams to one peer (up to ``size``).

    Protocol 3 (``batched=False``): a call takes a stream with no call in flight, and another
    stream is opened while every open one has some (then the least busy). Each end of such a
    stream handles its frames one at a time, and grpcio reports each read and write done only
    after a hop through its poller thread to the event loop; on a busy machine those hops wait
    for a core, and one stream's rate fell below the load (bench/mesh at load average 10-13:
    calls stalled up to 850 ms on one stream while HTTP-forwarded ones stayed under 60 ms).

    Protocol 4 (``batched=True``): what queues on a stream goes out in one message, so a stream
    keeps up by sending bigger batches. A call joins a stream whose next message is still
    gathering (it goes out with that message, no later); otherwise it takes a stream with nothing
    in flight: at low load nothing would gather to batch, and a shared stream's next message waits
    for the last one's completion hop through grpc's poller thread (under load average 9 such
    hops, not either node's Python code, were about half of the slowest calls' time). When no stream is
    idle, calls share the first with fewer than ``BATCH_SHARE`` in flight (streams_bench, 32
    calls in flight: 12 / 10.5 us of CPU per call on the two ends, 16 calls per message); more
    streams open only beyond that, so one huge result does not hold up every call.
    """

    #: calls in flight on a batched stream before the next call goes to another stream
    BATCH_SHARE = 16

    def __init__(self, open_call: Callable[[], Any], size: int = 4, batched: bool = True,
                 batch_bytes: int = BATCH_BYTES) -> None:
        if size < 1:
            raise ValueError(f"a stream pool needs at least one stream, got size={size}")
        self._open_call = open_call
        self.size = size
        self.batched = batched
        self.batch_bytes = batch_bytes
        self.streams: list[CallStream] = []

    def _pick(self) -> CallStream:
        if self.batched:
            for stream in self.streams:
                if stream.gathering and stream.in_flight < self.BATCH_SHARE:
                    return stream  # its next message has not gone yet: this call rides along
        for stream in self.streams:
            if not stream.in_flight:
                return stream
        if self.batched:
            for stream in self.streams:
                if stream.in_flight < self.BATCH_SHARE:
                    return stream
        if len(self.streams) < self.size:
            self.streams.append(CallStream(self._open_call, self.batched, self.batch_bytes))
            return self.streams[-1]
        return min(self.streams, key=lambda st: st.in_flight)

    async def request(self, req: pb.CallRequest, timeout: float) -> pb.CallReply:
        return await self._pick().request(req, timeout)

    async def close(self) -> None:
        for stream in self.streams:
            await stream.close()


async def serve_stream(messages: AsyncIterator[Any], run: Callable[[pb.CallRequest], Awaitable[pb.CallReply]],
                       batched: bool = True, batch_bytes: int = BATCH_BYTES) -> AsyncIterator[Any]:
    """The target's end: each frame's call runs in a task of its own; results go back as they
    finish, every result that is ready in one ``ResultBatch`` (``batched``, protocol 4) or one
    ``CallResult`` each (protocol 3); a cancel frame (or the caller going away) cancels the call."""
    loop = asyncio.get_running_loop()
    ready: list[pb.CallResult] = []
    tasks: dict[int, asyncio.Task] = {}
    wakeup: list[asyncio.Future] = []
    reading = True

    def wake() -> None:
        if wakeup and not wakeup[0].done():
            wakeup[0].set_result(None)

    async def one(seq: int, req: pb.CallRequest) -> None:
        try:
            reply = await run(req)
        except asyncio.CancelledError:
            return  # the caller gave up: nobody waits for an answer
        except Exception as exc:  # never leave a caller waiting for its deadline
            logger.opt(exception=exc).error(f"mesh: call {req.function} failed outside the executor")
            reply = pb.CallReply(error=pb.CallError(code="INTERNAL", message=f"internal error (request {req.request_id})"))
        finally:
            tasks.pop(seq, None)
        ready.append(pb.CallResult(seq=seq, reply=reply))
        wake()

    async def read() -> None:
        nonlocal reading
        try:
            async for message in messages:
                for frame in (message.frames if batched else (message,)):
                    if frame.cancel:
                        task = tasks.get(frame.seq)
                        if task is not None:
                            task.cancel()
                    elif frame.seq not in tasks:
                        tasks[frame.seq] = loop.create_task(one(frame.seq, frame.request))
        finally:
            reading = False
            wake()

    reader = loop.create_task(read())
    try:
        while True:
            if not ready:
                if not reading:  # the caller closed its side: answer what is still running, then end
                    if not tasks:
                        return
                    await asyncio.gather(*tasks.values(), return_exceptions=True)
                    continue
                wakeup[:] = [loop.create_future()]
                await wakeup[0]
                if batched:
                    await asyncio.sleep(0)  # one more turn of the loop: results finishing now join
                continue
            if batched:
                results, ready = take_batch(ready, batch_bytes)
                yield pb.ResultBatch(results=results)
            else:
                results, ready = ready, []
                for result in results:
                    yield result
    finally:
        reader.cancel()
        for task in list(tasks.values()):
            task.cancel()
