"""Database errors caused by the caller's data are INVALID_ARGUMENT naming what was refused, logged
at INFO without a traceback - never a 500 (issue 19, item 7)."""

from __future__ import annotations

import time

import httpx
import jwt
import pytest
from loguru import logger

from forge_kernel import Auth
from forge_kernel.errors import ForgeError
from forge_kernel.plugins import PluginLoader

import kernel_app

SECRET = "db-errors-secret-db-errors-secret-0123"


@pytest.mark.parametrize("kind, value, says", [
    ("numeric", "99999", "out of range"),
    ("datetime", "not a date", "invalid input syntax for type timestamp"),
    ("truncation", "abcdef", "value too long"),
    ("not_null", "x", "column v"),
    ("foreign_key", "xy", "constraint refused_child_p_fkey"),
    ("nul", "a\x00b", "0x00"),
    ("int32", str(2**40), "int32"),
])
async def test_refused_data_is_an_invalid_argument(forge_node, kind, value, says):
    loader = PluginLoader(env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1"}).load(
        extra=[("test-dispatch", kernel_app.DispatcherPlugin())])
    node = await forge_node(modules=["kernel_app"], loader=loader)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m), level="INFO", format="{level} {message}")
    try:
        with pytest.raises(ForgeError) as ei:
            await node.executor.call("refused", {"kind": kind, "value": value}, Auth(user_id="u", kind="user"))
    finally:
        logger.remove(sink)
    assert ei.value.code == "INVALID_ARGUMENT" and says in ei.value.message, ei.value.message
    assert ei.value.message.startswith("refused: invalid argument: ")
    logged = "".join(lines)
    assert "INFO refused: the database refused the call's data" in logged and "Traceback" not in logged, logged


async def test_example_app_answers_400_for_a_nul_byte_or_a_title_its_check_refuses(forge_processes):
    node = forge_processes({"node": {"roles": ["gateway", "function"]}, "gateway": {"port": 0, "jwt_secret": SECRET}},
                           env={"FORGE_LOG__LEVEL": "INFO"})
    token = jwt.encode({"sub": "ann", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    base = f"http://127.0.0.1:{node.ready_info()['ports']['http']}"
    async with httpx.AsyncClient(base_url=base, timeout=20, headers={"Authorization": f"Bearer {token}"}) as http:
        nul = await http.post("/rpc/add_todo", json={"title": "milk\x00"})
        too_long = await http.post("/rpc/add_todo", json={"title": "x" * 501})
        fine = await http.post("/rpc/add_todo", json={"title": "milk"})
    assert nul.status_code == 400 and nul.json()["error"]["code"] == "INVALID_ARGUMENT", nul.text
    assert "0x00" in nul.json()["error"]["message"]
    assert too_long.status_code == 400, too_long.text
    error = too_long.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT" and "todos_title_check" in error["message"]
    assert error["details"]["constraint"] == "todos_title_check" and error["details"]["table"] == "todos"
    assert fine.status_code == 200, fine.text
    node.terminate()
    log = node.log()
    assert "add_todo: the database refused the call's data (23514; constraint todos_title_check" in log
    assert "Traceback" not in log and "ERROR" not in log, log


async def test_a_call_whose_database_connection_is_lost_is_unavailable_not_internal(forge_node):
    """PostgreSQL restarting under a call is not the function's fault: UNAVAILABLE (503, retry),
    one warning line, no traceback (found by bench/soak: every call during a restart was a 500
    with a traceback, and live queries re-run then ended their subscriptions)."""
    import asyncio

    loader = PluginLoader(env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1"}).load(
        extra=[("test-dispatch", kernel_app.DispatcherPlugin())])
    node = await forge_node(modules=["kernel_app"], loader=loader)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m), level="INFO", format="{level} {message}")
    try:
        call = asyncio.create_task(node.executor.call("sleeps_in_db", {"seconds": 30}, Auth()))
        async with node.pool.acquire() as conn:
            for _ in range(200):
                if await conn.fetchval("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                       "WHERE query LIKE 'SELECT pg_sleep%' AND pid <> pg_backend_pid()"):
                    break
                await asyncio.sleep(0.05)
        with pytest.raises(ForgeError) as ei:
            await asyncio.wait_for(call, 20)
    finally:
        logger.remove(sink)
    assert ei.value.code == "UNAVAILABLE", ei.value.message
    assert "the database is unavailable" in ei.value.message
    logged = "".join(lines)
    assert "sleeps_in_db: the database is unavailable" in logged and "Traceback" not in logged, logged
