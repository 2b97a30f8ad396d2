"""``forge-node workflows ...``: list, show, start, cancel, retry runs, send events, and check
stored histories against the current code (``check`` exits 1 on a divergence, for CI)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from forge_kernel.app import Registry
from forge_kernel.errors import ForgeError

from .api import WorkflowClient
from .store import FINAL, LIVE


def add_workflows_command(subparsers: Any) -> None:
    p = subparsers.add_parser("workflows", help="list, show, start, cancel, retry workflow runs; send events; check")
    sub = p.add_subparsers(dest="workflows_command", required=True)
    ls = sub.add_parser("list", help="list runs, newest first")
    ls.add_argument("--status", choices=LIVE + FINAL + ("compensating",))
    ls.add_argument("--workflow")
    ls.add_argument("--correlation-key")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_run, action="list")
    show = sub.add_parser("show", help="one run as JSON: status, what it waits on, every step")
    show.add_argument("run_id")
    show.set_defaults(func=_run, action="show", json=True)
    steps = sub.add_parser("steps", help="one run as a timeline: what it waits on, every step")
    steps.add_argument("run_id")
    steps.set_defaults(func=_run, action="show", json=False)
    start = sub.add_parser("start", help="start a run")
    start.add_argument("workflow")
    start.add_argument("--args", default="{}", help="arguments as a JSON object")
    start.add_argument("--idempotency-key")
    start.add_argument("--correlation-key")
    start.set_defaults(func=_run, action="start")
    for name, what in (("cancel", "cancel runs (their compensations run)"),):
        c = sub.add_parser(name, help=what)
        c.add_argument("run_ids", nargs="+")
        c.set_defaults(func=_run, action=name)
    r = sub.add_parser("retry", help="run a failed, cancelled or blocked run again")
    r.add_argument("run_id")
    r.add_argument("--from-step", help="a step key or name: it and every later step run again")
    r.set_defaults(func=_run, action="retry")
    ev = sub.add_parser("send", help="send an event to a run (id or correlation key)")
    ev.add_argument("target")
    ev.add_argument("name")
    ev.add_argument("--payload", default="null", help="JSON")
    ev.set_defaults(func=_run, action="send")
    st = sub.add_parser("stats", help="runs per workflow and status")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_run, action="stats")
    ck = sub.add_parser("check", help="replay stored histories against the current code; exit 1 on a divergence")
    ck.add_argument("--all", action="store_true", help="ended runs too")
    ck.add_argument("--limit", type=int, default=10_000)
    ck.set_defaults(func=_run, action="check")


def _registry(cli: Any) -> Registry:
    from forge_kernel.node import app_modules

    return Registry.from_modules(app_modules(cli.config(), cli.loader))


async def _run(cli: Any) -> int:
    registry = _registry(cli)
    async with cli.connection() as conn:
        try:
            return await run_workflows_command(conn, registry, cli.config()["workflows"], cli.args)
        except ForgeError as exc:
            print(f"forge-node workflows: {exc.message}")
            return 1
        except json.JSONDecodeError as exc:
            print(f"forge-node workflows: invalid JSON: {exc}")
            return 2


def _line(info: Any) -> str:
    label = "compensating" if info.compensating and info.status in ("pending", "running") else info.status
    return f"{info.id}  {info.name:<24} {label:<12} {info.created_at:%Y-%m-%d %H:%M:%S}  {info.waiting_on or info.error or ''}"


async def run_workflows_command(conn: Any, registry: Registry, config: Any, args: argparse.Namespace) -> int:
    from .store import WorkflowEngine

    client = WorkflowClient(conn, registry, engine=WorkflowEngine(max_value_bytes=config.max_value_bytes))
    action = args.action
    if action == "list":
        runs = await client.list(status=args.status, name=args.workflow, correlation_key=args.correlation_key,
                                 limit=args.limit)
        if args.json:
            print(json.dumps([r.to_dict() for r in runs], default=str, indent=2))
        else:
            for r in runs:
                print(_line(r).splitlines()[0][:200])
    elif action == "show":
        info = await client.get(args.run_id)
        if info is None:
            print(f"no workflow run {args.run_id}")
            return 1
        if args.json:
            print(json.dumps(info.to_dict(), default=str, indent=2))
        else:
            print(_line(info).splitlines()[0])
            if info.error:
                print("error: " + info.error.strip())
            for s in info.steps:
                took = ""
                if s.started_at is not None:
                    took = f" {(s.finished_at - s.started_at).total_seconds() * 1000:.1f} ms"
                extra = s.error.splitlines()[0] if s.error else json.dumps(s.result, default=str)[:100]
                comp = " (undo recorded)" if s.compensation else ""
                print(f"  {s.key:<10} {s.kind:<12} {s.name:<24} {s.status:<9} x{s.attempts}{took}{comp}  {extra}")
    elif action == "start":
        print(await client.start(args.workflow, json.loads(args.args), idempotency_key=args.idempotency_key,
                                 correlation_key=args.correlation_key))
    elif action == "cancel":
        status = 0
        for run_id in args.run_ids:
            try:
                print(f"run {run_id}: cancel {await client.cancel(run_id)}")
            except ForgeError as exc:
                print(f"run {run_id}: {exc.message}")
                status = 1
        return status
    elif action == "retry":
        print(f"run {args.run_id}: {await client.retry(args.run_id, from_step=args.from_step)}")
    elif action == "send":
        n = await client.send_event(args.target, args.name, json.loads(args.payload))
        print(f"event {args.name!r} delivered to {n} run(s)")
    elif action == "stats":
        counts = await client.counts()
        if args.json:
            print(json.dumps(counts, indent=2))
        else:
            for name, by_status in sorted(counts.items()):
                print(f"{name}: " + ", ".join(f"{s}={n}" for s, n in sorted(by_status.items())))
    elif action == "check":
        from .check import check_runs

        checked, problems = await check_runs(conn, registry, config, include_ended=args.all, limit=args.limit)
        for p in problems:
            print(f"DIVERGED {p}" if not isinstance(p, str) else f"CANNOT REPLAY {p}")
        print(f"checked {checked} run(s): {len(problems)} problem(s)")
        return 1 if problems else 0
    return 0
