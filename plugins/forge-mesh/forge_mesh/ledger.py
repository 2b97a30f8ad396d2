"""Call ids of forwarded mutations and actions (``forge_mesh_calls``): claim, record, fence.

The claim of a mutation is written in the mutation's own transaction: another node retrying the
same call id blocks on the row until that transaction ends, then finds the stored result (it
committed) or nothing (it rolled back, so the retry runs it). An action's claim commits on its
own before the action starts, so an action never runs twice; a retry that finds a claim without
a result cannot know what happened and says so (:class:`OutcomeUnknown`).
"""

from __future__ import annotations

from typing import Any

from forge_kernel.app import FunctionDef
from forge_kernel.convert import unstructure
from forge_kernel.errors import ForgeError, Unavailable

from .wire import decode_json, encode_result

_CLAIM = """INSERT INTO forge_mesh_calls (call_id, function, node_id, state) VALUES ($1, $2, $3, 'running')
            ON CONFLICT (call_id) DO NOTHING RETURNING 1"""
_READ = "SELECT state, result, node_id FROM forge_mesh_calls WHERE call_id = $1"


class OutcomeUnknown(ForgeError):
    """A forwarded action (or a mutation whose node stopped answering) may or may not have run.

    Code ``INTERNAL`` (500) with ``details = {"outcome": "unknown", "call_id": ...}``: the caller
    must not blindly retry; look at the outcome (the function's own records) first.
    """

    code = "INTERNAL"

    def __init__(self, message: str, call_id: str) -> None:
        super().__init__(message, details={"outcome": "unknown", "call_id": call_id})


def _stored(call_id: str, defn_name: str, row: Any) -> tuple[bool, Any]:
    if row["state"] == "done":
        return True, decode_json(bytes(row["result"] or b"null"), "stored result")
    if row["state"] == "abandoned":
        raise Unavailable(f"{defn_name}: the caller gave up on call {call_id} before it ran; it will not run")
    raise OutcomeUnknown(f"outcome unknown: {defn_name} (call {call_id}) started on node {row['node_id']}, which "
                         f"stopped answering; it may or may not have run", call_id)


class Ledger:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id

    async def claim(self, conn: Any, call_id: str, defn: FunctionDef) -> tuple[bool, Any]:
        if await conn.fetchval(_CLAIM, call_id, defn.name, self.node_id):
            return False, None
        row = await conn.fetchrow(_READ, call_id)
        if row is None:  # pruned between the two statements: far older than any retry
            raise Unavailable(f"{defn.name}: call {call_id} is too old to run again")
        return _stored(call_id, defn.name, row)

    async def record(self, conn: Any, call_id: str, result: Any) -> None:
        await conn.execute("UPDATE forge_mesh_calls SET state = 'done', result = $2 WHERE call_id = $1",
                           call_id, encode_result(unstructure(result)))

    async def fence(self, conn: Any, call_id: str, defn: FunctionDef, lock_timeout: float) -> tuple[bool, Any]:
        """After the node running a call stopped answering and no other node can take the retry:
        make sure it never runs later. Returns ``(True, result)`` when it had completed; ``(False,
        None)`` when it never ran (and now never will); raises OutcomeUnknown when that cannot be
        told within ``lock_timeout`` (its transaction is still open on a frozen node) or an action
        started."""
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = {max(1, int(lock_timeout * 1000))}")
            try:
                inserted = await conn.fetchval(
                    """INSERT INTO forge_mesh_calls (call_id, function, node_id, state) VALUES ($1, $2, $3, 'abandoned')
                       ON CONFLICT (call_id) DO NOTHING RETURNING 1""", call_id, defn.name, self.node_id)
            except Exception as exc:  # lock_timeout: the claim is held by a transaction still open
                raise OutcomeUnknown(f"outcome unknown: {defn.name} (call {call_id}) is still held by a node that "
                                     f"stopped answering ({type(exc).__name__})", call_id) from None
            if inserted:
                return False, None
            row = await conn.fetchrow(_READ, call_id)
        if row["state"] == "abandoned":
            return False, None
        return _stored(call_id, defn.name, row)


async def prune(conn: Any, older_than: float) -> int:
    res = await conn.execute("DELETE FROM forge_mesh_calls WHERE created_at < now() - make_interval(secs => $1)",
                             float(older_than))
    return int(res.split()[-1])
