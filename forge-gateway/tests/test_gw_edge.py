"""The connection edge (issue 19, items 2, 3 and 12): header size and time limits, the connection
cap, forwarded addresses, and the JSON error shape of every refusal, with raw sockets against a
real forge-node process."""

from __future__ import annotations

import json
import select
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from forge_kernel.testing import wait_for
from gw_support import RunningGateway, child_env, running_gateway


@pytest.fixture(scope="module")
def http(gateway):
    with gateway.client() as c:
        yield c


@pytest.fixture(scope="module")
def edge(forge_database_url: str, keys: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """A node with small edge limits and a trusted proxy range."""
    with running_gateway(forge_database_url, keys, tmp_path_factory.mktemp("edge"), node_id="gw-edge",
                         header_timeout=1.0, max_connections=25, trust_forwarded_for=True,
                         trusted_proxies=["127.0.0.1/32", "10.0.0.0/8"]) as gw:
        yield gw


def _port(gw: RunningGateway) -> int:
    return int(gw.url.rsplit(":", 1)[1])


def _connect(gw: RunningGateway, timeout: float = 30.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", _port(gw)), timeout=timeout)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def _strict_json(body: bytes) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    return json.loads(body, parse_constant=refuse)


def assert_error_shape(status: int, headers: dict[str, str], body: bytes, want_status: int, want_code: str) -> dict:
    assert status == want_status, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), headers
    doc = _strict_json(body)
    assert set(doc) == {"error"} and set(doc["error"]) == {"code", "message", "details"}, doc
    assert doc["error"]["code"] == want_code, doc
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
    return doc["error"]


def _exchange(gw: RunningGateway, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with _connect(gw) as sock:
        sock.sendall(data)
        return _response(_read_all(sock))


# --- item 2: header size --------------------------------------------------------------------
def test_a_header_line_over_the_limit_gets_431(gateway):
    req = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17_000 + b"\r\n\r\n"
    err = assert_error_shape(*_exchange(gateway, req), 431, "PAYLOAD_TOO_LARGE")
    assert "max_header_line_bytes" in err["message"] and err["details"] == {"limit": 16384}


def test_headers_over_the_total_limit_get_431_before_they_end(gateway):
    """Six 12 KiB lines (each under the line limit, 72 KiB together) and no blank line: the
    node answers at 64 KiB instead of waiting for the end of the headers."""
    with _connect(gateway) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for i in range(6):
            try:
                sock.sendall(f"X-Part-{i}: ".encode() + b"b" * 12_000 + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
        err = assert_error_shape(*_response(_read_all(sock)), 431, "PAYLOAD_TOO_LARGE")
    assert "max_header_bytes" in err["message"] and err["details"] == {"limit": 65536}


def test_a_100_mb_header_is_cut_off_at_the_limit(gateway):
    """The issue's attack: one header of 100 MB sent in 64 KiB pieces. The node answers 431 and
    closes after the first 64 KiB; we stop as soon as it did."""
    sent, answer = 0, b""
    with _connect(gateway) as sock:
        sock.sendall(b"POST /rpc/add HTTP/1.1\r\nHost: x\r\nX-Huge: ")
        piece = b"z" * 65536
        try:
            while sent < 100 * 1024 * 1024:
                sock.sendall(piece)
                sent += len(piece)
                if select.select([sock], [], [], 0)[0]:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _read_all(sock)
    assert answer, f"no answer after {sent} bytes of header"
    assert_error_shape(*_response(answer), 431, "PAYLOAD_TOO_LARGE")
    # what was sent beyond the limit sat in socket buffers, never in the parser
    assert sent < 32 * 1024 * 1024, sent


def test_a_long_line_in_a_pipelined_request_is_refused_too(gateway):
    """The second request arrives in the same write as the first one's body (bytes the header
    count does not see), so its lines are measured one by one."""
    body = b'{"a": 1}'
    first = b"POST /rpc/add HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    second = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"l" * 17_000 + b"\r\n\r\n"
    with _connect(gateway) as sock:
        sock.sendall(first)
        time.sleep(0.3)
        sock.sendall(body + second)
        raw = _read_all(sock)
    # the refusal closes the connection; the first request may not have been answered yet
    assert b"HTTP/1.1 431" in raw, raw[:300]
    err = assert_error_shape(*_response(raw[raw.index(b"HTTP/1.1 431"):]), 431, "PAYLOAD_TOO_LARGE")
    assert "x-long" in err["message"].lower()


def test_headers_and_bodies_within_the_limits_still_work(gateway, http):
    assert http.get("/health", headers={"X-Ok": "c" * 15_000}).status_code == 200
    many = {f"X-Many-{i}": "d" * 1000 for i in range(55)}  # ~56 KiB of headers in total
    assert http.get("/health", headers=many).status_code == 200
    # headers and a body that arrive in one write larger than the header limit
    body = b'{"a": 1, "b": 2' + b" " * 40_000 + b"}"
    big = b'{"a": 1, "b": 2' + b" " * 200_000 + b"}"
    req = (b"POST /rpc/add HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
           + b"X-Fill: " + b"f" * 15_000 + b"\r\n" + f"Content-Length: {len(big)}\r\n\r\n".encode() + big)
    status, _, out = _exchange(gateway, req)
    assert status == 413  # the gateway's body limit (64 KiB in these tests), answered as JSON
    req = (b"POST /rpc/add HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Fill: " + b"f" * 15_000 + b"\r\n"
           + b"X-Fill2: " + b"f" * 15_000 + b"\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    status, _, out = _exchange(gateway, req)
    assert (status, _strict_json(out)) == (200, {"data": 3})


# --- item 2: slow clients -----------------------------------------------------------------------
def test_slowloris_is_closed_after_the_header_timeout(edge):
    """A header line every 0.3 s never finishes the headers: with header_timeout = 1 the node
    answers 408 and closes (without the limit it would wait for ever; we give up after 30 s)."""
    started = time.monotonic()
    with _connect(edge) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        while time.monotonic() - started < 30:
            if select.select([sock], [], [], 0.3)[0]:
                answer = _read_all(sock)
                break
            try:
                sock.sendall(b"X-Drip: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                answer = _read_all(sock)
                break
    assert answer, "the node held a slowloris connection for 30 s"
    err = assert_error_shape(*_response(answer), 408, "TIMEOUT")
    assert "header_timeout" in err["message"]


def test_a_silent_connection_and_a_half_sent_second_request_are_closed(edge):
    with _connect(edge) as sock:  # connects and sends nothing
        assert_error_shape(*_response(_read_all(sock)), 408, "TIMEOUT")
    with _connect(edge) as sock:  # one good request on a kept-alive connection, then half of another
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        assert_error_shape(*_response(_read_all(sock)), 408, "TIMEOUT")


def test_connections_past_the_cap_get_503_and_a_log_line(edge):
    held: list[socket.socket] = []
    try:
        # 25 connections that finished their headers and wait on a body that never comes
        for _ in range(25):
            s = _connect(edge)
            s.sendall(b"POST /rpc/add HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            held.append(s)
        time.sleep(0.3)
        with _connect(edge) as extra:
            status, headers, body = _response(_read_all(extra))
        err = assert_error_shape(status, headers, body, 503, "RATE_LIMITED")
        assert "max_connections" in err["message"] and headers.get("retry-after") == "1"
        wait_for(lambda: "connection limit reached" in edge.proc.log(), timeout=10, what="the cap's log line")
        assert "[gateway] max_connections = 25" in edge.proc.log()
    finally:
        for s in held:
            s.close()
    # once they are gone the node takes connections again
    with httpx.Client(base_url=edge.url, timeout=30) as c:
        assert wait_for(lambda: c.get("/health").status_code == 200, timeout=20, what="a connection after the cap")


# --- item 3: forwarded addresses ----------------------------------------------------------------
def _limited_ip(client: httpx.Client, forwarded: str) -> int:
    return client.post("/rpc/limited_ip", headers={"X-Forwarded-For": forwarded}).status_code


def test_forwarded_for_is_ignored_unless_configured(http):
    """limited_ip allows 3 calls per hour per client; without trust_forwarded_for the header
    changes nothing, so four different forwarded addresses from one peer are one client."""
    codes = [_limited_ip(http, f"198.51.100.{i}") for i in range(1, 5)]
    assert codes == [200, 200, 200, 429], codes


def test_the_rightmost_address_that_is_not_a_trusted_proxy_is_the_client(edge):
    with httpx.Client(base_url=edge.url, timeout=30) as c:
        # the client wrote the left-most entries; 10.1.2.3 is our proxy, 203.0.113.7 the client it saw
        codes = [_limited_ip(c, f"spoofed-{i}, 203.0.113.7, 10.1.2.3") for i in range(4)]
        assert codes == [200, 200, 200, 429], codes
        # several headers are one list, read the same way
        r = c.post("/rpc/limited_ip", headers=[("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "203.0.113.7")])
        assert r.status_code == 429
        assert _limited_ip(c, "spoofed, 203.0.113.8") == 200  # another client has its own calls


def test_forwarded_for_from_a_peer_that_is_not_a_trusted_proxy_is_ignored(edge):
    transport = httpx.HTTPTransport(local_address="127.0.0.2")  # the trusted proxy is 127.0.0.1 only
    with httpx.Client(base_url=edge.url, timeout=30, transport=transport) as c:
        codes = [_limited_ip(c, f"192.0.2.{i}") for i in range(1, 5)]
    assert codes == [200, 200, 200, 429], codes


# --- item 12: every error from /rpc has the documented JSON shape ---------------------------
def test_every_refusal_under_rpc_is_json(gateway):
    host = b"Host: x\r\nConnection: close\r\n"
    cases = [
        (b"POST /rpc/" + b"f" * 100_000 + b" HTTP/1.1\r\n" + host + b"\r\n", 414, "PAYLOAD_TOO_LARGE"),
        (b"POST /rpc/add HTTP/1.1\r\n" + host + b"Content-Length: 5\r\n\r\n{nope", 400, "INVALID_ARGUMENT"),
        (b"POST /rpc/add HTTP/1.1\r\n" + host + b"Content-Type: text/csv\r\nContent-Length: 3\r\n\r\na,b", 400,
         "INVALID_ARGUMENT"),
        (b"GET /rpc/add HTTP/1.1\r\n" + host + b"\r\n", 405, "INVALID_ARGUMENT"),
        (b"DELETE /rpc HTTP/1.1\r\n" + host + b"\r\n", 405, "INVALID_ARGUMENT"),
        (b"POST /rpcx HTTP/1.1\r\n" + host + b"\r\n", 404, "NOT_FOUND"),
        (b"POST /rpc/no_such_function HTTP/1.1\r\n" + host + b"\r\n", 404, "NOT_FOUND"),
        (b"POST /rpc/add HTTP/1.1\r\n" + host + b"Content-Length: 100000\r\n\r\n" + b"1" * 100_000, 413,
         "PAYLOAD_TOO_LARGE"),
        (b"POST /rpc/add HTTP/1.1\r\n" + host + b"X-Big: " + b"h" * 20_000 + b"\r\n\r\n", 431, "PAYLOAD_TOO_LARGE"),
        (b"POST /rpc/add HTTP/1.1\r\nBad Header Line\r\n\r\n", 400, "INVALID_ARGUMENT"),
        (b"POST /rpc/add HTTP/1.1\r\n" + host + b"Content-Length: x\r\n\r\n", 400, "INVALID_ARGUMENT"),
        (b"POST /rpc/add HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "INVALID_ARGUMENT"),
    ]
    for raw, status, code in cases:
        assert_error_shape(*_exchange(gateway, raw), status, code)


def test_a_100_kb_function_name_names_the_limit(gateway):
    req = b"POST /rpc/" + b"f" * 100_000 + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    err = assert_error_shape(*_exchange(gateway, req), 414, "PAYLOAD_TOO_LARGE")
    assert "max_header_line_bytes" in err["message"]


def test_default_limits_are_documented():
    from forge_gateway.config import GatewayConfig

    cfg = GatewayConfig()
    assert (cfg.max_header_line_bytes, cfg.max_header_bytes, cfg.header_timeout) == (16384, 65536, 10.0)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for key in ("max_header_line_bytes", "max_header_bytes", "header_timeout", "max_connections", "trusted_proxies",
                "ws_max_message_bytes", "tls_cert", "tls_key", "hsts_max_age"):
        assert f"`{key}`" in readme, key


def test_a_node_with_a_short_jwt_secret_does_not_start(forge_processes):
    secret = "short-secret-xyz-0123456789"  # 27 bytes: below HS256's 32
    proc = forge_processes({"gateway": {"jwt_secret": secret}}, ready=False,
                           env={**child_env(), "FORGE_GATEWAY__PORT": "0"})
    assert proc.proc.wait(timeout=120) != 0
    log = proc.log()
    assert "jwt_secret" in log and "HS256 needs at least 32 bytes" in log, log[-2000:]
    assert secret not in log
