"""Test support for FORGE and its plugins (ours and third parties').

Install it with ``pip install 'forge-kernel[testing]'`` (pytest, pytest-asyncio, hypothesis; a
production node needs none of them). The fixtures work in either pytest-asyncio mode: with
``asyncio_mode = "auto"`` async tests need no marker, in the default ``strict`` mode mark them
``@pytest.mark.asyncio``.

* :mod:`forge_kernel.testing.fixtures` - pytest fixtures, auto-registered through the
  ``pytest11`` entry point: ``forge_database_url`` (embedded PostgreSQL for the session,
  or ``FORGE_TEST_DATABASE_URL``), ``forge_db_url`` (a fresh database per test),
  ``forge_node`` (an in-process node), ``forge_processes`` (real ``forge-node`` processes,
  killed by pid at teardown), ``forge_plugin_manager``.
* :mod:`forge_kernel.testing.contracts` - hypothesis properties every plugin must keep.
* :mod:`forge_kernel.testing.servers` - PostgreSQL servers (a streaming replica, Debian's
  server with TLS) and PgBouncer of a test's own, run as an unprivileged account.
"""

from .procs import NodeProcess, eventually, free_port, wait_for

__all__ = ["NodeProcess", "eventually", "free_port", "wait_for"]
