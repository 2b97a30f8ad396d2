"""The ``[gateway]`` config section: where to listen, limits, CORS and authentication."""

from __future__ import annotations

import ipaddress
import re

import attrs

from forge_kernel.config import in_range, one_of
from forge_kernel.convert import InvalidValue

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEADER = re.compile(r"^[A-Za-z0-9-]+$")

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
#: RFC 7518 3.2: an HMAC key must be at least as long as the hash output
HMAC_MIN_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
PUBLIC_KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


def _hex_sha256(inst: object, attr: attrs.Attribute, value: str) -> None:
    if not _HEX64.match(value):
        raise InvalidValue(attr.name, value, "the lower-case hex SHA-256 of the key (64 characters)")


def _header_name(inst: object, attr: attrs.Attribute, value: str) -> None:
    if not _HEADER.match(value):
        raise InvalidValue(attr.name, value, "an HTTP header name (letters, digits, '-')")


def _origins(inst: object, attr: attrs.Attribute, value: list[str]) -> None:
    for origin in value:
        if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
            raise InvalidValue(attr.name, origin, "'*' or an origin like 'https://app.example.com' (scheme://host[:port])")


def _networks(inst: object, attr: attrs.Attribute, value: list[str]) -> None:
    for net in value:
        try:
            ipaddress.ip_network(net, strict=False)
        except (ValueError, TypeError):
            raise InvalidValue(attr.name, net, "IP addresses or CIDR ranges like '10.0.0.0/8' or '::1'") from None


@attrs.frozen
class ApiKey:
    """A service credential: callers send the key, the config stores only its SHA-256."""

    #: becomes ``ctx.auth.user_id`` (kind ``service``)
    name: str
    #: ``sha256(key).hexdigest()``; the key itself never appears in config
    sha256: str = attrs.field(validator=_hex_sha256)
    roles: list[str] = attrs.field(factory=list)


