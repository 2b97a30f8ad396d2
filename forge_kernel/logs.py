"""Logging for every FORGE process: one loguru set-up, and no secret in any line.

* Tracebacks never show local variables (``diagnose=False``: a frame's locals hold request
  headers, tokens and claims) and start at the frame that caught the error (``backtrace=False``).
* Every line a sink writes passes through :data:`REDACTOR`, which replaces with ``***``:
  the values of configured secrets (any config field whose name says ``secret``, ``password``,
  ``token`` or ``credential``, or whose attrs metadata has ``secret=True``; the password of
  ``[database] url``); API keys, recognised by their SHA-256 (the config holds only hashes);
  passwords in URLs; bearer tokens and anything shaped like a JWT; and ``key=value`` /
  ``"key": "value"`` pairs whose key names a credential. Values shorter than 6 characters are
  only redacted where a key or URL names them (they would match ordinary words).
* Records are patched as well (message and ``extra``), so a sink that formats records itself
  gets redacted fields.

Plugins that add sinks (forge-observe's PostgreSQL log sink) use :func:`add_sink`, which
applies the same defaults and redaction; a sink that formats a record's exception itself
passes the text through :func:`redact`.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from typing import Any, Callable, Iterable, Mapping

import attrs
from loguru import logger

REDACTED = "***"
#: config field names whose values are secrets (see module docstring)
_SECRET_FIELD = re.compile(r"secret|passw(or)?d|passwd|token|credential", re.I)
#: a raw API key may have been put where its hash belongs: never echo it
_HASH_FIELD = re.compile(r"sha256", re.I)
_CREDENTIAL_KEY = (r"[\w.-]*(?:passw(?:or)?d|passwd|secret|token|api[_-]?key|authorization|jwt|cookie|credential"
                   r"|private[_-]?key|session[_-]?id)[\w.-]*")
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/?#\s@]*:)([^@/\s]+)(@)", re.I), rf"\g<1>{REDACTED}\g<3>"),
    # JWTs (header.payload.signature, base64url JSON)
    (re.compile(r"\beyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*"), REDACTED),
    # Authorization schemes
    (re.compile(r"\b(bearer)(\s+)[\w.~+/=-]{8,}", re.I), rf"\g<1>\g<2>{REDACTED}"),
    # "password": "x" / 'token': 'x' (JSON, Python reprs)
    (re.compile(rf"""(["'](?:{_CREDENTIAL_KEY})["']\s*:\s*)(["'])(?:\\.|(?!\2).)*\2""", re.I),
     rf"\g<1>\g<2>{REDACTED}\g<2>"),
    # password=x, api_key=x (query strings, DSNs, logfmt); x-api-key: x (headers)
    (re.compile(rf"(\b(?:{_CREDENTIAL_KEY})\s*=\s*)(?!\*\*\*)([^\s&,;'\"]+)", re.I), rf"\g<1>{REDACTED}"),
    (re.compile(r"(\b(?:x-)?api-key\s*:\s*)(?!\*\*\*)(\S+)", re.I), rf"\g<1>{REDACTED}"),
)
_KEY_LIKE = re.compile(r"[\w.~+/=-]{16,}")
_MIN_VALUE = 6


def is_secret_field(name: str, attribute: attrs.Attribute | None = None) -> bool:
    """Whether a config field holds a secret (by name, or ``metadata={"secret": True}``)."""
    if attribute is not None and attribute.metadata.get("secret"):
        return True
    return bool(_SECRET_FIELD.search(name) or _HASH_FIELD.search(name))


class Redactor:
    """Replaces secrets in text. Thread-safe for reading; secrets are added at start-up."""

    def __init__(self) -> None:
        self._values: frozenset[str] = frozenset()
        self._values_re: re.Pattern[str] | None = None
        self._hashes: frozenset[bytes] = frozenset()

    def add_values(self, values: Iterable[Any]) -> None:
        """Secret values to replace wherever they appear (those under 6 characters are ignored)."""
        found = {str(v) for v in values if v is not None and not isinstance(v, bool) and len(str(v)) >= _MIN_VALUE}
        if not found - self._values:
            return
        self._values = self._values | found
        # longest first, so a secret that contains another is replaced whole
        alternation = "|".join(re.escape(v) for v in sorted(self._values, key=len, reverse=True))
        self._values_re = re.compile(alternation)

    def add_sha256(self, hex_digests: Iterable[str]) -> None:
        """API keys known only by their SHA-256: any key-like word hashing to one is replaced."""
        digests = set()
        for h in hex_digests:
            try:
                digests.add(bytes.fromhex(h))
            except (TypeError, ValueError):
                continue
        self._hashes = self._hashes | digests

    def add_config(self, config: Any) -> None:
        """Every secret of a loaded :class:`~forge_kernel.config.Config` (all sections)."""
        values: list[Any] = []
        hashes: list[str] = []
        for section in config.sections.values():
            _collect(section, False, values, hashes)
        url = getattr(config.sections.get("database"), "url", "")
        if url:
            values += _url_passwords(url)
        self.add_values(values)
        self.add_sha256(hashes)

    def __call__(self, text: str) -> str:
        if not text:
            return text
        if self._values_re is not None:
            text = self._values_re.sub(REDACTED, text)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        if self._hashes:
            text = _KEY_LIKE.sub(self._hashed, text)
        return text

    def _hashed(self, m: re.Match[str]) -> str:
        word = m.group(0)
        return REDACTED if hashlib.sha256(word.encode()).digest() in self._hashes else word

    def patch(self, record: Any) -> None:
        """A loguru patcher: redacts the message and string values of ``extra``."""
        record["message"] = self(record["message"])
        extra = record["extra"]
        for key, value in list(extra.items()):
            if isinstance(value, str):
                extra[key] = REDACTED if _SECRET_FIELD.search(key) else self(value)


def _collect(obj: Any, secret: bool, values: list[Any], hashes: list[str]) -> None:
    if attrs.has(type(obj)):
        for a in attrs.fields(type(obj)):
            value = getattr(obj, a.name)
            if _HASH_FIELD.search(a.name) and isinstance(value, str):
                hashes.append(value)
            else:
                _collect(value, secret or is_secret_field(a.name, a), values, hashes)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _collect(v, secret or (isinstance(k, str) and is_secret_field(k)), values, hashes)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _collect(v, secret, values, hashes)
    elif secret and isinstance(obj, (str, int, float)) and not isinstance(obj, bool):
        values.append(obj)


def secret_values(raw: Any, secret: bool = False) -> list[Any]:
    """Values under secret-named keys of raw (unvalidated) config data, e.g. for scrubbing a
    config error before the config exists."""
    values: list[Any] = []
    if isinstance(raw, Mapping):
        for k, v in raw.items():
            values += secret_values(v, secret or (isinstance(k, str) and is_secret_field(k)))
    elif isinstance(raw, (list, tuple)):
        for v in raw:
            values += secret_values(v, secret)
    elif secret and raw is not None and not isinstance(raw, bool):
        values.append(raw)
    return values


def _url_passwords(url: str) -> list[str]:
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(url)
        found = [parts.password] if parts.password else []
        found += parse_qs(parts.query).get("password", [])
    except ValueError:
        return []
    return found


#: the process-wide redactor every FORGE sink uses
REDACTOR = Redactor()


def redact(text: str) -> str:
    """``text`` with every known secret replaced by ``***``."""
    return REDACTOR(text)


class _RedactingWriter:
    """Wraps a stream (or a function taking text) so it only ever sees redacted text."""

    def __init__(self, target: Any) -> None:
        self._write: Callable[[str], Any] = target.write if hasattr(target, "write") else target
        self._flush = getattr(target, "flush", None)

    def __call__(self, message: str) -> None:
        self._write(REDACTOR(str(message)))
        if self._flush is not None:
            self._flush()


def add_sink(sink: Any, *, records: bool = False, **options: Any) -> int:
    """``logger.add`` with FORGE's defaults: no locals in tracebacks, no frames above the one
    that caught the error, and redaction of every line. ``sink`` is a stream or a function
    taking the formatted text; loguru's other options pass through. Returns the sink id.

    ``records=True``: ``sink`` is a function taking loguru's message itself (``message.record``
    for the fields: forge-observe stores them as columns). Its record's message and ``extra`` are
    redacted already (the patcher); the formatted text, which holds the exception, the sink
    passes through :func:`redact`."""
    options.setdefault("diagnose", False)
    options.setdefault("backtrace", False)
    if records:
        return logger.add(sink, **options)
    if "colorize" not in options and hasattr(sink, "isatty"):
        options["colorize"] = _isatty(sink)
    return logger.add(_RedactingWriter(sink), **options)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty()) and "NO_COLOR" not in os.environ
    except (AttributeError, ValueError):
        return False


def setup_logging(config: Any = None) -> None:
    """The process's logging: one sink on stderr (text or JSON lines per ``[log]``), redacting
    the secrets of ``config`` (call again once the config is loaded)."""
    level = config.log.level if config else os.environ.get("FORGE_LOG__LEVEL", "INFO")
    if config is not None:
        REDACTOR.add_config(config)
    logger.remove()
    logger.configure(extra={"request_id": "-"}, patcher=REDACTOR.patch)
    if config and config.log.json:
        add_sink(sys.stderr, level=level, serialize=True)
    else:
        add_sink(sys.stderr, level=level,
                 format="<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}")
