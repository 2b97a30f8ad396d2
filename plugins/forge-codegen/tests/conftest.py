"""Fixtures of the codegen tests: the JavaScript tools, and the test apps on sys.path."""

import os
import sys
from pathlib import Path

import pytest

APPS = Path(__file__).parent / "apps"
sys.path.insert(0, str(APPS))
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("FORGE_LOG__LEVEL", "WARNING")


@pytest.fixture(scope="session")
def js_tools():
    """tsc, the Svelte compiler, esbuild: npm ci from the committed lockfile (fails loudly without npm)."""
    import cg_js

    cg_js.ensure_installed()
    return cg_js

