"""``forge-node jobs ...``: list, show, retry, discard and cancel jobs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from forge_kernel.cli import bounded_int, json_default
from forge_kernel.errors import ForgeError

from .queue import HISTORY_STATUSES, LIVE_STATUSES, JobQueue


JOB_ID = bounded_int(1, what="a job id (a whole number)")
LIMIT = bounded_int(1, 100_000)


def add_jobs_command(subparsers: Any) -> None:
    p = subparsers.add_parser("jobs", help="list, retry, discard and cancel background jobs")
    sub = p.add_subparsers(dest="jobs_command", required=True)
    ls = sub.add_parser("list", help="list jobs, newest first (default: live jobs)")
    ls.add_argument("--status", choices=LIVE_STATUSES + HISTORY_STATUSES)
    ls.add_argument("--name")
    ls.add_argument("--queue")
    ls.add_argument("--limit", type=LIMIT, default=50)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_run, action="list")
    dead = sub.add_parser("dead", help="list dead-lettered jobs")
    dead.add_argument("--limit", type=LIMIT, default=50)
    dead.add_argument("--json", action="store_true")
    dead.set_defaults(func=_run, action="dead")
    show = sub.add_parser("show", help="show one job")
    show.add_argument("id", type=JOB_ID)
    show.set_defaults(func=_run, action="show", json=True)
    for name, what in (("retry", "put dead-lettered jobs back in the queue"),
                       ("discard", "remove dead-lettered jobs (kept in history as discarded)")):
        q = sub.add_parser(name, help=what)
        q.add_argument("ids", type=JOB_ID, nargs="*")
        q.add_argument("--all", action="store_true", help="every dead-lettered job")
        q.set_defaults(func=_run, action=name)
    c = sub.add_parser("cancel", help="cancel pending or running jobs")
    c.add_argument("ids", type=JOB_ID, nargs="+")
    c.set_defaults(func=_run, action="cancel")
    st = sub.add_parser("stats", help="live jobs per queue and status")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_run, action="stats")


def _print_jobs(jobs: list[Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps([j.to_dict() for j in jobs], default=json_default, indent=2))
        return
    cols = ["id", "name", "queue", "status", "attempt", "run_at", "node_id", "last_error"]
    rows = []
    for j in jobs:
        d = j.to_dict()
        d["attempt"] = f"{j.attempt}/{j.max_attempts}"
        d["run_at"] = j.run_at.strftime("%Y-%m-%d %H:%M:%S")
        d["last_error"] = (j.last_error or "").splitlines()[0][:60] if j.last_error else ""
        rows.append({c: "" if d.get(c) is None else str(d[c]) for c in cols})
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in cols))


async def _run(cli: Any) -> int:
    async with cli.connection() as conn:
        try:
            return await run_jobs_command(JobQueue(conn, hook=cli.loader.hook, config=cli.config()), cli.args)
        except ForgeError as exc:
            print(f"forge-node jobs: {exc.message}")
            return 1


async def run_jobs_command(queue: JobQueue, args: argparse.Namespace) -> int:
    action = args.action
    if action == "list":
        _print_jobs(await queue.list(status=args.status, name=args.name, queue=args.queue, limit=args.limit), args.json)
    elif action == "dead":
        _print_jobs(await queue.dead(limit=args.limit), args.json)
    elif action == "show":
        job = await queue.get(args.id)
        if job is None:
            print(f"no job {args.id}")
            return 1
        print(json.dumps(job.to_dict(), default=json_default, indent=2))
    elif action in ("retry", "discard"):
        if not args.ids and not args.all:
            print(f"forge-node jobs {action}: give job ids or --all")
            return 2
        fn = queue.retry if action == "retry" else queue.discard
        done = await fn(None if args.all else args.ids)
        missing = sorted(set(args.ids) - set(done))
        print(f"{'retried' if action == 'retry' else 'discarded'} {len(done)} job(s)" + (f": {', '.join(map(str, done))}" if done else ""))
        if missing:
            print(f"not dead-lettered (left alone): {', '.join(map(str, missing))}")
            return 1
    elif action == "cancel":
        status = 0
        for job_id in args.ids:
            try:
                print(f"job {job_id}: {await queue.cancel(job_id)}")
            except ForgeError as exc:
                print(f"job {job_id}: {exc.message}")
                status = 1
        return status
    elif action == "stats":
        counts = await queue.counts()
        if args.json:
            print(json.dumps(counts, indent=2))
        elif not counts:
            print("no live jobs (nothing scheduled, pending, running or dead-lettered)")
        else:
            for q, by_status in sorted(counts.items()):
                print(f"{q}: " + ", ".join(f"{s}={n}" for s, n in sorted(by_status.items())))
    return 0
