"""The ``[gateway]`` config section: where to listen, limits, CORS and authentication."""

from __future__ import annotations

import re

import attrs

from forge_kernel.config import in_range, one_of
from forge_kernel.convert import InvalidValue

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEADER = re.compile(r"^[A-Za-z0-9-]+$")

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
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
    #: take the client IP for ``key="ip"`` rate limits from X-Forwarded-For (only behind a trusted proxy)
    trust_forwarded_for: bool = False
    #: a node leases up to this fraction of a rate limit per database round trip; 0 = one token
    #: per round trip (exact, one query per limited call). See README "Rate limits".
    rate_limit_lease: float = attrs.field(default=0.05, validator=in_range(0, 0.5))
    #: seconds a graceful shutdown waits for in-flight requests
    shutdown_timeout: float = attrs.field(default=10.0, validator=in_range(0, 3600))

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
