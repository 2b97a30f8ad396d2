"""Errors with a stable code that every surface (HTTP, WebSocket, CLI) maps the same way."""

from __future__ import annotations

from typing import Any

# code -> HTTP status (docs/architecture.md, section 7)
ERROR_STATUS: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "CONFLICT": 409,
    "PAYLOAD_TOO_LARGE": 413,
    "RATE_LIMITED": 429,
    "INTERNAL": 500,
    #: nothing here can run it now: this node does not run the needed role, a needed package is missing,
    #: or the database is unavailable (DatabaseUnavailable)
    "UNAVAILABLE": 503,
    "TIMEOUT": 504,
}


class ForgeError(Exception):
    """An error meant for the caller: ``code`` is one of ``ERROR_STATUS``; ``details`` is JSON-safe."""

    code = "INTERNAL"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        if code is not None:
            if code not in ERROR_STATUS:
                raise ValueError(f"unknown FORGE error code {code!r}; expected one of {sorted(ERROR_STATUS)}")
            self.code = code
        self.message = message
        self.details = details

    @property
    def status(self) -> int:
        return ERROR_STATUS[self.code]

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class InvalidArgument(ForgeError):
    code = "INVALID_ARGUMENT"


class Unauthenticated(ForgeError):
    code = "UNAUTHENTICATED"


class Forbidden(ForgeError):
    code = "FORBIDDEN"


class NotFound(ForgeError):
    code = "NOT_FOUND"


class Conflict(ForgeError):
    code = "CONFLICT"


class PayloadTooLarge(ForgeError):
    code = "PAYLOAD_TOO_LARGE"


class RateLimited(ForgeError):
    code = "RATE_LIMITED"


class Unavailable(ForgeError):
    code = "UNAVAILABLE"


class DatabaseUnavailable(Unavailable):
    """``UNAVAILABLE``: the call lost its database connection or could not get one (PostgreSQL
    restarting, unreachable). Worth retrying; a mutation cut off this way may have committed."""


class Timeout(ForgeError):
    code = "TIMEOUT"


class StartupError(Exception):
    """The node cannot start; the message says what to change. Printed without a traceback."""


class ConfigError(StartupError):
    """A configuration key is unknown, mistyped or out of range."""
