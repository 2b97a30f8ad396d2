"""Who can take a forwarded call: fresh rows of forge_nodes joined with forge_mesh_nodes.

The database decides membership (a row is used only while the kernel's heartbeat keeps it
fresh and its status is ``running``); direct evidence only takes a peer out of rotation early:
a call that failed on the transport or ran into its deadline marks the peer *suspect*, and only
a successful probe brings it back.
"""

from __future__ import annotations

import random
import time
from typing import Any, Iterable

import attrs
from loguru import logger

#: probes in a row without an answer in time before a peer is suspect (Peer.probe_missed)
MISSED_PROBES_TO_SUSPECT = 2

PEERS_SQL = """
SELECT m.node_id, m.address, m.epoch, m.protocol, m.min_protocol, m.tls, m.draining, n.roles, n.capabilities
FROM forge_mesh_nodes m JOIN forge_nodes n ON n.id = m.node_id
WHERE n.status = 'running' AND NOT m.draining AND n.last_heartbeat > now() - make_interval(secs => $1)
"""


@attrs.define(eq=False)
class Peer:
    node_id: str
    address: str
    epoch: str
    protocol: int
    min_protocol: int
    tls: bool
    roles: frozenset[str]
    capabilities: frozenset[str]
    #: calls this node has in flight to the peer (balancing)
    in_flight: int = 0
    #: set when a call failed on the transport or timed out; cleared by a successful probe
    suspect_since: float | None = None
    last_error: str = ""
    #: probes in a row that got no answer in time
    missed_probes: int = 0
    #: the gRPC channel, created on first use inside the running loop
    channel: Any = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.node_id, self.epoch)

    def can_run(self, capability: str | None, own: int, needs: int) -> bool:
        """Runs functions (with ``capability``), accepts our protocol ``own`` and speaks at least ``needs``."""
        if "function" not in self.roles:
            return False
        if capability is not None and capability not in self.capabilities:
            return False
        return self.min_protocol <= own and self.protocol >= needs

    def suspect(self, why: str) -> None:
        if self.suspect_since is None:
            self.suspect_since = time.monotonic()
            logger.info(f"mesh: node {self.node_id} is suspect, calls avoid it until a probe answers: {why}")
        self.last_error = why

    def probe_missed(self, why: str) -> None:
        """A probe got no answer in time. One is weak evidence on a busy machine (the peer's loop
        may just be behind, and with one function node a false suspicion turns every call into
        UNAVAILABLE until the next probe); two in a row make the peer suspect. A refused
        connection, a wrong answer or a forwarded call that failed still count at once."""
        self.missed_probes += 1
        if self.missed_probes >= MISSED_PROBES_TO_SUSPECT:
            self.suspect(why)
        else:
            self.last_error = why

    def probe_answered(self) -> bool:
        """A probe got the right answer: the peer is healthy again. True when it was suspect."""
        was = self.suspect_since is not None
        self.suspect_since = None
        self.last_error = ""
        self.missed_probes = 0
        return was


class Directory:
    """The peers of one node, refreshed from the database; channels survive refreshes."""

    def __init__(self, self_id: str) -> None:
        self.self_id = self_id
        self.peers: dict[str, Peer] = {}
        self.loaded = False
        self.refreshed_at = 0.0

    def update(self, rows: Iterable[Any]) -> list[Peer]:
        """Replace the peer set with ``rows``; returns the peers that left or restarted (their
        channels are for the caller to close)."""
        gone: list[Peer] = []
        fresh: dict[str, Peer] = {}
        for r in rows:
            if r["node_id"] == self.self_id:
                continue
            old = self.peers.get(r["node_id"])
            if old is not None and old.epoch == r["epoch"] and old.address == r["address"] and old.tls == r["tls"]:
                old.protocol, old.min_protocol = r["protocol"], r["min_protocol"]
                old.roles, old.capabilities = frozenset(r["roles"]), frozenset(r["capabilities"])
                fresh[old.node_id] = old
                continue
            if old is not None:
                gone.append(old)
            fresh[r["node_id"]] = Peer(r["node_id"], r["address"], r["epoch"], r["protocol"], r["min_protocol"], r["tls"],
                                       frozenset(r["roles"]), frozenset(r["capabilities"]))
        gone.extend(p for nid, p in self.peers.items() if nid not in fresh)
        self.peers = fresh
        self.loaded = True
        self.refreshed_at = time.monotonic()
        return gone

    def drop(self, node_id: str) -> Peer | None:
        return self.peers.pop(node_id, None)

    def candidates(self, capability: str | None, own: int, needs: int) -> list[Peer]:
        return [p for p in self.peers.values() if p.can_run(capability, own, needs)]

    def choose(self, capability: str | None, own: int, needs: int, exclude: set[tuple[str, str]]) -> Peer | None:
        """The healthy candidate with the fewest calls in flight (ties at random)."""
        best: list[Peer] = []
        low = None
        for p in self.peers.values():
            if p.suspect_since is not None or p.key in exclude or not p.can_run(capability, own, needs):
                continue
            if low is None or p.in_flight < low:
                best, low = [p], p.in_flight
            elif p.in_flight == low:
                best.append(p)
        return random.choice(best) if best else None
