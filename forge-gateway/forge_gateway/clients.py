"""Who is calling: the client address of a connection, for ``key="ip"`` rate limits.

``X-Forwarded-For`` is written by whoever sends the request, so it is believed only when
``[gateway] trust_forwarded_for`` is on and the connection comes from one of
``[gateway] trusted_proxies``. Each proxy appends the address it saw, so the list is read from
the right: the first address that is not a trusted proxy is the client. Everything left of it
was written by the client itself and is ignored.
"""

from __future__ import annotations

import ipaddress
from typing import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientAddress:
    def __init__(self, trust_forwarded_for: bool, trusted_proxies: Sequence[str]) -> None:
        self.networks: tuple[Network, ...] = (
            tuple(ipaddress.ip_network(n, strict=False) for n in trusted_proxies) if trust_forwarded_for else ())

    @property
    def reads_forwarded(self) -> bool:
        return bool(self.networks)

    def trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def of(self, peer: str | None, forwarded: Sequence[str]) -> str:
        """The client behind a connection from ``peer`` that carried the ``X-Forwarded-For``
        header values ``forwarded`` (in the order received; several headers form one list)."""
        if peer is None:
            return "unknown"
        if not self.networks or not forwarded or not self.trusted(peer):
            return peer
        hops = [hop.strip() for value in forwarded for hop in value.split(",")]
        hops = [hop for hop in hops if hop]
        for hop in reversed(hops):
            if not self.trusted(hop):
                return _normal(hop)
        # every hop is one of our proxies: the left-most is the closest thing to a client
        return _normal(hops[0]) if hops else peer


def _normal(hop: str) -> str:
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return hop[:100]  # not an address (a proxy wrote "unknown"): a bounded bucket key
