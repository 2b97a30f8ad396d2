"""TLS on the node's own listener (``[gateway] tls_cert`` / ``tls_key``), reloaded without a restart.

asyncio (and uvloop) wrap every accepted connection with the one ``SSLContext`` the server was
created with, so the certificate cannot be swapped by handing the server a new context. Instead
the listener's context has an SNI callback (OpenSSL calls it on every handshake, with or without
a server name) that points the connection at the newest context. The files are checked at most
once a second, on a handshake; a change of either file's mtime, size or inode loads both into a
new context, and only a pair that loads cleanly replaces the current one (a half-written pair is
logged and retried, the old certificate stays in service). Connections already open keep the
certificate they started with.
"""

from __future__ import annotations

import os
import ssl
import stat
import time
from pathlib import Path
from typing import Any

from loguru import logger

from forge_kernel.errors import StartupError

#: seconds between checks of the files (made on a handshake, never by a timer)
CHECK_EVERY = 1.0


def _context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class ReloadingTls:
    def __init__(self, cert: str, key: str) -> None:
        self.cert, self.key = Path(cert), Path(key)
        for name, path in (("tls_cert", self.cert), ("tls_key", self.key)):
            try:
                path.read_bytes()
            except OSError as exc:
                raise StartupError(f"[gateway] {name} = {str(path)!r}: cannot read it: {exc.strerror or exc}") from None
        try:
            mode = self.key.stat().st_mode
        except OSError:  # pragma: no cover - read above
            mode = 0
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning(f"gateway: [gateway] tls_key {str(self.key)!r} is readable by other accounts "
                           f"(mode {stat.S_IMODE(mode):o}); chmod 600 it")
        self._stamp = self._files_stamp()
        try:
            self.current = _context(self.cert, self.key)
            #: the context the server listens with; it only hands connections to ``current``
            self.listener = _context(self.cert, self.key)
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise StartupError(f"[gateway] tls_cert / tls_key: cannot load the certificate and key "
                               f"({str(self.cert)!r}, {str(self.key)!r}): {exc}") from None
        self.listener.sni_callback = self._on_handshake
        self._checked = time.monotonic()
        self._failed_stamp: Any = None
        self.reloads = 0

    def _files_stamp(self) -> tuple[Any, ...] | None:
        try:
            return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in (os.stat(self.cert), os.stat(self.key)))
        except OSError:
            return None

    def _on_handshake(self, ssl_object: Any, server_name: str | None, listener: ssl.SSLContext) -> None:
        self.maybe_reload()
        ssl_object.context = self.current

    def maybe_reload(self, *, force: bool = False) -> bool:
        """Load the files again when they changed; True when a new certificate is in service."""
        now = time.monotonic()
        if not force and now - self._checked < CHECK_EVERY:
            return False
        self._checked = now
        stamp = self._files_stamp()
        if stamp is None or stamp == self._stamp or stamp == self._failed_stamp:
            return False
        try:
            fresh = _context(self.cert, self.key)
        except (ssl.SSLError, ValueError, OSError) as exc:
            self._failed_stamp = stamp
            logger.warning(f"gateway: TLS files changed but do not load ({exc}); still serving the previous "
                           f"certificate, will retry when {str(self.cert)!r} or {str(self.key)!r} changes again")
            return False
        self.current, self._stamp, self._failed_stamp = fresh, stamp, None
        self.reloads += 1
        logger.info(f"gateway: TLS certificate reloaded from {str(self.cert)!r}")
        return True
