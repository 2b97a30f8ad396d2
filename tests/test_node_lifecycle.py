"""Node membership, heartbeats, drain on SIGTERM/SIGINT, service order, crash restarts."""

import json
import signal
import subprocess
import sys
import time

import asyncpg
import pytest

from forge_kernel.testing import wait_for

APPS = str(__import__("pathlib").Path(__file__).parent / "apps")


def plugin_env(tmp_path):
    # only the kernel and the test plugin: role packages installed beside us stay out of this test
    return {"PYTHONPATH": APPS, "FORGE_PLUGINS": "lifecycle_plugin", "FORGE_DISABLE_PLUGIN_AUTOLOAD": "1",
            "FORGE_TEST_EVENTS": str(tmp_path / "events.txt")}


async def node_row(url, node_id):
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchrow("SELECT * FROM forge_nodes WHERE id = $1", node_id)
    finally:
        await conn.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_register_heartbeat_drain(forge_processes, tmp_path, sig):
    node = forge_processes({"node": {"heartbeat_interval": 0.2, "capabilities": ["gpu"]}, "app": {"example": False}},
                           env=plugin_env(tmp_path))
    url = forge_processes.db_url
    row = await node_row(url, "n1")
    assert row["status"] == "running" and "lifecycle" in row["roles"] and row["capabilities"] == ["gpu"]
    assert row["pid"] == node.pid
    first = row["last_heartbeat"]
    time.sleep(0.6)
    assert (await node_row(url, "n1"))["last_heartbeat"] > first
    node.signal(sig)
    assert node.proc.wait(30) == 0
    row = await node_row(url, "n1")
    assert row["status"] == "stopped" and row["stopped_at"] is not None
    events = (tmp_path / "events.txt").read_text().split("\n")
    starts = [e for e in events if e.startswith("start")]
    stops = [e for e in events if e.startswith("stop")]
    assert starts == ["start a", "start b", "start c"]
    assert stops == ["stop c", "stop b", "stop a"]  # exact reverse
    assert "status while stopping draining" in events
    assert "start never" not in events


async def test_drain_timeout_cuts_off_a_service_that_never_stops(forge_processes, tmp_path):
    node = forge_processes({"node": {"drain_timeout": 1.5}, "app": {"example": False}},
                           env={**plugin_env(tmp_path), "FORGE_TEST_HANG": "1"})
    node.signal(signal.SIGTERM)
    assert node.proc.wait(30) == 0  # without the cut-off it would never exit
    events = (tmp_path / "events.txt").read_text().split("\n")
    # the others stopped in reverse order first; the hanging one (started first) was cut off last
    assert [e for e in events if e.startswith("stop")] == ["stop c", "stop b", "stop a"]
    assert "hang stopping" in events
    assert "service 'hang' did not stop within the drain timeout; cancelling it" in node.log()
    row = await node_row(forge_processes.db_url, "n1")
    assert row["status"] == "stopped"


async def test_heartbeat_needs_no_pooled_connection(forge_processes, tmp_path):
    node = forge_processes({"node": {"heartbeat_interval": 0.2}, "app": {"example": False}},
                           env={**plugin_env(tmp_path), "FORGE_TEST_HOG": "1"})
    wait_for(lambda: "pool exhausted" in (tmp_path / "events.txt").read_text(), 20, what="the pool to be taken")
    first = (await node_row(forge_processes.db_url, "n1"))["last_heartbeat"]
    time.sleep(1.0)
    assert (await node_row(forge_processes.db_url, "n1"))["last_heartbeat"] > first
    node.signal(signal.SIGTERM)  # marking 'draining' cannot get a connection: bounded, the drain goes on
    assert node.proc.wait(30) == 0
    assert "could not record node status 'draining'" in node.log()
    # the heartbeat (its own connection) recorded it instead, before the first service stopped
    assert "status while stopping draining" in (tmp_path / "events.txt").read_text().split("\n")
    assert (await node_row(forge_processes.db_url, "n1"))["status"] == "stopped"


async def test_crashing_service_is_restarted_and_reported(forge_processes, tmp_path):
    node = forge_processes({"node": {"heartbeat_interval": 0.2}, "app": {"example": False}}, env=plugin_env(tmp_path))
    wait_for(lambda: "flaky running" in (tmp_path / "events.txt").read_text(), 20, what="flaky loop to recover")
    log = node.log()
    assert "service task 'flaky-loop' crashed (1 so far)" in log and "crashed (2 so far)" in log
    row = await node_row(forge_processes.db_url, "n1")
    info = json.loads(row["info"]) if isinstance(row["info"], str) else row["info"]
    assert info["crashes"]["flaky-loop"]["count"] == 2
    assert "flaky crash 2" in info["crashes"]["flaky-loop"]["error"]
    assert node.alive()


