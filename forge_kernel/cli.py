"""``forge-node``: start | migrate | plugins | status (plus sub-commands from plugins)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import inspect
import json
import sys
from typing import Any, AsyncIterator, Coroutine

import asyncpg
from loguru import logger

from . import migrations as migmod
from .app import Registry
from .config import Config, load_config
from .errors import StartupError
from .logs import REDACTOR, redact, setup_logging
from .node import Node, all_migrations, app_modules, cluster_status, database_url, session_url
from .plugins import PluginLoader


class Cli:
    """What sub-commands get: lazily loaded plugins, config and database."""

    def __init__(self, loader: PluginLoader, args: argparse.Namespace | None = None) -> None:
        self.loader = loader
        self.args = args
        self._config: Config | None = None

    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.loader.config_sections(), path=getattr(self.args, "config", None),
                                       owners=self.loader.section_owner)
            REDACTOR.add_config(self._config)  # every command's output and log lines keep its secrets out
            roles = getattr(self.args, "roles", None)
            if roles:
                self._config = self._config.evolve("node", roles=[r.strip() for r in roles.split(",") if r.strip()])
        return self._config

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection to the configured database for one command: starts (or joins) the embedded
        PostgreSQL when no URL is configured, and closes and releases everything on exit."""
        from .db import connect

        url, pg = await asyncio.to_thread(database_url, self.config())
        try:
            conn = await connect(session_url(self.config(), url))  # migrate takes a session lock
            try:
                yield conn
            finally:
                await conn.close()
        finally:
            if pg is not None:
                await asyncio.to_thread(pg.release)  # pg_ctl stop can take seconds: off the loop


def _print_table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


def _json_default(v: Any) -> Any:
    if isinstance(v, (dt.datetime, dt.date)):
        return v.isoformat()
    return str(v)


def run_event_loop(main: Coroutine[Any, Any, Any], event_loop: str = "auto") -> Any:
    """Run ``main`` to completion on uvloop (``auto`` when it is installed, or ``uvloop``) or on
    asyncio's own loop (``asyncio``): ``[node] event_loop``."""
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                main.close()
                raise StartupError("[node] event_loop is 'uvloop' but uvloop is not installed "
                                   "(pip install uvloop, or set event_loop = \"auto\")") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


# --- commands ---------------------------------------------------------------------------
def cmd_start(cli: Cli) -> int:
    config = cli.config()
    setup_logging(config)
    for f in cli.loader.failed():
        logger.warning(f"plugin {f.name} ({f.distribution} {f.version}) failed to load and is skipped: {f.error}")
    node = Node(config, cli.loader, freeze_gc=True)
    run_event_loop(node.run(), config.node.event_loop)
    return 0


async def cmd_migrate(cli: Cli) -> int:
    config = cli.config()
    async with cli.connection() as conn:
        registry = Registry.from_modules(app_modules(config, cli.loader))
        migs = all_migrations(cli.loader, registry)
        if cli.args.status:
            states = await migmod.status(conn, migs)
            if cli.args.json:
                print(json.dumps([s.__dict__ if hasattr(s, "__dict__") else _asdict(s) for s in states], default=_json_default))
            else:
                _print_table([_asdict(s) for s in states], ["namespace", "version", "name", "state", "applied_at"])
            return 1 if any(s.state in ("drift", "pending") for s in states) else 0
        done = await migmod.migrate(conn, migs)
        print(f"applied {len(done)} migration(s)" + "".join(f"\n  {m.namespace} {m.version:04d}_{m.name}" for m in done))
        return 0


def _asdict(obj: Any) -> dict[str, Any]:
    import attrs

    return attrs.asdict(obj)


async def cmd_plugins(cli: Cli) -> int:
    infos = cli.loader.infos
    if cli.args.json:
        print(json.dumps({"plugins": [i.to_dict() for i in infos],
                          "roles": cli.loader.provided_roles(),
                          "autoload": cli.loader.autoload()}, indent=2))
    else:
        _print_table([{**i.to_dict(), "roles": ",".join(i.roles), "hooks": ",".join(h.removeprefix("forge_") for h in i.hooks),
                       "error": i.error or ""} for i in infos],
                     ["name", "distribution", "version", "status", "roles", "hooks", "error"])
    return 0


async def cmd_status(cli: Cli) -> int:
    config = cli.config()
    if cli.args.live:
        return await _live_status(cli, config)
    async with cli.connection() as conn:
        exists = await conn.fetchval("SELECT to_regclass('forge_nodes') IS NOT NULL")
        rows = await cluster_status(conn, config.node.dead_after) if exists else []
    if cli.args.json:
        print(json.dumps(rows, default=_json_default, indent=2))
        return 0
    if not cli.args.all:
        rows = [r for r in rows if r["status"] not in ("stopped",)]
    _print_table([{**r, "roles": ",".join(r["roles"]), "ports": ",".join(f"{k}={v}" for k, v in (r["ports"] or {}).items()),
                   "heartbeat": f"{r['heartbeat_age']:.1f}s ago"} for r in rows],
                 ["id", "host", "status", "roles", "ports", "version", "heartbeat"])
    return 0


async def _live_status(cli: Cli, config: Config) -> int:
    """Every live node asked what it does now, through ``forge_live_status`` (forge-mesh)."""
    async with cli.connection() as conn:
        pending = cli.loader.hook.forge_live_status(config=config, conn=conn, timeout=cli.args.timeout)
        if pending is None:
            print("forge-node status --live asks nodes over the mesh: install forge-mesh (pip install forge-mesh)",
                  file=sys.stderr)
            return 2
        rows = await pending
    if cli.args.json:
        print(json.dumps(rows, default=_json_default, indent=2))
    else:
        _print_table([{"id": r["id"], "reachable": "yes" if r["reachable"] else f"no ({r.get('error') or '?'})",
                       **{k: json.dumps(v, default=_json_default) for k, v in (r.get("activity") or {}).items()}}
                      for r in rows],
                     ["id", "reachable", *sorted({k for r in rows for k in (r.get("activity") or {})})])
    return 0 if all(r["reachable"] for r in rows) else 1


def build_parser(loader: PluginLoader | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forge-node", description="Run and inspect FORGE nodes.")
    parser.add_argument("--config", "-c", help="path to forge.toml (default: ./forge.toml or $FORGE_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="start a node (an embedded PostgreSQL when [database] url is empty)")
    p.add_argument("--roles", help="comma-separated roles, overrides [node] roles")
    p.set_defaults(func=cmd_start)
    p = sub.add_parser("migrate", help="apply pending migrations")
    p.add_argument("--status", action="store_true", help="show applied, pending and drifted migrations")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_migrate)
    p = sub.add_parser("plugins", help="list plugins found, loaded and failed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("status", help="list the nodes of the cluster")
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="include stopped nodes")
    p.add_argument("--live", action="store_true",
                   help="ask every live node what it is doing now (in-flight calls, jobs, sockets, pool; needs forge-mesh)")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds --live waits for the nodes (default 1)")
    p.set_defaults(func=cmd_status)
    if loader is not None:
        loader.hook.forge_cli_commands(subparsers=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    # plugins may add sub-commands, so load them before parsing
    try:
        cli = Cli(PluginLoader().load())
        cli.args = build_parser(cli.loader).parse_args(argv)
        result = cli.args.func(cli)
        if inspect.isawaitable(result):
            result = asyncio.run(result)
        return int(result or 0)
    except StartupError as exc:
        print(f"forge-node: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
