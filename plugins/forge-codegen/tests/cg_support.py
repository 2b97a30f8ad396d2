"""Helpers shared by the codegen tests (a uniquely named module: other packages' test folders have a
conftest.py too, so ``from conftest import ...`` would be ambiguous)."""

from __future__ import annotations

import os
from pathlib import Path

APPS = Path(__file__).parent / "apps"


def child_env() -> dict[str, str]:
    """Environment for forge-node children: the test apps importable."""
    return {"PYTHONPATH": os.pathsep.join([str(APPS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