@attrs.frozen
class GatewayConfig:
    host: str = "127.0.0.1"
    #: 0 picks a free port (the bound one is published in ``forge_nodes.ports``)
    port: int = attrs.field(default=8080, validator=in_range(0, 65535))
    #: request bodies above this many bytes get 413 PAYLOAD_TOO_LARGE
    max_body_bytes: int = attrs.field(default=1_048_576, validator=in_range(2, 1 << 30))
    #: most calls in one JSON-RPC batch
    max_batch: int = attrs.field(default=100, validator=in_range(1, 10_000))
    #: allowed CORS origins; empty (the default) sends no CORS headers at all
    cors_origins: list[str] = attrs.field(factory=list, validator=_origins)
    cors_allow_credentials: bool = False
    #: log every request (costs throughput)
    access_log: bool = False
    #: take the client IP for ``key="ip"`` rate limits from X-Forwarded-For, for connections from
    #: ``trusted_proxies`` only: the right-most address that is not a trusted proxy is the client
    trust_forwarded_for: bool = False
    #: addresses / CIDR ranges of the reverse proxies in front of the node (needed by ``trust_forwarded_for``)
    trusted_proxies: list[str] = attrs.field(factory=list, validator=_networks)
    #: a node leases up to this fraction of a rate limit per database round trip; 0 = one token
    #: per round trip (exact, one query per limited call). See README "Rate limits".
    rate_limit_lease: float = attrs.field(default=0.05, validator=in_range(0, 0.5))
    #: seconds a graceful shutdown waits for in-flight requests
    shutdown_timeout: float = attrs.field(default=10.0, validator=in_range(0, 3600))

    # --- the connection edge (enforced by the server's protocol, before the app sees a request) ---
    #: longest request line or header line; longer ones get 414 / 431
    max_header_line_bytes: int = attrs.field(default=16_384, validator=in_range(256, 1 << 20))
    #: most bytes of request line + headers of one request; more get 431
    max_header_bytes: int = attrs.field(default=65_536, validator=in_range(1024, 16 << 20))
    #: seconds a connection may take to send a request's headers (from connecting, or from the
    #: request's first byte on a kept-alive connection); then it gets 408 and is closed
    header_timeout: float = attrs.field(default=10.0, validator=in_range(0.05, 3600))
    #: open connections (HTTP and WebSocket) per node; further ones get 503 and are closed
    max_connections: int = attrs.field(default=10_000, validator=in_range(1, 10_000_000))
    #: largest WebSocket message, checked by the server on the frame header before the payload is read
    #: (close 1009); a route's own limit (``[realtime] max_message_bytes``) applies below it
    ws_max_message_bytes: int = attrs.field(default=65_536, validator=in_range(64, 64 << 20))

    # --- TLS on the node's own listener -------------------------------------------------
    #: PEM certificate chain; with ``tls_key`` the node serves HTTPS and WSS only (reloaded on change)
    tls_cert: str = ""
    #: PEM private key of ``tls_cert`` (unencrypted)
    tls_key: str = ""
    #: seconds of ``Strict-Transport-Security: max-age`` sent over TLS; 0 sends no header
    hsts_max_age: int = attrs.field(default=0, validator=in_range(0, 10 * 365 * 86400))

    # --- authentication ------------------------------------------------------------
    #: shared secret for HS256/384/512 tokens; empty disables HMAC tokens
    jwt_secret: str = ""
    #: PEM public key (RSA, EC or Ed25519) for RS*/PS*/ES*/EdDSA tokens
    jwt_public_key: str = ""
    #: file holding the PEM public key (alternative to ``jwt_public_key``)
    jwt_public_key_file: str = ""
    #: URL of a JWKS document; keys are chosen by the token's ``kid``
    jwks_url: str = ""
    #: seconds a fetched JWKS is trusted before it is fetched again
    jwks_cache_seconds: float = attrs.field(default=300.0, validator=in_range(1, 86400))
    #: accepted algorithms (``none`` is never accepted)
    jwt_algorithms: list[str] = attrs.field(factory=lambda: ["HS256", "RS256"],
                                            validator=one_of(*HMAC_ALGORITHMS, *PUBLIC_KEY_ALGORITHMS))
    #: expected ``aud``; empty means tokens must not carry an audience
    jwt_audience: str = ""
    #: expected ``iss``; empty means not checked
    jwt_issuer: str = ""
    #: clock skew tolerated for ``exp``/``nbf``, seconds
    jwt_leeway: float = attrs.field(default=0.0, validator=in_range(0, 3600))
    #: tokens without ``exp`` are rejected
    jwt_require_exp: bool = True
    user_id_claim: str = "sub"
    #: claim holding the caller's roles (a list, or a space-separated string)
    roles_claim: str = "roles"
    api_keys: list[ApiKey] = attrs.field(factory=list)
    #: header carrying an API key (``Authorization: Bearer <key>`` works as well)
    api_key_header: str = attrs.field(default="X-API-Key", validator=_header_name)

    def __attrs_post_init__(self) -> None:
        if self.jwt_public_key and self.jwt_public_key_file:
            raise InvalidValue("jwt_public_key_file", self.jwt_public_key_file,
                               "either jwt_public_key or jwt_public_key_file, not both")
        names = [k.name for k in self.api_keys]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise InvalidValue("api_keys", dupes, "unique API key names")
        if self.max_header_line_bytes > self.max_header_bytes:
            raise InvalidValue("max_header_line_bytes", self.max_header_line_bytes,
                               f"at most max_header_bytes ({self.max_header_bytes})")
        if self.trust_forwarded_for and not self.trusted_proxies:
            raise InvalidValue("trusted_proxies", self.trusted_proxies,
                               "the addresses of your reverse proxies when trust_forwarded_for = true "
                               "(X-Forwarded-For is believed only from them)")
        if bool(self.tls_cert) != bool(self.tls_key):
            missing = "tls_key" if self.tls_cert else "tls_cert"
            raise InvalidValue(missing, "", "a PEM file path: tls_cert and tls_key go together")
        self._check_secret_length()

    def _check_secret_length(self) -> None:
        if not self.jwt_secret:
            return
        hmac_algs = [a for a in self.jwt_algorithms if a in HMAC_MIN_KEY_BYTES]
        if not hmac_algs:
            return
        need_alg = max(hmac_algs, key=HMAC_MIN_KEY_BYTES.__getitem__)
        need, size = HMAC_MIN_KEY_BYTES[need_alg], len(self.jwt_secret.encode())
        if size < need:
            # a plain ValueError, not InvalidValue: the config loader shows the value of a key named
            # in an InvalidValue, and this one is a secret
            raise ValueError(f"jwt_secret: the secret has {size} bytes; {need_alg} needs at least {need} bytes "
                             "(RFC 7518 3.2). Generate one with: "
                             "python -c 'import secrets; print(secrets.token_urlsafe(64))'")
