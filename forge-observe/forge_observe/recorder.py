"""The hot-path side of forge-observe: the call middleware, the tail sampler, job and log hooks.

Everything here runs on the app's path and therefore only measures and appends: a span into
its trace, an event tuple into the node's ring, a kept trace or a log row into the writer's queue.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from typing import Any, Callable

import asyncpg

from forge_kernel.errors import ForgeError
from forge_kernel.telemetry import Telemetry, Trace, current_span

from .writer import Writer, truncate

#: error codes that are the caller's doing: a trace is not kept for them alone
CLIENT_CODES = frozenset({"INVALID_ARGUMENT", "UNAUTHENTICATED", "FORBIDDEN", "NOT_FOUND", "CONFLICT",
                          "PAYLOAD_TOO_LARGE", "RATE_LIMITED"})


def call_middleware(tel: Telemetry) -> Callable[..., Any]:
    """``forge_call_middleware``: a span and a ``call`` event per function call (jobs included)."""

    async def observe_call(call: Any, nxt: Callable[[Any], Any]) -> Any:
        if not tel.enabled:
            return await nxt(call)
        defn = call.defn
        span = tel.start_span(defn.name, "internal", attrs={"function.kind": defn.kind, "call.id": call.request_id})
        t0 = time.perf_counter()
        code = "OK"
        try:
            return await nxt(call)
        except ForgeError as exc:
            code = exc.code
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"  # a timeout (asyncio.timeout cancels) or the caller went away
            raise
        except asyncpg.UniqueViolationError:
            code = "CONFLICT"
            raise
        except BaseException:
            code = "INTERNAL"
            raise
        finally:
            tel.emit("call", defn.name, defn.kind, code, time.perf_counter() - t0)
            tel.end_span(span, None if code == "OK" else code)

    return observe_call


def keep(trace: Trace, slow_threshold: float) -> str | None:
    """The tail-sampling decision: why ``trace`` is kept (``sampled``, ``error``, ``slow``) or None."""
    if trace.sampled:
        return "sampled"
    for s in trace.spans:
        if s.error is not None and s.error not in CLIENT_CODES:
            return "error"
    root = trace.root
    if root is not None and root.duration >= slow_threshold:
        return "slow"
    return None


class TraceSink:
    """``Telemetry.attach(on_trace=...)``: decide, then queue kept traces for storage and export."""

    def __init__(self, writer: Writer, slow_threshold: float, export: Callable[[Trace], None] | None = None,
                 count: Callable[[str], None] | None = None) -> None:
        self.writer = writer
        self.slow_threshold = slow_threshold
        self.export = export
        self.count = count
        self.kept = 0
        self.discarded = 0

    def __call__(self, trace: Trace) -> None:
        why = keep(trace, self.slow_threshold)
        if why is None:
            self.discarded += 1
            return
        self.kept += 1
        if self.count is not None:
            self.count(why)
        self.writer.add("spans", trace)
        if self.export is not None:
            self.export(trace)


class LogSink:
    """A loguru sink (``logger.add(sink, format="{message}")``): one row per record into the writer.

    ``redact`` (text -> text) is applied to the message before it is stored; the kernel's log
    set-up owns the redaction rules and hands them in."""

    def __init__(self, writer: Writer, node_id: str, max_bytes: int, redact: Callable[[str], str] | None = None) -> None:
        self.writer = writer
        self.node_id = node_id
        self.max_bytes = max_bytes
        self.redact = redact

    def __call__(self, message: Any) -> None:
        r = message.record
        text = str(message).rstrip("\n")
        if self.redact is not None:
            text = self.redact(text)
        extra = r["extra"]
        span = current_span()
        ids = span.trace.ids if span is not None else {}
        call_id = extra.get("request_id")
        if call_id == "-":
            call_id = None
        rest = {k: v for k, v in extra.items() if k != "request_id"}
        self.writer.add("logs", (
            r["time"], self.node_id, r["level"].name, r["name"], truncate(text, self.max_bytes),
            f"{span.trace_id:032x}" if span is not None else None, f"{span.span_id:016x}" if span is not None else None,
            str(call_id) if call_id is not None else None, _int(ids.get("job")), _int(ids.get("cron_run")),
            None if ids.get("workflow_run") is None else str(ids["workflow_run"]),
            _extra(rest, self.max_bytes, self.redact)))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _extra(extra: dict[str, Any], limit: int, redact: Callable[[str], str] | None) -> str | None:
    if not extra:
        return None
    text = json.dumps(extra, default=str)
    if redact is not None:
        text = redact(text)
    if len(text) > limit:
        return json.dumps({"truncated": truncate(text, limit)})
    return text


def job_finished(tel: Telemetry, outcome: Any) -> None:
    """``forge_job_finished``: job and cron outcome events (the aggregation happens later)."""
    if not tel.enabled:
        return
    started = outcome.started_at
    seconds = (outcome.finished_at - started).total_seconds() if started is not None else None
    tel.emit("job.finished", outcome.name, outcome.status, seconds)
    opts = outcome.options or {}
    cron = opts.get("cron")
    if cron:
        lag = None
        slot = opts.get("slot")
        if started is not None and isinstance(slot, str):
            try:
                lag = max(0.0, (started - dt.datetime.fromisoformat(slot)).total_seconds())
            except (ValueError, TypeError):
                lag = None
        tel.emit("cron.run", cron, outcome.status, lag)
