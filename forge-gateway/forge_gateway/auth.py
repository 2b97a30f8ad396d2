"""Turning credentials into a ``forge_kernel.Auth``: bearer JWTs (HMAC, public key, JWKS) and API keys.

A bad credential is always an error (``Unauthenticated``); only a request without any
credential is anonymous.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import time
import urllib.request
from pathlib import Path
from typing import Any, Mapping

import jwt
from jwt.algorithms import has_crypto

from forge_kernel import ANONYMOUS, Auth
from forge_kernel.errors import StartupError, Unauthenticated

from .config import HMAC_ALGORITHMS, PUBLIC_KEY_ALGORITHMS, GatewayConfig


class JwksCache:
    """Keys of a JWKS document by ``kid``; refetched when stale or when an unknown ``kid`` shows up
    (at most once per ``min_refetch`` seconds, so garbage kids cannot hammer the identity provider)."""

    def __init__(self, url: str, ttl: float, *, min_refetch: float = 10.0) -> None:
        self.url = url
        self.ttl = ttl
        self.min_refetch = min_refetch
        self._keys: dict[str, Any] = {}
        self._fetched_at = -1e18
        self._lock = asyncio.Lock()

    def _fetch(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url, timeout=5) as resp:  # noqa: S310 - URL comes from config
            data = json.loads(resp.read())
        keyset = jwt.PyJWKSet.from_dict(data)
        return {k.key_id: k for k in keyset.keys if k.key_id}

    async def key(self, kid: str) -> Any:
        now = time.monotonic()
        stale = now - self._fetched_at > self.ttl
        if stale or (kid not in self._keys and now - self._fetched_at > self.min_refetch):
            async with self._lock:
                if time.monotonic() - self._fetched_at > min(self.ttl, self.min_refetch) or stale:
                    try:
                        self._keys = await asyncio.to_thread(self._fetch)
                    except Exception as exc:  # the IdP being down is an auth failure, not a 500
                        raise Unauthenticated(f"cannot fetch JWKS from {self.url}: {type(exc).__name__}") from None
                    self._fetched_at = time.monotonic()
        found = self._keys.get(kid)
        if found is None:
            raise Unauthenticated(f"token key id {kid!r} is not in the JWKS")
        return found


class Verifier:
    """``await verify(token) -> Auth``; the object returned by ``forge_auth_verifier``."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        public_key = config.jwt_public_key
        if config.jwt_public_key_file:
            try:
                public_key = Path(config.jwt_public_key_file).read_text()
            except OSError as exc:
                raise StartupError(f"[gateway] jwt_public_key_file = {config.jwt_public_key_file!r}: {exc}") from None
        self._secret = config.jwt_secret.encode() if config.jwt_secret else None
        self._public_key: Any = None
        if public_key:
            if not has_crypto:
                raise StartupError("[gateway] jwt_public_key needs the 'cryptography' package")
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            try:
                self._public_key = load_pem_public_key(public_key.encode())
            except ValueError as exc:
                raise StartupError(f"[gateway] jwt_public_key: not a PEM public key ({exc})") from None
        self._jwks = JwksCache(config.jwks_url, config.jwks_cache_seconds) if config.jwks_url else None
        self._algorithms = frozenset(config.jwt_algorithms)
        self._api_keys = [(bytes.fromhex(k.sha256), k) for k in config.api_keys]
        self._require = ["exp"] if config.jwt_require_exp else []

    @property
    def accepts_jwt(self) -> bool:
        return bool(self._secret or self._public_key is not None or self._jwks)

    async def verify(self, token: str) -> Auth:
        """A JWT (three dot-separated parts) or an API key."""
        if not isinstance(token, str) or not token:
            raise Unauthenticated("empty credential")
        if token.count(".") == 2:
            return await self.verify_jwt(token)
        return self.verify_api_key(token)

    def verify_api_key(self, key: str) -> Auth:
        digest = hashlib.sha256(key.encode()).digest()
        match = None
        # compare against every key, always, so timing does not tell how many keys exist or which matched
        for stored, entry in self._api_keys:
            if hmac.compare_digest(stored, digest):
                match = entry
        if match is None:
            raise Unauthenticated("unknown API key")
        return Auth.for_api_key(match.name, match.roles)  # user id apikey:<name>: no token subject can be it

    async def verify_jwt(self, token: str) -> Auth:
        cfg = self.config
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"malformed token: {exc}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise Unauthenticated(f"token algorithm {alg!r} is not accepted; accepted: {', '.join(sorted(self._algorithms))}")
        key: Any
        if alg in HMAC_ALGORITHMS:
            if self._secret is None:
                raise Unauthenticated(f"token algorithm {alg} is not accepted: no [gateway] jwt_secret is configured")
            key = self._secret
        elif alg in PUBLIC_KEY_ALGORITHMS:
            kid = header.get("kid")
            if self._jwks is not None and isinstance(kid, str):
                key = (await self._jwks.key(kid)).key
            elif self._public_key is not None:
                key = self._public_key
            else:
                raise Unauthenticated(f"token algorithm {alg} is not accepted: no public key or JWKS is configured")
        else:  # pragma: no cover - config validation keeps other names out
            raise Unauthenticated(f"token algorithm {alg!r} is not accepted")
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], audience=cfg.jwt_audience or None, issuer=cfg.jwt_issuer or None,
                leeway=cfg.jwt_leeway, options={"require": self._require, "verify_signature": True})
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("token not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError as exc:
            raise Unauthenticated(f"token audience rejected: {exc}") from None
        except jwt.InvalidIssuerError as exc:
            raise Unauthenticated(f"token issuer rejected: {exc}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"token rejected: {exc}") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("token signature is invalid") from None
        except OverflowError:  # exp/iat/nbf of Infinity (Python's json reads it) or beyond any clock
            raise Unauthenticated("token rejected: a time claim (exp, iat, nbf) is out of range") from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise Unauthenticated(f"token rejected: {exc}") from None
        return self._auth_from_claims(claims)

    def _auth_from_claims(self, claims: Mapping[str, Any]) -> Auth:
        cfg = self.config
        user = claims.get(cfg.user_id_claim)
        if isinstance(user, bool) or not isinstance(user, (str, int)) or user == "":
            raise Unauthenticated(f"token has no usable {cfg.user_id_claim!r} claim (the caller's id)")
        raw_roles = claims.get(cfg.roles_claim, [])
        if isinstance(raw_roles, str):
            roles = raw_roles.split()
        elif isinstance(raw_roles, list) and all(isinstance(r, str) for r in raw_roles):
            roles = raw_roles
        else:
            raise Unauthenticated(f"token claim {cfg.roles_claim!r} must be a list of strings or a space-separated string")
        exp = claims.get("exp")
        expires = None
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            try:
                expires = dt.datetime.fromtimestamp(exp, dt.timezone.utc)
            except (OverflowError, ValueError, OSError):  # a signed exp past the year 9999
                raise Unauthenticated("token rejected: exp is out of range (after the year 9999); "
                                      "issue tokens with a real expiry") from None
        try:
            return Auth.for_user(str(user), roles, claims, expires)
        except ValueError as exc:  # a subject posing as an API key or the node
            raise Unauthenticated(f"token {cfg.user_id_claim!r} claim: {exc}") from None

    async def from_headers(self, authorization: str | None, api_key: str | None) -> Auth:
        """The caller of an HTTP request: no credential is anonymous; a bad one raises."""
        if api_key is not None:
            if authorization is not None:
                raise Unauthenticated(f"send either an Authorization header or {self.config.api_key_header}, not both")
            return self.verify_api_key(api_key)
        if authorization is None:
            return ANONYMOUS
        scheme, _, credential = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise Unauthenticated("Authorization header must be 'Bearer <token>'")
        return await self.verify(credential.strip())
