"""Peer health (peers.py): what takes a peer out of rotation and what brings it back."""

from __future__ import annotations

import pytest

from forge_mesh.peers import MISSED_PROBES_TO_SUSPECT, Directory


def _directory() -> Directory:
    d = Directory("g")
    d.update([{"node_id": "f", "address": "127.0.0.1:1", "epoch": "e1", "protocol": 3, "min_protocol": 1,
               "tls": False, "roles": ["function"], "capabilities": []}])
    return d


def test_one_probe_without_an_answer_in_time_does_not_take_the_only_node_out_of_rotation():
    d = _directory()
    peer = d.peers["f"]
    for _ in range(MISSED_PROBES_TO_SUSPECT - 1):
        peer.probe_missed("no answer to a probe in time")
    assert peer.suspect_since is None and d.choose(None, 3, 1, set()) is peer
    assert peer.last_error == "no answer to a probe in time"  # still shown in status --live
    peer.probe_missed("no answer to a probe in time")
    assert peer.suspect_since is not None and d.choose(None, 3, 1, set()) is None


def test_an_answer_clears_the_misses_and_the_suspicion():
    d = _directory()
    peer = d.peers["f"]
    for _ in range(MISSED_PROBES_TO_SUSPECT):
        peer.probe_missed("slow")
    assert peer.probe_answered() is True
    assert peer.suspect_since is None and peer.last_error == "" and peer.missed_probes == 0
    peer.probe_missed("slow")  # the count starts again: one miss is not enough
    assert d.choose(None, 3, 1, set()) is peer
    assert peer.probe_answered() is False


def test_hard_evidence_still_counts_at_once():
    d = _directory()
    peer = d.peers["f"]
    peer.suspect("UNAVAILABLE: connection refused")  # a refused probe, or a forwarded call that failed
    assert d.choose(None, 3, 1, set()) is None


async def test_a_peer_restarted_on_the_same_address_answers_its_new_channel_at_once():
    """A channel to an address where nothing listened is in reconnect back-off; the peer that then
    starts there gets a new channel (a new epoch), which must connect at once instead of failing
    with the old "connection refused" (grpc's shared subchannels, see channels.channel_options)."""
    import socket

    import grpc

    from forge_mesh.channels import channel_options

    def echo(request, context):
        return request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    # back-off long enough that the second call below lands inside it
    options = [o for o in channel_options(1 << 20) if "backoff" not in o[0]] + [
        ("grpc.initial_reconnect_backoff_ms", 5_000), ("grpc.min_reconnect_backoff_ms", 5_000),
        ("grpc.max_reconnect_backoff_ms", 5_000)]
    dead = grpc.aio.insecure_channel(address, options=options)
    server = grpc.aio.server()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await dead.unary_unary("/t.Echo/Echo")(b"x", timeout=1.0)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "t.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
        assert server.add_insecure_port(address)
        await server.start()
        fresh = grpc.aio.insecure_channel(address, options=options)
        try:
            assert await fresh.unary_unary("/t.Echo/Echo")(b"x", timeout=2.0) == b"x"
        finally:
            await fresh.close()
    finally:
        await dead.close()
        await server.stop(None)
