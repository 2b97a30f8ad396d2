"""The mesh protocol: the committed code matches mesh.proto, no change breaks a stored version,
the checker catches breaking changes, and a cluster of protocol 1 and 2 nodes forwards correctly."""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from google.protobuf import descriptor_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from forge_mesh.config import MIN_PROTOCOL, PROTOCOL
from forge_mesh.protocol import compat, mesh_pb2
from mesh_support import create_database, http_url, node_config, node_env, rpc, start_node, wait_peers

PROTO_DIR = Path(compat.__file__).parent


def test_the_committed_mesh_pb2_is_generated_from_mesh_proto(tmp_path):
    out = tmp_path / "mesh.desc"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-Iforge_mesh/protocol={PROTO_DIR}",
                    f"--descriptor_set_out={out}", "forge_mesh/protocol/mesh.proto"], check=True)
    generated = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto()
    mesh_pb2.DESCRIPTOR.CopyToProto(committed)
    for message in generated.message_type:  # protoc adds JSON names the runtime descriptor leaves out
        for field in message.field:
            field.ClearField("json_name")
    assert generated == committed, "mesh_pb2.py is stale: regenerate it (see the README's Protocol section)"


def test_the_current_protocol_is_the_stored_latest_version():
    assert compat.describe() == compat.stored(PROTOCOL), (
        f"mesh.proto changed: store the new shape as descriptors/v{PROTOCOL + 1}.json and raise PROTOCOL, "
        f"or undo the change")


@pytest.mark.parametrize("version", range(MIN_PROTOCOL, PROTOCOL + 1))
def test_no_stored_version_is_broken(version):
    assert compat.breaking_changes(compat.stored(version), compat.describe()) == []


def test_versions_only_ever_add():
    for old in range(MIN_PROTOCOL, PROTOCOL):
        assert compat.breaking_changes(compat.stored(old), compat.stored(old + 1)) == []
    assert compat.breaking_changes(compat.stored(2), compat.stored(1))  # going back removes fields


_CURRENT = compat.describe()
_FIELDS = [(m, f) for m, msg in _CURRENT["messages"].items() for f in msg["fields"]]
_METHODS = [(s, m) for s, ms in _CURRENT["services"].items() for m in ms]


@st.composite
def breaking(draw):
    """One change that breaks old peers, applied to a copy of the current protocol."""
    new = copy.deepcopy(_CURRENT)
    kind = draw(st.sampled_from(["remove_field", "renumber", "retype", "relabel", "remove_message",
                                 "remove_method", "restream", "reuse_number"]))
    msg, field = draw(st.sampled_from(_FIELDS))
    fields = new["messages"][msg]["fields"]
    if kind == "remove_field":
        del fields[field]
    elif kind == "renumber":
        fields[field]["number"] += draw(st.integers(100, 1000))
    elif kind == "retype":
        fields[field]["type"] = draw(st.sampled_from(["TYPE_STRING", "TYPE_BYTES", "TYPE_INT64", "TYPE_BOOL"]).filter(
            lambda t: t != fields[field]["type"]))
    elif kind == "relabel":
        fields[field]["label"] = "repeated" if fields[field]["label"] != "repeated" else "optional"
    elif kind == "remove_message":
        del new["messages"][msg]
    elif kind == "reuse_number":
        number = fields.pop(field)["number"]
        fields[field + "_v2"] = {"number": number, "type": "TYPE_STRING", "label": "optional"}
    else:
        svc, meth = draw(st.sampled_from(_METHODS))
        if kind == "remove_method":
            del new["services"][svc][meth]
        else:
            new["services"][svc][meth]["server_streaming"] = not new["services"][svc][meth]["server_streaming"]
    return new


@settings(max_examples=100, deadline=None)
@given(new=breaking())
def test_any_breaking_change_is_caught(new):
    assert compat.breaking_changes(_CURRENT, new)


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_additions_are_not_breaking(data):
    new = copy.deepcopy(_CURRENT)
    msg, _ = data.draw(st.sampled_from(_FIELDS))
    taken = {f["number"] for f in new["messages"][msg]["fields"].values()}
    number = data.draw(st.integers(1, 10_000).filter(lambda n: n not in taken))
    new["messages"][msg]["fields"]["added_" + str(number)] = {"number": number, "type": "TYPE_STRING", "label": "optional"}
    new["messages"]["Added"] = {"fields": {}, "reserved": []}
    new["services"]["Mesh"]["Added"] = {"input": ".x", "output": ".y", "server_streaming": False, "client_streaming": False}
    assert compat.breaking_changes(_CURRENT, new) == []


@pytest.fixture(scope="module")
def mixed(forge_database_url, tmp_path_factory):
    """A rolling upgrade: gnew and fnew speak the current protocol, gprev and fprev are pinned to the
    previous one, and fv1 to protocol 1 (before read sets)."""
    tmp = tmp_path_factory.mktemp("mesh-mixed")
    db = asyncio.run(create_database(forge_database_url))
    prev = {"protocol_version": PROTOCOL - 1}
    procs = {
        "gnew": start_node(tmp, node_config(db, "gnew", ["gateway", "realtime"]), node_env("forge_realtime.hooks"),
                           wait=False),
        "gprev": start_node(tmp, node_config(db, "gprev", ["gateway"], mesh=prev), wait=False),
        "fprev": start_node(tmp, node_config(db, "fprev", ["function"], mesh=prev), wait=False),
        "fnew": start_node(tmp, node_config(db, "fnew", ["function"]), wait=False),
        "fv1": start_node(tmp, node_config(db, "fv1", ["function"], mesh={"protocol_version": 1}), wait=False),
    }
    try:
        for p in procs.values():
            p.wait_ready(90)
        for g in ("gnew", "gprev"):
            asyncio.run(wait_peers(db, g, {"fprev", "fnew", "fv1"}))
        yield {"db": db, **procs}
    finally:
        for p in procs.values():
            p.terminate(timeout=20)


async def test_a_mixed_cluster_forwards_between_protocol_versions(mixed):
    async with httpx.AsyncClient(timeout=20) as client:
        for g in ("gnew", "gprev"):
            seen = set()
            for i in range(30):
                r = await rpc(client, http_url(mixed[g]), "whoami")
                assert r.status_code == 200, r.text
                seen.add(r.json()["data"]["node"])
                r = await rpc(client, http_url(mixed[g]), "add_item", {"key": f"mixed-{g}-{i}"})
                assert r.status_code == 200, r.text
            assert seen == {"fprev", "fnew", "fv1"}, (g, seen)
    assert f"protocol {PROTOCOL - 1}" in mixed["fprev"].log() and f"protocol {PROTOCOL}" in mixed["fnew"].log()


async def test_live_query_reruns_go_only_to_nodes_that_return_read_sets(mixed):
    """Read sets came with protocol 2: a protocol 1 node cannot run a re-run for a subscriber."""
    import websockets

    url = http_url(mixed["gnew"]).replace("http://", "ws://") + "/ws"
    for i in range(8):
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "auth", "token": None}))
            await asyncio.wait_for(ws.recv(), 20)
            await ws.send(json.dumps({"type": "subscribe", "id": f"s{i}", "function": "whoami", "args": {}}))
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
                if msg.get("id") == f"s{i}":
                    break
            assert msg["type"] == "data" and msg["data"]["node"] in ("fprev", "fnew"), msg
