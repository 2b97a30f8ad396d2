"""The ``[observe]`` config section."""

from __future__ import annotations

import ipaddress
import urllib.parse

import attrs

from forge_kernel.config import in_range, one_of
from forge_kernel.convert import InvalidValue

#: what an alert rule can watch (see alerts.py for how each is computed over the window)
ALERT_METRICS = ("job_failure_rate", "job_queue_wait_p95", "function_error_rate", "function_latency_p95",
                 "nodes_missing_heartbeat", "jobs_pending", "telemetry_dropped")


def _url(inst, attr, value: str) -> None:
    if not value:
        return
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidValue(attr.name, value, "an http:// or https:// URL (or empty to turn it off)")


def _name(inst, attr, value: str) -> None:
    if not value or not all(c.isalnum() or c in "-_." for c in value):
        raise InvalidValue(attr.name, value, "a name of letters, digits, '-', '_' or '.'")


@attrs.frozen
class Retention:
    """Days each kind of record is kept; whole days, since storage is partitioned by day."""

    metrics: int = attrs.field(default=30, validator=in_range(1, 3650))
    logs: int = attrs.field(default=7, validator=in_range(1, 3650))
    spans: int = attrs.field(default=7, validator=in_range(1, 3650))


@attrs.frozen
class AlertRule:
    """``[[observe.alerts]]``: fire when ``metric`` over the last ``window`` seconds is ``op`` ``threshold``."""

    name: str = attrs.field(validator=_name)
    metric: str = attrs.field(validator=one_of(*ALERT_METRICS))
    threshold: float
    op: str = attrs.field(default=">", validator=one_of(">", ">=", "<", "<="))
    window: float = attrs.field(default=300.0, validator=in_range(10, 7 * 86400))
    #: POSTed (JSON) on firing and on resolving, through a job so delivery is retried
    webhook: str = attrs.field(default="", validator=_url)


def _networks(inst, attr, value: list[str]) -> None:
    for v in value:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise InvalidValue(attr.name, v, "an IP network such as 10.0.0.0/8 or ::1/128") from None


def _unique_rules(inst, attr, value: list[AlertRule]) -> None:
    names = [r.name for r in value]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidValue(attr.name, dupes, "alert rules with distinct names")


@attrs.frozen
class ObserveConfig:
    #: share of traces kept whatever happens (0..1); errors and slow work are always kept
    sample_rate: float = attrs.field(default=0.01, validator=in_range(0.0, 1.0))
    #: a local trace whose root took at least this many seconds is kept (tail sampling)
    slow_threshold: float = attrs.field(default=1.0, validator=in_range(0.0, 86400))
    #: keep traces whose caller's traceparent says "sampled" (turn off on untrusted networks)
    honor_remote_sampled: bool = True
    #: seconds between metric snapshots written to PostgreSQL
    flush_interval: float = attrs.field(default=10.0, validator=in_range(0.5, 3600))
    #: seconds between batches of logs and spans written to PostgreSQL
    write_interval: float = attrs.field(default=0.5, validator=in_range(0.01, 60))
    #: records of each kind (logs, spans, metric rows) buffered in memory; the oldest go first
    queue_size: int = attrs.field(default=20_000, validator=in_range(100, 10_000_000))
    #: events (job started, pushes...) buffered between two aggregations
    event_ring: int = attrs.field(default=65_536, validator=in_range(1024, 10_000_000))
    #: lowest log level stored in PostgreSQL (the console keeps [log] level)
    log_level: str = attrs.field(default="INFO", validator=one_of("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING",
                                                                  "ERROR", "CRITICAL"))
    #: longer log messages and span attribute values are cut, ending in a marker
    max_message_bytes: int = attrs.field(default=8192, validator=in_range(256, 1_000_000))
    max_attribute_bytes: int = attrs.field(default=1024, validator=in_range(64, 1_000_000))
    retention: Retention = attrs.field(factory=Retention)
    #: days of partitions created ahead of time
    partitions_ahead: int = attrs.field(default=2, validator=in_range(1, 30))
    #: OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces); empty: no export
    otlp_endpoint: str = attrs.field(default="", validator=_url)
    otlp_timeout: float = attrs.field(default=5.0, validator=in_range(0.1, 120))
    #: spans waiting for export; more are dropped and counted
    otlp_queue_size: int = attrs.field(default=10_000, validator=in_range(100, 10_000_000))
    #: client networks allowed to read /metrics (the node's function names, rates and errors)
    metrics_allow: list[str] = attrs.field(factory=lambda: ["127.0.0.0/8", "::1/128"], validator=_networks)
    #: when set, /metrics also needs ``Authorization: Bearer <token>``
    metrics_token: str = ""
    alerts: list[AlertRule] = attrs.field(factory=list, validator=_unique_rules)
    #: seconds between alert evaluations (by the scheduler leader)
    alert_interval: float = attrs.field(default=30.0, validator=in_range(1, 86400))
    #: seconds between collections of cluster gauges (by the scheduler leader)
    cluster_interval: float = attrs.field(default=10.0, validator=in_range(1, 3600))
