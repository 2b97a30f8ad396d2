"""Authentication and authorisation over HTTP, including the classic JWT attacks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest

from gw_support import AUDIENCE, ISSUER, SECRET, SERVICE_KEY


@pytest.fixture(scope="module")
def http(gateway):
    with gateway.client() as c:
        yield c


def whoami(http, token: str | None = None, **headers):
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return http.post("/rpc/whoami", headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, claims: dict, signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(signature)}"


def assert_401(r, fragment: str = ""):
    assert r.status_code == 401, r.text
    err = r.json()["error"]
    assert err["code"] == "UNAUTHENTICATED"
    assert fragment.lower() in err["message"].lower(), err["message"]


def test_hs256_token_carries_user_roles_and_claims(http, keys):
    r = whoami(http, keys.hs256(sub="alice", roles=["admin", "reader"], tenant="t1"))
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["user_id"] == "alice" and data["roles"] == ["admin", "reader"] and data["kind"] == "user"
    assert {"sub", "roles", "tenant", "exp", "aud", "iss"} <= set(data["claims"])


def test_rs256_token(http, keys):
    r = whoami(http, keys.rs256(sub="bob", roles="a b"))
    assert r.status_code == 200, r.text
    assert r.json()["data"]["user_id"] == "bob" and r.json()["data"]["roles"] == ["a", "b"]


def test_api_key_for_services(http):
    r = http.post("/rpc/admin_only", headers={"X-API-Key": SERVICE_KEY})
    assert r.status_code == 200 and r.json() == {"data": "secret admin data"}
    r = http.post("/rpc/whoami", headers={"Authorization": f"Bearer {SERVICE_KEY}"})
    assert r.json()["data"]["kind"] == "service" and r.json()["data"]["user_id"] == "apikey:billing-service"
    assert_401(http.post("/rpc/whoami", headers={"X-API-Key": SERVICE_KEY + "x"}), "unknown API key")


def test_a_bad_credential_is_401_even_on_a_public_function(http):
    # never a silent anonymous caller: a caller that sent a credential gets it checked
    r = http.post("/rpc/add", json={"a": 1}, headers={"Authorization": "Bearer not-a-token"})
    assert_401(r)


# --- the classic attacks ------------------------------------------------------------------------
def test_alg_none_is_rejected(http):
    now = int(time.time())
    claims = {"sub": "admin", "roles": ["admin"], "exp": now + 300, "aud": AUDIENCE, "iss": ISSUER}
    assert_401(whoami(http, forge({"alg": "none", "typ": "JWT"}, claims)), "algorithm")
    assert_401(whoami(http, forge({"alg": "None", "typ": "JWT"}, claims)), "algorithm")
    assert_401(whoami(http, jwt.encode(claims, None, algorithm="none")), "algorithm")


def test_hs256_signed_with_the_rs256_public_key_is_rejected(http, keys):
    now = int(time.time())
    claims = {"sub": "admin", "roles": ["admin"], "exp": now + 300, "aud": AUDIENCE, "iss": ISSUER}
    header = {"alg": "HS256", "typ": "JWT"}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}".encode()
    sig = hmac.new(keys.public_pem, signing_input, hashlib.sha256).digest()
    assert_401(whoami(http, signing_input.decode() + "." + b64(sig)), "signature")


def test_expired_token(http, keys):
    assert_401(whoami(http, keys.hs256(ttl=-10)), "expired")
    assert_401(whoami(http, keys.rs256(ttl=-10)), "expired")


def test_not_yet_valid_token(http, keys):
    assert_401(whoami(http, keys.hs256(nbf=int(time.time()) + 600)), "not valid yet")


def test_wrong_audience_and_issuer(http, keys):
    assert_401(whoami(http, keys.hs256(aud="someone-else")), "audience")
    assert_401(whoami(http, keys.hs256(aud=None)), "aud")
    assert_401(whoami(http, keys.hs256(iss="https://evil.test")), "issuer")


def test_tampered_payload(http, keys):
    token = keys.hs256(sub="mallory", roles=["reader"])
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["admin"]
    tampered = f"{head}.{b64(json.dumps(claims).encode())}.{sig}"
    assert_401(whoami(http, tampered), "signature")
    rs = keys.rs256(sub="mallory").split(".")
    assert_401(whoami(http, f"{rs[0]}.{b64(json.dumps(claims).encode())}.{rs[2]}"), "signature")


def test_wrong_key_and_wrong_secret(http, keys):
    other = jwt.encode({"sub": "x", "exp": int(time.time()) + 60, "aud": AUDIENCE, "iss": ISSUER},
                       keys.other_private_pem, algorithm="RS256")
    assert_401(whoami(http, other), "signature")
    assert_401(whoami(http, keys.hs256(secret=SECRET + "!")), "signature")


def test_missing_exp_and_bad_claims(http, keys):
    assert_401(whoami(http, jwt.encode({"sub": "x", "aud": AUDIENCE, "iss": ISSUER}, SECRET, algorithm="HS256")), "exp")
    assert_401(whoami(http, keys.hs256(sub="")), "sub")
    assert_401(whoami(http, keys.hs256(roles=[1, 2])), "roles")


def test_algorithm_not_on_the_list(http, keys):
    token = jwt.encode({"sub": "x", "exp": int(time.time()) + 60, "aud": AUDIENCE, "iss": ISSUER}, SECRET, algorithm="HS512")
    assert_401(whoami(http, token), "not accepted")


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "token abc", "a.b.c", "Bearer  x y"])
def test_malformed_authorization_headers(http, header):
    assert_401(http.post("/rpc/whoami", headers={"Authorization": header}))


def test_jwt_errors_never_leak_as_500(http):
    for token in ["a.b.c", "e30.e30.", "....", "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln", "x" * 5000 + ".y.z"]:
        r = http.post("/rpc/whoami", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, (token, r.text)


def test_jobs_dispatched_by_a_caller_record_that_caller(http, keys):
    r = http.post("/rpc/enqueue", json={"tag": "a"}, headers={"Authorization": f"Bearer {keys.hs256(sub='dave')}"})
    assert r.status_code == 200, r.text
    assert http.post("/rpc/enqueue", json={"tag": "b"}, headers={"X-API-Key": SERVICE_KEY}).status_code == 200
    # a mutation that fails after dispatching leaves no job (the job commits with the mutation)
    r = http.post("/rpc/enqueue", json={"tag": "c", "fail": True}, headers={"Authorization": f"Bearer {keys.hs256(sub='erin')}"})
    assert r.status_code == 409
    assert http.post("/rpc/job_callers").json() == {"data": ["dave", "apikey:billing-service"]}


# --- issue 19 item 8: signed tokens with absurd time claims are 401, never 500 -----------------
@pytest.mark.parametrize("claims, fragment", [
    ({"exp": int(time.time()) + 10**12}, "exp is out of range"),  # year 33715: past datetime's range
    ({"exp": 10**30}, "exp is out of range"),
    ({"exp": float("inf")}, "exp"),  # Python's json writes and reads Infinity
    ({"exp": float("nan")}, "exp"),
    ({"iat": float("inf")}, "iat"),
    ({"nbf": float("inf")}, "nbf"),
    ({"nbf": float("-inf")}, "nbf"),
    ({"iat": 10**30}, "iat"),
    ({"nbf": 10**30}, "not valid yet"),
])
def test_absurd_time_claims_in_a_signed_token_are_401(http, keys, claims, fragment):
    assert_401(whoami(http, keys.hs256(claims)), fragment)
    assert_401(whoami(http, keys.rs256(claims)), fragment)


# --- issue 19 item 10: one credential per request ---------------------------------------------
def test_a_repeated_credential_header_is_refused_whatever_its_order(http, keys):
    good, bad = f"Bearer {keys.hs256(sub='carol')}", "Bearer not-a-token"
    assert whoami(http, keys.hs256(sub="carol")).status_code == 200
    for headers in ([("Authorization", bad), ("Authorization", good)], [("Authorization", good), ("Authorization", bad)],
                    [("Authorization", good), ("Authorization", good)],
                    [("X-API-Key", "wrong"), ("X-API-Key", SERVICE_KEY)], [("X-API-Key", SERVICE_KEY), ("x-api-key", "w")],
                    [("Authorization", bad), ("Authorization", good), ("X-Request-Id", "a"), ("X-Request-Id", "b")]):
        for path, body in (("/rpc/whoami", None), ("/rpc", {"jsonrpc": "2.0", "method": "whoami", "id": 1})):
            r = http.post(path, headers=headers, json=body)
            assert r.status_code == 400, (headers, path, r.text)
            err = r.json()["error"]
            assert err["code"] == "INVALID_ARGUMENT" and "more than once" in err["message"], err
            assert headers[0][0] in err["message"]
