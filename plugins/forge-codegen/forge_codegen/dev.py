"""``forge-node dev``: a node that reloads the app's code when a file is saved.

The node keeps running: a reload imports fresh copies of the app's modules, builds a new registry
and hands it to ``Node.reload_registry`` (checks, new migrations, swap, ``forge_registry_reloaded``:
the gateway serves the new functions and realtime re-runs live queries on open WebSockets, pushing
only changed results). A file that does not import leaves the old code serving; the error goes to
the terminal and, through ``forge_dev_notice``, to connected clients. After each reload the
TypeScript client is regenerated (``[codegen] ts_out``) and models that differ from the database
are reported.

Files are found by polling their size and modification time every ``[codegen] poll_interval``
(0.1 s): a few dozen ``stat`` calls, no watcher library, and no debounce beyond waiting until two
scans agree (editors write a file in several steps).
"""

from __future__ import annotations

import asyncio
import linecache
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loguru import logger

from forge_kernel.errors import StartupError
from forge_kernel.node import Node

from . import appload, schema, tsgen

WATCHED = (".py", ".sql")


def scan(roots: list[Path]) -> dict[Path, tuple[int, int]]:
    """Every watched file under ``roots``: (mtime_ns, size)."""
    out: dict[Path, tuple[int, int]] = {}
    for root in roots:
        paths = [root] if root.is_file() else root.rglob("*")
        for path in paths:
            if path.suffix in WATCHED and "__pycache__" not in path.parts:
                try:
                    st = path.stat()
                except OSError:  # removed while we looked
                    continue
                out[path] = (st.st_mtime_ns, st.st_size)
    return out


def changed_files(before: dict[Path, Any], after: dict[Path, Any]) -> list[Path]:
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


def never_stale_bytecode() -> None:
    """Bytecode caches are keyed by a source file's mtime in whole seconds and its size: two saves of
    the same size within one second would import the first one's bytecode. A dev node reads and
    writes none."""
    sys.dont_write_bytecode = True
    sys.pycache_prefix = tempfile.mkdtemp(prefix="forge-dev-nopyc-")


