"""forge-codegen's hook implementations: a config section and the CLI commands (the work is in
:mod:`forge_codegen.commands` and the modules it calls)."""

from __future__ import annotations

from forge_kernel import hookimpl

from . import commands
from .config import CodegenConfig


@hookimpl
def forge_config_sections():
    return {"codegen": CodegenConfig}


@hookimpl
def forge_cli_commands(subparsers):
    commands.add_commands(subparsers)
