"""The observer of one node: attaches to ``node.telemetry``, aggregates, writes, exports, serves /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from operator import itemgetter
from typing import Any, AsyncIterator

import asyncpg
from loguru import logger

from forge_kernel.logs import add_sink, redact
from forge_kernel.telemetry import ClusterGauge

from .config import ObserveConfig
from .metrics import NodeMetrics
from .otlp import OtlpExporter
from .recorder import LogSink, TraceSink
from .writer import Writer, drop_partitions, ensure_partitions

SERVICE_NAME = "observe"
_ATTR = "_forge_observe"
#: services an observer must outlive (it starts before them and stops after them, so it stores what they log)
OBSERVED_SERVICES = ("gateway-http", "worker", "scheduler", "realtime")
#: every so many flushes, every series is written even if unchanged (alerts need a value at a window's start)
FULL_SNAPSHOT_EVERY = 30
#: telemetry events that mean rows a dashboard shows changed: the kind of activity hint each sends.
#: Not ``job.dispatched``: a stored job is announced at its commit by the worker's own wake-up NOTIFY
#: (while a worker sleeps; a busy cluster hints with every finished job), and a second hint half a
#: second later made the live pages spend their one refresh a second on it (measured: a change 1.2 s
#: after another waited up to 0.8 s for the spacing).
HINT_KINDS = {"job.finished": "jobs", "jobs": "jobs", "cron.run": "crons", "cron.missed": "crons",
              "workflow.run": "workflows", "workflow.step": "workflows", "workflow.compensation": "workflows"}

#: seconds between two aggregations of the node's event ring (bench/jobs/instructions.py lengthens it)
AGGREGATE_EVERY = 0.5


class Observer:
    def __init__(self, node: Any) -> None:
        self.node = node
        self.config: ObserveConfig = node.config["observe"]
        self.metrics = NodeMetrics(node)
        self.writer: Writer | None = None
        self.exporter: OtlpExporter | None = None
        self.sink: TraceSink | None = None
        self.cluster_gauges: list[ClusterGauge] = []
        self._log_sink_id: int | None = None
        self._last_rows: dict[tuple[str, str], tuple] = {}
        self._flushes = 0
        self.running = False

    # --- lifecycle -------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, node: Any) -> AsyncIterator["Observer"]:
        cfg = self.config
        self.writer = Writer(self._connect, node.id, self.metrics, queue_size=cfg.queue_size,
                             interval=cfg.write_interval, attr_limit=cfg.max_attribute_bytes,
                             partitions_ahead=cfg.partitions_ahead)
        if cfg.otlp_endpoint:
            self.exporter = OtlpExporter(cfg.otlp_endpoint, node.id, timeout=cfg.otlp_timeout,
                                         queue_size=cfg.otlp_queue_size, attr_limit=cfg.max_attribute_bytes,
                                         on_drop=lambda n: self.metrics.drop("otlp", "export_failed", n),
                                         on_export=self.metrics.exported.inc)
            self.exporter.start()
        self.sink = TraceSink(self.writer, cfg.slow_threshold, self.exporter.offer if self.exporter else None)
        node.telemetry.attach(self.sink, sample_rate=cfg.sample_rate, ring_size=cfg.event_ring,
                              honor_remote_sampled=cfg.honor_remote_sampled, keep_over=cfg.slow_threshold)
        # through the kernel's log set-up: no locals in stored tracebacks, secrets redacted
        self._log_sink_id = add_sink(LogSink(self.writer, node.id, cfg.max_message_bytes, redact), records=True,
                                     level=cfg.log_level, format="{message}", catch=True)
        # its connection and partitions are made before the node's work starts (a connection's set-up
        # cost PostgreSQL about 3 us per job of a 20,000-job drain when it fell inside the drain)
        await self.writer.open(timeout=10.0)
        sup = node.supervisor
        sup.spawn("observe.writer", self.writer.run, service=SERVICE_NAME)
        sup.spawn("observe.aggregate", self._aggregate_loop, service=SERVICE_NAME)
        sup.spawn("observe.flush", self._flush_loop, service=SERVICE_NAME)
        self.running = True
        try:
            yield self
        finally:
            self.running = False
            await self.stop()

    async def stop(self) -> None:
        """Flush: aggregate what is left, snapshot the metrics, write everything buffered."""
        tel = self.node.telemetry
        self.aggregate()
        if self.writer is not None:
            self._queue_snapshot(full=True)
            await self.writer.close(timeout=min(10.0, max(1.0, self.node.config.node.drain_timeout)))
        if self._log_sink_id is not None:
            with contextlib.suppress(ValueError):
                logger.remove(self._log_sink_id)
            self._log_sink_id = None
        tel.detach()
        if self.exporter is not None:
            await asyncio.to_thread(self.exporter.stop, 2.0)

    async def _connect(self) -> asyncpg.Connection:
        # its own connection (not the pool, no JSON codecs: COPY sends jsonb as text in binary format),
        # a session on [database] direct_url: its startup settings would not pass a transaction pooler
        return await asyncpg.connect(self.node.direct_url or self.node.url, timeout=10, server_settings={
            "application_name": "forge-observe", "synchronous_commit": "off"})

    # --- aggregation and snapshots -----------------------------------------------------------
    def aggregate(self) -> int:
        if self.sink is not None:
            self.metrics.count_traces(self.sink.take_decisions())
        events = self.node.telemetry.drain()
        if events and self.writer is not None:
            try:
                seen = HINT_KINDS.keys() & set(map(itemgetter(0), events))
            except TypeError:  # an unhashable kind (the metrics count it as malformed)
                seen = {k for k in map(itemgetter(0), events) if isinstance(k, str) and k in HINT_KINDS}
            if seen:
                self.writer.hint({HINT_KINDS[k] for k in seen})
        return self.metrics.apply(events)

    async def _aggregate_loop(self) -> None:
        period = AGGREGATE_EVERY
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(period)
            lag = time.monotonic() - t0 - period
            self.metrics.loop_lag.set(max(0.0, lag))
            self.aggregate()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.flush_interval)
            self.aggregate()
            self._queue_snapshot(full=self._flushes % FULL_SNAPSHOT_EVERY == 0)
            self.writer.wake.set()

    def _queue_snapshot(self, full: bool) -> int:
        """Queue the metric rows that changed since the last snapshot (all of them when ``full``)."""
        self._flushes += 1
        now = dt.datetime.now(dt.timezone.utc)
        n = 0
        for row in self.metrics.snapshot(now, self.node.id):
            key = (row[2], row[3])
            sig = row[4:]
            if full or self._last_rows.get(key) != sig:
                self._last_rows[key] = sig
                self.writer.add("metrics", row)
                n += 1
        return n

    # --- leader chores (forge_maintenance_tasks) ----------------------------------------------
    async def collect_cluster(self, conn: Any) -> int:
        """The cluster gauges, collected by the leader and exported only by it."""
        n = 0
        gauges = list(self.cluster_gauges) + [NODE_GAUGE]
        for g in gauges:
            try:
                values = await g.collect(conn)
            except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError):
                continue  # the owning plugin's tables are not migrated on this database
            self.metrics.node_collector.cluster[g.name] = (g.help, tuple(g.labels), list(values), time.monotonic())
            n += len(values)
        self.metrics.node_collector.cluster_ttl = 3 * self.config.cluster_interval
        return n

    async def partitions(self, conn: Any) -> list[str]:
        today = dt.datetime.now(dt.timezone.utc).date()
        await ensure_partitions(conn, today, today + dt.timedelta(days=self.config.partitions_ahead))
        r = self.config.retention
        dropped = await drop_partitions(conn, {"metrics": r.metrics, "logs": r.logs, "spans": r.spans}, today)
        if dropped:
            logger.info(f"observe: dropped {len(dropped)} partition(s) past retention: {', '.join(dropped)}")
        return dropped


async def _node_counts(conn: Any) -> list[tuple[tuple[str, ...], float]]:
    rows = await conn.fetch("SELECT status, count(*) AS n FROM forge_nodes GROUP BY status")
    return [((r["status"],), float(r["n"])) for r in rows]


NODE_GAUGE = ClusterGauge("forge_cluster_nodes", "Nodes of the cluster by recorded status", ("status",), _node_counts)


def for_node(node: Any) -> Observer:
    obs = getattr(node, _ATTR, None)
    if obs is None:
        obs = Observer(node)
        setattr(node, _ATTR, obs)
    return obs