class DevSession:
    """One ``forge-node dev`` run: the node, its app modules, and the watch loop."""

    def __init__(self, node: Node, modules: list[str], roots: list[Path], *, project: Path, ts_out: Path | None,
                 svelte: bool, poll_interval: float) -> None:
        self.node = node
        self.modules = modules
        self.roots = roots
        self.project = project
        self.ts_out = ts_out
        self.svelte = svelte
        self.poll_interval = poll_interval
        self.reloads = 0
        self._stop = asyncio.Event()

    def _rel(self, path: str | Path | None) -> str:
        if path is None:
            return "?"
        try:
            return str(Path(path).resolve().relative_to(self.project))
        except ValueError:
            return str(path)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            self.write_client()  # before the node is ready: a page can build against it at once
            # the files as the node is about to load them: a save made once it is ready (before the
            # watcher's first look) is a change, not the baseline
            snapshot = scan(self.roots)
            await self.node.start()
            await self.report_drift()
            logger.info(f"forge dev: watching {', '.join(self._rel(r) for r in self.roots)} "
                        f"(every {self.poll_interval:g}s); save a file to reload")
            watcher = asyncio.create_task(self.watch(snapshot), name="forge:dev-watch")
            await self._stop.wait()
            watcher.cancel()
        finally:
            await self.node.stop()

    async def watch(self, snapshot: dict[Path, tuple[int, int]]) -> None:
        """Reload on every change to the files under the roots since ``snapshot`` (a ``scan``)."""
        while True:
            await asyncio.sleep(self.poll_interval)
            current = scan(self.roots)
            if current == snapshot:
                continue
            while True:  # wait until the editor has finished writing
                await asyncio.sleep(min(self.poll_interval, 0.03))
                again = scan(self.roots)
                if again == current:
                    break
                current = again
            changed = changed_files(snapshot, current)
            snapshot = current
            roots = list(self.roots)
            try:
                await self.reload(changed)
            except Exception as exc:  # the watch loop must survive anything a reload throws
                logger.opt(exception=exc).error("forge dev: reload failed unexpectedly")
            if self.roots != roots:  # a module of a new package joined the app
                snapshot = scan(self.roots)

    async def reload(self, changed: list[Path]) -> bool:
        started = time.monotonic()
        before = set(self.node.registry.functions)
        what = ", ".join(self._rel(p) for p in changed) or "files"
        try:
            loaded = appload.load(self.modules, fresh=True)
        except appload.AppImportError as exc:
            self.failed(f"{type(exc.error).__name__}: {exc.error}", exc.file, exc.line, what)
            return False
        imported = time.monotonic()
        try:
            applied = await self.node.reload_registry(loaded.registry)
        except StartupError as exc:
            self.failed(str(exc), None, None, what)
            return False
        swapped = time.monotonic()
        self.roots = loaded.roots
        self.reloads += 1
        after = set(loaded.registry.functions)
        parts = [f"{len(after)} functions"]
        if after - before:
            parts.append("added " + ", ".join(sorted(after - before)))
        if before - after:
            parts.append("removed " + ", ".join(sorted(before - after)))
        if applied:
            parts.append("applied " + ", ".join(f"{m.namespace}/{m.version:04d}_{m.name}" for m in applied))
        logger.info(f"forge dev: reloaded {what} in {(swapped - started) * 1000:.0f} ms (import "
                    f"{(imported - started) * 1000:.0f} ms, swap {(swapped - imported) * 1000:.0f} ms): {'; '.join(parts)}")
        message = await self.after_load()
        self.notice({"event": "reloaded", "message": message or f"reloaded {what}", "file": None, "line": None,
                     "functions": sorted(after)})
        return True

    def failed(self, message: str, file: str | None, line: int | None, what: str) -> None:
        where = f"{self._rel(file)}:{line}" if file and line else self._rel(file) if file else what
        if file:
            linecache.checkcache(file)  # the file changed since it may have been cached
        code = linecache.getline(file, line).rstrip() if file and line else ""
        logger.error(f"forge dev: reload of {what} failed, the previous code keeps serving\n  {where}: {message}"
                     + (f"\n    {line} | {code}" if code else ""))
        # project-relative: a page needs where, not the server's directory layout
        self.notice({"event": "reload_failed", "message": message, "file": self._rel(file) if file else None, "line": line,
                     "functions": sorted(self.node.registry.functions)})

    def notice(self, notice: dict[str, Any]) -> None:
        try:
            self.node.loader.hook.forge_dev_notice(node=self.node, notice=notice)
        except Exception as exc:  # a client-facing nicety must not break the loop
            logger.opt(exception=exc).warning("forge dev: sending the notice to clients failed")

    async def after_load(self) -> str:
        """Regenerate the TypeScript client and report models that differ from the database.
        Returns a summary of problems (empty when there are none)."""
        return "\n".join(p for p in (self.write_client(), await self.report_drift()) if p)

    def write_client(self) -> str:
        if self.ts_out is None:
            return ""
        try:
            written = tsgen.write(self.ts_out, tsgen.generate(self.node.registry, svelte=self.svelte))
        except tsgen.GenerateError as exc:
            problem = f"the TypeScript client was not regenerated: {exc}"
            logger.warning(f"forge dev: {problem}")
            return problem
        if written:
            logger.info(f"forge dev: TypeScript client written: {', '.join(self._rel(p) for p in written)}")
        return ""

    async def report_drift(self) -> str:
        try:
            drift = await schema.drift(self.node, self.node.registry)
        except Exception as exc:  # noqa: BLE001 - a report, never a reason to stop serving
            logger.opt(exception=exc).warning("forge dev: could not compare the models with the database")
            return ""
        if not drift:
            return ""
        text = ("models differ from the database (forge-node generate migration NAME writes the migration):\n  "
                + "\n  ".join(drift))
        logger.warning(f"forge dev: {text}")
        return text


def port_problem(config: Any) -> str | None:
    """Why the gateway cannot listen where the config says, naming the process that holds the port."""
    from . import ports

    try:
        gw = config["gateway"]
    except (KeyError, LookupError):
        return None
    if not getattr(gw, "port", 0) or not ports.in_use(gw.host, gw.port):
        return None
    who = ports.holder(gw.port) or "another process (could not tell which)"
    return (f"[gateway] port {gw.port} on {gw.host} is in use by {who}; stop it, or pick another port: "
            f"forge-node dev --port 0 (any free port) or [gateway] port in forge.toml")


def run(cli: Any, project: Path) -> int:
    from forge_kernel.cli import run_event_loop, setup_logging
    from forge_kernel.node import app_modules

    args = cli.args
    config = cli.config()
    if args.port is not None:
        config = config.evolve("gateway", port=args.port)
    setup_logging(config)
    problem = port_problem(config)
    if problem:
        print(f"forge-node: error: dev: {problem}", file=sys.stderr)
        return 2
    never_stale_bytecode()
    appload.use_project_path(project)
    modules = app_modules(config, cli.loader)
    try:
        loaded = appload.load(modules)
    except appload.AppImportError as exc:
        print(f"forge-node: error: dev: {exc}", file=sys.stderr)
        return 1
    cfg = config["codegen"]
    ts_out = getattr(args, "ts_out", None) or cfg.ts_out
    node = Node(config, cli.loader, registry=loaded.registry)
    session = DevSession(node, modules, loaded.roots, project=project, ts_out=Path(ts_out) if ts_out else None,
                         svelte=cfg.svelte, poll_interval=cfg.poll_interval)
    run_event_loop(session.run(), config.node.event_loop)
    return 0
