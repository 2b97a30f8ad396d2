"""``forge-node new | dev | generate ts | generate migration``: argument parsing and output."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from forge_kernel.node import app_modules

from . import appload, scaffold, tsgen


def project_dir(cli: Any) -> Path:
    """The folder of the forge.toml in use (the current folder when there is none)."""
    path = getattr(cli.args, "config", None) or os.environ.get("FORGE_CONFIG")
    return Path(path).resolve().parent if path else Path.cwd()


def load_app(cli: Any, *, fresh: bool = False) -> appload.Loaded:
    appload.use_project_path(project_dir(cli))
    return appload.load(app_modules(cli.config(), cli.loader), fresh=fresh)


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
            generated = tsgen.generate(appload.load([f"{package}.app"]).registry, svelte=True)
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


def add_commands(subparsers: Any) -> None:
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
