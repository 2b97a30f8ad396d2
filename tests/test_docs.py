"""The documentation is the repository's own and tells the truth: links stay inside the
repository, every ``--json`` output has the shape its documentation shows, and every code
example (markdown and docstrings) runs (``tests/test_docs_examples.py``)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from forge_kernel import Auth
from forge_kernel.cli import build_parser
from forge_kernel.plugins import PluginLoader
from forge_kernel.testing import eventually
from forge_kernel.testing.procs import write_config

REPO = Path(__file__).resolve().parent.parent


def markdown_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md", "**/*.md"], cwd=REPO, capture_output=True, text=True, check=True)
    return sorted({REPO / line for line in out.stdout.split()})


_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_PATH = re.compile(r"`([^`\s]*\.\./[^`\s]*)`")


def test_every_markdown_link_points_inside_the_repository():
    problems = []
    for md in markdown_files():
        text = md.read_text()
        where = md.relative_to(REPO)
        for target in _LINK.findall(text) + _CODE_PATH.findall(text):
            if re.match(r"^[a-z]+://", target) or target.startswith(("#", "mailto:")):
                continue
            path = (md.parent / target.split("#")[0]).resolve()
            if not path.is_relative_to(REPO):
                problems.append(f"{where}: {target} points outside the repository")
            elif not path.exists():
                problems.append(f"{where}: {target} does not exist")
        for outside in ("/work/", "shared/DESIGN", "DESIGN.md"):
            if outside in text:
                problems.append(f"{where}: mentions {outside!r}, which users of the repository do not have")
    assert not problems, "\n".join(problems)


def test_the_architecture_document_is_linked_from_the_readme():
    assert (REPO / "docs" / "architecture.md").exists()
    assert "(docs/architecture.md)" in (REPO / "README.md").read_text()


# --- every --json output has a documented shape ------------------------------------------------
def cli_leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """``(("jobs", "show"), parser)`` for every command that takes no further sub-command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from cli_leaves(child, path + (name,))


def json_commands() -> list[str]:
    """Every command that prints JSON: those with ``--json`` (required positional arguments as their
    upper-case names, e.g. ``forge-node traces show TRACE_ID --json``), and ``jobs show``
    (always JSON)."""
    out = []
    for path, leaf in cli_leaves(build_parser(PluginLoader().load())):
        if "--json" in leaf._option_string_actions:
            extra = " --status" if path == ("migrate",) else ""
            positional = [a.dest.upper() for a in leaf._actions if not a.option_strings and a.nargs not in ("?", "*")
                          and not isinstance(a, argparse._SubParsersAction)]
            out.append(" ".join(("forge-node", *path, *positional)) + extra + " --json")
    return out + ["forge-node jobs show ID"]


_FENCE = re.compile(r"```json\n(.*?)```", re.S)
_DOCUMENTED = re.compile(r"`(forge-node [^`]+)`")


def documented_shapes() -> dict[str, tuple[str, Any]]:
    """``command -> (where, example)`` for each ```json block right after a line naming a command."""
    out: dict[str, tuple[str, Any]] = {}
    for md in markdown_files():
        text = md.read_text()
        for m in _FENCE.finditer(text):
            before = [x for x in text[:m.start()].splitlines() if x.strip()]
            for named in _DOCUMENTED.findall(before[-1]) if before else []:
                out[named] = (f"{md.relative_to(REPO)}", json.loads(m.group(1)))
    return out


def check_shape(actual: Any, example: Any, where: str, top: bool = True) -> list[str]:
    """Keys as documented (nested objects may leave keys out; ``"<name>"`` keys stand for any
    key; ``"..."`` for any value); numbers, text and booleans of the documented kind."""
    if example == "..." or actual is None or example is None:
        return []
    if isinstance(example, dict) and isinstance(actual, list) and top:  # "a list of these"
        return [p for i, v in enumerate(actual) for p in check_shape(v, example, f"{where}[{i}]", top)]
    if isinstance(example, dict):
        if not isinstance(actual, dict):
            return [f"{where}: expected an object, got {actual!r}"]
        wild = [k for k in example if k.startswith("<")]
        if wild:
            return [p for k, v in actual.items() for p in check_shape(v, example[wild[0]], f"{where}.{k}", False)]
        problems = [f"{where}: undocumented key {k!r}" for k in actual if k not in example]
        if top:
            problems += [f"{where}: documented key {k!r} missing" for k in example if k not in actual]
        return problems + [p for k, v in actual.items() if k in example
                           for p in check_shape(v, example[k], f"{where}.{k}", False)]
    if isinstance(example, list):
        if not isinstance(actual, list):
            return [f"{where}: expected a list, got {actual!r}"]
        return [p for i, v in enumerate(actual) for p in check_shape(v, example[0], f"{where}[{i}]", top)] if example else []
    kinds = (bool,) if isinstance(example, bool) else (int, float) if isinstance(example, (int, float)) else (str,)
    if not isinstance(actual, kinds) or (isinstance(actual, bool) and not isinstance(example, bool)):
        return [f"{where}: expected {type(example).__name__} like {example!r}, got {actual!r}"]
    return []


