"""The embedded PostgreSQL against another account on the same machine (issue 19, item 1).

Black-box: a throwaway unprivileged account tries what took the old server over - connect
over TCP and the unix socket (then ``COPY ... TO PROGRAM`` as the server's account), read the
password, use the printed URL - and every step is refused. The server's account plants
symbolic links where root would follow them; the next start follows none. Parent folders keep
their modes, and the server never runs with group 0. Needs root (useradd, runuser).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from forge_kernel.embedded_pg import SERVER_ACCOUNT, EmbeddedPostgres, _bin_dir, server_account
from forge_kernel.errors import StartupError
from forge_kernel.testing import free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a throwaway account")

PSQL = str(_bin_dir() / "psql")
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
ATTACK = "COPY (SELECT 1) TO PROGRAM 'id > /tmp/forge-pwned'"


def _useradd(name: str) -> None:
    for _ in range(50):  # other test runs on this machine may hold the passwd lock for a moment
        proc = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            return
        if "lock" not in proc.stderr:
            raise RuntimeError(proc.stderr)
        import time

        time.sleep(0.2)
    raise RuntimeError(f"useradd {name}: passwd stayed locked")


@pytest.fixture
def account():
    """Factory for throwaway unprivileged accounts, deleted afterwards."""
    made: list[str] = []

    def make() -> str:
        name = f"forge_t{secrets.token_hex(3)}"
        _useradd(name)
        made.append(name)
        return name

    yield make
    for name in made:
        subprocess.run(["userdel", name], capture_output=True)


def as_user(user: str, *cmd: str, input: str | None = None, home: str = "/") -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": home, "LC_ALL": "C"}
    return subprocess.run([RUNUSER, "-u", user, "--", *cmd], capture_output=True, text=True, timeout=60,
                          env=env, input=input, cwd="/")


def victim_file(folder: Path) -> Path:
    """A root-only file the server's account must never get hold of."""
    v = folder / "victim"
    v.write_text("root's secret\n")
    v.chmod(0o600)
    return v


def assert_untouched(victim: Path) -> None:
    st = victim.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600), "a link was followed"
    assert victim.read_text() == "root's secret\n"


def server_ids(pg: EmbeddedPostgres) -> dict[str, list[int]]:
    pid = int((pg.pgdata / "postmaster.pid").read_text().split()[0])
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(x) for x in value.split()]
    return out


async def test_another_local_account_cannot_take_the_embedded_postgres_over(forge_pg_folder, account):
    attacker = account()
    home = forge_pg_folder / "home"
    home.mkdir(mode=0o711)
    home.chmod(0o711)
    victim = victim_file(forge_pg_folder)
    modes_before = {p: stat.S_IMODE(p.stat().st_mode) for p in (forge_pg_folder, home)}
    port = free_port()
    pg = EmbeddedPostgres(home / ".forge", tcp_port=port)
    url = await asyncio.to_thread(pg.start)
    try:
        assert "password" not in url and pg.passfile.read_text().split(":")[-1].strip() not in url
        # the node's own account (root here) connects with what is printed: asyncpg and psql
        conn = await asyncpg.connect(url)
        assert await conn.fetchval("SELECT current_setting('listen_addresses')") == "127.0.0.1"
        await conn.close()
        assert subprocess.run([PSQL, url, "-Atc", "SELECT 42"], capture_output=True, text=True).stdout == "42\n"

        # 1. TCP: a password is required, and guessing does not help
        tcp = as_user(attacker, PSQL, f"host=127.0.0.1 port={port} user=postgres dbname=postgres", "-w", "-c", ATTACK)
        assert tcp.returncode != 0 and "password" in tcp.stderr, tcp
        guess = as_user(attacker, "env", "PGPASSWORD=postgres", PSQL,
                        f"host=127.0.0.1 port={port} user=postgres dbname=postgres", "-w", "-c", ATTACK)
        assert guess.returncode != 0 and "password authentication failed" in guess.stderr, guess
        # 2. the unix socket lives in a folder the attacker may not enter
        sock = as_user(attacker, PSQL, f"host={pg.socket_dir} port={port} user=postgres dbname=postgres", "-w",
                       "-c", ATTACK)
        assert sock.returncode != 0 and "Permission denied" in sock.stderr, sock
        # 3. the printed URL names a password file only the node's account can read
        printed = as_user(attacker, PSQL, url, "-w", "-c", ATTACK)
        assert printed.returncode != 0, printed
        with_asyncpg = as_user(attacker, sys.executable, "-c",
                               f"import asyncio, asyncpg; asyncio.run(asyncpg.connect({url!r}))")
        assert with_asyncpg.returncode != 0 and "Traceback" in with_asyncpg.stderr, with_asyncpg
        for secret in (pg.passfile, pg.root / "users.json", pg.pgdata / "PG_VERSION"):
            read = as_user(attacker, "cat", str(secret))
            assert read.returncode != 0 and "Permission denied" in read.stderr, (secret, read)
        assert not Path("/tmp/forge-pwned").exists()

        # 4. the server runs as its own account and group: no uid 0, no group 0 anywhere
        ids = server_ids(pg)
        acc = server_account()
        assert set(ids["Uid"]) == {acc.uid} and set(ids["Gid"]) == {acc.gid}, ids
        assert 0 not in ids["Groups"], ids

        # 5. parent folders keep their modes
        assert {p: stat.S_IMODE(p.stat().st_mode) for p in modes_before} == modes_before

        # 6. the server's account plants links (as COPY ... TO PROGRAM 'ln -s ...' would); the
        # next start follows none of them
        for planted in (pg.pgdata / "x", pg.pgdata / "global" / "y", pg.run_dir / "z"):
            planted.symlink_to(victim)
            os.lchown(planted, acc.uid, acc.gid)
    finally:
        await asyncio.to_thread(pg.release, 5)
    again = EmbeddedPostgres(home / ".forge", tcp_port=port)
    await asyncio.to_thread(again.start)
    assert_untouched(victim)
    await asyncio.to_thread(again.release, 5)
    # a link where root writes its own files (only root could put it there now) is refused, not followed
    (pg.root / "users.json").unlink()
    (pg.root / "users.json").symlink_to(victim)
    with pytest.raises(StartupError, match="never follows links"):
        EmbeddedPostgres(home / ".forge").start()
    assert_untouched(victim)
    assert {p: stat.S_IMODE(p.stat().st_mode) for p in modes_before} == modes_before


