"""`forge-node dev`: saved code serves the next call, open WebSockets stay open and get only changed
results, a file that does not import keeps the old code and is reported (terminal and a typed `dev`
message), new migrations are applied, the TypeScript client is rewritten, drift is reported, and a
port in use names its holder."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import textwrap
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from cg_support import DevProcess
from forge_kernel.testing.procs import eventually, free_port, write_config

APP = '''\
from forge_kernel import field, model, query
from forge_kernel.migrations import from_package

MIGRATIONS = from_package("devapp.migrations", namespace="devapp")


@query(public=True)
async def version(ctx) -> int:
    return {version}


@query(public=True)
async def stable(ctx) -> str:
    return "same"
{extra}'''


def project(tmp_path: Path, port: int, version: int = 1, extra: str = "") -> Path:
    root = tmp_path / "proj"
    (root / "devapp" / "migrations").mkdir(parents=True)
    (root / "devapp" / "__init__.py").write_text("")
    (root / "devapp" / "migrations" / "__init__.py").write_text("")
    (root / "devapp" / "migrations" / "0001_start.sql").write_text("CREATE TABLE dev_start (id int PRIMARY KEY);\n")
    write_app(root, version, extra)
    write_config(root / "forge.toml", {
        "node": {"roles": ["gateway", "function", "realtime"]},
        "app": {"modules": ["devapp.app"], "example": False},
        "gateway": {"port": port}, "realtime": {"fallback_poll": 0.05},
        "codegen": {"ts_out": "client", "poll_interval": 0.05},
    })
    return root


def write_app(root: Path, version: int, extra: str = "") -> None:
    path = root / "devapp" / "app.py"
    tmp = path.with_name(".app.py.tmp")  # as an editor saves: the whole file at once
    tmp.write_text(APP.format(version=version, extra=extra))
    tmp.replace(path)


def call(port: int, name: str, args: dict | None = None) -> dict:
    return httpx.post(f"http://127.0.0.1:{port}/rpc/{name}", json=args or {}, timeout=10).json()


async def until(check, what: str, node=None):
    try:
        return await eventually(check, timeout=30, what=what)
    except AssertionError as exc:  # the dev node's own account of what it did says why
        if node is None:
            raise
        raise AssertionError(f"{exc}\n--- forge-node dev log (tail) ---\n{node.log()[-6000:]}") from None


class Socket:
    """A raw /ws connection recording every message it receives."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.messages: list[dict] = []
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            self.messages.append(json.loads(raw))

    def of(self, **match) -> list[dict]:
        return [m for m in self.messages if all(m.get(k) == v for k, v in match.items())]

    async def wait(self, what: str, **match) -> dict:
        async def found():
            got = self.of(**match)
            return got[-1] if got else None
        return await until(found, f"{what} ({match}); got {self.messages}")


@pytest.fixture
def dev(tmp_path, forge_db_url):
    procs: list[DevProcess] = []

    def start(root: Path, *args: str) -> DevProcess:
        p = DevProcess(root, {"FORGE_DATABASE__URL": forge_db_url, "FORGE_LOG__LEVEL": "INFO"}, *args)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


async def test_dev_reloads_code_on_save_and_keeps_websockets_open(dev, tmp_path):
    port = free_port()
    root = project(tmp_path, port)
    node = dev(root).wait_ready()
    assert call(port, "version") == {"data": 1}
    async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
        sock = Socket(ws)
        await ws.send(json.dumps({"type": "subscribe", "id": "v", "function": "version"}))
        await ws.send(json.dumps({"type": "subscribe", "id": "s", "function": "stable"}))
        await sock.wait("the first results", type="data", id="s")
        await sock.wait("the first results", type="data", id="v")

        # 1. a save: the next call runs the new code; the socket gets the changed result only
        write_app(root, 2)
        await until(lambda: asyncio.to_thread(lambda: call(port, "version") == {"data": 2}), "the new code")
        assert (await sock.wait("the changed result", type="data", id="v", data=2))
        notice = await sock.wait("the reload notice", type="dev", event="reloaded")
        assert "version" in notice["functions"]
        await ws.send(json.dumps({"type": "ping", "id": 1}))
        await sock.wait("a pong", type="pong", id=1)
        await asyncio.sleep(0.5)  # room for a push that must not come
        assert len(sock.of(type="data", id="s")) == 1, sock.messages

        # 2. a syntax error: the old code keeps serving, the terminal and the socket say where
        broken = APP.format(version=3, extra="") + "\nbroken = (\n"
        line = broken.splitlines().index("broken = (") + 1
        (root / "devapp" / "app.py").write_text(broken)
        failed = await sock.wait("the failure notice", type="dev", event="reload_failed")
        assert failed["file"].endswith("devapp/app.py") and failed["line"] == line, failed
        assert "SyntaxError" in failed["message"]
        assert call(port, "version") == {"data": 2}
        assert f"devapp/app.py:{line}: SyntaxError" in node.log() and "the previous code keeps serving" in node.log()

        # 3. fixed: serving again, on the same socket
        write_app(root, 3)
        await sock.wait("the result of the fixed code", type="data", id="v", data=3)
        assert not ws.close_code
    assert "Traceback" not in node.log()


async def test_dev_applies_new_migrations_writes_the_client_and_reports_drift(dev, tmp_path):
    port = free_port()
    root = project(tmp_path, port)
    node = dev(root).wait_ready()
    assert "stable: fn<" in (root / "client" / "api.ts").read_text()  # written before the node was ready

    # a migration and a query over its table, saved while dev runs
    (root / "devapp" / "migrations" / "0002_notes.sql").write_text(
        "CREATE TABLE notes (id bigint PRIMARY KEY, body text NOT NULL);\nINSERT INTO notes VALUES (1, 'hi');\n")
    write_app(root, 1, extra=textwrap.dedent('''

        @model(table="notes")
        class Note:
            id: int
            body: str
            pinned: bool = field(default=False)


        @query(public=True)
        async def notes(ctx) -> list[str]:
            return [r["body"] for r in await ctx.db.fetch("SELECT body FROM notes ORDER BY id")]
        '''))

    async def served():
        return await asyncio.to_thread(lambda: call(port, "notes")) == {"data": ["hi"]}

    await until(served, "the query over the new migration's table", node)
    assert "applied devapp/0002_notes" in node.log()
    api = await until(lambda: asyncio.to_thread(
        lambda: "notes: fn<\"query\", Record<string, never>, string[]>" in (root / "client" / "api.ts").read_text()),
        "the regenerated TypeScript client")
    assert api
    # the model has a column the table lacks: reported, not applied
    await until(lambda: asyncio.to_thread(lambda: "models differ from the database" in node.log()), "a drift report")
    assert "notes.pinned: column is missing" in node.log()


def test_dev_names_the_process_holding_its_port(dev, tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        p = dev(project(tmp_path, port))
        assert p.proc.wait(60) == 2
        log = p.log()
        assert f"[gateway] port {port} on 127.0.0.1 is in use by pid {os.getpid()}" in log, log
        assert "--port 0" in log
    finally:
        holder.close()


def test_dev_names_the_module_that_does_not_import(dev, tmp_path):
    root = project(tmp_path, free_port())
    (root / "devapp" / "app.py").write_text("import no_such_module_here\n")
    p = dev(root)
    assert p.proc.wait(60) == 1
    log = p.log()
    assert "cannot import app module 'devapp.app'" in log and "no_such_module_here" in log, log
    assert "Traceback" not in log
