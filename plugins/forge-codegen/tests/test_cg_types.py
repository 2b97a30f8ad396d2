"""`forge-node generate ts`: every supported type, values the wire converter really produces checked by
tsc against the generated types, unsupported types named, byte-identical output, --check."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cg_bad_types_app
import cg_types_app as app
from cg_support import APPS
from forge_codegen import tsgen
from forge_codegen.appload import load
from forge_kernel.convert import structure, unstructure
from forge_kernel.testing.procs import write_config

CLI = [sys.executable, "-m", "forge_kernel.cli"]


def test_every_supported_type_is_declared_as_the_wire_shapes_it():
    text = tsgen.generate(load(["cg_types_app"]).registry).files["api.ts"]
    expected = [
        "export type Color = \"red\" | \"green\";", "export type Level = 1 | 2;",
        "  maybe: number | null;", "  choice: \"a\" | \"b\" | 3;", "  when: DateTime;", "  day: DateString;",
        "  ident: UUID;", "  price: Decimal;", "  blob: Base64;", "  wait: number;", "  tags: string[];",
        "  unique: number[];", "  pair: [number, string];", "  many: number[];", "  scores: Record<string, number>;",
        "  by_color: Partial<Record<Color, Point[]>>;", "  shape: Circle | Square;", "  event: Ping | Pong;",
        # a TypedDict's NotRequired key, a msgspec tag and rename, defaults optional only on the way in
        "  zip?: string;", "  type: \"Ping\";", "  firstName: string;", "  children: Everything[];",
        "  children?: EverythingInput[];", "  side?: number;", "  currency?: \"EUR\" | \"USD\";",
        'stamp: fn<"query", { day: DateString; ids?: UUID[] }, [DateTime, Money]>("stamp", "query")',
    ]
    for line in expected:
        assert line in text, f"{line!r} missing from:\n{text}"
    assert "any" not in text.replace("many", "")


def _everything(depth: int = 1) -> st.SearchStrategy:
    children = st.just([]) if depth == 0 else st.lists(_everything(depth - 1), max_size=1)
    return st.builds(app.Everything, children=children, wait=st.timedeltas(-dt.timedelta(days=999), dt.timedelta(days=999)),
                     ratio=st.floats(allow_nan=False, allow_infinity=False),
                     price=st.decimals(allow_nan=False, allow_infinity=False),
                     many=st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=3).map(tuple),
                     shape=st.one_of(st.builds(app.Circle, kind=st.just("circle"),
                                               radius=st.floats(allow_nan=False, allow_infinity=False),
                                               center=st.builds(app.Point, st.floats(-1e6, 1e6), st.floats(-1e6, 1e6))),
                                     st.builds(app.Square, kind=st.just("square"),
                                               corner=st.builds(app.Point, st.floats(-1e6, 1e6), st.floats(-1e6, 1e6)),
                                               side=st.floats(0, 1e6))),
                     by_color=st.dictionaries(st.sampled_from(app.Color),
                                              st.lists(st.builds(app.Point, st.floats(-1e6, 1e6), st.floats(-1e6, 1e6)),
                                                       max_size=2), max_size=2),
                     money=st.builds(app.Money, st.decimals(allow_nan=False, places=2), st.sampled_from(["EUR", "USD"])),
                     address=st.fixed_dictionaries({"street": st.text(max_size=8)}, optional={"zip": st.text(max_size=5)}))


def test_values_the_wire_produces_type_check_against_the_generated_types(js_tools, tmp_path):
    """Random values of every argument and result type go through the kernel's converter (unstructure,
    JSON, structure back: the same value) and are then checked by tsc against the generated types: a
    renamed key, a missing or extra field, a wrong scalar or tuple shape would be a tsc error."""
    generated = tsgen.generate(load(["cg_types_app"]).registry)
    tsgen.write(tmp_path / "generated", generated)
    samples: list[tuple[str, str]] = []
    cases = {
        "G.EverythingInput": (app.Everything, _everything()),
        "G.Everything": (app.Everything, _everything()),
        "(G.Circle | G.SquareInput)[]": (list[app.Circle | app.Square],
                                    st.lists(st.builds(app.Square, kind=st.just("square"), side=st.floats(0, 9),
                                                       corner=st.builds(app.Point, st.floats(0, 9), st.floats(0, 9))),
                                             max_size=3)),
        "[G.DateTime, G.Money]": (tuple[dt.datetime, app.Money],
                              st.tuples(st.datetimes(timezones=st.none() | st.just(dt.timezone.utc)),
                                        st.builds(app.Money, st.decimals(allow_nan=False, places=3)))),
        "G.PingInput | G.PongInput": (app.Ping | app.Pong, st.one_of(st.builds(app.Ping), st.builds(app.Pong))),
    }

    for ts_type, (tp, strategy) in cases.items():
        @settings(max_examples=20, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(strategy)
        def collect(value):
            # encoded as the gateway encodes results (msgspec: sets and tuples become arrays)
            wire = json.loads(msgspec.json.encode(unstructure(value)))
            assert structure(wire, tp) == value  # the converter reads back what it wrote
            samples.append((ts_type, json.dumps(wire)))

        collect()

    lines = ['import type { Brand } from "./generated/runtime";',
             'import type * as G from "./generated/api";',
             # brands are compile-time only: on the wire they are plain strings
             "type Wire<T> = T extends Brand<string, string> ? string : T extends object ? { [K in keyof T]: Wire<T[K]> } : T;"]
    for i, (ts_type, wire) in enumerate(samples):
        lines.append(f"export const v{i}: Wire<{ts_type}> = {wire};")
    (tmp_path / "samples.ts").write_text("\n".join(lines) + "\n")
    proc = js_tools.tsc(tmp_path, ["generated/api.ts", "generated/runtime.ts", "samples.ts"])
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert len(samples) >= 80


def test_wire_type_check_catches_a_wrong_key(js_tools, tmp_path):
    """The sample check is not vacuous: a wire value with a renamed key fails tsc."""
    tsgen.write(tmp_path / "generated", tsgen.generate(load(["cg_types_app"]).registry))
    (tmp_path / "samples.ts").write_text(
        'import type { Brand } from "./generated/runtime";\nimport type * as G from "./generated/api";\n'
        "type Wire<T> = T extends Brand<string, string> ? string : T extends object ? { [K in keyof T]: Wire<T[K]> } : T;\n"
        'export const v: Wire<G.Money> = {"amount": "1.00", "currencyCode": "EUR"};\n')
    proc = js_tools.tsc(tmp_path, ["generated/*.ts", "samples.ts"])
    assert proc.returncode != 0 and "currencyCode" in proc.stdout, proc.stdout


def test_unsupported_types_are_errors_naming_function_and_field():
    with pytest.raises(tsgen.GenerateError) as info:
        tsgen.generate(load(["cg_bad_types_app"]).registry)
    problems = "\n".join(info.value.problems)
    for needle in ["function 'takes_any' (cg_bad_types_app), argument 'value': Any says nothing",
                   "function 'no_result_hint' (cg_bad_types_app), result: Any says nothing",
                   "annotate the return type",
                   "function 'either' (cg_bad_types_app), argument 'value': int | str: the wire cannot tell these apart",
                   "function 'nested' (cg_bad_types_app), argument 'event.at': time has no wire representation",
                   "function 'nested' (cg_bad_types_app), result[].at: time has no wire representation",
                   "function 'int_keys' (cg_bad_types_app), result: dict keys of type int",
                   "function 'bare' (cg_bad_types_app), argument 'items': a bare list",
                   "function 'bare' (cg_bad_types_app), result: Opaque has no wire representation"]:
        assert needle in problems, f"{needle!r} not in:\n{problems}"
    assert len(info.value.problems) == 8, problems


def _project(tmp_path: Path, modules: list[str], **codegen) -> tuple[Path, dict[str, str]]:
    write_config(tmp_path / "forge.toml", {"app": {"modules": modules, "example": False},
                                           "codegen": {"ts_out": "client", **codegen}})
    env = {**os.environ, "PYTHONPATH": f"{APPS}:{tmp_path}", "FORGE_DISABLE_PLUGINS": "",
           "FORGE_CONFIG": str(tmp_path / "forge.toml")}
    return tmp_path, env


def test_cli_output_is_byte_identical_and_check_detects_staleness(tmp_path):
    root, env = _project(tmp_path, ["cg_types_app", "cg_app"], svelte=True)
    outputs = []
    for seed in ("1", "2"):  # set and dict order differ between hash seeds; the output must not
        proc = subprocess.run([*CLI, "generate", "ts"], cwd=root, env={**env, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        outputs.append({p.name: p.read_bytes() for p in sorted((root / "client").iterdir())})
        if seed == "1":
            assert "wrote" in proc.stdout
            for p in (root / "client").iterdir():
                p.write_text("stale")
    assert outputs[0] == outputs[1]
    assert set(outputs[0]) == {"api.ts", "runtime.ts", "svelte.svelte.ts"}

    ok = subprocess.run([*CLI, "generate", "ts", "--check"], cwd=root, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    (root / "client" / "api.ts").write_bytes(outputs[0]["api.ts"].replace(b"title", b"name"))
    stale = subprocess.run([*CLI, "generate", "ts", "--check"], cwd=root, env=env, capture_output=True, text=True)
    assert stale.returncode == 1
    assert "stale" in stale.stderr and "api.ts" in stale.stderr and "runtime.ts" not in stale.stderr


def test_cli_names_the_module_that_does_not_import(tmp_path):
    (tmp_path / "brokenapp.py").write_text("from forge_kernel import query\n\n@query\nasync def f(ctx) -> int\n    return 1\n")
    root, env = _project(tmp_path, ["brokenapp"])
    proc = subprocess.run([*CLI, "generate", "ts"], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "cannot import app module 'brokenapp'" in proc.stderr and "brokenapp.py:4" in proc.stderr
    assert "SyntaxError" in proc.stderr and "Traceback" not in proc.stderr
    assert not (root / "client").exists()


def test_cli_reports_unsupported_types_and_writes_nothing(tmp_path):
    root, env = _project(tmp_path, ["cg_bad_types_app"])
    proc = subprocess.run([*CLI, "generate", "ts"], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "function 'either' (cg_bad_types_app), argument 'value'" in proc.stderr
    assert not (root / "client").exists()


def test_dotted_function_names_nest_and_collisions_are_named():
    from forge_kernel.app import Registry

    reg = Registry()
    for name in ("todos.add", "todos.list", "health"):
        reg.add(_named(name))
    text = tsgen.generate(reg).files["api.ts"]
    assert '  todos: {\n' in text and '    add: fn<"query", Record<string, never>, number>("todos.add", "query"),' in text
    reg.add(_named("todos"))
    with pytest.raises(tsgen.GenerateError, match="function 'todos' and function 'todos.add'"):
        tsgen.generate(reg)


def _named(name: str):
    from forge_kernel import query

    async def fn(ctx) -> int:
        return 1

    return query(name=name, public=True)(fn).__forge__
