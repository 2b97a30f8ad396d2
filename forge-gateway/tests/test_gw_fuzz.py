"""Property-based fuzzing of the live API from its own /openapi.json (schemathesis + hypothesis).

Valid and invalid inputs for every operation must never produce a 5xx or a status, content
type or body the document does not declare.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gw_support import NodeProcess, child_env, create_database, drop_database, gateway_config


@pytest.fixture(scope="module")
def fuzz_gateway(forge_database_url, keys, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    db = create_database(forge_database_url)
    cfg = gateway_config(keys, tmp, modules=["gw_fuzz_app"])
    cfg["database"] = {"url": db}
    cfg["node"] = {"id": "gw-fuzz"}
    proc = NodeProcess(tmp / "node", cfg, env=child_env())
    proc.start()
    try:
        proc.wait_ready()
        yield f"http://127.0.0.1:{cfg['gateway']['port']}"
    finally:
        proc.terminate(timeout=20)
        drop_database(forge_database_url, db)


@pytest.fixture(scope="module")
def api_schema(fuzz_gateway):
    schema = schemathesis.openapi.from_url(f"{fuzz_gateway}/openapi.json")
    schema.config.update(base_url=fuzz_gateway)
    return schema


#: FORGE_SLOW=1 fuzzes much longer
EXAMPLES = 400 if os.environ.get("FORGE_SLOW") == "1" else 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


# schemathesis' own pytest plugin does not run on pytest 9, so hypothesis drives its strategies directly
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_5xx_and_only_documented_answers(api_schema, mode):
    ops = operations(api_schema)
    statuses: set[int] = set()
    assert {op.path for op in ops} >= {"/rpc/add", "/rpc/total", "/rpc/when", "/rpc", "/health", "/ready"}
    for op in ops:
        if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET":
            continue  # /health and /ready take no input: nothing can be invalid
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call()
            statuses.add(response.status_code)
            case.validate_response(response, checks=CHECKS)

        check()
    # the fuzzer really reached both the functions and the argument checks
    assert 200 in statuses if mode is GenerationMode.POSITIVE else 400 in statuses, statuses
    assert not any(s >= 500 for s in statuses)
