"""The ``[mesh]`` config section."""

from __future__ import annotations

import ipaddress
import re

import attrs

from forge_kernel.config import in_range, one_of
from forge_kernel.convert import InvalidValue

#: the protocol this code speaks, and the oldest it still talks to
PROTOCOL = 4
MIN_PROTOCOL = 1

_HOSTPORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):([0-9]{1,5})$")


def _advertise(inst: object, attr: attrs.Attribute, value: str) -> None:
    if value and (not _HOSTPORT.match(value) or not 0 < int(value.rsplit(":", 1)[1]) < 65536):
        raise InvalidValue(attr.name, value, "host:port that other nodes can dial (e.g. 'node7.internal:7070'), "
                                             "or empty to advertise the listen address")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name) only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@attrs.frozen
class MeshConfig:
    #: listen address of the mesh server; anything beyond loopback requires mutual TLS
    host: str = "127.0.0.1"
    #: listen port; 0 picks a free one (published in forge_mesh_nodes)
    port: int = attrs.field(default=0, validator=in_range(0, 65535))
    #: host:port other nodes dial when the listen address is not reachable as is (NAT, containers)
    advertise: str = attrs.field(default="", validator=_advertise)
    #: ``auto``: mutual TLS when listening beyond loopback, plaintext (logged) on loopback;
    #: ``required``: mutual TLS always
    tls: str = attrs.field(default="auto", validator=one_of("auto", "required"))
    #: folder of the cluster CA made by ``forge-node mesh init-ca`` (ca.pem, ca.key); a node with
    #: the CA key and no cert_file issues its own certificate at start-up
    tls_dir: str = ".forge/mesh-ca"
    #: PEM files; empty means from tls_dir
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    #: seconds between checks of the certificate files (changed files apply to new connections)
    tls_reload_interval: float = attrs.field(default=10.0, validator=in_range(0.1, 86400))
    #: seconds between reads of the peer table
    refresh_interval: float = attrs.field(default=1.0, validator=in_range(0.05, 60))
    #: seconds between probes of peers (a peer that failed a call is skipped until a probe succeeds)
    probe_interval: float = attrs.field(default=1.0, validator=in_range(0.05, 60))
    #: protocol this node speaks; set it to the previous version while a rolling upgrade is under way
    protocol_version: int = attrs.field(default=PROTOCOL, validator=in_range(MIN_PROTOCOL, PROTOCOL))
    #: largest message (arguments, results) in bytes
    max_message_bytes: int = attrs.field(default=64 << 20, validator=in_range(1024, 1 << 30))
    #: seconds stored call results are kept for retries (pruned by the scheduler leader)
    call_retention: float = attrs.field(default=3600.0, validator=in_range(60, 30 * 86400))

    def __attrs_post_init__(self) -> None:
        if not self.host:
            raise InvalidValue("host", self.host, "an address to listen on ('127.0.0.1', '0.0.0.0', '::')")

    @property
    def needs_tls(self) -> bool:
        return self.tls == "required" or not is_loopback(self.host)
