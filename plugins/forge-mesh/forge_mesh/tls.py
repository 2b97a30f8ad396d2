"""Mutual TLS between nodes: the cluster CA, node certificates, and contexts that follow file changes.

Every node certificate names ``forge-mesh`` (a DNS SAN): a peer proves it belongs to the cluster
by presenting a certificate the cluster CA signed, and a node checks the same of every peer.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from pathlib import Path
from typing import Any

import attrs
from loguru import logger

from forge_kernel.errors import StartupError

from .config import MeshConfig

#: the name every node certificate carries and every client checks
CLUSTER_NAME = "forge-mesh"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def init_ca(folder: Path, *, days: int = 3650, force: bool = False) -> tuple[Path, Path]:
    """Create ``ca.pem`` and ``ca.key`` (mode 0600) in ``folder``; refuses to overwrite unless ``force``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = folder / "ca.pem", folder / "ca.key"
    if not force and (cert_path.exists() or key_path.exists()):
        raise StartupError(f"{cert_path} already exists; pass --force to replace the cluster CA "
                           f"(every node then needs a certificate from the new one)")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FORGE mesh cluster CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def issue_cert(ca_cert_pem: bytes, ca_key_pem: bytes, node_name: str, *, days: int = 365) -> tuple[bytes, bytes]:
    """A node certificate and key (PEM) signed by the cluster CA, for client and server use."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name[:64] or CLUSTER_NAME)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(CLUSTER_NAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@attrs.frozen
class Material:
    """The PEM bytes a node uses: the CA it trusts, its own certificate and key."""

    ca: bytes
    cert: bytes
    key: bytes
    #: when the files were read (their mtimes), to notice changes
    stamp: tuple[float, ...] = ()


def _files(cfg: MeshConfig) -> tuple[Path, Path | None, Path | None, Path | None]:
    folder = Path(cfg.tls_dir)
    ca = Path(cfg.ca_file) if cfg.ca_file else folder / "ca.pem"
    if cfg.cert_file or cfg.key_file:
        if not (cfg.cert_file and cfg.key_file):
            raise StartupError("[mesh] cert_file and key_file go together: set both, or neither to issue one "
                               "from the CA key in [mesh] tls_dir")
        return ca, Path(cfg.cert_file), Path(cfg.key_file), None
    return ca, None, None, folder / "ca.key"


def _mtime(p: Path | None) -> float:
    try:
        return p.stat().st_mtime if p is not None else 0.0
    except OSError:
        return -1.0


def load_material(cfg: MeshConfig, node_id: str) -> Material:
    """Read the CA and this node's certificate; without cert_file, issue one (in memory) from the
    CA key in ``tls_dir``. Errors name the config key to fix."""
    ca_path, cert_path, key_path, ca_key_path = _files(cfg)
    hint = "create a cluster CA with 'forge-node mesh init-ca' or set [mesh] ca_file, cert_file and key_file"
    try:
        ca = ca_path.read_bytes()
    except OSError as exc:
        raise StartupError(f"[mesh] needs mutual TLS (it listens on {cfg.host}, beyond loopback, or tls = "
                           f"\"required\") but cannot read the CA certificate {ca_path}: {exc.strerror or exc}; {hint}") from None
    if cert_path is not None:
        try:
            cert, key = cert_path.read_bytes(), key_path.read_bytes()
        except OSError as exc:
            raise StartupError(f"[mesh] cert_file/key_file: cannot read {exc.filename}: {exc.strerror}") from None
        stamp = (_mtime(ca_path), _mtime(cert_path), _mtime(key_path))
    else:
        try:
            ca_key = ca_key_path.read_bytes()
        except OSError as exc:
            raise StartupError(f"[mesh] no cert_file is set and the CA key {ca_key_path} cannot be read "
                               f"({exc.strerror or exc}): give this node a certificate ('forge-node mesh issue-cert') "
                               f"in [mesh] cert_file and key_file") from None
        cert, key = issue_cert(ca, ca_key, node_id)
        stamp = (_mtime(ca_path), _mtime(ca_key_path))
    return Material(ca, cert, key, stamp)


def material_stamp(cfg: MeshConfig) -> tuple[float, ...]:
    ca_path, cert_path, key_path, ca_key_path = _files(cfg)
    if cert_path is not None:
        return (_mtime(ca_path), _mtime(cert_path), _mtime(key_path))
    return (_mtime(ca_path), _mtime(ca_key_path))


def server_context(m: Material) -> ssl.SSLContext:
    """The TLS context of the mesh port: a client certificate from the cluster CA is required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=m.ca.decode())
    _load_chain(ctx, m)
    ctx.set_alpn_protocols(["h2"])  # gRPC clients insist on HTTP/2 by ALPN
    return ctx


def _load_chain(ctx: ssl.SSLContext, m: Material) -> None:
    # the ssl module loads chains from files only; a private temporary folder holds them for the call
    import tempfile

    with tempfile.TemporaryDirectory(prefix="forge-mesh-") as d:
        cert, key = Path(d) / "c.pem", Path(d) / "k.pem"
        _write_private(cert, m.cert)
        _write_private(key, m.key)
        ctx.load_cert_chain(cert, key)


def channel_credentials(m: Material) -> Any:
    import grpc

    return grpc.ssl_channel_credentials(root_certificates=m.ca, private_key=m.key, certificate_chain=m.cert)


def classify_handshake_error(exc: BaseException) -> str:
    """``wrong_ca`` for a peer certificate the cluster CA did not sign, ``no_cert`` for a client
    without one, ``tls_error`` for anything else."""
    text = f"{getattr(exc, 'reason', '')} {exc}".upper()
    if "CERTIFICATE_VERIFY_FAILED" in text or "UNKNOWN_CA" in text or "BAD_CERTIFICATE" in text:
        return "wrong_ca"
    if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text or "CERTIFICATE_REQUIRED" in text:
        return "no_cert"
    return "tls_error"


def log_plaintext(host: str) -> None:
    logger.info(f"mesh: plaintext on loopback ({host}): only processes on this machine can reach it; "
                f"listening beyond loopback turns on mutual TLS")