def test_status_cli_lists_cluster(forge_processes, tmp_path):
    forge_processes({"app": {"example": False}}, node_id="alpha", env=plugin_env(tmp_path))
    forge_processes({"app": {"example": False}}, node_id="beta", env=plugin_env(tmp_path))
    cfg = tmp_path / "status.toml"
    cfg.write_text(f'[database]\nurl = "{forge_processes.db_url}"\n')
    out = subprocess.run([sys.executable, "-m", "forge_kernel.cli", "--config", str(cfg), "status", "--json"],
                         capture_output=True, text=True, timeout=60, check=True)
    rows = {r["id"]: r for r in json.loads(out.stdout)}
    assert rows["alpha"]["status"] == "running" and rows["beta"]["status"] == "running"
    text = subprocess.run([sys.executable, "-m", "forge_kernel.cli", "--config", str(cfg), "status"],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert "alpha" in text and "beta" in text and "HEARTBEAT" in text


@pytest.mark.parametrize("setting, expected", [(None, "uvloop"), ("asyncio", "asyncio"), ("uvloop", "uvloop")])
def test_event_loop_setting(forge_processes, tmp_path, setting, expected):
    node = {"event_loop": setting} if setting else {}
    proc = forge_processes({"node": node, "app": {"example": False}}, env=plugin_env(tmp_path))
    assert proc.ready_info()["event_loop"] == expected  # uvloop is a kernel dependency on this platform


@pytest.mark.parametrize("setting, expected", [(None, [50_000, 10, 10]), ([2000, 5, 5], [2000, 5, 5])])
def test_gc_thresholds_setting(forge_processes, tmp_path, setting, expected):
    node = {"gc_thresholds": setting} if setting else {}
    proc = forge_processes({"node": node, "app": {"example": False}}, env=plugin_env(tmp_path))
    assert proc.ready_info()["gc_thresholds"] == expected


def _full_collections(port: int) -> float:
    import re
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return float(re.search(r'python_gc_collections_total\{generation="2"\} ([0-9.e+]+)', text).group(1))


def test_a_quiet_node_still_collects_cycles_on_its_timer(forge_processes):
    """With the raised thresholds a quiet node would reach a full collection only after millions of
    allocations; ``gc_collect_interval`` runs one on a timer (seen on forge-observe's /metrics)."""
    pytest.importorskip("forge_observe")
    proc = forge_processes({"node": {"gc_collect_interval": 0.2, "gc_collect_growth": 0}, "app": {"example": False}})
    port = proc.ready_info()["ports"]["http"]
    first = _full_collections(port)
    wait_for(lambda: _full_collections(port) >= first + 3, timeout=30, what="three timed full collections")


def test_a_node_holding_still_skips_its_timed_collections(forge_processes):
    """A full collection scans everything alive: a node holding 5,000 sockets paused 0.5 s of CPU a
    minute to find nothing. With ``gc_collect_growth`` (default 5%) the timer collects only once the
    heap has changed that much since the last collection, and a node doing nothing does not."""
    pytest.importorskip("forge_observe")
    proc = forge_processes({"node": {"gc_collect_interval": 0.1}, "app": {"example": False}})
    port = proc.ready_info()["ports"]["http"]
    first = _full_collections(port)
    time.sleep(3.0)  # thirty timer ticks: without the growth check, thirty collections
    assert _full_collections(port) - first < 5


@pytest.mark.parametrize("growth, blocks, due", [
    (0.0, 1_000, True),  # 0: every interval, as before
    (0.05, 1_000, False), (0.05, 1_049, False), (0.05, 1_050, True),  # grew 5%: uncollected cycles may be there
    (0.05, 951, False), (0.05, 950, True),  # shrank 5%: a wave of closed connections left their cycles
])
def test_collect_timer_waits_for_the_heap_to_change(growth, blocks, due):
    from forge_kernel.node import CollectTimer

    timer = CollectTimer(growth, 1_000)
    assert timer.due(blocks) is due
    timer.collected(blocks)  # what is left after a collection is the new baseline
    assert timer.due(blocks) is (growth == 0)


def test_any_full_collection_resets_the_collect_timer():
    """The interpreter's own full collections (its thresholds) count as much as the timer's: right
    after one there is nothing for a timed collection to find, however much the heap grew before."""
    import gc

    from forge_kernel.node import CollectTimer

    timer = CollectTimer(0.05, 1)  # as if the heap had grown enormously since the timer's last collection
    gc.callbacks.append(timer.on_gc)
    try:
        gc.collect(1)  # a young collection is no full one
        assert timer.due(sys.getallocatedblocks())
        gc.collect()
        assert not timer.due(sys.getallocatedblocks())
    finally:
        gc.callbacks.remove(timer.on_gc)


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_timed_collections_freeze_survivors_and_a_rescan_still_frees_their_cycles():
    """A timed pass freezes what survives it, so the next one walks only newer objects; a cycle that
    was alive at a pass and dies later is found by the rescan (everything unfrozen and walked)."""
    import gc
    import weakref

    from forge_kernel.node import CollectTimer

    assert gc.get_freeze_count() == 0  # the test process owns no frozen heap to disturb
    timer = CollectTimer(0.05, sys.getallocatedblocks(), rescan_growth=0.25)
    try:
        survivors = [_Cycle() for _ in range(100)]
        timer.collect(rescan=False)
        assert gc.get_freeze_count() >= len(survivors)  # survivors left the collector's generations
        walked = sum(len(gc.get_objects(g)) for g in range(3))
        assert walked < gc.get_freeze_count()  # the next pass walks far less than everything alive

        dead = weakref.ref(survivors[0])
        young = _Cycle()
        young_dead = weakref.ref(young)
        del survivors, young  # all garbage now: frozen cycles and a young one
        timer.collect(rescan=False)
        assert young_dead() is None  # young cycles are collected by every timed pass
        assert dead() is not None  # a frozen cycle waits for the rescan...
        timer.collect(rescan=True)
        assert dead() is None and timer.rescans == 1  # ...which frees it
        assert gc.get_freeze_count() > 0  # and freezes the survivors again
    finally:
        gc.unfreeze()


def test_the_rescan_comes_once_the_heap_grew_by_its_fraction():
    """Frozen garbage stays allocated, so it grows the heap; past ``rescan_growth`` the timer's
    next pass walks the frozen objects too, and that pass is the new baseline."""
    import gc

    from forge_kernel.node import CollectTimer

    timer = CollectTimer(0.05, 1_000, rescan_growth=0.25)
    assert not timer.rescan_due(1_249) and timer.rescan_due(1_250)
    assert not timer.rescan_due(500)  # a heap that shrank grew no frozen garbage by itself...
    for _ in range(timer.rescan_every - 1):
        timer.tick()
    assert not timer.rescan_due(500)
    timer.tick()
    assert timer.rescan_due(500)  # ...but frozen cycles that died since are freed within rescan_every intervals
    try:
        before = timer.after_rescan
        timer.collect(rescan=False)
        assert timer.after_rescan == before and timer.rescans == 0  # a young pass keeps the baseline
        timer.collect()  # due (the test process's heap is far above 1,000 blocks): a rescan
        assert timer.rescans == 1 and timer.after_rescan == timer.after_last and timer.ticks == 0
        assert not timer.rescan_due(timer.after_rescan)
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("value", [-0.1, "some"])
def test_bad_gc_collect_growth_names_the_key(forge_processes, tmp_path, value):
    proc = forge_processes({"node": {"gc_collect_growth": value}}, env=plugin_env(tmp_path), ready=False)
    assert proc.proc.wait(60) == 2
    assert "gc_collect_growth" in proc.log()


@pytest.mark.parametrize("value", [0, "some"])
def test_bad_gc_rescan_growth_names_the_key(forge_processes, tmp_path, value):
    proc = forge_processes({"node": {"gc_rescan_growth": value}}, env=plugin_env(tmp_path), ready=False)
    assert proc.proc.wait(60) == 2
    assert "gc_rescan_growth" in proc.log()


@pytest.mark.parametrize("value", [-1, "soon", 86_401])
def test_bad_gc_collect_interval_names_the_key(forge_processes, tmp_path, value):
    proc = forge_processes({"node": {"gc_collect_interval": value}}, env=plugin_env(tmp_path), ready=False)
    assert proc.proc.wait(60) == 2
    assert "gc_collect_interval" in proc.log()


def test_bad_event_loop_setting_names_the_key(forge_processes, tmp_path):
    proc = forge_processes({"node": {"event_loop": "trio"}}, env=plugin_env(tmp_path), ready=False)
    assert proc.proc.wait(60) == 2
    assert "event_loop" in proc.log() and "'trio'" in proc.log() and "one of auto, uvloop, asyncio" in proc.log()


def test_unknown_role_stops_startup_naming_package(forge_processes):
    node = forge_processes({"node": {"roles": ["scheduler-x"]}}, ready=False)
    assert node.proc.wait(60) == 2
    assert "roles asks for 'scheduler-x'" in node.log()


async def test_nodes_starting_at_once_apply_each_migration_once(forge_processes, tmp_path):
    nodes = [forge_processes({"app": {"modules": ["kernel_app"], "example": False}}, node_id=f"c{i}",
                             env=plugin_env(tmp_path), ready=False) for i in range(3)]
    for n in nodes:
        n.wait_ready()
    conn = await asyncpg.connect(forge_processes.db_url)
    try:
        rows = await conn.fetch("SELECT namespace, version FROM forge_migrations ORDER BY 1, 2")
        assert [(r["namespace"], r["version"]) for r in rows] == [("kernel", 1), ("kernel_app", 1)]
        assert await conn.fetchval("SELECT count(*) FROM forge_nodes WHERE status = 'running'") == 3
    finally:
        await conn.close()


async def test_an_embedded_node_leaves_the_host_heap_unfrozen(forge_node):
    # only `forge-node start`, which owns its process, freezes the start-up heap
    import gc

    before, thresholds = gc.get_freeze_count(), gc.get_threshold()
    node = await forge_node(modules=[])
    assert node.status == "running"
    assert gc.get_freeze_count() == before and gc.get_threshold() == thresholds
