"""TLS on the node's own listener (issue 19, item 13): HTTPS and WSS with a throwaway CA, HSTS,
and a certificate replaced on disk served without a restart."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from forge_kernel.testing import wait_for
from gw_support import running_gateway


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class ThrowawayCa:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name("forge test CA")).issuer_name(_name("forge test CA"))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, cn: str) -> tuple[bytes, bytes, int]:
        """(certificate PEM, key PEM, serial) for 127.0.0.1 and localhost."""
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        serial = x509.random_serial_number()
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(serial)
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem, serial


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o600)
    tmp.replace(path)  # atomic, as a certificate manager would do it


def _served_serial(port: int, ca_pem: bytes) -> int:
    import socket

    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


@pytest.fixture(scope="module")
def tls_node(forge_database_url: str, keys: Any, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("tls")
    ca = ThrowawayCa()
    cert, key, serial = ca.issue("forge node one")
    cert_path, key_path = tmp / "node.crt", tmp / "node.key"
    _write(cert_path, cert)
    _write(key_path, key)
    with running_gateway(forge_database_url, keys, tmp, node_id="gw-tls", plugins=("gw_routes_plugin",),
                         tls_cert=str(cert_path), tls_key=str(key_path), hsts_max_age=31536000) as gw:
        yield {"port": int(gw.url.rsplit(":", 1)[1]), "ca": ca, "serial": serial, "cert": cert_path, "key": key_path,
               "proc": gw.proc}


def test_https_with_hsts(tls_node):
    ctx = ssl.create_default_context(cadata=tls_node["ca"].pem().decode())
    with httpx.Client(base_url=f"https://127.0.0.1:{tls_node['port']}", verify=ctx, timeout=30) as c:
        r = c.post("/rpc/add", json={"a": 40, "b": 2})
        assert r.json() == {"data": 42}
        assert r.headers["strict-transport-security"] == "max-age=31536000"
        assert c.get("/health").headers["strict-transport-security"] == "max-age=31536000"
    # plain HTTP on the TLS port gets nowhere
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_node['port']}/health", timeout=10)
    # a client that does not trust our CA refuses the node
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"https://127.0.0.1:{tls_node['port']}/health", timeout=10)


def test_no_hsts_without_tls(gateway):
    with gateway.client() as c:
        assert "strict-transport-security" not in c.get("/health").headers


async def test_wss(tls_node):
    ctx = ssl.create_default_context(cadata=tls_node["ca"].pem().decode())
    async with websockets.connect(f"wss://127.0.0.1:{tls_node['port']}/echo", ssl=ctx) as ws:
        await ws.send("over tls")
        assert await asyncio.wait_for(ws.recv(), 10) == "over tls"


def test_a_replaced_certificate_is_served_without_a_restart(tls_node):
    ca, port = tls_node["ca"], tls_node["port"]
    assert _served_serial(port, ca.pem()) == tls_node["serial"]
    # half-written: a new certificate with the old key does not load; the old pair stays in service
    cert2, key2, serial2 = ca.issue("forge node two")
    _write(tls_node["cert"], cert2)
    time.sleep(1.2)
    assert _served_serial(port, ca.pem()) == tls_node["serial"]
    _write(tls_node["key"], key2)
    assert wait_for(lambda: _served_serial(port, ca.pem()) == serial2, timeout=20, what="the new certificate")
    pid = tls_node["proc"].pid
    assert tls_node["proc"].alive() and tls_node["proc"].pid == pid
    log = tls_node["proc"].log()
    assert "TLS files changed but do not load" in log and "TLS certificate reloaded" in log
