"""The kernel's own hook implementations (its config sections and tables)."""

from __future__ import annotations

from .admin import kernel_actions
from .config import KERNEL_SECTIONS
from .hookspecs import hookimpl
from .migrations import from_package


@hookimpl
def forge_config_sections():
    return KERNEL_SECTIONS


@hookimpl
def forge_migrations():
    return from_package("forge_kernel.sql", namespace="kernel")


@hookimpl
def forge_admin_actions(node):
    return kernel_actions()
