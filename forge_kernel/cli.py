"""``forge-node``: start | migrate | plugins | status (plus sub-commands from plugins).

Every command answers bad input, a missing file and an unreachable database with one line on
stderr and a non-zero exit (2: the command line or the configuration is wrong, 1: it failed),
never a traceback. ``--config`` is accepted before or after any sub-command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import decimal
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
from .node import Node, all_migrations, app_modules, cluster_status, database_url, importable_app_dir, session_url
from .plugins import PluginLoader

#: the largest id a BIGINT column holds (job ids, run ids)
MAX_BIGINT = 2**63 - 1


class Cli:
    """What sub-commands get: lazily loaded plugins, config and database."""

    def __init__(self, loader: PluginLoader, args: argparse.Namespace | None = None) -> None:
        self.loader = loader
        self.args = args
        self._config: Config | None = None

    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.loader.config_sections(), path=getattr(self.args, "config", None),
                                       owners=self.loader.section_owner, foreign=self.loader.absent_sections())
            REDACTOR.add_config(self._config)  # every command's output and log lines keep its secrets out
            roles = getattr(self.args, "roles", None)
            if roles:
                self._config = self._config.evolve("node", roles=[r.strip() for r in roles.split(",") if r.strip()])
            # like uvicorn's --app-dir: app modules beside forge.toml import without PYTHONPATH
            importable_app_dir(self._config)
        return self._config

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection to the configured database for one command: starts (or joins) the embedded
        PostgreSQL when no URL is configured, and closes and releases everything on exit."""
        from .db import connect

        config = self.config()
        url, pg = await asyncio.to_thread(database_url, config)
        try:
            url = session_url(config, url)  # migrate takes a session lock
            key = "direct_url" if config.database.direct_url else "url"
            try:
                conn = await connect(url, timeout=config.database.connect_timeout)
            except (OSError, ValueError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise StartupError(f"cannot connect to PostgreSQL at {redact(url)} ([database] {key}): "
                                   f"{type(exc).__name__}: {exc}") from None
            try:
                yield conn
            finally:
                await conn.close()
        finally:
            if pg is not None:
                await asyncio.to_thread(pg.release)  # pg_ctl stop can take seconds: off the loop


def bounded_int(lo: int, hi: int = MAX_BIGINT, what: str = "a whole number") -> Any:
    """An ``argparse`` type: a whole number from ``lo`` to ``hi`` (a job id: ``bounded_int(1)``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} expected, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{what} from {lo} to {hi} expected, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


def _print_table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


def json_default(v: Any) -> Any:
    """``json.dumps(default=...)`` of every ``--json`` output: times as ISO 8601 text, intervals
    and decimals as numbers (seconds), anything else as text."""
    if isinstance(v, (dt.datetime, dt.date)):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return v.total_seconds()
    if isinstance(v, decimal.Decimal):
        return float(v)
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
                print(json.dumps([s.__dict__ if hasattr(s, "__dict__") else _asdict(s) for s in states], default=json_default))
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
        rows = await cluster_status(conn, config.node.dead_after, config.node.heartbeat_interval) if exists else []
    if cli.args.json:
        print(json.dumps(rows, default=json_default, indent=2))
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
        print(json.dumps(rows, default=json_default, indent=2))
    else:
        _print_table([{"id": r["id"], "reachable": "yes" if r["reachable"] else f"no ({r.get('error') or '?'})",
                       **{k: json.dumps(v, default=json_default) for k, v in (r.get("activity") or {}).items()}}
                      for r in rows],
                     ["id", "reachable", *sorted({k for r in rows for k in (r.get("activity") or {})})])
    return 0 if all(r["reachable"] for r in rows) else 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error printed as one line (and the help that explains it named)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"forge-node: error: {self.prog}: {message} (see '{self.prog} --help')\n")


CONFIG_HELP = "path to forge.toml (default: ./forge.toml or $FORGE_CONFIG)"


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every sub-command parser below it (plugins' included)."""
    out = [parser]
    for action in parser._actions:  # argparse keeps sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                out.extend(_parsers(child))
    return out


def _config_option_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept ``--config`` after any sub-command too (``forge-node start --config my.toml``).
    A sub-command's copy has no default, so it never hides one given before the sub-command."""
    for p in _parsers(parser)[1:]:
        if "--config" in p._option_string_actions:
            continue
        flags = ["--config"] + (["-c"] if "-c" not in p._option_string_actions else [])
        p.add_argument(*flags, default=argparse.SUPPRESS, help=CONFIG_HELP)


def build_parser(loader: PluginLoader | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="forge-node", description="Run and inspect FORGE nodes.")
    parser.add_argument("--config", "-c", help=CONFIG_HELP)
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
    _config_option_everywhere(parser)
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
    except asyncpg.UndefinedTableError as exc:
        print(f"forge-node: error: the database lacks FORGE's tables ({redact(str(exc))}); run 'forge-node "
              f"migrate' (or start a node) first", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"forge-node: error: database: {type(exc).__name__}: {redact(str(exc))}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback; the trace at DEBUG
        logger.opt(exception=exc).debug("forge-node failed")
        print(f"forge-node: error: {type(exc).__name__}: {redact(str(exc))} (FORGE_LOG__LEVEL=DEBUG shows the "
              f"traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
