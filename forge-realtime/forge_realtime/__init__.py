"""forge-realtime: change capture, precise invalidation and live queries over WebSocket ``/ws``.

The Python client is :class:`forge_realtime.client.ForgeClient`.
"""

from .client import ForgeClient, SubscriptionError

__all__ = ["ForgeClient", "SubscriptionError"]
