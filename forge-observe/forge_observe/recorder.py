"""The hot-path side of forge-observe: the tail sampler and the log sink.

Everything here runs on the app's path and therefore only decides and appends: a kept trace or a
log row into the writer's queue, an event tuple into the node's ring. Function calls are recorded
by the kernel's executor (``Telemetry.call_started`` / ``call_ended``), not by a middleware: a
middleware layer cost more per call than everything else recorded for it (bench/rpc/README.md).
"""

from __future__ import annotations

import json
from typing import Any, Callable

import msgspec

from forge_kernel.telemetry import Telemetry, Trace, current_span

from .writer import Writer, jsonb_text, truncate

#: error codes that are the caller's doing: a trace is not kept for them alone
CLIENT_CODES = frozenset({"INVALID_ARGUMENT", "UNAUTHENTICATED", "FORBIDDEN", "NOT_FOUND", "CONFLICT",
                          "PAYLOAD_TOO_LARGE", "RATE_LIMITED"})


def keep(trace: Trace, slow_threshold: float) -> str | None:
    """The tail-sampling decision: why ``trace`` is kept (``sampled``, ``error``, ``slow``) or None."""
    if trace.sampled:
        return "sampled"
    if trace.errors:
        for s in trace.spans:
            if s.error is not None and s.error not in CLIENT_CODES:
                return "error"
    root = trace.root
    if root is not None and root.duration >= slow_threshold:
        return "slow"
    return None


class TraceSink:
    """``Telemetry.attach(on_trace=...)``: decide, then queue kept traces for storage and export.

    Decisions are counted in a plain dict (``take_decisions``), folded into the
    ``forge_observe_traces`` series when the observer aggregates: a prometheus_client
    ``labels(...).inc()`` per trace cost ~12k CPU instructions (its lock and label lookup)."""

    def __init__(self, writer: Writer, slow_threshold: float, export: Callable[[Trace], None] | None = None) -> None:
        self.writer = writer
        self.slow_threshold = slow_threshold
        self.export = export
        self.kept = 0
        self.discarded = 0
        #: decision (sampled, error, slow, discarded) -> traces since the last take_decisions()
        self.decisions: dict[str, int] = {}

    def __call__(self, trace: Trace) -> None:
        # the kernel hands over only traces that may be kept (Telemetry.attach): sampled, failed or slow
        why = keep(trace, self.slow_threshold)
        decisions = self.decisions
        if why is None:  # e.g. only a client error (a bad argument, a missing row)
            self.discarded += 1
            decisions["discarded"] = decisions.get("discarded", 0) + 1
            return
        self.kept += 1
        decisions[why] = decisions.get(why, 0) + 1
        self.writer.add("spans", trace)
        if self.export is not None:
            self.export(trace)

    def take_decisions(self) -> dict[str, int]:
        """The decisions counted since the last call (and a fresh count from now)."""
        taken, self.decisions = self.decisions, {}
        return taken


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
        ids = None
        if span is not None:  # a root carries its work's ids; a child reaches them through its trace
            ids = span.ids
            if ids is None and span.trace is not None:
                ids = span.trace.ids
        ids = ids or {}
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


#: extra fields as JSON jsonb takes (NaN and infinities as null; json.dumps wrote ``NaN``, and the
#: COPY of the whole batch failed), anything else msgspec does not know as its text
_encode_extra = msgspec.json.Encoder(enc_hook=str).encode


def _extra(extra: dict[str, Any], limit: int, redact: Callable[[str], str] | None) -> str | None:
    if not extra:
        return None
    try:
        text = jsonb_text(_encode_extra(extra))
    except (TypeError, ValueError):  # a key msgspec does not encode (a tuple): every value as text
        text = jsonb_text(_encode_extra({str(k): str(v) for k, v in extra.items()}))
    if redact is not None:
        text = redact(text)
    if len(text) > limit:
        return json.dumps({"truncated": truncate(text, limit)})
    return text
