"""``forge-node new NAME``: a runnable project from the templates shipped in this package (no network).

Templates are files named ``*.tmpl`` under ``templates/project`` (and ``templates/svelte`` for
``--frontend svelte``); ``__NAME__`` and ``__PACKAGE__`` in paths and contents become the project's
name and its Python package. Everything is rendered in memory first, then written: a new folder is
filled aside and renamed into place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import keyword
import os
import re
import shutil
import tempfile
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
SVELTE_TS_OUT = "web/src/lib/forge"


class ScaffoldError(Exception):
    pass


def package_name(name: str) -> str:
    if not _NAME.match(name):
        raise ScaffoldError(f"project name {name!r}: use letters, digits, '-' and '_', starting with a letter")
    package = name.replace("-", "_").lower()
    if keyword.iskeyword(package):
        raise ScaffoldError(f"project name {name!r}: {package!r} is a Python keyword; pick another name")
    if _installed(package):
        raise ScaffoldError(f"project name {name!r}: a module named {package!r} is already importable here "
                            "(the app would shadow it or be shadowed); pick another name")
    return package


def _installed(package: str) -> bool:
    """Importable from somewhere other than the current folder (``python -m`` puts that on sys.path)."""
    import sys

    here = {"", os.getcwd()}
    saved = sys.path[:]
    try:
        sys.path[:] = [p for p in sys.path if p not in here]
        return importlib.util.find_spec(package) is not None
    finally:
        sys.path[:] = saved


def _walk(root) -> list[tuple[str, str]]:
    out = []
    for entry in root.iterdir():
        if entry.is_dir():
            out += [(f"{entry.name}/{rel}", text) for rel, text in _walk(entry)]
        elif entry.name.endswith(".tmpl"):
            out.append((entry.name[: -len(".tmpl")], entry.read_text()))
    return out


def render(name: str, *, frontend: str | None = None) -> tuple[str, dict[str, str]]:
    """The project's Python package, and relative path -> file text of every file."""
    package = package_name(name)
    templates = importlib.resources.files("forge_codegen.templates")
    sources = _walk(templates / "project") + (_walk(templates / "svelte") if frontend == "svelte" else [])
    values = {
        "__NAME__": name,
        "__PACKAGE__": package,
        "__TS_OUT__": (f'ts_out = "{SVELTE_TS_OUT}"\nsvelte = true' if frontend == "svelte"
                       else '# ts_out = "client"   # uncomment to keep a TypeScript client next to the app'),
        # the Vite dev server's page calls the node from another origin
        "__CORS__": ('cors_origins = ["http://localhost:5173", "http://127.0.0.1:5173"]\n' if frontend == "svelte" else ""),
        "__FRONTEND_README__": ("\nThe Svelte page (`web/`) uses the generated client in `web/src/lib/forge/`:\n\n"
                                "```sh\ncd web && npm install && npm run dev   # http://localhost:5173\n```\n"
                                if frontend == "svelte" else ""),
    }
    files = {}
    for rel, text in sorted(sources):
        for key, value in values.items():
            rel, text = rel.replace(key, value), text.replace(key, value)
        files[".gitignore" if rel == "gitignore" else rel] = text
    return package, files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def occupied(target: Path) -> list[str]:
    return sorted(p.name for p in target.iterdir()) if target.is_dir() else []


def write(target: Path, files: dict[str, str], *, force: bool = False) -> None:
    """Write ``files`` under ``target``: a missing or empty folder is filled atomically; a non-empty one
    only with ``force`` (files of the same name are replaced, others are left alone)."""
    if target.exists() and not target.is_dir():
        raise ScaffoldError(f"{target} exists and is not a folder")
    present = occupied(target)
    if present and not force:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise ScaffoldError(f"{target} is not empty ({len(present)} entries: {shown}); "
                            "pass --force to write the project into it anyway")
    if present:
        for rel, text in files.items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.forge-new")
            tmp.write_text(text)
            os.replace(tmp, path)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the project gets the usual mode
        for rel, text in files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        if target.exists():
            target.rmdir()  # empty: checked above
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
