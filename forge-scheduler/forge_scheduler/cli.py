"""``forge-node crons list | history | trigger | pause | resume | leader``."""

from __future__ import annotations

import argparse
import datetime as dt
import decimal
import json
from typing import Any

import attrs
from loguru import logger

from forge_kernel.cli import bounded_int, json_default
from forge_kernel.errors import ForgeError, StartupError

from . import api
from .settings import CronSettings, crons_of


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("crons", help="list, trigger, pause and resume crons; show run history and the leader")
    sub = p.add_subparsers(dest="crons_command", required=True)
    c = sub.add_parser("list", help="every cron with its schedule, state, next slot and last run")
    c.add_argument("--json", action="store_true")
    c = sub.add_parser("history", help="recent runs, newest first")
    c.add_argument("name", nargs="?", help="only this cron")
    c.add_argument("--limit", type=bounded_int(1, 10_000), default=20)
    c.add_argument("--json", action="store_true")
    for verb, text in (("trigger", "run a cron once now (also when paused)"),
                       ("pause", "stop scheduling a cron until resumed"),
                       ("resume", "schedule a paused cron again from now on")):
        c = sub.add_parser(verb, help=text)
        c.add_argument("name")
    c = sub.add_parser("leader", help="which node leads the scheduler, since when")
    c.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _registered(cli: Any) -> list[CronSettings]:
    """Crons of the configured app, so names work before any leader registered them."""
    from forge_kernel.app import Registry
    from forge_kernel.node import app_modules

    try:
        return list(crons_of(Registry.from_modules(app_modules(cli.config(), cli.loader))).values())
    except StartupError as exc:
        logger.warning(f"app crons not loaded ({exc}); using the cluster's cron state only")
        return []


def _cell(v: Any) -> str:
    """Table text: times as ISO 8601, fractions rounded to what a reader needs."""
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(json_default(v) if isinstance(v, (dt.datetime, decimal.Decimal)) else v)


def _table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    text = [{c: _cell(r.get(c)) for c in cols} for r in rows]
    widths = {c: max([len(c)] + [len(t[c]) for t in text]) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for t in text:
        print("  ".join(t[c].ljust(widths[c]) for c in cols))


async def run(cli: Any) -> int:
    """``forge-node crons ...`` (``cli.args`` holds the parsed arguments)."""
    known = _registered(cli)
    async with cli.connection() as conn:
        if not await conn.fetchval("SELECT to_regclass('forge_cron_state') IS NOT NULL"):
            raise StartupError("the scheduler's tables do not exist yet: run `forge-node migrate` (or start a node) first")
        try:
            return await _dispatch(cli.args, conn, known)
        except ForgeError as exc:
            print(f"forge-node crons: {exc.message}")
            return 1


async def _dispatch(args: argparse.Namespace, conn: Any, known: list[CronSettings]) -> int:
    cmd = args.crons_command
    if cmd == "list":
        rows = [attrs.asdict(c) for c in await api.list_crons(conn, known)]
        if args.json:
            print(json.dumps(rows, default=json_default, indent=2))
        else:
            _table(rows, ["name", "schedule", "timezone", "paused", "defined", "next_slot", "last_status", "last_slot",
                          "runs", "dropped_total"])
        return 0
    if cmd == "history":
        rows = [attrs.asdict(r) for r in await api.history(conn, args.name, limit=args.limit, known=known)]
        if args.json:
            print(json.dumps(rows, default=json_default, indent=2))
        else:
            _table(rows, ["id", "cron", "slot", "kind", "status", "attempts", "duration_ms", "node_id", "error"])
        return 0
    if cmd == "trigger":
        rid = await api.trigger(conn, args.name, requested_by="cli", known=known)
        print(f"cron {args.name}: run requested (request {rid}); the leader enqueues it on its next tick")
        return 0
    if cmd == "pause":
        changed = await api.pause(conn, args.name, known=known)
        print(f"cron {args.name}: {'paused' if changed else 'was already paused'}")
        return 0
    if cmd == "resume":
        changed = await api.resume(conn, args.name, known=known)
        print(f"cron {args.name}: {'resumed' if changed else 'was not paused'}")
        return 0
    if cmd == "leader":
        row = await api.leader(conn)
        if args.json:
            print(json.dumps(row, default=json_default, indent=2))
        elif row is None or row["node_id"] is None:
            print("no scheduler leader" + (f" (last term {row['term']})" if row else ""))
        else:
            print(f"leader {row['node_id']} term {row['term']} since {row['since'].isoformat()} "
                  f"(renewed {row['renewed_age']:.1f}s ago)")
        return 0
    raise StartupError(f"unknown crons command {cmd!r}")