def test_a_folder_the_server_account_cannot_reach_stops_with_what_to_change(forge_pg_folder):
    closed = forge_pg_folder / "closed"
    closed.mkdir()
    closed.chmod(0o700)
    with pytest.raises(StartupError) as err:
        EmbeddedPostgres(closed / ".forge").start()
    message = str(err.value)
    assert f"may not enter {closed} (mode 0700" in message and f"chmod o+x {closed}" in message
    assert "[database] data_dir" in message
    assert stat.S_IMODE(closed.stat().st_mode) == 0o700  # never loosened
    assert not (closed / ".forge" / "pgdata").exists()


def test_a_data_folder_owned_by_another_account_or_a_link_is_refused(forge_pg_folder, account):
    other = account()
    theirs = forge_pg_folder / "theirs"
    theirs.mkdir()
    import pwd

    pw = pwd.getpwnam(other)
    os.chown(theirs, pw.pw_uid, pw.pw_gid)
    with pytest.raises(StartupError, match="owned by .*not by this account"):
        EmbeddedPostgres(theirs).start()
    link = forge_pg_folder / "link"
    link.symlink_to(theirs)
    with pytest.raises(StartupError, match="not a symbolic link"):
        EmbeddedPostgres(link).start()
    assert pw.pw_uid == theirs.stat().st_uid and not (theirs / "pgdata").exists()


NODE_OWN_SERVER = """
import sys
from pathlib import Path
from forge_kernel.embedded_pg import EmbeddedPostgres
pg = EmbeddedPostgres(Path(sys.argv[1]))
print(pg.start(), flush=True)
sys.stdin.read()
print(pg.release(5), flush=True)
"""


async def test_an_unprivileged_node_account_runs_its_own_server_that_others_cannot_use(forge_pg_folder, account):
    """Not root: the server runs as the node's account, whose URL works for it (and root), not for others."""
    owner, stranger = account(), account()
    import pwd

    pw = pwd.getpwnam(owner)
    home = forge_pg_folder / "owner"
    home.mkdir()
    os.chown(home, pw.pw_uid, pw.pw_gid)
    home.chmod(0o700)
    proc = subprocess.Popen([RUNUSER, "-u", owner, "--", sys.executable, "-c", NODE_OWN_SERVER, str(home / ".forge")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(home), "LC_ALL": "C"}, cwd="/")
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("postgresql://postgres@/postgres?host="), proc.stderr.read() if not url else url
        mine = as_user(owner, PSQL, url, "-w", "-Atc", "SELECT current_user", home=str(home))
        assert mine.returncode == 0 and mine.stdout == "postgres\n", mine
        theirs = as_user(stranger, PSQL, url, "-w", "-c", ATTACK)
        assert theirs.returncode != 0, theirs
        pid = int(as_user(owner, "head", "-1", str(home / ".forge" / "pgdata" / "postmaster.pid")).stdout)
        status = Path(f"/proc/{pid}/status").read_text()
        assert f"Uid:\t{pw.pw_uid}\t" in status and f"Gid:\t{pw.pw_gid}\t" in status
        assert stat.S_IMODE((home / ".forge").stat().st_mode) == 0o700
        assert stat.S_IMODE((home / ".forge" / "pgpass").stat().st_mode) == 0o600
    finally:
        out, err = proc.communicate("", timeout=60)
    assert proc.returncode == 0 and out.strip() == "True", err


async def test_a_data_folder_from_an_older_forge_is_taken_back_and_given_a_password(forge_pg_folder):
    """The old layout: .forge/ owned by forge_pg (who could plant links there) and a cluster without
    a password. The next start takes the folder back without following the planted link, drops
    the server's top-level files and gives the superuser a password."""
    victim = victim_file(forge_pg_folder)
    root = forge_pg_folder / ".forge"
    first = EmbeddedPostgres(root)
    await asyncio.to_thread(first.start)
    await asyncio.to_thread(first.release, 0)
    acc = server_account()
    os.chown(root, acc.uid, acc.gid)  # as the old code left it
    old_password = (root / "pgpass").read_text()
    (root / "pgpass").unlink()        # a cluster made before passwords
    (root / "server.json").unlink()
    (root / "server.json").symlink_to(victim)
    os.lchown(root / "server.json", acc.uid, acc.gid)
    again = EmbeddedPostgres(root)
    url = await asyncio.to_thread(again.start)
    try:
        assert_untouched(victim)
        st = root.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, acc.gid, 0o710)
        assert not (root / "server.json").is_symlink()
        assert (root / "pgpass").read_text() != old_password
        conn = await asyncpg.connect(url)  # the new password, from the new pgpass
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        assert "trust" not in (root / "pg_hba.conf").read_text()
    finally:
        await asyncio.to_thread(again.release, 0)
