"""``forge-node new | dev | generate ts | generate migration``: argument parsing and output."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

from forge_kernel.node import app_modules

from . import appload, scaffold, schema, tsgen


def project_dir(cli: Any) -> Path:
    """The folder of the forge.toml in use (the current folder when there is none)."""
    path = getattr(cli.args, "config", None) or os.environ.get("FORGE_CONFIG")
    return Path(path).resolve().parent if path else Path.cwd()


def load_app(cli: Any) -> appload.Loaded:
    appload.use_project_path(project_dir(cli))
    return appload.load(app_modules(cli.config(), cli.loader))


def _err(text: str) -> None:
    print(f"forge-node: error: {text}", file=sys.stderr)


# --- generate ts -----------------------------------------------------------------------------------
def ts_target(cli: Any) -> tuple[Path | None, bool]:
    cfg = cli.config()["codegen"]
    out = getattr(cli.args, "out", None) or cfg.ts_out
    svelte = getattr(cli.args, "frontend", None) == "svelte" or cfg.svelte
    return (Path(out) if out else None), svelte


def cmd_generate_ts(cli: Any) -> int:
    out, svelte = ts_target(cli)
    if out is None:
        _err("generate ts: no output folder: pass --out DIR or set [codegen] ts_out in forge.toml")
        return 2
    try:
        registry = load_app(cli).registry
        generated = tsgen.generate(registry, svelte=svelte)
    except (appload.AppImportError, tsgen.GenerateError) as exc:
        _err(f"generate ts: {exc}")
        return 1
    if cli.args.check:
        bad = tsgen.stale(out, generated)
        if bad:
            _err("generate ts --check: the TypeScript client is stale (run `forge-node generate ts`): "
                 + ", ".join(bad))
            return 1
        print(f"{out}: up to date ({len(generated.functions)} functions)")
        return 0
    written = tsgen.write(out, generated)
    print(f"{out}: {len(generated.functions)} functions; " + (f"wrote {', '.join(written)}" if written else "unchanged"))
    return 0


# --- generate migration ---------------------------------------------------------------------------
_MIGRATION_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,80}$")


def migration_home(registry: Any, table: str) -> tuple[str, Path, str, int]:
    """(app module, migrations folder, namespace, next version) for the model of ``table``: the first
    app module holding the model that ships ``MIGRATIONS`` read from a ``migrations`` package."""
    md = registry.models[table]
    for name in registry.modules:
        module = sys.modules.get(name)
        if module is None or not any(v is md.cls for v in vars(module).values()):
            continue
        migrations = getattr(module, "MIGRATIONS", None)
        package = name.rpartition(".")[0] or name
        try:
            spec = importlib.util.find_spec(f"{package}.migrations")
        except ModuleNotFoundError:  # the module is not in a package
            spec = None
        if migrations is None or spec is None or not spec.submodule_search_locations:
            raise schema.SchemaError(f"model {md.cls.__name__} (table {table}) has nowhere to put its migration: add "
                                     f"a {package}/migrations/ package and MIGRATIONS = from_package("
                                     f"\"{package}.migrations\", namespace=\"{package}\") to {name}")
        namespace = migrations[0].namespace if migrations else package
        version = max((m.version for m in migrations if m.namespace == namespace), default=0) + 1
        return name, Path(list(spec.submodule_search_locations)[0]), namespace, version
    raise schema.SchemaError(f"no app module holds the model of table {table}")


async def cmd_generate_migration(cli: Any) -> int:
    from forge_kernel import migrations as migmod
    from forge_kernel.node import app_migrations

    if not _MIGRATION_NAME.match(cli.args.name):
        _err(f"generate migration: name {cli.args.name!r}: use letters, digits, '_' and '-' (it becomes NNNN_name.sql)")
        return 2
    try:
        registry = load_app(cli).registry
    except appload.AppImportError as exc:
        _err(f"generate migration: {exc}")
        return 1
    if not registry.models:
        _err("generate migration: the app has no @model classes")
        return 1
    async with cli.connection() as conn:
        # the app's own migrations (plugins' tables are never compared)
        states = await migmod.status(conn, app_migrations(registry))
        pending = [f"{s.namespace}/{s.version:04d}_{s.name}" for s in states if s.state in ("pending", "drift")]
        if pending:
            _err("generate migration: apply the migrations written so far first (forge-node migrate, or let "
                 f"forge-node dev do it): {', '.join(pending)}; the new one is computed from the database")
            return 1
        try:
            changes = await schema.compare(conn, registry)
        except schema.SchemaError as exc:
            _err(f"generate migration: {exc}")
            return 1
    if not changes:
        print("the models match the database: no migration written")
        return 0
    by_home: dict[tuple, list] = {}
    for change in changes:
        try:
            home = migration_home(registry, change.table)
        except schema.SchemaError as exc:
            _err(f"generate migration: {exc}")
            return 1
        by_home.setdefault(home, []).append(change)
    for (module, folder, namespace, version), group in by_home.items():
        path = folder / f"{version:04d}_{cli.args.name}.sql"
        text = schema.render(group, allow_destructive=cli.args.allow_destructive,
                             title=f"{namespace} {version:04d}_{cli.args.name} (models of {module})")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        held = [c for c in group if c.destructive and not cli.args.allow_destructive]
        print(f"wrote {path}: {len(group) - len(held)} change(s)"
              + (f", {len(held)} destructive one(s) commented out (see the WARNING lines)" if held else ""))
    return 0


# --- new ----------------------------------------------------------------------------------------
def cmd_new(cli: Any) -> int:
    args = cli.args
    target = Path(args.dir or args.name)
    try:
        package, files = scaffold.render(args.name, frontend=args.frontend)
        scaffold.write(target, files, force=args.force)
    except scaffold.ScaffoldError as exc:
        _err(f"new: {exc}")
        return 2
    lines = [f"created {target}/ ({len(files)} files)"]
    if args.frontend == "svelte":
        # the page imports the generated client: write it now, from the new app itself
        appload.use_project_path(target)
        try:
            # with the functions installed plugins ship (as `generate ts` and the node serve them)
            shipped = [m for r in cli.loader.hook.forge_app_modules() for m in (r or [])]
            generated = tsgen.generate(appload.load([f"{package}.app", *shipped]).registry, svelte=True)
        except (appload.AppImportError, tsgen.GenerateError) as exc:
            _err(f"new: the project was written but its TypeScript client was not: {exc}")
            return 1
        tsgen.write(target / scaffold.SVELTE_TS_OUT, generated)
        lines.append(f"wrote the TypeScript client to {target / scaffold.SVELTE_TS_OUT}/")
    lines += ["", "next:", f"  cd {target}", "  forge-node dev    # serve the app on http://127.0.0.1:8080, reloading on save",
              "  pytest            # the app's tests, on an embedded PostgreSQL"]
    if args.frontend == "svelte":
        lines.append("  cd web && npm install && npm run dev   # the Svelte page on http://localhost:5173")
    print("\n".join(lines))
    return 0


# --- dev ----------------------------------------------------------------------------------------
def cmd_dev(cli: Any) -> int:
    from . import dev

    return dev.run(cli, project_dir(cli))


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("dev", help="run a node that reloads the app's code on save (WebSockets stay open)")
    p.add_argument("--roles", help="comma-separated roles, overrides [node] roles")
    p.add_argument("--port", type=int, help="HTTP port, overrides [gateway] port (0 picks a free one)")
    p.add_argument("--ts-out", dest="ts_out", help="write the TypeScript client here on every reload "
                                                   "(default: [codegen] ts_out)")
    p.set_defaults(func=cmd_dev)
    p = subparsers.add_parser("new", help="create a runnable FORGE project (templates ship with forge-codegen)")
    p.add_argument("name", help="project name (letters, digits, '-', '_'); the Python package is its lower-case form")
    p.add_argument("--dir", help="folder to create (default: NAME)")
    p.add_argument("--frontend", choices=["svelte"], help="add a Svelte 5 page using the generated client")
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    p.set_defaults(func=cmd_new)
    gen = subparsers.add_parser("generate", help="generate the TypeScript client or a migration from the app")
    kinds = gen.add_subparsers(dest="what", required=True)
    p = kinds.add_parser("ts", help="write the typed TypeScript client of the app's functions")
    p.add_argument("--out", help="output folder (default: [codegen] ts_out)")
    p.add_argument("--check", action="store_true", help="exit 1 when the files on disk differ (for CI)")
    p.add_argument("--frontend", choices=["svelte"], help="also write the Svelte 5 bindings")
    p.set_defaults(func=cmd_generate_ts)
    p = kinds.add_parser("migration", help="write the next SQL migration that makes the database match the models")
    p.add_argument("name", help="the migration's name (NNNN_name.sql)")
    p.add_argument("--allow-destructive", action="store_true",
                   help="write drops and narrowing type changes as statements instead of commented out")
    p.set_defaults(func=cmd_generate_migration)
