"""Finding and loading plugins, one at a time, so one broken plugin cannot break the rest.

Discovery: the ``forge.plugins`` entry-point group (built-in role packages use it too).
Switches: ``FORGE_DISABLE_PLUGIN_AUTOLOAD=1`` loads no entry points (only plugins given
explicitly, e.g. ``FORGE_PLUGINS=pkg.hooks,other.hooks``); ``FORGE_DISABLE_PLUGINS=a,b``
skips the named plugins (entry-point name or distribution name).

Each plugin is first registered on a scratch plugin manager and its descriptive hooks
(roles, config sections, migrations) are called; only if all of that works is it
registered for real. A plugin that fails is recorded with its distribution, version and
error and is never left half-registered.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import traceback
from typing import Any, Iterable, Mapping

import attrs
import pluggy

from . import hookspecs
from .errors import StartupError
from .migrations import Migration

GROUP = "forge.plugins"

#: which distribution provides a role, to name the package to install
ROLE_PACKAGES = {
    "gateway": "forge-gateway",
    "function": "forge-gateway",
    "worker": "forge-worker",
    "scheduler": "forge-scheduler",
    "realtime": "forge-realtime",
    "observe": "forge-observe",
}

#: which FORGE distribution owns a config section. One ``forge.toml`` serves a whole cluster: a
#: node ignores (with one log line) the sections of packages whose plugin it does not load, and
#: still rejects sections nobody owns. Add a package's sections here when it gains some.
SECTION_PACKAGES = {
    "gateway": "forge-gateway",
    "worker": "forge-worker",
    "workflows": "forge-worker",
    "scheduler": "forge-scheduler",
    "realtime": "forge-realtime",
    "observe": "forge-observe",
    "mesh": "forge-mesh",
    "codegen": "forge-codegen",
    "hello": "forge-hello",
}


@attrs.define
class PluginInfo:
    name: str
    distribution: str | None = None
    version: str | None = None
    status: str = "found"  # found | loaded | failed | disabled
    error: str | None = None
    roles: list[str] = attrs.field(factory=list)
    sections: list[str] = attrs.field(factory=list)
    hooks: list[str] = attrs.field(factory=list)
    plugin: Any = attrs.field(default=None, repr=False)
    traceback: str | None = attrs.field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self, filter=lambda a, v: a.name not in ("plugin", "traceback"))


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("forge")
    pm.add_hookspecs(hookspecs)
    return pm


def _flat(results: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for r in results:
        if r is None:
            continue
        if isinstance(r, (list, tuple)):
            out.extend(r)
        else:
            out.append(r)
    return out


def _probe(obj: Any, name: str) -> tuple[list[str], dict[str, type], list[str]]:
    """Register ``obj`` on a scratch manager and call its descriptive hooks; raise on any problem."""
    scratch = new_plugin_manager()
    scratch.register(obj, name=name)
    scratch.check_pending()  # a forge_* function that matches no hook spec is a typo, not a no-op
    roles = _flat(scratch.hook.forge_roles())
    for r in roles:
        if not isinstance(r, str) or not r:
            raise TypeError(f"forge_roles must return role names, got {r!r}")
    sections: dict[str, type] = {}
    for res in scratch.hook.forge_config_sections():
        if res is None:
            continue
        if not isinstance(res, Mapping):
            raise TypeError(f"forge_config_sections must return a mapping, got {type(res).__name__}")
        for sec, cls in res.items():
            if not attrs.has(cls):
                raise TypeError(f"config section [{sec}] must be an attrs class, got {cls!r}")
            sections[sec] = cls
    for m in _flat(scratch.hook.forge_migrations()):
        if not isinstance(m, Migration):
            raise TypeError(f"forge_migrations must return Migration objects, got {m!r}")
    hooks = sorted(c.name for c in scratch.get_hookcallers(obj) or [])
    return roles, sections, hooks


class PluginLoader:
    """Loads plugins into one plugin manager and remembers what happened to each."""

    def __init__(self, *, env: Mapping[str, str] | None = None) -> None:
        self.env = os.environ if env is None else env
        self.pm = new_plugin_manager()
        self.infos: list[PluginInfo] = []
        self.section_owner: dict[str, str] = {}
        from . import kernel_plugin

        self._register(kernel_plugin, PluginInfo("kernel", "forge-kernel", _version("forge-kernel")))

    # --- discovery -----------------------------------------------------------------
    def disabled_names(self) -> set[str]:
        raw = self.env.get("FORGE_DISABLE_PLUGINS", "")
        return {p.strip() for p in raw.split(",") if p.strip()}

    def autoload(self) -> bool:
        return self.env.get("FORGE_DISABLE_PLUGIN_AUTOLOAD", "").lower() not in ("1", "true", "yes")

    def load(self, extra: Iterable[tuple[str, Any]] = ()) -> "PluginLoader":
        disabled = self.disabled_names()
        if self.autoload():
            eps = sorted(md.entry_points(group=GROUP), key=lambda e: e.name)
            seen: set[str] = set()
            for ep in eps:
                if ep.name in seen:
                    continue
                seen.add(ep.name)
                dist = ep.dist.name if ep.dist else None
                info = PluginInfo(ep.name, dist, ep.dist.version if ep.dist else None)
                if ep.name in disabled or (dist and dist in disabled):
                    info.status = "disabled"
                    self.infos.append(info)
                    continue
                self._load_one(info, ep.load)
        for spec in [p.strip() for p in self.env.get("FORGE_PLUGINS", "").split(",") if p.strip()]:
            if spec in disabled:
                continue
            dist = _distribution_of(spec)
            info = PluginInfo(spec, dist, _version(dist) if dist else None)
            self._load_one(info, lambda s=spec: importlib.import_module(s))
        for name, obj in extra:
            self._load_one(PluginInfo(name, None, None), lambda o=obj: o)
        return self

    def _load_one(self, info: PluginInfo, get: Any) -> None:
        try:
            obj = get()
        except Exception as exc:
            info.status, info.error = "failed", f"import failed: {type(exc).__name__}: {exc}"
            info.traceback = traceback.format_exc()
            self.infos.append(info)
            return
        self._register(obj, info)

    def _register(self, obj: Any, info: PluginInfo) -> None:
        try:
            roles, sections, hooks = _probe(obj, info.name)
            for sec in sections:
                if sec in self.section_owner:
                    raise StartupError(f"config section [{sec}] is already owned by {self.section_owner[sec]}")
            self.pm.register(obj, name=info.name)
        except Exception as exc:
            # never leave a half-registered plugin behind
            if self.pm.get_plugin(info.name) is not None:
                self.pm.unregister(name=info.name)
            info.status, info.error = "failed", f"{type(exc).__name__}: {exc}"
            info.traceback = traceback.format_exc()
            self.infos.append(info)
            return
        for sec in sections:
            self.section_owner[sec] = info.distribution or info.name
        info.status, info.roles, info.sections, info.hooks, info.plugin = "loaded", roles, sorted(sections), hooks, obj
        self.infos.append(info)

    # --- queries ---------------------------------------------------------------------
    @property
    def hook(self):
        return self.pm.hook

    def loaded(self) -> list[PluginInfo]:
        return [i for i in self.infos if i.status == "loaded"]

    def failed(self) -> list[PluginInfo]:
        return [i for i in self.infos if i.status == "failed"]

    def provided_roles(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for i in self.loaded():
            for r in i.roles:
                out.setdefault(r, i.distribution or i.name)
        return out

    def absent_sections(self) -> dict[str, str]:
        """Config sections of FORGE packages with no loaded plugin here: section -> package."""
        loaded = {i.distribution for i in self.loaded()}
        return {sec: pkg for sec, pkg in SECTION_PACKAGES.items() if pkg not in loaded}

    def config_sections(self) -> dict[str, type]:
        out: dict[str, type] = {}
        for res in self.pm.hook.forge_config_sections():
            if res:
                out.update(res)
        return out

    def migrations(self) -> list[Migration]:
        return _flat(self.pm.hook.forge_migrations())

    def resolve_roles(self, wanted: Iterable[str]) -> list[str]:
        """Roles the node runs: ``wanted`` (or all provided when empty). Raises naming the
        package to install, or the plugin that failed, when a needed role is missing."""
        provided = self.provided_roles()
        wanted = list(wanted)
        failed = self.failed()
        if not wanted:
            # installed-but-broken role packages are needed roles too
            for f in failed:
                for role, dist in ROLE_PACKAGES.items():
                    if f.distribution == dist and role not in provided:
                        raise StartupError(
                            f"plugin {f.name} ({f.distribution} {f.version}) provides role {role!r} "
                            f"but failed to load: {f.error}")
            return sorted(provided)
        for role in wanted:
            if role in provided:
                continue
            dist = ROLE_PACKAGES.get(role)
            broken = [f for f in failed if dist and f.distribution == dist]
            if broken:
                f = broken[0]
                raise StartupError(f"[node] roles asks for {role!r}, but plugin {f.name} ({f.distribution} "
                                   f"{f.version}) that provides it failed to load: {f.error}")
            hint = f"install {dist} (pip install {dist})" if dist else "no known package provides it"
            raise StartupError(f"[node] roles asks for {role!r}, which no loaded plugin provides; {hint}")
        return sorted(dict.fromkeys(wanted))


def _distribution_of(module: str) -> str | None:
    """The installed distribution that ships ``module`` (for plugins named in FORGE_PLUGINS)."""
    dists = md.packages_distributions().get(module.split(".")[0]) or []
    return dists[0] if dists else None


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None
