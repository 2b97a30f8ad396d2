"""Who may see the dashboard and who may act: credentials, sessions, CSRF, the loopback rule.

* With ``[dashboard] admin_roles`` / ``read_roles`` set, every request needs a credential: a
  bearer JWT or an API key (verified by the node's ``forge_auth_verifier``, i.e. the gateway's
  ``[gateway]`` settings) whose roles include an admin or a read-only role. API clients send it
  in a header on every request; browsers sign in once at ``/_forge/login`` and get a session cookie.
* With neither set, the dashboard answers loopback clients only, as an admin, and says so on
  every page. A request that came through a proxy (forwarding headers) or names a host other
  than a loopback one (DNS rebinding) is refused, since it may come from anywhere.
* Sessions live in ``forge_dashboard_sessions`` (only the SHA-256 of the cookie's id), so every
  gateway node accepts them. Every POST made with the cookie must carry the session's CSRF token
  (``X-CSRF-Token`` header or ``csrf`` form field); a POST with a credential header carries no
  ambient credential a foreign page could borrow and needs none. The cookie is ``HttpOnly``,
  ``SameSite=Strict``, scoped to ``/_forge`` and ``Secure`` over https.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import secrets
import time
from typing import Any

import attrs
from loguru import logger

from forge_kernel.errors import Forbidden, Unauthenticated

from .config import DashboardConfig

COOKIE = "forge_session"
LOGIN_COOKIE = "forge_login"
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
_FORWARDING = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")


@attrs.frozen
class Viewer:
    """Who is looking: ``who`` for people and the audit, ``role`` admin or read."""

    who: str
    kind: str
    role: str
    csrf: str | None = None
    #: session | header | loopback
    via: str = "session"

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def sha(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


class Access:
    def __init__(self, node: Any, config: DashboardConfig, db: Any) -> None:
        self.node = node
        self.config = config
        self.db = db  # the dashboard's pools (live.Pools)
        self._verifier: Any = None
        #: sha256(session id) -> (viewer, expires monotonic): a page and its stream do not look it up each time
        self._cache: dict[bytes, tuple[Viewer | None, float]] = {}
        gw = _section(node, "gateway")
        self.api_key_header = (getattr(gw, "api_key_header", None) or "X-API-Key").lower()

    # --- the rule for this node -------------------------------------------------------
    def describe(self) -> str:
        if self.config.open_on_loopback:
            return ("No admin credential is configured ([dashboard] admin_roles / read_roles), so this dashboard "
                    "answers loopback clients only. Set admin_roles to open it to signed-in admins.")
        return ""

    def verifier(self) -> Any:
        if self._verifier is None:
            self._verifier = self.node.loader.hook.forge_auth_verifier(node=self.node)
        return self._verifier

    def role_of(self, roles: Any) -> str | None:
        roles = set(roles or ())
        if roles & set(self.config.admin_roles):
            return "admin"
        if roles & set(self.config.read_roles):
            return "read"
        return None

    def loopback_problem(self, headers: Any, client: str) -> str | None:
        """Why an open-on-loopback dashboard refuses this request (None: it may pass)."""
        if not _is_loopback(client):
            return f"this dashboard answers loopback clients only (no admin credential is configured); you are {client}"
        if any(h in headers for h in _FORWARDING):
            return "a request forwarded by a proxy may come from anywhere: configure [dashboard] admin_roles to use one"
        if _host_name(headers.get("host", "")) not in _LOOPBACK_HOSTS:
            return "the Host header must name a loopback address (localhost, 127.0.0.1, [::1])"
        return None

    # --- resolving a request ----------------------------------------------------------
    async def viewer(self, headers: Any, cookies: dict[str, str], client: str) -> Viewer | None:
        """The viewer of a request, or None when it needs to sign in. Raises ``Forbidden`` for a
        request the rules refuse outright and ``Unauthenticated`` for a bad credential."""
        if self.config.open_on_loopback:
            problem = self.loopback_problem(headers, client)
            if problem:
                raise Forbidden(problem)
        authorization = headers.get("authorization")
        api_key = headers.get(self.api_key_header)
        if not self.config.open_on_loopback and (authorization or api_key):
            return await self._from_credential(authorization, api_key)
        sid = cookies.get(COOKIE)
        if sid:
            viewer = await self._session(sid)
            if viewer is not None:
                return viewer
        return None

    async def _from_credential(self, authorization: str | None, api_key: str | None) -> Viewer:
        verifier = self.verifier()
        if verifier is None:
            raise Unauthenticated("no credential verifier on this node (install forge-gateway)")
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the Authorization header must be 'Bearer <token or API key>'")
            auth = await verifier.verify(token.strip())
        else:
            auth = await verifier.verify(api_key.strip())
        role = self.role_of(auth.roles)
        if role is None:
            raise Forbidden(f"{auth.user_id} has none of the dashboard's roles "
                            f"(admin: {', '.join(self.config.admin_roles) or '-'}; "
                            f"read-only: {', '.join(self.config.read_roles) or '-'})")
        return Viewer(auth.user_id or "?", auth.kind, role, None, "header")

    async def _session(self, sid: str) -> Viewer | None:
        key = sha(sid)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        row = await self.db.read.fetchrow(
            "SELECT who, kind, role, csrf FROM forge_dashboard_sessions WHERE id_sha256 = $1 AND expires_at > now()", key)
        viewer = Viewer(row["who"], row["kind"], row["role"], row["csrf"], "loopback" if row["kind"] == "loopback"
                        else "session") if row else None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (viewer, now + 5.0)
        return viewer

    # --- sessions -----------------------------------------------------------------------
    async def open_session(self, who: str, kind: str, role: str, client: str,
                           token_expires: dt.datetime | None = None) -> tuple[str, Viewer, dt.datetime]:
        sid = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(24)
        expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=self.config.session_hours)
        if token_expires is not None and token_expires < expires:
            expires = token_expires
        await self.db.write.execute(
            """INSERT INTO forge_dashboard_sessions (id_sha256, who, kind, role, csrf, expires_at, client)
               VALUES ($1, $2, $3, $4, $5, $6, $7)""", sha(sid), who, kind, role, csrf, expires, client)
        # expired sessions go now and then, never in a hot path
        if secrets.randbelow(20) == 0:
            await self.db.write.execute("DELETE FROM forge_dashboard_sessions WHERE expires_at < now()")
        return sid, Viewer(who, kind, role, csrf, "loopback" if kind == "loopback" else "session"), expires

    async def sign_in(self, credential: str, client: str) -> tuple[str, Viewer, dt.datetime]:
        credential = (credential or "").strip()
        if not credential:
            raise Unauthenticated("paste a token or an API key")
        verifier = self.verifier()
        if verifier is None:
            raise Unauthenticated("no credential verifier on this node (install forge-gateway)")
        auth = await verifier.verify(credential)
        role = self.role_of(auth.roles)
        if role is None:
            raise Forbidden(f"{auth.user_id} has none of the dashboard's roles")
        logger.info(f"dashboard: {auth.user_id} signed in ({role}) from {client}")
        return await self.open_session(auth.user_id or "?", auth.kind, role, client, auth.expires_at)

    async def sign_out(self, sid: str) -> None:
        self._cache.pop(sha(sid), None)
        await self.db.write.execute("DELETE FROM forge_dashboard_sessions WHERE id_sha256 = $1", sha(sid))

    @staticmethod
    def csrf_ok(viewer: Viewer, given: str | None) -> bool:
        if viewer.via == "header":
            return True  # no ambient credential: a foreign page cannot send this request as the viewer
        return bool(given) and viewer.csrf is not None and hmac.compare_digest(given, viewer.csrf)


def _section(node: Any, name: str) -> Any:
    try:
        return node.config[name]
    except (KeyError, TypeError):
        return None
