"""Running operator actions: through the owners' ``forge_admin_actions``, audited.

An action runs in one transaction on the dashboard's write pool together with its audit row, so
a change is never left unrecorded (and a failed action leaves an ``error`` row of its own). A
request carrying an ``idempotency_key`` that was already used returns the recorded result instead
of acting again (double clicks, retried POSTs). Actions on a whole filter pick their targets here
(the dashboard owns the filters) and stay bounded by ``[dashboard] bulk_limit``.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import asyncpg
from loguru import logger

from forge_kernel.admin import AdminAction
from forge_kernel.errors import ForgeError, InvalidArgument, NotFound

from . import queries as q
from .access import Viewer
from .views import job_filter, job_filter_args, job_table

#: which live statuses each job action can change (a bulk count shows exactly those)
JOB_VERBS = {"retry": ["dead"], "discard": ["dead"], "cancel": ["scheduled", "pending", "running"]}
_AUDIT = """INSERT INTO forge_dashboard_audit (who, kind, role, node_id, client, action, targets, filter, params, affected,
                                                before, after, outcome, error, idempotency_key)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) RETURNING id, at"""


def _plain(value: Any) -> Any:
    """JSON-safe copy (the pool's jsonb codec encodes it; dates become text)."""
    return json.loads(json.dumps(value, default=str))


def _key(value: Any) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or not 8 <= len(value) <= 100:
        raise InvalidArgument("idempotency_key: a string of 8 to 100 characters")
    return value


class Actions:
    def __init__(self, node: Any, config: Any, pools: Any, actions: Mapping[str, AdminAction]) -> None:
        self.node = node
        self.config = config
        self.pools = pools
        self.actions = dict(actions)

    def names(self) -> list[str]:
        return sorted(self.actions)

    def params(self) -> dict[str, list[str]]:
        """The parameters each action takes besides its targets (for tools that build requests)."""
        return {name: list(self.actions[name].params) for name in self.names()}

    async def perform(self, viewer: Viewer, name: str, targets: Sequence[Any], params: Mapping[str, Any] | None,
                      client: str, idempotency_key: Any = None, filter: Mapping[str, Any] | None = None) -> dict[str, Any]:
        action = self.actions.get(name)
        if action is None:
            raise NotFound(f"no admin action {name!r}; known: {', '.join(self.names())}")
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, (str, int)) and not isinstance(t, bool)
                                                             for t in targets):
            raise InvalidArgument("targets: a list of ids or names")
        targets = [str(t) for t in targets]
        if not targets and filter is None:
            raise InvalidArgument("targets: name at least one")
        limit = min(action.max_targets, self.config.bulk_limit)
        if len(targets) > limit:
            raise InvalidArgument(f"{name}: at most {limit} targets at once, got {len(targets)}")
        if not action.bulk and len(targets) != 1:
            raise InvalidArgument(f"{name}: exactly one target")
        if not isinstance(params, Mapping):
            raise InvalidArgument(f"params: a JSON object of the parameters {name} takes, got {type(params).__name__}")
        params = dict(params)
        unknown = sorted(set(params) - set(action.params))
        if unknown:
            raise InvalidArgument(f"{name}: unknown parameter(s) {', '.join(unknown)}; "
                                  f"accepted: {', '.join(action.params) or 'none'}")
        key = _key(idempotency_key)
        head = (viewer.who, viewer.kind, viewer.role, self.node.id, client, name, targets,
                _plain(filter) if filter is not None else None, _plain(params))
        async with self.pools.write.acquire() as conn:
            if key is not None:
                done = await self._recorded(conn, key)
                if done is not None:
                    return done
            try:
                async with conn.transaction():
                    result = await action.run(conn, targets, params, viewer.who)
                    row = await conn.fetchrow(_AUDIT, *head, result.affected, _plain(result.before), _plain(result.after),
                                              "ok", None, key)
            except asyncpg.UniqueViolationError as exc:
                if key is not None and "idempotency" in str(exc.constraint_name or ""):
                    done = await self._recorded(conn, key)  # the same request, committed meanwhile
                    if done is not None:
                        return done
                raise
            except ForgeError as exc:
                await self._failed(conn, head, exc.message, key)
                raise
            except Exception as exc:
                logger.opt(exception=exc).error(f"dashboard action {name} failed")
                await self._failed(conn, head, f"internal error: {type(exc).__name__}", key)
                raise
        logger.info(f"dashboard: {viewer.who} ran {name} on {len(targets)} target(s): {result.affected} changed")
        return {"audit_id": row["id"], "at": row["at"].isoformat(), "action": name, "targets": len(targets),
                "affected": result.affected, "message": result.message, "before": result.before,
                "after": result.after, "replayed": False}

    async def _failed(self, conn: Any, head: tuple, message: str, key: str | None) -> None:
        try:
            await conn.execute(_AUDIT, *head, 0, None, None, "error", message[:2000], None)
        except Exception as exc:  # the action's error is what the operator needs to see
            logger.warning(f"dashboard could not record a failed action: {exc}")

    @staticmethod
    async def _recorded(conn: Any, key: str) -> dict[str, Any] | None:
        row = await conn.fetchrow("SELECT id, at, action, cardinality(targets) AS n, affected, before, after "
                                  "FROM forge_dashboard_audit WHERE idempotency_key = $1", key)
        if row is None:
            return None
        return {"audit_id": row["id"], "at": row["at"].isoformat(), "action": row["action"], "targets": row["n"],
                "affected": row["affected"], "message": "already done (same idempotency key)",
                "before": row["before"], "after": row["after"], "replayed": True}

    # --- a whole jobs filter -------------------------------------------------------------
    def _bulk_query(self, verb: str, params: Mapping[str, str], limit: int) -> tuple[str, list[Any], dict[str, Any]]:
        if verb not in JOB_VERBS:
            raise InvalidArgument(f"verb: one of {', '.join(JOB_VERBS)}; got {verb!r}")
        f = job_filter(params)
        table, statuses = job_table(f)
        if table != "forge_jobs":
            raise InvalidArgument(f"{verb}: finished jobs cannot be changed; choose live jobs")
        acting = [s for s in statuses if s in JOB_VERBS[verb]]
        args = job_filter_args(f)
        args[0] = acting
        # the whole table, newest first: a bulk action is not limited to the stretch a page showed
        sql, a = q.bulk_targets(table, args, 2**62, 2**62, limit)
        return sql, a, {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in f.items()}

    async def bulk_preview(self, verb: str, params: Mapping[str, str]) -> dict[str, Any]:
        limit = min(self.config.bulk_limit, self.actions[f"job.{verb}"].max_targets if f"job.{verb}" in self.actions
                    else self.config.bulk_limit)
        sql, args, f = self._bulk_query(verb, params, limit + 1)
        ids = await self.pools.read.fetchval(sql, *args)
        return {"verb": verb, "count": min(len(ids), limit), "capped": len(ids) > limit, "limit": limit, "filter": f}

    async def bulk(self, viewer: Viewer, verb: str, params: Mapping[str, str], client: str,
                   idempotency_key: Any) -> dict[str, Any]:
        limit = min(self.config.bulk_limit, self.actions[f"job.{verb}"].max_targets if f"job.{verb}" in self.actions
                    else self.config.bulk_limit)
        sql, args, f = self._bulk_query(verb, params, limit)
        key = _key(idempotency_key)
        if key is None:
            raise InvalidArgument("idempotency_key: required for an action on a whole filter (the page sends one)")
        ids = await self.pools.read.fetchval(sql, *args)
        return await self.perform(viewer, f"job.{verb}", [str(i) for i in ids], {}, client, key, filter=f)
