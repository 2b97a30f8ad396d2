"""Mutual TLS whenever a node listens beyond loopback: cluster CA, refusals counted, reload without restart."""

from __future__ import annotations

import asyncio
import os
import stat
import time

import asyncpg
import grpc
import httpx
import pytest

from forge_kernel.testing import free_port
from forge_mesh.channels import open_stubs
from forge_mesh.protocol import mesh_pb2 as pb
from forge_mesh.tls import Material, init_ca, issue_cert
from mesh_support import create_database, http_url, mesh_view, node_config, rpc, start_node, wait_peers


TOKEN = ""  # the cluster's mesh token, read from the test's database


def material(folder, name="test-client") -> Material:
    ca, key = (folder / "ca.pem").read_bytes(), (folder / "ca.key").read_bytes()
    cert, ckey = issue_cert(ca, key, name)
    return Material(ca, cert, ckey)


async def ping(port: int, tls: bool, m: Material | None, token: str = TOKEN) -> str:
    stubs = open_stubs(f"127.0.0.1:{port}", tls, m, 1 << 20, token or TOKEN)
    try:
        reply = await stubs.ping(pb.PingRequest(protocol=2), timeout=3, metadata=stubs.metadata)
        return f"ok:{reply.node_id}"
    except grpc.aio.AioRpcError as exc:
        return f"refused:{exc.code().name}"
    finally:
        await stubs.close()


async def test_a_node_listening_beyond_loopback_requires_mutual_tls(forge_database_url, tmp_path):
    ca1, ca2 = tmp_path / "ca1", tmp_path / "ca2"
    init_ca(ca1)
    init_ca(ca2)
    for f in (ca1 / "ca.key", ca1 / "ca.pem"):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    with pytest.raises(Exception, match="already exists"):
        init_ca(ca1)
    db = await create_database(forge_database_url)
    # F listens on every interface (so TLS is on) and is dialled on loopback; its certificate files
    # come from CA1 and are swapped for CA2's below
    certs = tmp_path / "f-certs"
    certs.mkdir()
    _install(certs, ca1, "f")
    port = free_port()
    f = start_node(tmp_path, node_config(db, "f", ["function"], mesh={
        "host": "0.0.0.0", "port": port, "advertise": f"127.0.0.1:{port}", "ca_file": str(certs / "ca.pem"),
        "cert_file": str(certs / "node.pem"), "key_file": str(certs / "node.key"), "tls_reload_interval": 0.2}),
        wait=False)
    # G listens on loopback (plaintext) and dials F with a certificate it issues itself from CA1's key
    g = start_node(tmp_path, node_config(db, "g", ["gateway"], mesh={"tls_dir": str(ca1)}), wait=False)
    try:
        await asyncio.to_thread(f.wait_ready, 90)
        await asyncio.to_thread(g.wait_ready, 90)
        assert "mutual TLS" in f.log() and "plaintext, loopback only" in g.log()
        await wait_peers(db, "g", {"f"})
        global TOKEN
        conn = await asyncpg.connect(db)
        try:
            TOKEN = await conn.fetchval("SELECT token FROM forge_mesh_cluster")
        finally:
            await conn.close()
        async with httpx.AsyncClient(timeout=30) as client:
            r = await rpc(client, http_url(g), "whoami")
            assert r.status_code == 200 and r.json()["data"]["node"] == "f", r.text

        assert await ping(port, False, None) == "refused:UNAVAILABLE"            # plaintext
        # a client certificate from another CA (the client trusts F's CA, so F is the one refusing)
        foreign = material(ca2)
        assert (await ping(port, True, Material((ca1 / "ca.pem").read_bytes(), foreign.cert, foreign.key))).startswith(
            "refused")
        assert await ping(port, True, material(ca1)) == "ok:f"
        # a cluster certificate is not enough: the request must carry the cluster's mesh token too
        assert await ping(port, True, material(ca1), token="wrong") == "refused:UNAUTHENTICATED"
        refused = (await mesh_view(db, "f", str(ca1)))["refused"]
        assert refused["plaintext"] >= 1 and refused["wrong_ca"] >= 1 and refused["token"] >= 1, refused

        # new certificate files (a new cluster CA) apply to new connections without a restart
        _install(certs, ca2, "f")
        deadline = time.monotonic() + 15
        while await ping(port, True, material(ca2)) != "ok:f":
            assert time.monotonic() < deadline, f.log()[-2000:]
            await asyncio.sleep(0.2)
        assert (await ping(port, True, material(ca1))).startswith("refused")
        assert f.alive() and "reloaded the cluster certificates" in f.log()
    finally:
        g.terminate(timeout=20)
        f.terminate(timeout=20)


def _install(folder, ca_folder, name: str) -> None:
    m = material(ca_folder, name)
    for file, data in (("ca.pem", m.ca), ("node.pem", m.cert), ("node.key", m.key)):
        tmp = folder / f".{file}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / file)


async def test_a_node_beyond_loopback_without_certificates_does_not_start(forge_database_url, tmp_path):
    db = await create_database(forge_database_url)
    p = start_node(tmp_path, node_config(db, "f", ["function"], mesh={"host": "0.0.0.0", "tls_dir": str(tmp_path / "none")}),
                   wait=False)
    try:
        code = await asyncio.to_thread(p.proc.wait, 60)
    finally:
        p.terminate(timeout=10)
    assert code != 0
    assert "[mesh]" in p.log() and "init-ca" in p.log(), p.log()[-2000:]


async def test_on_loopback_another_local_user_without_the_database_is_refused(forge_database_url, tmp_path):
    """Plaintext on loopback: the port is reachable by every local process, so every request must
    carry the cluster's mesh token, which only holders of the database can read."""
    db = await create_database(forge_database_url)
    port = free_port()
    f = start_node(tmp_path, node_config(db, "f", ["function"], mesh={"port": port}))
    try:
        assert "plaintext, loopback only" in f.log()
        conn = await asyncpg.connect(db)
        try:
            token = await conn.fetchval("SELECT token FROM forge_mesh_cluster")
        finally:
            await conn.close()
        assert await ping(port, False, None, token="guessed") == "refused:UNAUTHENTICATED"
        stubs = open_stubs(f"127.0.0.1:{port}", False, None, 1 << 20, "unused")
        try:  # no token at all: a forged call under someone else's identity
            req = pb.CallRequest(function="whoami", args_json=b"{}", caller=pb.Caller(user_id="admin", kind="user",
                                 roles=["admin"]), target_node="f", protocol=2)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stubs.call(req, timeout=3)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await stubs.close()
        assert await ping(port, False, None, token=token) == "ok:f"
        assert (await mesh_view(db, "f"))["refused"]["token"] == 2
    finally:
        f.terminate(timeout=20)
