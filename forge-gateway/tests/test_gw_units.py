"""Unit and property tests of the gateway's parts without HTTP: verifier, rate limiter (real
PostgreSQL), schema builder, JSON-RPC validation."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
import typing
import uuid

import asyncpg
import attrs
import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge_kernel import ANONYMOUS, RateLimit
from forge_kernel.convert import structure
from forge_kernel.errors import RateLimited, Unauthenticated
from forge_kernel.migrations import from_package, migrate

from forge_gateway.auth import Verifier
from forge_gateway.config import ApiKey, GatewayConfig
from forge_gateway.openapi import SchemaBuilder
from forge_gateway.ratelimit import RateLimiter

SECRET = "unit-test-secret-unit-test-secret-unit-test!"


def verifier(**kw) -> Verifier:
    return Verifier(GatewayConfig(jwt_secret=SECRET, **kw))


def token(**claims) -> str:
    base = {"sub": "u1", "exp": int(time.time()) + 60}
    base.update(claims)
    return jwt.encode(base, SECRET, algorithm="HS256")


async def test_verifier_roundtrip():
    auth = await verifier().verify(token(roles=["a"], team="x"))
    assert auth.user_id == "u1" and auth.roles == {"a"} and auth.claims["team"] == "x" and auth.kind == "user"
    assert auth.expires_at is not None and auth.expires_at > dt.datetime.now(dt.timezone.utc)


@settings(max_examples=150, deadline=None)
@given(position=st.integers(min_value=0), replacement=st.characters(codec="ascii", exclude_characters="."))
async def test_any_single_character_change_is_rejected(position, replacement):
    good = token(roles=["reader"])
    i = position % len(good)
    if good[i] == "." or good[i] == replacement:
        return
    bad = good[:i] + replacement + good[i + 1:]
    try:
        auth = await verifier().verify(bad)
    except Unauthenticated:
        return
    # base64url may decode a changed trailing character to the same bytes; then nothing changed
    assert auth.user_id == "u1" and auth.roles == {"reader"}


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300))
async def test_garbage_credentials_raise_unauthenticated_only(text):
    v = Verifier(GatewayConfig(jwt_secret=SECRET, api_keys=[ApiKey("svc", hashlib.sha256(b"k").hexdigest())]))
    try:
        auth = await v.verify(text)
    except Unauthenticated:
        return
    assert text == "k" and auth.user_id == "apikey:svc"


async def test_headers_without_credentials_are_anonymous_and_bad_ones_raise():
    v = verifier()
    assert await v.from_headers(None, None) is ANONYMOUS
    with pytest.raises(Unauthenticated):
        await v.from_headers("Basic abc", None)
    with pytest.raises(Unauthenticated):
        await v.from_headers(f"Bearer {token()}", "also-a-key")


def test_config_rejects_bad_values():
    from forge_kernel.convert import StructureError

    with pytest.raises(StructureError) as info:
        structure({"api_keys": [{"name": "a", "sha256": "nothex"}]}, GatewayConfig)
    assert "sha256" in str(info.value)
    with pytest.raises(StructureError) as info:
        structure({"jwt_algorithms": ["none"]}, GatewayConfig)
    assert "none" in str(info.value)
    with pytest.raises(StructureError) as info:
        structure({"cors_origins": ["example.com"]}, GatewayConfig)
    assert "cors_origins" in str(info.value)


# --- rate limiter against a real PostgreSQL ------------------------------------------------------
@pytest.fixture
async def limiter_pool(forge_db_url):
    conn = await asyncpg.connect(forge_db_url)
    try:
        await migrate(conn, from_package("forge_gateway.sql", namespace="gateway"))
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(forge_db_url, min_size=1, max_size=8)
    yield pool
    await pool.close()


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(limit=st.integers(1, 40), lease=st.sampled_from([0.0, 0.1, 0.5]), nodes=st.integers(1, 3),
       calls=st.integers(1, 80))
async def test_no_window_admits_more_than_the_limit(limiter_pool, limit, lease, nodes, calls):
    limiters = [RateLimiter(limiter_pool, lease_fraction=lease) for _ in range(nodes)]
    rule = RateLimit(limit, per=3600, key="global")
    fn = f"f{uuid.uuid4().hex[:8]}"

    async def one(i: int) -> bool:
        try:
            await limiters[i % nodes].acquire(fn, rule, "*")
            return True
        except RateLimited as exc:
            assert exc.retry_after >= 1
            return False

    admitted = sum(await asyncio.gather(*(one(i) for i in range(calls))))
    assert admitted <= limit
    if lease == 0.0:
        assert admitted == min(limit, calls)  # exact without leasing


async def test_keys_are_counted_separately(limiter_pool):
    limiter = RateLimiter(limiter_pool, lease_fraction=0)
    rule = RateLimit(1, per=3600, key="user")
    await limiter.acquire("g", rule, "user:a")
    await limiter.acquire("g", rule, "user:b")
    with pytest.raises(RateLimited):
        await limiter.acquire("g", rule, "user:a")


# --- schema builder -----------------------------------------------------------------------------
class Mood(__import__("enum").Enum):
    OK = "ok"


@attrs.frozen
class Node:
    name: str
    children: list["Node"] = attrs.Factory(list)


def test_schemas_of_common_types():
    b = SchemaBuilder()
    assert b.schema(int | None) == {"anyOf": [{"type": "integer"}, {"type": "null"}]}
    assert b.schema(typing.Optional[str]) == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert b.schema(dict[str, float]) == {"type": "object", "additionalProperties": {"type": "number"}}
    assert b.schema(tuple[int, str])["prefixItems"] == [{"type": "integer"}, {"type": "string"}]
    assert b.schema(tuple[int, ...]) == {"type": "array", "items": {"type": "integer"}}
    assert b.schema(frozenset[str]) == {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
    assert b.schema(typing.Literal["x", 1]) == {"enum": ["x", 1]}
    assert b.schema(dt.timedelta) == {"type": "number", "description": "seconds"}
    assert b.schema(typing.Any) == {}
    assert b.schema(Mood) == {"$ref": "#/components/schemas/Mood"}
    assert b.schema(typing.Mapping[str, int]) == {"type": "object", "additionalProperties": {"type": "integer"}}
    assert b.schema(typing.Sequence[int]) == {"type": "array", "items": {"type": "integer"}}


def test_recursive_attrs_classes_become_one_component():
    b = SchemaBuilder()
    assert b.schema(Node) == {"$ref": "#/components/schemas/Node"}
    comp = b.components["Node"]
    assert comp["properties"]["children"] == {"type": "array", "items": {"$ref": "#/components/schemas/Node"}}
    assert comp["required"] == ["name"] and comp["additionalProperties"] is False


def test_undescribable_types_do_not_break_the_document():
    @attrs.frozen
    class Broken:
        x: "DoesNotExist"  # noqa: F821 - unresolvable on purpose

    b = SchemaBuilder()
    out = b.schema(Broken)
    assert out.get("$ref") or "no JSON schema" in out.get("description", ""), out
    assert "no JSON schema" in str(b.components.get("Broken", out))


async def test_auth_verifier_hook_returns_one_verifier_per_node(forge_node):
    node = await forge_node(modules=[], config={"node": {"roles": ["function"]}, "gateway": {"jwt_secret": SECRET}},
                            env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1",
                                 "FORGE_PLUGINS": "forge_kernel.kernel_plugin,forge_gateway.hooks"})
    first = node.loader.hook.forge_auth_verifier(node=node)
    assert first is node.loader.hook.forge_auth_verifier(node=node)
    auth = await first.verify(token(sub="ws-user"))
    assert auth.user_id == "ws-user"
    with pytest.raises(Unauthenticated):
        await first.verify(token(sub="x") + "tampered")


# --- issue 19 item 3: a bounded lease table, O(1) per call ----------------------------------
@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 8),
       steps=st.lists(st.tuples(st.sampled_from("abcdefghij"), st.integers(0, 5), st.booleans()), max_size=60))
def test_the_lease_table_is_bounded_and_never_returns_an_ended_lease(capacity, steps):
    """Against a model (a plain dict): the table never holds more than ``capacity`` entries, never
    hands out a lease whose window ended, and whatever it returns is what was last put there."""
    from forge_gateway.ratelimit import LeaseTable, _Lease

    table, model, now = LeaseTable(capacity), {}, 0.0
    for bucket, lasts, put in steps:
        now += 1.0
        if put:
            lease = _Lease(3, now + lasts)
            table.put(bucket, lease, now)
            model[bucket] = lease
        else:
            got = table.get(bucket, now)
            if got is not None:
                assert got.ends > now and got is model[bucket]
            elif bucket in model and model[bucket].ends > now:
                pass  # evicted early: allowed (only unspent tokens are given up)
        assert len(table) <= capacity


async def test_a_flood_of_distinct_callers_keeps_the_limiter_bounded(limiter_pool):
    """Each distinct key leaves one lease behind; the table stays at its capacity (the old one grew
    past 100,000 entries and then walked all of them on every new caller)."""
    limiter = RateLimiter(limiter_pool, lease_fraction=0.5, max_leases=50)
    rule = RateLimit(10, per=3600, key="ip")
    for i in range(300):
        await limiter.acquire("flood", rule, f"ip:10.0.{i // 256}.{i % 256}")
    assert len(limiter._leases) == 50


def test_client_address_reads_forwarded_for_from_the_right():
    from forge_gateway.clients import ClientAddress

    off = ClientAddress(False, ["127.0.0.1"])
    assert off.of("127.0.0.1", ["6.6.6.6"]) == "127.0.0.1"
    on = ClientAddress(True, ["127.0.0.1/32", "10.0.0.0/8", "::1"])
    assert on.of("127.0.0.1", ["evil, 1.2.3.4, 10.0.0.7"]) == "1.2.3.4"
    assert on.of("127.0.0.1", ["evil", "1.2.3.4,10.0.0.7"]) == "1.2.3.4"  # two headers are one list
    assert on.of("::1", ["2001:db8::0001"]) == "2001:db8::1"
    assert on.of("127.0.0.1", ["10.0.0.1, 10.0.0.2"]) == "10.0.0.1"  # every hop is ours
    assert on.of("127.0.0.1", [" , "]) == "127.0.0.1"
    assert on.of("127.0.0.1", ["unknown"]) == "unknown"
    assert on.of("192.0.2.9", ["1.2.3.4"]) == "192.0.2.9"  # not from a trusted proxy: header ignored
    assert on.of(None, ["1.2.3.4"]) == "unknown"


# --- issue 19 item 6: HMAC secrets as long as RFC 7518 asks -------------------------------------
@pytest.mark.parametrize("algorithms, need", [(["HS256"], 32), (["HS256", "RS256"], 32), (["HS384"], 48),
                                              (["HS256", "HS512"], 64)])
def test_a_short_jwt_secret_stops_start_up_without_showing_it(algorithms, need):
    from forge_kernel.config import load_config
    from forge_kernel.errors import ConfigError

    short = "s3cr3t-" + "q" * (need - 8)
    with pytest.raises(ConfigError) as info:
        load_config({"gateway": GatewayConfig}, data={"gateway": {"jwt_secret": short, "jwt_algorithms": algorithms}},
                    env={})
    message = str(info.value)
    assert "jwt_secret" in message and f"at least {need} bytes" in message and "[gateway]" in message, message
    assert short not in message and "s3cr3t" not in message, message
    ok = load_config({"gateway": GatewayConfig}, data={"gateway": {"jwt_secret": short + "q", "jwt_algorithms": algorithms}},
                     env={})
    assert ok["gateway"].jwt_secret == short + "q"
    # public-key algorithms only: the secret is unused, so its length does not matter
    assert GatewayConfig(jwt_secret="short", jwt_algorithms=["RS256"]).jwt_secret == "short"
