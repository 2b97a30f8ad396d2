"""``forge-node logs``, ``forge-node traces``, ``forge-node metrics`` (on :mod:`forge_observe.query`)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
from typing import Any

from forge_kernel.errors import ForgeError

from . import query

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def parse_since(text: str | None) -> dt.timedelta | None:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d`` -> a timedelta."""
    if text is None:
        return None
    m = _DURATION.match(text.strip())
    if not m:
        raise ForgeError(f"--since takes a duration such as 90s, 15m, 2h or 7d, got {text!r}", code="INVALID_ARGUMENT")
    return dt.timedelta(seconds=float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)])


def _default(v: Any) -> Any:
    return v.isoformat() if isinstance(v, (dt.datetime, dt.date)) else str(v)


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("logs", help="stored log records (forge-observe)")
    p.add_argument("--level", help="lowest level shown (DEBUG, INFO, WARNING, ERROR...)")
    p.add_argument("--text", help="case-insensitive text the message contains")
    p.add_argument("--node", help="only this node id")
    p.add_argument("--trace", help="only this trace id")
    p.add_argument("--job", type=int, help="only this job id")
    p.add_argument("--since", default="1h", help="how far back (90s, 15m, 2h, 7d; default 1h)")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new records until interrupted")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_logs)

    p = subparsers.add_parser("traces", help="stored traces (forge-observe)")
    sub = p.add_subparsers(dest="traces_command", required=True)
    s = sub.add_parser("show", help="every span of one trace, as a tree")
    s.add_argument("trace_id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_trace_show)
    s = sub.add_parser("list", help="recent traces")
    s.add_argument("--since", default="1h")
    s.add_argument("--errors", action="store_true", help="only traces with an error")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_trace_list)

    p = subparsers.add_parser("metrics", help="a summary per function and job (forge-observe)")
    p.add_argument("--since", default="1h", help="the window (default 1h)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_metrics)


def _print_log(r: query.LogRecord, as_json: bool) -> None:
    if as_json:
        print(json.dumps(r.to_dict(), default=_default), flush=True)
        return
    ids = " ".join(f"{k}={v}" for k, v in (("trace", r.trace_id), ("job", r.job_id), ("call", r.call_id)) if v)
    print(f"{r.at.astimezone().strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]} {r.level:<7} {r.node_id} {r.message}"
          + (f"  [{ids}]" if ids else ""), flush=True)


async def cmd_logs(cli: Any) -> int:
    a = cli.args
    try:
        since = parse_since(a.since)
        filters = dict(level=a.level, text=a.text, node=a.node, trace=a.trace, job=a.job)
        async with cli.connection() as conn:
            rows = await query.logs(conn, since=since, limit=a.limit, **filters)
            for r in rows:
                _print_log(r, a.json)
            if not a.follow:
                return 0
            last = rows[-1].at if rows else dt.datetime.now(dt.timezone.utc) - (since or dt.timedelta(0))
            while True:
                await asyncio.sleep(a.interval)
                for r in await query.logs(conn, after=last, limit=10_000, **filters):
                    _print_log(r, a.json)
                    last = r.at
    except ForgeError as exc:
        print(f"forge-node logs: {exc.message}")
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 0


async def cmd_trace_show(cli: Any) -> int:
    try:
        async with cli.connection() as conn:
            spans = await query.trace(conn, cli.args.trace_id)
    except ForgeError as exc:
        print(f"forge-node traces show: {exc.message}")
        return 2
    if cli.args.json:
        print(json.dumps([s.to_dict() for s in spans], default=_default, indent=2))
        return 0 if spans else 1
    if not spans:
        print(f"no stored spans for trace {cli.args.trace_id} (not sampled, or past retention)")
        return 1
    t0 = min(s.start_at for s in spans)
    for depth, s in query.span_tree(spans):
        offset = (s.start_at - t0).total_seconds() * 1000
        err = f"  ERROR {s.error}" if s.error else ""
        extra = ""
        if s.attrs:
            shown = {k: v for k, v in s.attrs.items() if k in ("db.statement", "job.id", "http.status_code", "call.id")}
            extra = "  " + " ".join(f"{k}={v}" for k, v in shown.items()) if shown else ""
        print(f"{'  ' * depth}{s.name} [{s.kind}] {s.node_id} +{offset:.1f}ms {s.duration_ms:.2f}ms{err}{extra}")
    return 0


async def cmd_trace_list(cli: Any) -> int:
    try:
        async with cli.connection() as conn:
            rows = await query.recent_traces(conn, since=parse_since(cli.args.since), errors_only=cli.args.errors,
                                             limit=cli.args.limit)
    except ForgeError as exc:
        print(f"forge-node traces list: {exc.message}")
        return 2
    if cli.args.json:
        import attrs

        print(json.dumps([attrs.asdict(r) for r in rows], default=_default, indent=2))
        return 0
    for r in rows:
        print(f"{r.trace_id}  {r.start_at.astimezone().strftime('%H:%M:%S')}  {r.duration_ms:9.2f}ms  "
              f"{r.spans:3d} spans  {r.errors} errors  {r.root}  ({', '.join(r.nodes)})")
    return 0


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


async def cmd_metrics(cli: Any) -> int:
    try:
        since = parse_since(cli.args.since)
        async with cli.connection() as conn:
            fns = await query.function_summary(conn, since)
            jobs = await query.job_summary(conn, since)
    except ForgeError as exc:
        print(f"forge-node metrics: {exc.message}")
        return 2
    if cli.args.json:
        import attrs

        print(json.dumps({"functions": [attrs.asdict(f) for f in fns], "jobs": [attrs.asdict(j) for j in jobs]}))
        return 0
    print(f"functions (last {cli.args.since})")
    print(f"  {'FUNCTION':<32} {'KIND':<9} {'CALLS':>8} {'ERRORS':>7} {'P50 MS':>8} {'P95 MS':>8}")
    for f in fns:
        print(f"  {f.function:<32} {f.kind:<9} {f.calls:>8} {f.errors:>7} {_fmt(f.p50_ms):>8} {_fmt(f.p95_ms):>8}")
    print(f"jobs (last {cli.args.since})")
    print(f"  {'JOB':<32} {'OK':>7} {'FAILED':>7} {'DEAD':>5} {'OTHER':>6} {'RUN P95':>8} {'WAIT P95':>9}")
    for j in jobs:
        print(f"  {j.job:<32} {j.succeeded:>7} {j.failed:>7} {j.dead:>5} {j.other:>6} {_fmt(j.run_p95_ms):>8} "
              f"{_fmt(j.wait_p95_ms):>9}")
    return 0
