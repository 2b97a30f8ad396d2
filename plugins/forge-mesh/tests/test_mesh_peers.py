"""Peer health (peers.py): what takes a peer out of rotation and what brings it back."""

from __future__ import annotations

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
