"""Layout rules from docs/architecture.md (section 2): plugins depend on the kernel and third-party libraries, never on each other."""

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = sorted(p.parent for p in [*ROOT.glob("forge-*/pyproject.toml"), *ROOT.glob("plugins/*/pyproject.toml")])
IMPORTS = {p.name.replace("-", "_"): p for p in PACKAGES}


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("pkg", PACKAGES, ids=[p.name for p in PACKAGES])
def test_plugin_does_not_depend_on_other_plugins(pkg):
    meta = tomllib.loads((pkg / "pyproject.toml").read_text())["project"]
    deps = {d.split(">")[0].split("=")[0].split("[")[0].split("<")[0].strip() for d in meta.get("dependencies", [])}
    others = {p.name for p in PACKAGES if p != pkg}
    assert not deps & others, f"{pkg.name} declares a dependency on {deps & others}"
    own = pkg.name.replace("-", "_")
    for src in pkg.rglob("*.py"):
        if "tests" in src.relative_to(pkg).parts:
            continue  # tests may drive several packages together
        bad = (imported_modules(src) & set(IMPORTS)) - {own}
        assert not bad, f"{src.relative_to(ROOT)} imports {bad}"


def test_kernel_does_not_import_plugins():
    for src in (ROOT / "forge_kernel").rglob("*.py"):
        bad = imported_modules(src) & set(IMPORTS)
        assert not bad, f"{src.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("pkg", PACKAGES, ids=[p.name for p in PACKAGES])
def test_plugin_registers_through_the_entry_point_group(pkg):
    meta = tomllib.loads((pkg / "pyproject.toml").read_text())["project"]
    eps = meta.get("entry-points", {}).get("forge.plugins", {})
    assert eps, f"{pkg.name} has no forge.plugins entry point"
    for target in eps.values():
        module = target.split(":")[0]
        assert module.endswith(".hooks"), f"{pkg.name}: the entry point should name the thin hooks module, got {module}"


def test_every_hook_spec_documents_its_contract():
    from forge_kernel import hookspecs

    specs = [name for name in dir(hookspecs) if name.startswith("forge_")]
    assert len(specs) >= 10
    for name in specs:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "Called" in doc or "called" in doc, f"{name}: say when it is called"
        assert any(w in doc for w in ("Return", "return", "raise")), f"{name}: say what to return"
        assert any(w in doc for w in ("Implemented", "plugin", "Plugin")), f"{name}: say who implements it"