def test_check_shape_finds_what_differs():
    doc = [{"id": 1, "name": "x", "ports": {"http": 8080}, "info": {"<key>": "..."}}]
    assert check_shape([{"id": 2, "name": "y", "ports": {}, "info": {"a": [1]}}], doc, "s") == []
    assert check_shape([{"id": "2", "name": "y", "ports": {"ws": 1}, "extra": 0}], doc, "s") == [
        "s[0]: undocumented key 'extra'", "s[0]: documented key 'info' missing",
        "s[0].id: expected int like 1, got '2'", "s[0].ports: undocumented key 'ws'"]


@pytest.fixture
async def busy_cluster(forge_node, forge_db_url, tmp_path):
    """A node with every role, a scheduler leader, a cron run, a live job and a dead one."""
    from forge_worker import JobQueue

    node = await forge_node(config={"gateway": {"port": 0}, "scheduler": {"tick_interval": 0.2},
                                    "worker": {"poll_interval": 0.1}, "app": {"example": True}})
    from forge_scheduler import Crons, crons_of

    crons = Crons(node.pool, crons_of(node.registry).values())
    await eventually(lambda: _leader(node), timeout=60, what="a scheduler leader")
    await crons.trigger("count_open_todos", requested_by="docs")
    await eventually(lambda: node.pool.fetchval("SELECT count(*) FROM forge_cron_runs"), timeout=60, what="a cron run")
    queue = JobQueue(node.pool)
    live = await queue.enqueue("send_reminder", {"todo_id": "4b0b6d4e-4e0b-4e5f-9a55-6d1f2b0e2a1c"}, delay=3600)
    await queue.enqueue("no_such_job", {})
    await eventually(lambda: node.pool.fetchval("SELECT count(*) FROM forge_jobs WHERE status = 'dead'"),
                     timeout=60, what="a dead-lettered job")
    await node.executor.call("add_todo", {"title": "write docs"}, Auth(user_id="ann", kind="user"))
    from forge_worker import WorkflowClient

    # a run of a workflow no node defines: it waits, pending, for a worker that knows it
    await WorkflowClient(node.pool).start("docs_flow", {"step": 1}, correlation_key="docs")
    cfg = write_config(tmp_path / "cli.toml", {"database": {"url": forge_db_url}})
    words = {"config": cfg, "ID": str(live), "NAME": "count_open_todos"}
    if "observe" in {p.name for p in node.loader.loaded()}:  # forge-observe keeps the dead job's trace
        words["TRACE_ID"] = await eventually(lambda: node.pool.fetchval("SELECT trace_id FROM forge_obs_spans"),
                                             timeout=60, what="a stored trace")
    return words


async def _leader(node) -> bool:
    return bool(await node.pool.fetchval("SELECT node_id IS NOT NULL FROM forge_leaders"))


async def test_every_json_output_has_its_documented_shape(busy_cluster):
    shapes = documented_shapes()
    commands = json_commands()
    undocumented = [c for c in commands if c not in shapes]
    assert not undocumented, ("document the JSON shape of these commands (a ```json block right after a line "
                              f"naming the command in backticks): {undocumented}")
    env = {**os.environ, "FORGE_CONFIG": str(busy_cluster["config"])}

    def run(command: str) -> tuple[str, subprocess.CompletedProcess]:
        argv = [busy_cluster.get(w, w) for w in command.split()[1:]]
        return command, subprocess.run([sys.executable, "-m", "forge_kernel.cli", *argv], capture_output=True,
                                       text=True, timeout=120, env=env)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, commands))
    problems = []
    for command, out in results:
        if out.returncode not in (0, 1) or not out.stdout.strip():  # migrate --status exits 1 with pending ones
            problems.append(f"{command}: exit {out.returncode}: {out.stderr[-500:]}")
            continue
        try:
            actual = json.loads(out.stdout)
        except json.JSONDecodeError:  # JSON lines (forge-node logs --json): a list of objects
            actual = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        assert actual, f"{command} printed nothing to compare: {out.stdout}"
        where, example = shapes[command]
        problems += [f"{p} (documented in {where})" for p in check_shape(actual, example, command)]
    assert not problems, "\n".join(problems)
