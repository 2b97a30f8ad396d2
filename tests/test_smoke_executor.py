from forge_kernel import Auth
from forge_kernel.errors import ForgeError
import pytest


async def test_example_app_runs(forge_node):
    node = await forge_node(modules=["forge_example"])
    alice = Auth(user_id="alice", kind="user")
    assert await node.executor.call("list_todos", {}, alice) == []
    with pytest.raises(ForgeError) as ei:
        await node.executor.call("list_todos", {}, Auth())
    assert ei.value.code == "UNAUTHENTICATED"
    assert await node.executor.call("count_open", {}) == 0
