"""JSON-RPC 2.0 at POST /rpc: single calls, batches, notifications and the standard error codes."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def http(gateway):
    with gateway.client() as c:
        yield c


def rpc(http, body, **kw):
    return http.post("/rpc", json=body, **kw)


def test_single_call_by_name_and_by_position(http):
    r = rpc(http, {"jsonrpc": "2.0", "method": "add", "params": {"a": 1, "b": 2}, "id": 1})
    assert r.status_code == 200 and r.json() == {"jsonrpc": "2.0", "result": 3, "id": 1}
    r = rpc(http, {"jsonrpc": "2.0", "method": "add", "params": [5, 6], "id": "x"})
    assert r.json() == {"jsonrpc": "2.0", "result": 11, "id": "x"}
    r = rpc(http, {"jsonrpc": "2.0", "method": "add", "params": [1, 2, 3], "id": 2})
    assert r.json()["error"]["code"] == -32602


def test_batch_keeps_ids_and_mixes_errors(http):
    r = rpc(http, [
        {"jsonrpc": "2.0", "method": "add", "params": {"a": 1}, "id": 1},
        {"jsonrpc": "2.0", "method": "nope", "id": 2},
        {"jsonrpc": "2.0", "method": "add", "params": {"a": "x"}, "id": 3},
        {"jsonrpc": "2.0", "method": "add", "params": {"a": 10}},  # notification: no reply
        {"jsonrpc": "2.0", "method": "whoami", "id": 4},
        {"jsonrpc": "2.0", "method": "boom", "id": 5},
        5,
    ])
    assert r.status_code == 200
    by_id = {item["id"]: item for item in r.json() if item["id"] is not None}
    assert by_id[1]["result"] == 1
    assert by_id[2]["error"]["code"] == -32601 and by_id[2]["error"]["data"]["code"] == "NOT_FOUND"
    assert by_id[3]["error"]["code"] == -32602 and by_id[3]["error"]["data"]["code"] == "INVALID_ARGUMENT"
    assert by_id[3]["error"]["data"]["details"][0]["argument"] == "a"
    assert by_id[4]["error"]["data"]["code"] == "UNAUTHENTICATED"
    assert by_id[5]["error"]["code"] == -32603 and by_id[5]["error"]["data"]["code"] == "INTERNAL"
    assert "hunter2" not in r.text
    invalid = [item for item in r.json() if item["id"] is None]
    assert len(invalid) == 1 and invalid[0]["error"]["code"] == -32600
    assert len(r.json()) == 6


def test_notifications_only_get_204(http):
    r = rpc(http, {"jsonrpc": "2.0", "method": "add", "params": {"a": 1}})
    assert r.status_code == 204 and r.content == b""
    r = rpc(http, [{"jsonrpc": "2.0", "method": "add", "params": {"a": 1}}, {"jsonrpc": "2.0", "method": "nope"}])
    assert r.status_code == 204


def test_parse_error(http):
    r = http.post("/rpc", content=b'{"jsonrpc": "2.0", "method"')
    assert r.status_code == 400
    body = r.json()
    assert body["error"]["code"] == -32700 and body["id"] is None
    assert body["error"]["data"]["code"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize("body,fragment", [
    ({"method": "add", "id": 1}, "jsonrpc"),
    ({"jsonrpc": "1.0", "method": "add", "id": 1}, "jsonrpc"),
    ({"jsonrpc": "2.0", "method": 5, "id": 1}, "method"),
    ({"jsonrpc": "2.0", "method": "add", "params": 5, "id": 1}, "params"),
    ({"jsonrpc": "2.0", "method": "add", "id": {"x": 1}}, "id"),
    ({"jsonrpc": "2.0", "method": "add", "id": 1, "extra": True}, "extra"),
    ("just a string", "object"),
    ([], "empty batch"),
])
def test_invalid_request(http, body, fragment):
    r = rpc(http, body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == -32600 and fragment in err["message"], err
    assert err["data"]["code"] == "INVALID_ARGUMENT"


def test_method_not_found_and_status(http):
    r = rpc(http, {"jsonrpc": "2.0", "method": "nope", "id": 9})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == -32601 and r.json()["id"] == 9


def test_single_call_status_follows_the_forge_code(http, keys):
    r = rpc(http, {"jsonrpc": "2.0", "method": "admin_only", "id": 1},
            headers={"Authorization": f"Bearer {keys.hs256(roles=['reader'])}"})
    assert r.status_code == 403 and r.json()["error"]["data"]["code"] == "FORBIDDEN"
    r = rpc(http, {"jsonrpc": "2.0", "method": "whoami", "id": 1}, headers={"Authorization": "Bearer bad.to.ken"})
    assert r.status_code == 401 and r.json()["error"]["code"] == -32001
    r = rpc(http, {"jsonrpc": "2.0", "method": "slow", "params": {"seconds": 3}, "id": 1})
    assert r.status_code == 504 and r.json()["error"]["data"]["code"] == "TIMEOUT"
    r = rpc(http, {"jsonrpc": "2.0", "method": "conflicting", "id": 1})
    assert r.status_code == 409 and r.json()["error"]["data"]["code"] == "CONFLICT"


def test_rate_limit_over_jsonrpc_has_retry_after(http):
    codes = []
    for _ in range(7):
        r = rpc(http, {"jsonrpc": "2.0", "method": "limited_global", "id": 1})
        codes.append(r.status_code)
    assert codes[-1] == 429 and codes.count(200) <= 5
    assert r.json()["error"]["data"]["code"] == "RATE_LIMITED" and int(r.headers["retry-after"]) >= 1


def test_batch_too_large(http):
    r = rpc(http, [{"jsonrpc": "2.0", "method": "add", "params": {"a": 1}, "id": i} for i in range(101)])
    assert r.status_code == 400 and "above the limit" in r.json()["error"]["message"]


def test_body_too_large_is_413(http):
    r = http.post("/rpc", content=b"[" + b" " * 70_000 + b"]")
    assert r.status_code == 413 and r.json()["error"]["data"]["code"] == "PAYLOAD_TOO_LARGE"
