"""The function executor: transactions, outbox, argument binding, auth, timeouts, errors, read sets."""

import uuid

import pytest

from forge_kernel import Auth
from forge_kernel.db import TableRead
from forge_kernel.errors import ForgeError
from forge_kernel.plugins import PluginLoader

import kernel_app


@pytest.fixture
async def node(forge_node):
    loader = PluginLoader(env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1"}).load(extra=[("test-dispatch", kernel_app.DispatcherPlugin())])
    return await forge_node(modules=["kernel_app"], loader=loader)


async def err(coro):
    with pytest.raises(ForgeError) as ei:
        await coro
    return ei.value


async def test_mutation_and_its_jobs_commit_together(node):
    ex = node.executor
    note = await ex.call("add_note", {"owner": "ann", "body": "hi"}, Auth(user_id="ann", kind="user"))
    assert note["owner"] == "ann"
    jobs = await node.pool.fetch("SELECT name, args, caller FROM test_jobs")
    assert [(j["name"], j["args"], j["caller"]) for j in jobs] == [("remember", {"note_id": note["id"]}, "ann")]


async def test_rolled_back_mutation_leaves_no_row_and_no_job(node):
    e = await err(node.executor.call("add_note", {"owner": "ann", "body": "hi", "fail": True}))
    assert e.code == "CONFLICT"
    assert await node.pool.fetchval("SELECT count(*) FROM notes") == 0
    assert await node.pool.fetchval("SELECT count(*) FROM test_jobs") == 0


async def test_query_is_read_only_and_node_survives(node):
    e = await err(node.executor.call("sneaky_write", {}))
    assert e.code == "INTERNAL" and "cannot write" in e.message
    assert await node.pool.fetchval("SELECT count(*) FROM notes") == 0
    assert await node.executor.call("raw_count", {}) == 0


async def test_action_calls_mutations_and_queries_through_ctx(node):
    assert await node.executor.call("add_two", {"owner": "bob"}) == 2
    assert await node.pool.fetchval("SELECT count(*) FROM test_jobs") == 2


async def test_arguments_are_structured_from_type_hints(node):
    uid = str(uuid.uuid4())
    out = await node.executor.call("typed", {"n": 3, "id": uid, "f": {"owner": "o", "tags": ["x"]}})
    assert out == {"n": 3, "id": uid, "owner": "o", "tags": ["x"], "flag": False}


@pytest.mark.parametrize("args, where, what", [
    ({"id": "x", "f": {"owner": "o"}}, "n", "required, missing"),
    ({"n": "3", "id": str(uuid.uuid4()), "f": {"owner": "o"}}, "n", "expected int, got str '3'"),
    ({"n": 1, "id": "not-a-uuid", "f": {"owner": "o"}}, "id", "expected a UUID string"),
    ({"n": 1, "id": str(uuid.uuid4()), "f": {"owner": 5}}, "f.owner", "expected str, got int 5"),
    ({"n": 1, "id": str(uuid.uuid4()), "f": {"owner": "o", "tags": [1]}}, "f.tags[0]", "expected str"),
    ({"n": 1, "id": str(uuid.uuid4()), "f": {"owner": "o"}, "extra": 1}, "extra", "unknown argument"),
    ({"n": True, "id": str(uuid.uuid4()), "f": {"owner": "o"}}, "n", "expected int, got bool"),
])
async def test_bad_arguments_name_the_argument(node, args, where, what):
    e = await err(node.executor.call("typed", args))
    assert e.code == "INVALID_ARGUMENT"
    assert {"argument": where, "message": e.details[0]["message"]} in e.details
    assert any(d["argument"] == where and what in d["message"] for d in e.details), e.details


async def test_arguments_must_be_an_object(node):
    e = await err(node.executor.call("typed", [1, 2]))
    assert e.code == "INVALID_ARGUMENT" and "must be an object" in e.message


async def test_auth_rules(node):
    ex = node.executor
    assert (await err(ex.call("whoami", {}))).code == "UNAUTHENTICATED"
    assert await ex.call("whoami", {}, Auth(user_id="u1", roles=frozenset({"a"}), kind="user")) == {"user": "u1", "roles": ["a"]}
    assert (await err(ex.call("admin_only", {}, Auth(user_id="u1", kind="user")))).code == "FORBIDDEN"
    assert await ex.call("admin_only", {}, Auth(user_id="u1", roles=frozenset({"admin"}), kind="user")) == "secret"


async def test_unknown_function_and_wrong_kind(node):
    assert (await err(node.executor.call("nope", {}))).code == "NOT_FOUND"
    # jobs are not callable as functions
    assert (await err(node.executor.call("remember", {"note_id": str(uuid.uuid4())}))).code == "NOT_FOUND"


async def test_timeout(node):
    e = await err(node.executor.call("slow", {}))
    assert e.code == "TIMEOUT" and "0.2s" in e.message


async def test_user_exception_becomes_internal_without_details(node, capfd):
    e = await err(node.executor.call("boom", {}, request_id="req-123"))
    assert e.code == "INTERNAL"
    assert "secret internal detail" not in e.message and "req-123" in e.message
    assert e.details == {"request_id": "req-123"}
    assert await node.executor.call("raw_count", {}) == 0  # still serving


async def test_read_sets_are_recorded(node):
    calls = []
    await node.executor.call("notes_of", {"owner": "ann"}, track_reads=True, call_out=calls)
    assert calls[0].reads == [TableRead("notes", (("owner", "ann"),))]
    assert calls[0].used_auth is False
    calls = []
    await node.executor.call("raw_count", {}, track_reads=True, call_out=calls)
    assert sorted(r.table for r in calls[0].reads) == ["notes", "test_jobs"]
    assert all(r.filters is None for r in calls[0].reads)
    calls = []
    await node.executor.call("whoami", {}, Auth(user_id="u", kind="user"), track_reads=True, call_out=calls)
    assert calls[0].used_auth is True


async def test_dispatch_without_job_store_is_a_clear_error(forge_node):
    loader = PluginLoader(env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1"}).load()
    node = await forge_node(modules=["kernel_app"], loader=loader)
    e = await err(node.executor.call("add_note", {"owner": "a", "body": "b"}))
    assert "install forge-worker" in e.message
    assert await node.pool.fetchval("SELECT count(*) FROM notes") == 0


def test_request_ids_are_distinct_and_a_forked_child_draws_its_own():
    import os

    from forge_kernel.executor import new_request_id

    ids = [new_request_id() for _ in range(1000)]  # several draws of the pool
    assert len(set(ids)) == 1000 and all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    new_request_id()  # the pool holds ids drawn before the fork
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, new_request_id().encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 64).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert len(child) == 16 and child != new_request_id() and child not in ids
