"""Importing (and re-importing) an app's modules, with errors that name the module, file and line.

A reload imports fresh copies of every module under the app's source folders. When that fails
(a syntax error, an import error, an exception at import time) the previous modules are put back
into ``sys.modules`` untouched, so the running registry keeps working on the old code.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Iterable

import attrs

from forge_kernel.app import Registry


class AppImportError(Exception):
    """An app module could not be imported. ``file`` and ``line`` point at the cause when known."""

    def __init__(self, module: str, error: BaseException, file: str | None, line: int | None) -> None:
        where = f" ({file}:{line})" if file and line else f" ({file})" if file else ""
        super().__init__(f"cannot import app module {module!r}{where}: {type(error).__name__}: {error}")
        self.module, self.error, self.file, self.line = module, error, file, line


def use_project_path(project: Path) -> None:
    """Make the project folder importable, as ``python -m`` does for the current folder."""
    path = str(project.resolve())
    if path not in sys.path:
        sys.path.insert(0, path)


def _where(exc: BaseException, roots: Iterable[Path]) -> tuple[str | None, int | None]:
    if isinstance(exc, SyntaxError) and exc.filename:
        return exc.filename, exc.lineno
    roots = [str(r) for r in roots]
    frames = traceback.extract_tb(exc.__traceback__)
    # the innermost frame in the app's own files: where the user has to look
    for frame in reversed(frames):
        if any(frame.filename.startswith(r) for r in roots):
            return frame.filename, frame.lineno
    return (frames[-1].filename, frames[-1].lineno) if frames else (None, None)


def source_roots(module_names: Iterable[str]) -> list[Path]:
    """The folders holding the app's top-level packages (or single-file modules), found without importing."""
    roots: list[Path] = []
    for name in module_names:
        top = name.split(".")[0]
        spec = importlib.util.find_spec(top)
        if spec is None:
            continue
        if spec.submodule_search_locations:
            paths = [Path(p) for p in spec.submodule_search_locations]
        elif spec.origin:
            paths = [Path(spec.origin)]
        else:
            continue
        for p in paths:
            # as found (module files carry the sys.path spelling) and resolved (symlinked checkouts)
            for candidate in (p.absolute(), p.resolve()):
                if candidate not in roots:
                    roots.append(candidate)
    return roots


def _prefixes(roots: list[Path]) -> tuple[str, ...]:
    return tuple(str(r) for r in roots)


def _under(module: ModuleType, prefixes: tuple[str, ...]) -> bool:
    # plain string tests: resolving the path of every loaded module costs ~100 ms per reload
    file = getattr(module, "__file__", None)
    return bool(file) and any(file == p or file.startswith(p + os.sep) for p in prefixes)


@attrs.define
class Loaded:
    registry: Registry
    roots: list[Path]


def load(module_names: list[str], *, fresh: bool = False) -> Loaded:
    """Import the app's modules and build their registry. With ``fresh``, every module under the
    app's source roots is imported anew; on failure the previous modules are restored."""
    roots = source_roots(module_names)
    prefixes = _prefixes(roots)
    saved: dict[str, ModuleType] = {}
    if fresh:
        saved = {n: m for n, m in list(sys.modules.items()) if m is not None and _under(m, prefixes)}
        for n in saved:
            del sys.modules[n]
        importlib.invalidate_caches()
    reg = Registry()
    current = ""
    try:
        for current in module_names:
            if current in reg.modules:
                continue
            reg.add_module(importlib.import_module(current))
    except BaseException as exc:
        if fresh:
            for n in [n for n, m in sys.modules.items() if m is not None and _under(m, prefixes)]:
                del sys.modules[n]
            sys.modules.update(saved)
        if isinstance(exc, KeyboardInterrupt):
            raise
        file, line = _where(exc, roots)
        raise AppImportError(current, exc, file, line) from None
    return Loaded(reg, roots)
