"""FORGE node mesh (gRPC): forwarding, live cluster status, drain, instant job cancel.

Python API for tools and the dashboard: :func:`live_status` (what every node does now),
:func:`follow_logs`, :func:`drain`, :func:`cancel_job` (all take the configuration and a
database connection), :class:`MeshConfig` (the ``[mesh]`` section).
"""

from .client import cancel_job, drain, follow_logs, live_status
from .config import MeshConfig
from .ledger import OutcomeUnknown

__all__ = ["MeshConfig", "OutcomeUnknown", "cancel_job", "drain", "follow_logs", "live_status"]
