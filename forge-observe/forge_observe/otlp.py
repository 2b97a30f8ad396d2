"""OTLP export of kept traces with the OpenTelemetry SDK's OTLP/HTTP exporter, on a thread of its own.

The event loop only puts a finished trace on a bounded queue (full: dropped and counted). The
thread converts spans to the SDK's ``ReadableSpan`` and calls the exporter, whose retries and
timeouts therefore never touch the node's loop. An unreachable endpoint is logged at most once
a minute, with the number of spans dropped since the last message.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

from loguru import logger

from forge_kernel.telemetry import Trace

_KINDS = {"server": "SERVER", "client": "CLIENT", "producer": "PRODUCER", "consumer": "CONSUMER",
          "internal": "INTERNAL"}
BATCH = 512
LOG_EVERY = 60.0


def _attr(value: Any, limit: int) -> Any:
    if isinstance(value, (bool, int, float)):
        return value
    text = value if isinstance(value, str) else str(value)
    from .writer import truncate

    return truncate(text, limit)


def readable_spans(trace: Trace, resource: Any, attr_limit: int) -> list[Any]:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    flags = TraceFlags(TraceFlags.SAMPLED)
    out = []
    for s in trace.spans:
        ctx = SpanContext(s.trace_id, s.span_id, is_remote=False, trace_flags=flags)
        parent = None
        if s.parent_id:
            parent = SpanContext(s.trace_id, s.parent_id, is_remote=s.parent_id == trace.remote_parent,
                                 trace_flags=flags)
        attrs = {str(k): _attr(v, attr_limit) for k, v in (s.attrs or {}).items() if v is not None}
        status = Status(StatusCode.ERROR, s.error) if s.error else Status(StatusCode.UNSET)
        out.append(ReadableSpan(name=s.name, context=ctx, parent=parent, resource=resource, attributes=attrs,
                                kind=getattr(SpanKind, _KINDS.get(s.kind, "INTERNAL")), status=status,
                                start_time=s.start_ns, end_time=s.end_ns or s.start_ns))
    return out


class OtlpExporter:
    """``offer(trace)`` from the loop; a daemon thread exports batches."""

    def __init__(self, endpoint: str, node_id: str, *, timeout: float = 5.0, queue_size: int = 10_000,
                 attr_limit: int = 1024, on_drop: Callable[[int], None] | None = None,
                 on_export: Callable[[int], None] | None = None, exporter: Any = None) -> None:
        from opentelemetry.sdk.resources import Resource

        self.endpoint = endpoint
        self.resource = Resource.create({"service.name": "forge", "service.instance.id": node_id})
        self.attr_limit = attr_limit
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.on_drop = on_drop
        self.on_export = on_export
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=endpoint, timeout=timeout)
            # the exporter logs every failed batch; we log once a minute with a count instead
            logging.getLogger("opentelemetry.exporter.otlp.proto.http").setLevel(logging.CRITICAL)
            logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter").setLevel(logging.CRITICAL)
        self.exporter = exporter
        self.exported = 0
        self.dropped = 0
        self._dropped_unlogged = 0
        self._last_log = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="forge-observe-otlp", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, trace: Trace) -> None:
        try:
            self.queue.put_nowait(trace)
        except queue.Full:
            self._drop(len(trace.spans), "queue full")

    def _drop(self, n: int, why: str) -> None:
        self.dropped += n
        self._dropped_unlogged += n
        if self.on_drop is not None:
            self.on_drop(n)
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY:
            self._last_log = now
            logger.warning(f"observe: OTLP export to {self.endpoint} failing ({why}); "
                           f"{self._dropped_unlogged} span(s) dropped since the last report")
            self._dropped_unlogged = 0

    def _run(self) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        while not self._stop.is_set() or not self.queue.empty():
            try:
                first = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            traces = [first]
            while len(traces) < BATCH:
                try:
                    traces.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            spans = [sp for t in traces for sp in readable_spans(t, self.resource, self.attr_limit)]
            try:
                result = self.exporter.export(spans)
            except Exception as exc:  # the exporter should not raise; never let it end the thread
                result, why = None, f"{type(exc).__name__}: {exc}"
            else:
                why = "endpoint unreachable or refused the batch"
            if result == SpanExportResult.SUCCESS:
                self.exported += len(spans)
                if self.on_export is not None:
                    self.on_export(len(spans))
            else:
                self._drop(len(spans), why)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.exporter.shutdown()
