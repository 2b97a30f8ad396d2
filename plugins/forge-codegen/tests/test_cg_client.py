"""The generated TypeScript client, for real: tsc --strict with @ts-expect-error cases, and Node's test
runner driving the client against a real forge-node process (every error code, live updates, a killed
socket resumed, a 2 s token refreshed, a dead connection replaced)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cg_support import child_env
from forge_codegen import tsgen
from forge_codegen.appload import load
from forge_kernel.testing.procs import free_port

JS = Path(__file__).resolve().parent.parent / "js"
SECRET = "codegen-test-secret-of-32-bytes-or-more!"


def _generate(out: Path, modules: list[str], *, svelte: bool = False) -> tsgen.Generated:
    generated = tsgen.generate(load(modules).registry, svelte=svelte)
    tsgen.write(out, generated)
    return generated


def _fail(what: str, proc: subprocess.CompletedProcess) -> str:
    return f"{what} exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


def test_generated_client_and_consumer_pass_tsc_strict(js_tools, tmp_path):
    _generate(tmp_path / "generated", ["cg_app"], svelte=True)
    shutil.copy(JS / "tests" / "consumer.ts", tmp_path / "consumer.ts")
    proc = js_tools.tsc(tmp_path, ["generated/api.ts", "generated/runtime.ts", "consumer.ts"])
    assert proc.returncode == 0, _fail("tsc", proc)


def test_tsc_fails_on_a_misuse_the_expect_error_lines_do_not_cover(js_tools, tmp_path):
    """The consumer check can fail at all: one ts-expect-error removed turns into an error naming the line."""
    _generate(tmp_path / "generated", ["cg_app"])
    text = (JS / "tests" / "consumer.ts").read_text().replace("  // @ts-expect-error wrong argument type\n", "")
    (tmp_path / "consumer.ts").write_text(text)
    proc = js_tools.tsc(tmp_path, ["generated/api.ts", "generated/runtime.ts", "consumer.ts"])
    assert proc.returncode != 0
    assert "consumer.ts(25," in proc.stdout and "not assignable" in proc.stdout, proc.stdout


def test_renaming_a_python_argument_breaks_the_consumers_tsc(js_tools, tmp_path, monkeypatch):
    app = tmp_path / "renamed_app.py"
    source = ("from forge_kernel import mutation\n\n"
              "@mutation\nasync def add(ctx, title: str) -> str:\n    return title\n")
    app.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "consumer.ts").write_text(
        'import { connect } from "./generated/api";\n'
        'export const done: Promise<string> = connect({ url: "http://x" }).add({ title: "milk" });\n')
    _generate(tmp_path / "generated", ["renamed_app"])
    assert js_tools.tsc(tmp_path, ["generated/*.ts", "consumer.ts"]).returncode == 0

    app.write_text(source.replace("title", "name"))
    sys.modules.pop("renamed_app", None)
    _generate(tmp_path / "generated", ["renamed_app"])
    proc = js_tools.tsc(tmp_path, ["generated/*.ts", "consumer.ts"])
    assert proc.returncode != 0
    assert "consumer.ts" in proc.stdout and "'title' does not exist" in proc.stdout, proc.stdout


@pytest.fixture
def cg_node(forge_processes):
    cfg = {
        "node": {"roles": ["gateway", "function", "realtime"]},
        "gateway": {"port": free_port(), "jwt_secret": SECRET, "max_body_bytes": 65536, "rate_limit_lease": 0.0},
        "app": {"modules": ["cg_app"], "example": False},
        "realtime": {"fallback_poll": 0.05},
    }
    proc = forge_processes(cfg, env=child_env())
    return f"http://127.0.0.1:{cfg['gateway']['port']}", proc


def test_client_against_a_real_node(js_tools, cg_node, tmp_path):
    url, proc = cg_node
    _generate(tmp_path / "generated", ["cg_app"])
    bundle = tmp_path / "client.mjs"
    js_tools.bundle(tmp_path / "generated" / "api.ts", bundle)
    result = js_tools.node_test([JS / "tests" / "client.test.mjs"],
                                env={"FORGE_CLIENT": str(bundle), "FORGE_URL": url, "FORGE_JWT_SECRET": SECRET})
    assert result.returncode == 0, _fail("node --test", result) + "\nnode log:\n" + proc.log()[-3000:]
    assert "# fail 0" in result.stdout or "fail 0" in result.stdout, result.stdout


def test_runtime_size_stays_small(js_tools, tmp_path):
    """The target is 10 kB min+gzip for everything the generated client pulls in (printed for the report)."""
    _generate(tmp_path / "generated", ["cg_app"])
    minified, gzipped = js_tools.min_gzip_size(tmp_path / "generated" / "api.ts", tmp_path)
    print(f"generated client: {minified} bytes minified, {gzipped} bytes min+gzip")
    assert gzipped <= 10_000


def test_svelte_bindings_compile_without_warnings_and_work_with_a_fake_socket(js_tools, tmp_path):
    generated = _generate(tmp_path / "generated", ["cg_app"], svelte=True)
    build = JS / ".build" / tmp_path.name  # inside js/: node resolves svelte from js/node_modules
    build.mkdir(parents=True, exist_ok=True)
    try:
        compiled = js_tools.svelte_compile(tmp_path / "generated" / "svelte.svelte.ts", build / "svelte.js")
        assert compiled.returncode == 0 and compiled.stdout == "", _fail("svelte compile (warnings or errors)", compiled)
        harness = js_tools.svelte_compile(JS / "tests" / "harness.svelte.js", build / "harness.js")
        assert harness.returncode == 0, _fail("svelte compile of the test harness", harness)
        shutil.copy(tmp_path / "generated" / "runtime.ts", build / "runtime.ts")
        shutil.copy(JS / "tests" / "svelte-entry.js", build / "entry.js")
        js_tools.bundle(build / "entry.js", build / "bundle.mjs", browser=True)
        result = js_tools.node_test([JS / "tests" / "svelte.test.mjs"], env={"FORGE_SVELTE_BUNDLE": str(build / "bundle.mjs")})
        assert result.returncode == 0, _fail("node --test", result)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    # the bindings type-check with the generated client too
    (tmp_path / "use.ts").write_text(
        'import { connect } from "./generated/api";\nimport { useQuery } from "./generated/svelte.svelte";\n'
        'const api = connect({ url: "http://x" });\n'
        "export const items = () => useQuery(api.list_items, () => ({}));\n"
        "// @ts-expect-error only queries\nexport const bad = () => useQuery(api.add_item, () => ({ title: 'x' }));\n"
        "// @ts-expect-error arguments of the wrong shape\nexport const bad2 = () => useQuery(api.echo, () => ({ text: 1 }));\n")
    assert "svelte.svelte.ts" in generated.files
    (tmp_path / "node_modules").symlink_to(JS / "node_modules")  # svelte's types, as in a real project
    proc = js_tools.tsc(tmp_path, ["generated/*.ts", "use.ts"])
    assert proc.returncode == 0, _fail("tsc", proc)
