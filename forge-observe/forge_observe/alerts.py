"""Alert rules from ``[[observe.alerts]]``, evaluated by the scheduler leader over stored metrics.

Each evaluation measures every rule's metric over its window; a rule that crosses its threshold
gets a ``firing`` row in ``forge_obs_alerts`` (one at most, by a partial unique index), which turns
``resolved`` once the measure is back. Both transitions are logged and, with a ``webhook``, POSTed
by a job (``observe_alert_webhook``), so delivery is retried with the worker's backoff.
"""

from __future__ import annotations

import datetime as dt
import operator
from typing import Any, Sequence

from loguru import logger

from forge_kernel.errors import ForgeError
from forge_kernel.executor import job_request

from . import query
from .config import AlertRule

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
WEBHOOK_JOB = "observe_alert_webhook"


async def measure(conn: Any, rule: AlertRule, dead_after: float = 15.0) -> float | None:
    """The value of ``rule.metric`` over the last ``rule.window`` seconds (None: no data)."""
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=rule.window)
    m = rule.metric
    if m == "nodes_missing_heartbeat":
        return float(await conn.fetchval(
            """SELECT count(*) FROM forge_nodes
               WHERE (status IN ('starting', 'running', 'draining') AND last_heartbeat < now() - make_interval(secs => $1))
                  OR (status = 'dead' AND stopped_at > now() - make_interval(secs => $2))""", dead_after, rule.window))
    if m == "jobs_pending":
        rows = await conn.fetch(
            """SELECT DISTINCT ON (labels) value FROM forge_obs_metrics
               WHERE name = 'forge_jobs' AND labels->>'status' = 'pending' AND at > $1
               ORDER BY labels, at DESC""", start - query.LOOKBACK)
        return float(sum(r["value"] for r in rows)) if rows else None
    if m == "job_failure_rate":
        d = (await query.window_deltas(conn, ["forge_jobs_finished_total"], start))["forge_jobs_finished_total"]
        total = sum(x.value for x in d)
        bad = sum(x.value for x in d if x.labels.get("status") in ("failed", "dead"))
        return bad / total if total else None
    if m == "function_error_rate":
        d = (await query.window_deltas(conn, ["forge_function_calls_total"], start))["forge_function_calls_total"]
        total = sum(x.value for x in d)
        bad = sum(x.value for x in d if x.labels.get("code") in query.SERVER_ERROR_CODES)
        return bad / total if total else None
    if m == "job_queue_wait_p95":
        name = "forge_job_queue_wait_seconds"
        return query.merged_quantile(0.95, (await query.window_deltas(conn, [name], start))[name])
    if m == "function_latency_p95":
        name = "forge_function_duration_seconds"
        return query.merged_quantile(0.95, (await query.window_deltas(conn, [name], start))[name])
    if m == "telemetry_dropped":
        d = (await query.window_deltas(conn, ["forge_observe_dropped_total"], start))["forge_observe_dropped_total"]
        return float(sum(x.value for x in d))
    raise ValueError(f"unknown alert metric {m!r}")


class AlertEvaluator:
    """The ``observe.alerts`` maintenance task."""

    def __init__(self, node: Any, rules: Sequence[AlertRule]) -> None:
        self.node = node
        self.rules = list(rules)

    async def run(self, conn: Any) -> list[tuple[str, str]]:
        """Evaluate every rule; returns the transitions made as (rule, firing|resolved)."""
        changes = []
        dead_after = self.node.config.node.dead_after
        for rule in self.rules:
            value = await measure(conn, rule, dead_after)
            firing = value is not None and _OPS[rule.op](value, rule.threshold)
            change = await self._record(conn, rule, value, firing)
            if change:
                changes.append((rule.name, change))
        return changes

    async def _record(self, conn: Any, rule: AlertRule, value: float | None, firing: bool) -> str | None:
        shown = "no data" if value is None else f"{value:.4g}"
        if firing:
            message = f"alert {rule.name}: {rule.metric} over {rule.window:g}s is {shown} ({rule.op} {rule.threshold:g})"
            row = await conn.fetchrow(
                """INSERT INTO forge_obs_alerts (rule, metric, state, value, threshold, message, node_id)
                   VALUES ($1, $2, 'firing', $3, $4, $5, $6)
                   ON CONFLICT (rule) WHERE state = 'firing' DO NOTHING RETURNING id, fired_at""",
                rule.name, rule.metric, value, rule.threshold, message, self.node.id)
            if row is None:
                return None
            logger.warning(message)
            await self._notify(conn, rule, "firing", value, message, row["id"])
            return "firing"
        row = await conn.fetchrow(
            """UPDATE forge_obs_alerts SET state = 'resolved', resolved_at = now()
               WHERE rule = $1 AND state = 'firing' RETURNING id""", rule.name)
        if row is None:
            return None
        message = f"alert {rule.name} resolved: {rule.metric} over {rule.window:g}s is {shown}"
        logger.info(message)
        await self._notify(conn, rule, "resolved", value, message, row["id"])
        return "resolved"

    async def _notify(self, conn: Any, rule: AlertRule, state: str, value: float | None, message: str,
                      alert_id: int) -> None:
        if not rule.webhook:
            return
        payload = {"alert_id": alert_id, "rule": rule.name, "metric": rule.metric, "state": state, "value": value,
                   "threshold": rule.threshold, "op": rule.op, "window": rule.window, "message": message,
                   "at": dt.datetime.now(dt.timezone.utc).isoformat()}
        try:
            dispatcher = self.node.executor.dispatcher()
        except ForgeError as exc:
            logger.warning(f"alert {rule.name}: cannot send its webhook: {exc}")
            return
        await dispatcher.dispatch(conn, [job_request(WEBHOOK_JOB, {"url": rule.webhook, "payload": payload},
                                                     max_attempts=8)])
