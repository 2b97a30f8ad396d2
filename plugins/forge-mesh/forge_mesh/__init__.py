"""FORGE node mesh (gRPC): forwarding, live cluster status, drain, instant job cancel.

Python API for tools and the dashboard: :func:`live_status` (what every node does now),
:func:`follow_logs`, :func:`drain`, :func:`cancel_job` (all take the configuration and a
database connection), :class:`MeshConfig` (the ``[mesh]`` section).
"""

from . import engine

engine.prefer_polling_path()  # before any module of ours imports grpc (engine.py says why)

from .client import cancel_job, drain, follow_logs, live_status  # noqa: E402
from .config import MeshConfig  # noqa: E402
from .ledger import OutcomeUnknown  # noqa: E402

__all__ = ["MeshConfig", "OutcomeUnknown", "cancel_job", "drain", "follow_logs", "live_status"]
