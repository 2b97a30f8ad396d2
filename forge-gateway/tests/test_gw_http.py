"""Routes and every error code (docs/architecture.md, section 7), over real HTTP against a real forge-node process."""

from __future__ import annotations

import json
import uuid

import pytest
from openapi_spec_validator import validate



@pytest.fixture(scope="module")
def http(gateway):
    with gateway.client() as c:
        yield c


def test_health_and_ready(http):
    r = http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["node"] == "gw-main"
    r = http.get("/ready")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ready"


def test_call_returns_data_and_request_id(http):
    r = http.post("/rpc/add", json={"a": 2, "b": 40})
    assert r.status_code == 200
    assert r.json() == {"data": 42}
    assert len(r.headers["x-request-id"]) >= 8
    r = http.post("/rpc/value", json={"id": 7})
    assert r.json() == {"data": 8}


def test_request_id_is_taken_from_the_caller(http):
    r = http.post("/rpc/add", json={"a": 1}, headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = http.post("/rpc/add", json={"a": 1}, headers={"X-Request-Id": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces"


def test_empty_body_means_no_arguments(http):
    r = http.post("/rpc/add", content=b"")
    assert r.status_code == 400
    assert r.json()["error"]["details"] == [{"argument": "a", "message": "required, missing"}]


def test_typed_nested_arguments_and_results(http):
    shape = {"id": str(uuid.uuid4()), "points": [{"x": 1, "y": 2.5}, {"x": 0, "y": 0, "label": "o"}],
             "colour": "green", "created": "2024-05-01T12:00:00+00:00"}
    r = http.post("/rpc/describe", json={"shape": shape, "tags": ["a"], "kind": "b"})
    assert r.status_code == 200, r.text
    assert r.json() == {"data": {"points": 2, "tags": 1}}
    r = http.post("/rpc/make_shape", json={"n": 2})
    data = r.json()["data"]
    assert data["id"] == str(uuid.UUID(int=2)) and data["colour"] == "red" and len(data["points"]) == 2
    assert data["created"] == "2024-01-01T00:00:00+00:00"


# --- INVALID_ARGUMENT 400 ------------------------------------------------------------------
@pytest.mark.parametrize("body,argument,fragment", [
    ({"a": "5"}, "a", "expected int"),
    ({"a": True}, "a", "expected int"),
    ({}, "a", "required, missing"),
    ({"a": 1, "c": 2}, "c", "unknown argument"),
    ({"a": 1.5}, "a", "expected int"),
])
def test_invalid_arguments_name_the_argument(http, body, argument, fragment):
    r = http.post("/rpc/add", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "INVALID_ARGUMENT"
    assert any(d["argument"] == argument and fragment in d["message"] for d in err["details"]), err


def test_nested_argument_errors_have_paths(http):
    shape = {"id": "not-a-uuid", "points": [{"x": 1}], "colour": "blue", "created": "yesterday"}
    r = http.post("/rpc/describe", json={"shape": shape})
    assert r.status_code == 400
    where = {d["argument"] for d in r.json()["error"]["details"]}
    assert {"shape.id", "shape.colour", "shape.created"} <= where, where
    assert any(w.startswith("shape.points") for w in where), where


@pytest.mark.parametrize("content", [b"{", b"{'a': 1}", b"nul", b"\xff\xfe", b"[1, 2", b'{"a": 1}}'])
def test_malformed_json_is_400(http, content):
    r = http.post("/rpc/add", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "INVALID_ARGUMENT" and "malformed JSON" in err["message"]


@pytest.mark.parametrize("body", [[1, 2], "text", 5, None])
def test_arguments_must_be_an_object(http, body):
    r = http.post("/rpc/add", content=json.dumps(body).encode())
    assert r.status_code == 400
    assert "arguments must be an object" in r.json()["error"]["message"]


def test_deeply_nested_json_is_400_not_500(http):
    deep = b"[" * 5000 + b"]" * 5000
    r = http.post("/rpc/add", content=deep)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "INVALID_ARGUMENT"
    nested = {"a": 1}
    for _ in range(300):
        nested = {"a": nested}
    r = http.post("/rpc/add", json={"a": nested})
    assert r.status_code == 400


# --- UNAUTHENTICATED 401 / FORBIDDEN 403 --------------------------------------------------------
def test_functions_need_a_caller_unless_public(http):
    r = http.post("/rpc/whoami")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "UNAUTHENTICATED"


def test_roles_give_403(http, keys):
    token = keys.hs256(roles=["reader"])
    r = http.post("/rpc/admin_only", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403
    err = r.json()["error"]
    assert err["code"] == "FORBIDDEN" and "admin" in err["message"]
    token = keys.hs256(roles=["admin"])
    r = http.post("/rpc/admin_only", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json() == {"data": "secret admin data"}


# --- NOT_FOUND 404 / CONFLICT 409 ------------------------------------------------------------
def test_unknown_function_is_404(http):
    r = http.post("/rpc/no_such_function", json={})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "NOT_FOUND" and "no_such_function" in err["message"]


def test_unknown_route_is_404_in_the_same_shape(http):
    r = http.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"
    r = http.post("/rpcadd", json={"a": 1})
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]


def test_not_found_raised_by_the_function(http):
    r = http.post("/rpc/missing", json={"id": 3})
    assert r.status_code == 404 and r.json()["error"] == {"code": "NOT_FOUND", "message": "no thing 3", "details": None}


def test_conflicts_are_409(http):
    r = http.post("/rpc/conflicting")
    assert r.status_code == 409 and r.json()["error"]["code"] == "CONFLICT"
    name = f"item-{uuid.uuid4().hex[:6]}"
    assert http.post("/rpc/insert_item", json={"name": name}).status_code == 200
    r = http.post("/rpc/insert_item", json={"name": name})
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "CONFLICT"


# --- PAYLOAD_TOO_LARGE 413 ------------------------------------------------------------------
def test_body_above_the_limit_is_413(http):
    big = json.dumps({"a": 1, "pad": "x" * 70_000}).encode()
    r = http.post("/rpc/add", content=big)
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "PAYLOAD_TOO_LARGE" and err["details"] == {"limit": 65536}


def test_chunked_body_above_the_limit_is_413(http):
    def chunks():
        for _ in range(100):
            yield b" " * 1000

    r = http.post("/rpc/add", content=chunks())
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"


# --- INTERNAL 500 -----------------------------------------------------------------------------
def test_user_exception_is_internal_with_request_id_and_no_trace(http, gateway):
    r = http.post("/rpc/boom", headers={"X-Request-Id": "boom-req-1"})
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "INTERNAL"
    assert err["details"] == {"request_id": "boom-req-1"}
    assert "hunter2" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
    # the server log has the trace under that request id: the error line names it, the trace follows
    log = gateway.proc.log()
    line = next(ln for ln in log.splitlines() if "boom-req-1" in ln and "ERROR" in ln)
    after = log[log.index(line):]
    assert "Traceback" in after and "hunter2" in after and "RuntimeError" in after


# --- TIMEOUT 504 ------------------------------------------------------------------------------
def test_timeout_is_504(http):
    r = http.post("/rpc/slow", json={"seconds": 5})
    assert r.status_code == 504
    err = r.json()["error"]
    assert err["code"] == "TIMEOUT" and "0.3" in err["message"]
    assert http.post("/rpc/slow", json={"seconds": 0}).json() == {"data": "done"}


# --- RATE_LIMITED 429 -------------------------------------------------------------------------
def test_rate_limit_by_ip_gives_429_with_retry_after(http):
    codes = [http.post("/rpc/limited_ip").status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    r = http.post("/rpc/limited_ip")
    assert r.json()["error"]["code"] == "RATE_LIMITED"
    assert 1 <= int(r.headers["retry-after"]) <= 3600


def test_rate_limit_by_user_counts_each_caller(http, keys):
    def call(user):
        return http.post("/rpc/limited_user", headers={"Authorization": f"Bearer {keys.hs256(sub=user)}"}).status_code

    assert [call("alice") for _ in range(3)] == [200, 200, 429]
    assert [call("bob") for _ in range(3)] == [200, 200, 429]
    # an anonymous caller is refused before spending anyone's tokens
    assert http.post("/rpc/limited_user").status_code == 401


def test_every_error_code_is_documented_with_its_status(http):
    doc = http.get("/openapi.json").json()
    responses = doc["paths"]["/rpc/add"]["post"]["responses"]
    assert {"200", "400", "401", "403", "404", "409", "413", "429", "500", "504"} <= set(responses)


# --- OpenAPI ----------------------------------------------------------------------------------
def test_openapi_document_is_valid_and_typed(http):
    doc = http.get("/openapi.json").json()
    validate(doc)
    paths = doc["paths"]
    assert {"/rpc/add", "/rpc/describe", "/rpc/whoami", "/rpc/boom", "/rpc", "/health", "/ready"} <= set(paths)
    add = paths["/rpc/add"]["post"]
    schema = add["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                      "additionalProperties": False, "required": ["a"]}
    assert add["responses"]["200"]["content"]["application/json"]["schema"]["properties"]["data"] == {"type": "integer"}
    assert add["security"] == []
    assert paths["/rpc/whoami"]["post"]["security"] == [{"bearer": []}, {"apiKey": []}]
    shape = doc["components"]["schemas"]["Shape"]
    assert shape["required"] == ["id", "points", "colour", "created"]
    assert shape["properties"]["id"] == {"type": "string", "format": "uuid"}
    assert shape["properties"]["points"] == {"type": "array", "items": {"$ref": "#/components/schemas/Point"}}
    assert doc["components"]["schemas"]["Colour"]["enum"] == ["red", "green"]
    assert paths["/rpc/limited_ip"]["post"]["x-forge-rate-limit"] == {"requests": 3, "per": 3600.0, "key": "ip"}


def test_no_cors_headers_by_default(http):
    r = http.options("/rpc/add", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = http.post("/rpc/add", json={"a": 1}, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_wrong_method_is_405_in_the_error_shape(http):
    r = http.get("/rpc/add")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "INVALID_ARGUMENT"
