"""What a new user runs into first: --config anywhere, an app beside forge.toml, one forge.toml
for a whole cluster, a node without the package it needs, a failed start, the example app next
to plugins' functions, ``forge-node status --json``, and CLI errors as one line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest

from forge_kernel.cli import build_parser
from forge_kernel.config import KERNEL_SECTIONS, load_config
from forge_kernel.errors import ConfigError, StartupError
from forge_kernel.node import EXAMPLE_MODULE, app_modules
from forge_kernel.plugins import SECTION_PACKAGES, PluginLoader
from forge_kernel.testing import free_port, wait_for
from forge_kernel.testing.procs import write_config

from test_docs import cli_leaves

FORGE_NODE = str(Path(sys.executable).parent / "forge-node")
APP = '''
from forge_kernel import query

MIGRATIONS = []

@query(public=True)
async def bookmarks_count(ctx) -> int:
    return 41 + 1
'''


def _clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without what would make an app importable by accident."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FORGE_CONFIG")}
    env.update(extra)
    return env


def _argv(path: tuple[str, ...], parser: argparse.ArgumentParser) -> list[str]:
    """``path`` plus a plausible value for each required positional argument."""
    argv = list(path)
    for a in parser._actions:
        if not a.option_strings and a.nargs not in ("?", "*", argparse.PARSER) and a.dest != "help":
            argv.append("1" if a.type is not None and a.type is not str else "x")
        elif a.option_strings and a.required:
            argv += [a.option_strings[0], "1" if a.type is not None and a.type is not str else "x"]
    return argv


# --- 1. --config before or after any sub-command ----------------------------------------------
def test_config_option_is_accepted_after_every_sub_command():
    parser = build_parser(PluginLoader().load())
    leaves = list(cli_leaves(parser))
    assert {("start",), ("jobs", "show"), ("crons", "leader")} <= {p for p, _ in leaves}  # plugins' too
    for path, leaf in leaves:
        argv = _argv(path, leaf)
        assert parser.parse_args([*argv, "--config", "after.toml"]).config == "after.toml", path
        assert parser.parse_args(["--config", "before.toml", *argv]).config == "before.toml", path
        assert parser.parse_args(argv).config is None, path


# --- 2. an app beside forge.toml is importable; 1 for real ------------------------------------
def test_app_beside_forge_toml_starts_with_config_after_start(tmp_path, forge_db_url):
    app_dir = tmp_path / "myapp"
    app_dir.mkdir()
    (app_dir / "bookmarks.py").write_text(APP)
    port = free_port()
    write_config(app_dir / "forge.toml", {
        "database": {"url": forge_db_url}, "app": {"modules": ["bookmarks"]},
        "node": {"roles": ["gateway", "function"]}, "gateway": {"port": port}})
    ready = tmp_path / "ready.json"
    # the console script (not python -m, which would put the working directory on sys.path), run
    # from another folder, with no PYTHONPATH
    proc = subprocess.Popen([FORGE_NODE, "start", "--config", "myapp/forge.toml"], cwd=tmp_path,
                            env=_clean_env(FORGE_READY_FILE=str(ready)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, 90, what="node ready")
        assert proc.poll() is None, proc.stdout.read()
        import httpx

        r = httpx.post(f"http://127.0.0.1:{port}/rpc/bookmarks_count", json={}, timeout=30)
        assert r.json() == {"data": 42}
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out


def test_working_directory_is_importable_without_a_config_file(tmp_path, forge_db_url):
    (tmp_path / "bookmarks.py").write_text(APP.replace("MIGRATIONS = []", textwrap.dedent('''
        from forge_kernel.migrations import Migration
        MIGRATIONS = [Migration("bookmarks", 1, "bookmarks", "CREATE TABLE bookmarks (url text PRIMARY KEY)")]''')))
    out = subprocess.run([FORGE_NODE, "migrate"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=_clean_env(FORGE_DATABASE__URL=forge_db_url, FORGE_APP__MODULES="bookmarks"))
    assert out.returncode == 0, out.stderr
    assert "bookmarks 0001_bookmarks" in out.stdout


# --- 3. one forge.toml for a cluster -----------------------------------------------------------
def test_sections_of_packages_not_loaded_here_are_ignored_unknown_ones_refused(tmp_path):
    path = tmp_path / "forge.toml"
    path.write_text('[node]\nid = "a"\n[mesh]\nport = 7000\n[codegen]\nout = "web"\n')
    foreign = {s: p for s, p in SECTION_PACKAGES.items() if s in ("mesh", "codegen", "gateway")}
    cfg = load_config(KERNEL_SECTIONS, path=path, env={"FORGE_GATEWAY__PORT": "9"}, foreign=foreign)
    assert cfg.node.id == "a"
    assert cfg.ignored == {"forge-mesh": ("mesh",), "forge-codegen": ("codegen",), "forge-gateway": ("gateway",)}

    path.write_text('[node]\nid = "a"\n[gatway]\nport = 7000\n')
    with pytest.raises(ConfigError) as ei:
        load_config(KERNEL_SECTIONS, path=path, env={}, foreign=foreign)
    assert f"[gatway]: unknown section (in {path})" in str(ei.value)


def test_config_errors_say_whether_the_file_or_which_variable_set_the_value(tmp_path):
    path = tmp_path / "forge.toml"
    path.write_text('[node]\nheartbeat_interval = "fast"\n')
    env = {"FORGE_NODE__DEAD_AFTER": "-1", "FORGE_GATWAY__PORT": "80", "FORGE_LOG__LEVL": "INFO"}
    with pytest.raises(ConfigError) as ei:
        load_config(KERNEL_SECTIONS, path=path, env=env, foreign={})
    lines = str(ei.value).splitlines()

    def line(needle: str) -> str:
        return next(x for x in lines if needle in x)

    assert f"(in {path})" in line("heartbeat_interval = 'fast'")
    assert "unknown section (set by environment variable FORGE_GATWAY__PORT)" in line("[gatway] port")
    assert "(set by environment variable FORGE_LOG__LEVL)" in line("[log] levl")

    path.write_text('[node]\nheartbeat_interval = 0.5\n')  # a bad value (checked once the types are right)
    with pytest.raises(ConfigError) as ei:
        load_config(KERNEL_SECTIONS, path=path, env={"FORGE_NODE__DEAD_AFTER": "-1"}, foreign={})
    assert "dead_after = -1: expected a number between 0.5 and 3600, got -1.0 (set by environment variable " \
           "FORGE_NODE__DEAD_AFTER)" in str(ei.value)


def test_a_worker_only_node_starts_with_the_whole_clusters_config(forge_processes):
    cluster = {"gateway": {"port": 8080, "max_body_bytes": 1000}, "scheduler": {"tick_interval": 0.5},
               "realtime": {"fallback_poll": 1.0}, "worker": {"concurrency": 4}, "mesh": {"port": 7000},
               "hello": {"greeting": "hi"}}
    node = forge_processes(cluster, env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1", "FORGE_PLUGINS": "forge_worker.hooks",
                                         "FORGE_LOG__LEVEL": "INFO"})
    assert node.ready_info()["roles"] == ["worker"]
    log = node.log()
    assert "config sections [gateway] ignored: they belong to forge-gateway, whose plugin is not loaded" in log
    assert "config sections [hello] ignored: they belong to forge-hello, which is not installed" in log
    assert "[scheduler] ignored: they belong to forge-scheduler" in log
    assert "[worker]" not in log.split("ignored")[0].rsplit("\n", 1)[-1]


# --- 5. an app with jobs on a node that cannot store them --------------------------------------
async def test_app_with_jobs_on_a_node_without_a_job_store_stops_at_start(forge_node):
    loader = PluginLoader(env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1", "FORGE_PLUGINS": "forge_gateway.hooks"}).load()
    with pytest.raises(StartupError) as ei:
        await forge_node(modules=[EXAMPLE_MODULE], loader=loader, config={"gateway": {"port": 0}})
    msg = str(ei.value)
    assert "pip install forge-worker" in msg and "@job send_reminder" in msg and "@cron count_open_todos" in msg


async def test_dispatch_without_a_job_store_is_unavailable_not_internal(forge_node):
    from forge_kernel import Auth
    from forge_kernel.errors import ForgeError

    loader = PluginLoader(env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1"}).load()
    node = await forge_node(modules=["newcomer_app"], loader=loader)  # no role runs: nothing to refuse
    with pytest.raises(ForgeError) as ei:
        await node.executor.call("dispatch_by_name", {}, Auth(user_id="u", kind="user"))
    assert ei.value.code == "UNAVAILABLE" and ei.value.status == 503
    assert "pip install forge-worker" in ei.value.message


# --- 6. a failed start prints only the real error ----------------------------------------------
def test_failed_start_prints_only_the_real_error(forge_processes):
    node = forge_processes({"app": {"modules": ["no_such_module_here"]}}, ready=False,
                           env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1"})
    node.proc.wait(60)
    log = node.log()
    assert node.proc.returncode == 2
    assert "forge-node: error: [app] modules: cannot import 'no_such_module_here'" in log
    assert "could not record node status" not in log and "Traceback" not in log, log


# --- 12. the example app beside plugins' functions ----------------------------------------------
def test_example_app_is_served_beside_plugin_functions():
    loader = PluginLoader(env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1", "FORGE_PLUGINS": "newcomer_app"}).load()
    cfg = load_config(loader.config_sections(), data={}, env={})
    assert app_modules(cfg, loader) == [EXAMPLE_MODULE, "newcomer_app"]
    cfg = load_config(loader.config_sections(), data={"app": {"example": False}}, env={})
    assert app_modules(cfg, loader) == ["newcomer_app"]
    cfg = load_config(loader.config_sections(), data={"app": {"modules": ["kernel_app"]}}, env={})
    assert app_modules(cfg, loader) == ["kernel_app", "newcomer_app"]


async def test_example_query_answers_on_a_node_with_a_plugin_app(forge_node):
    from forge_kernel import ANONYMOUS

    loader = PluginLoader(env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1", "FORGE_PLUGINS": "newcomer_app"}).load()
    node = await forge_node(loader=loader)
    assert await node.executor.call("count_open", {}, ANONYMOUS) == 0  # the README's curl
    assert await node.executor.call("newcomer_hello", {}, ANONYMOUS) == "hello"


# --- 11. forge-node status --json ---------------------------------------------------------------
async def test_status_json_numbers_and_a_killed_node_shown_unresponsive(forge_processes, tmp_path):
    env = {"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    node = forge_processes({"node": {"heartbeat_interval": 0.3, "dead_after": 600}, "app": {"example": False}}, env=env)
    cfg = write_config(tmp_path / "status.toml", {"database": {"url": forge_processes.db_url}})

    def status() -> dict:
        out = subprocess.run([sys.executable, "-m", "forge_kernel.cli", "status", "--json", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=60, env=_clean_env(**env))
        assert out.returncode == 0, out.stderr
        return {r["id"]: r for r in json.loads(out.stdout)}["n1"]

    row = status()
    assert row["status"] == "running" and row["pid"] == node.pid
    assert isinstance(row["heartbeat_age"], float) and 0 <= row["heartbeat_age"] < 60
    node.kill()
    # dead_after is ten minutes, but three missed heartbeats already say what happened
    row = wait_for(lambda: (r := status())["status"] == "unresponsive" and r, 30, interval=0.3,
                   what="the killed node shown unresponsive")
    assert row["heartbeat_age"] > 0.9


# --- issue 19 item 11: bad input and an unreachable database -----------------------------------
def _one_line_error(out: subprocess.CompletedProcess) -> str:
    text = (out.stdout + out.stderr).strip()
    assert out.returncode != 0, text
    assert "Traceback" not in text, text
    lines = [x for x in text.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("forge-node: error: "), text
    return lines[0]


def _run_all(argvs: list[list[str]], env: dict[str, str], cwd: Path) -> list[subprocess.CompletedProcess]:
    def run(argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "forge_kernel.cli", *argv], capture_output=True, text=True,
                              timeout=120, env=env, cwd=cwd)

    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(run, argvs))


@pytest.mark.parametrize("argv, needle", [
    (["jobs", "show", "99999999999999999999"], "argument id: a job id (a whole number) from 1 to"),
    (["jobs", "retry", "99999999999999999999"], "from 1 to 9223372036854775807 expected"),
    (["jobs", "cancel", "-3"], "expected, got -3"),
    (["jobs", "show", "seven"], "expected, got 'seven'"),
    (["jobs", "list", "--limit", "0"], "argument --limit"),
    (["crons", "history", "--limit", "100000000000"], "argument --limit"),
    (["jobs", "list", "--status", "finished"], "invalid choice: 'finished'"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
    (["status", "--config", "/no/such/forge.toml"], "config file /no/such/forge.toml (from --config) does not exist"),
])
def test_bad_command_lines_get_one_line_and_exit_2(argv, needle, tmp_path):
    out = subprocess.run([sys.executable, "-m", "forge_kernel.cli", *argv], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env=_clean_env())
    assert needle in _one_line_error(out) and out.returncode == 2


def test_every_command_against_an_unreachable_database_says_so_in_one_line(tmp_path):
    url = f"postgresql://forge:hunter2secret@127.0.0.1:{free_port()}/forge"
    parser = build_parser(PluginLoader().load())
    # commands that never open the database: listing plugins, and forge-codegen's project scaffold
    # and TypeScript generation (they read only files)
    offline = {("plugins",), ("new",), ("generate", "ts"), ("mesh", "init-ca"), ("mesh", "issue-cert")}
    needs = {("mesh", "logs"): ["--follow"], ("logs",): ["--follow"]}  # without it, a usage error first
    argvs = [_argv(path, leaf) + needs.get(path, []) for path, leaf in cli_leaves(parser) if path not in offline]
    argvs.append(["migrate", "--status"])
    env = _clean_env(FORGE_DATABASE__URL=url, FORGE_LOG__LEVEL="WARNING")
    for argv, out in zip(argvs, _run_all(argvs, env, tmp_path)):
        line = _one_line_error(out)
        assert "127.0.0.1" in line or "PostgreSQL" in line, (argv, line)
        assert "hunter2secret" not in line, (argv, line)


def test_commands_before_migrate_say_to_migrate_and_empty_stats_say_so(tmp_path, forge_db_url):
    env = _clean_env(FORGE_DATABASE__URL=forge_db_url)
    for out in _run_all([["jobs", "list"], ["jobs", "stats"]], env, tmp_path):
        assert "forge-node migrate" in _one_line_error(out)
    assert _run_all([["migrate"]], env, tmp_path)[0].returncode == 0
    text, as_json = _run_all([["jobs", "stats"], ["jobs", "stats", "--json"]], env, tmp_path)
    assert text.returncode == 0 and text.stdout.strip() == "no live jobs (nothing scheduled, pending, running or dead-lettered)"
    assert as_json.returncode == 0 and json.loads(as_json.stdout) == {}
