"""`forge-node new`: a runnable project whose tests pass at once, a Svelte page that compiles cleanly
against the generated client, and refusals that name the problem."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "forge_kernel.cli"]


def new(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "new", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_new_project_passes_its_own_tests_on_an_embedded_postgresql(tmp_path):
    proc = new(tmp_path, "todo-board")
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "todo-board"
    mask = os.umask(0)
    os.umask(mask)
    assert root.stat().st_mode & 0o777 == 0o777 & ~mask  # not the 0700 of the staging folder
    for rel in ["forge.toml", "README.md", "pyproject.toml", ".gitignore", "todo_board/app.py",
                "todo_board/migrations/0001_tasks.sql", "tests/test_app.py"]:
        assert (root / rel).is_file(), rel
    app = (root / "todo_board" / "app.py").read_text()
    for what in ["@model", "@query", "@mutation", "ctx.dispatch(", "@job", "@cron("]:
        assert what in app
    readme = (root / "README.md").read_text()
    assert "forge-node dev" in readme and "pytest" in readme
    assert "forge-node dev" in proc.stdout and "pytest" in proc.stdout
    # the project's own pytest, as a user runs it: its own embedded PostgreSQL, no help from this suite
    env = {k: v for k, v in os.environ.items() if k not in ("FORGE_TEST_DATABASE_URL", "PYTHONPATH")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "3 passed" in run.stdout
    assert not list(tmp_path.glob(".todo-board.*")), "the staging folder was left behind"


def test_new_with_svelte_writes_a_page_that_compiles_cleanly_against_the_generated_client(js_tools, tmp_path):
    proc = new(tmp_path, "shop", "--frontend", "svelte")
    assert proc.returncode == 0, proc.stderr
    web = tmp_path / "shop" / "web"
    for rel in ["package.json", "index.html", "vite.config.ts", "src/main.ts", "src/App.svelte",
                "src/lib/forge/api.ts", "src/lib/forge/runtime.ts", "src/lib/forge/svelte.svelte.ts"]:
        assert (web / rel).is_file(), rel
    compiled = js_tools.svelte_compile(web / "src" / "App.svelte", tmp_path / "App.js")
    assert compiled.returncode == 0 and compiled.stdout == "", compiled.stdout + compiled.stderr
    # the page's script type-checks against the generated client (runes typed by svelte's own types)
    script = re.search(r'<script lang="ts">(.*?)</script>', (web / "src" / "App.svelte").read_text(), re.S).group(1)
    (web / "src" / "page.svelte.ts").write_text(script + "\nexport { tasks, add };\n")
    (web / "node_modules").symlink_to(js_tools.JS / "node_modules")
    checked = js_tools.tsc(web, ["src/lib/forge/*.ts", "src/page.svelte.ts"])
    assert checked.returncode == 0, checked.stdout
    # the committed client is what `generate ts --check` expects
    check = subprocess.run([*CLI, "generate", "ts", "--check"], cwd=tmp_path / "shop", capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stderr


def test_new_refuses_a_folder_that_is_not_empty_unless_forced(tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    proc = new(tmp_path, "busy")
    assert proc.returncode == 2
    assert "busy is not empty (1 entries: notes.txt)" in proc.stderr and "--force" in proc.stderr
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    forced = new(tmp_path, "busy", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (target / "notes.txt").read_text() == "mine"
    assert (target / "busy" / "app.py").is_file()


@pytest.mark.parametrize("name, message", [
    ("1st", "use letters, digits"),
    ("my app", "use letters, digits"),
    ("class", "is a Python keyword"),
    ("json", "a module named 'json' is already importable"),
])
def test_new_rejects_names_that_cannot_be_a_package(tmp_path, name, message):
    proc = new(tmp_path, name)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_templates_ship_inside_the_package():
    import forge_codegen.scaffold as scaffold

    package, files = scaffold.render("demo", frontend="svelte")
    assert package == "demo"
    assert "demo/app.py" in files and "web/src/App.svelte" in files
    assert all("__NAME__" not in t and "__PACKAGE__" not in t for t in files.values())
