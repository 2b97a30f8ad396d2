"""``forge.toml`` plus ``FORGE_<SECTION>__<KEY>`` environment overrides.

Each plugin owns a section: an attrs class returned from ``forge_config_sections``.
The kernel owns ``[node]``, ``[database]``, ``[app]`` and ``[log]``. Every problem
(unknown section or key, wrong type, bad value) is collected and reported at once,
naming the key, the value, what was expected and where the value came from (the file, or
the environment variable that set it).

One ``forge.toml`` can serve a whole cluster: a section that belongs to a FORGE package
whose plugin is not loaded on this node (``foreign``: section -> package, see
``forge_kernel.plugins.SECTION_PACKAGES``) is skipped and listed in ``Config.ignored``;
a section nobody knows stays an error.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
import typing
from pathlib import Path
from typing import Any, Mapping

import attrs

from .convert import InvalidValue, Problem, StructureError, structure, unstructure
from .errors import ConfigError
from .logs import Redactor, is_secret_field, secret_values

ENV_PREFIX = "FORGE_"


def redact_url(text: str) -> str:
    """``text`` with the password of a ``scheme://user:password@host`` URL (or its ``password=``
    parameter) replaced by ``***``: config errors and logs show URLs, never their passwords."""
    text = re.sub(r"(://[^:/?#@\s]*:)[^/?#\s]*@", r"\1***@", text)
    return re.sub(r"([?&]password=)[^&\s]*", r"\1***", text)


# --- validators that name what they expect -------------------------------------------
def in_range(lo: float | None = None, hi: float | None = None):
    def check(inst: Any, attr: attrs.Attribute, value: Any) -> None:
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"between {lo} and {hi}")
            raise InvalidValue(attr.name, value, f"a number {bounds}")

    return check


def one_of(*choices: str):
    def check(inst: Any, attr: attrs.Attribute, value: Any) -> None:
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v not in choices:
                raise InvalidValue(attr.name, v, f"one of {', '.join(choices)}")

    return check


def identifiers(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    for v in value:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise InvalidValue(attr.name, v, "names of letters, digits, '-', '_' or '.'")


def _gc_thresholds(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if len(value) != 3 or any(not 0 <= v <= 2**31 - 1 for v in value):
        raise InvalidValue(attr.name, value, "three whole numbers from 0 to 2147483647 (generations 0, 1 and 2)")


def _port_or_zero(attr: attrs.Attribute, value: int) -> None:
    if value != 0 and not 1024 <= value <= 65535:
        raise InvalidValue(attr.name, value, "0 (unix socket only) or a TCP port from 1024 to 65535")


# --- kernel sections ---------------------------------------------------------------
@attrs.frozen
class NodeConfig:
    #: node id; empty means generated at start-up
    id: str = ""
    #: host name advertised to the cluster
    host: str = attrs.field(factory=socket.gethostname)
    #: roles to run; empty means every role the installed plugins provide
    roles: list[str] = attrs.field(factory=list, validator=identifiers)
    #: what this node's hardware/software offers (jobs may require these)
    capabilities: list[str] = attrs.field(factory=list, validator=identifiers)
    heartbeat_interval: float = attrs.field(default=2.0, validator=in_range(0.05, 300))
    #: a node whose heartbeat is older than this is considered dead
    dead_after: float = attrs.field(default=15.0, validator=in_range(0.5, 3600))
    #: seconds a draining node waits for its services to stop
    drain_timeout: float = attrs.field(default=30.0, validator=in_range(0, 3600))
    #: ``auto`` runs the node on uvloop when it is installed (it is on Linux and macOS), else on
    #: asyncio's own loop; ``uvloop`` insists on it, ``asyncio`` never uses it
    event_loop: str = attrs.field(default="auto", validator=one_of("auto", "uvloop", "asyncio"))
    #: ``gc.set_threshold`` of a ``forge-node start`` process (generations 0, 1, 2). Python's
    #: 700 allocations per young collection makes a busy server scan its live connections over
    #: and over: bench/realtime (c) pushed 26,000 results/s at p99 696 ms with it, 42,000/s at
    #: p99 281 ms with 50,000. ``[0, 0, 0]`` turns the cyclic collector off.
    gc_thresholds: list[int] = attrs.field(factory=lambda: [50_000, 10, 10], validator=_gc_thresholds)
    #: seconds between full collections of the cyclic GC in a ``forge-node start`` process; 0 never.
    #: With the thresholds above a quiet node reaches a full collection only after millions of
    #: allocations, so the cycles every closed connection leaves (uvicorn's protocol, its scope and
    #: queue) piled up for hours: bench/soak's never-killed node held 333 WebSocket protocols for
    #: its 166 open sockets and grew 104 -> 124 MB in 30 minutes. The start-up heap is frozen, so a
    #: collection scans only what requests allocated since
    gc_collect_interval: float = attrs.field(default=60.0, validator=in_range(0, 86_400))
    #: a timed collection runs only when the heap (``sys.getallocatedblocks()``) has changed by at
    #: least this fraction since the last full collection (the interpreter's own included); 0: at every interval. A full collection costs in
    #: proportion to what lives, not to what it frees: a node holding 5,000 WebSocket connections
    #: tracks ~640,000 objects and paused 0.5-0.6 s of CPU (1.1-7 s on a busy machine) every minute
    #: to find nothing (bench/realtime (c)). Uncollected cycles are heap that was allocated, so they
    #: grow (or, when a wave of connections closes and their acyclic parts are freed, shrink) the
    #: count: garbage stays within this fraction of the heap
    gc_collect_growth: float = attrs.field(default=0.05, validator=in_range(0, 10))
    #: each timed collection freezes what survives it, so the next one walks only what was allocated
    #: since (bench/realtime (b) with 1,000 open sockets and two CPU burners: 23-27 ms of CPU over 24,000
    #: objects, then 1-3 ms, against 86-116 ms over 112,000 every time, pauses of up to 625 ms in the
    #: middle of the writes). Frozen objects that become garbage later (a closed connection's cycles)
    #: are found by a timed collection that unfreezes and walks everything, the start-up heap too, which
    #: runs once the heap has grown by this fraction since the last such one, and at the latest every
    #: tenth ``gc_collect_interval`` (a heap that stopped growing still has its frozen garbage freed)
    gc_rescan_growth: float = attrs.field(default=0.25, validator=in_range(0.01, 10))


@attrs.frozen
class DatabaseConfig:
    #: PostgreSQL URL of the pool (functions, jobs, crons); may be a transaction-mode pooler
    #: (PgBouncer). Empty means an embedded server under ``data_dir``
    url: str = ""
    #: the server itself, for what needs a session: migrations, leader election, LISTEN, the
    #: realtime change reader, heartbeats. Empty means ``url``
    direct_url: str = ""
    #: ``transaction``: ``url`` is a transaction-mode pooler - no statement cache, no session state
    #: between transactions. ``none``: a server (or a session-mode pooler). ``auto``: ``transaction``
    #: when ``direct_url`` is set and differs from ``url``, else ``none``
    pooler: str = attrs.field(default="auto", validator=one_of("auto", "none", "transaction"))
    #: a streaming replica (hot standby) queries may read from; empty means they read ``url``
    read_url: str = ""
    #: seconds a query waits for the replica to replay the writes it must see (read-your-writes)
    #: before it reads the primary instead
    read_wait: float = attrs.field(default=0.5, validator=in_range(0, 60))
    data_dir: str = ".forge"
    #: embedded server only: 0 serves the unix socket alone; a port also listens on 127.0.0.1 there
    #: (password required) and keeps that port across restarts
    embedded_port: int = attrs.field(default=0, validator=lambda i, a, v: _port_or_zero(a, v))
    pool_min: int = attrs.field(default=2, validator=in_range(0, 1000))
    pool_max: int = attrs.field(default=20, validator=in_range(1, 1000))
    #: seconds to wait for a connection at start-up
    connect_timeout: float = attrs.field(default=10.0, validator=in_range(0.1, 600))

    def __attrs_post_init__(self) -> None:
        if self.pool_min > self.pool_max:
            raise InvalidValue("pool_min", self.pool_min, f"at most pool_max ({self.pool_max})")
        if not self.url:
            for key in ("direct_url", "read_url"):
                if getattr(self, key):
                    raise InvalidValue(key, redact_url(getattr(self, key)),
                                       "nothing while [database] url is empty (the embedded server "
                                       "needs no direct URL and has no replica)")
            if self.pooler == "transaction":
                raise InvalidValue("pooler", self.pooler, "'none' or 'auto' while [database] url is empty "
                                                          "(the embedded server has no pooler in front)")
        elif self.pooler == "transaction" and self.session_url == self.url:
            raise InvalidValue("direct_url", redact_url(self.direct_url),
                               "the server itself, not [database] url, with pooler = 'transaction' (migrations, "
                               "leader election and LISTEN need a session, which a transaction pooler cannot keep)")

    @property
    def session_url(self) -> str:
        """Where sessions go (``direct_url``, else ``url``)."""
        return self.direct_url or self.url

    @property
    def transaction_pooler(self) -> bool:
        """Whether ``url`` is a transaction-mode pooler (``pooler``, ``auto`` resolved)."""
        if self.pooler == "auto":
            return bool(self.direct_url) and self.direct_url != self.url
        return self.pooler == "transaction"


@attrs.frozen
class AppConfig:
    #: Python modules whose decorated functions make up the app
    modules: list[str] = attrs.field(factory=list)
    #: default per-function timeout in seconds
    function_timeout: float = attrs.field(default=30.0, validator=in_range(0.001, 86400))
    #: serve ``forge_kernel.example`` when no modules are configured
    example: bool = True
    #: every call's transaction carries the caller for row-level security policies (forge.user_id,
    #: forge.auth_kind, forge.roles): ``auto`` when a table has RLS enabled, ``on``, ``off``
    row_security: str = attrs.field(default="auto", validator=one_of("auto", "on", "off"))


@attrs.frozen
class LogConfig:
    level: str = attrs.field(default="INFO", validator=one_of("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"))
    json: bool = False


KERNEL_SECTIONS: dict[str, type] = {
    "node": NodeConfig,
    "database": DatabaseConfig,
    "app": AppConfig,
    "log": LogConfig,
}


@attrs.frozen
class Config:
    """Structured configuration: one attrs instance per section."""

    sections: Mapping[str, Any]
    source: str = "<defaults>"
    #: the config file read, if any
    path: str | None = None
    #: sections skipped because they belong to a FORGE package not loaded here: package -> sections
    ignored: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.sections[name]

    @property
    def node(self) -> NodeConfig:
        return self.sections["node"]

    @property
    def database(self) -> DatabaseConfig:
        return self.sections["database"]

    @property
    def app(self) -> AppConfig:
        return self.sections["app"]

    @property
    def log(self) -> LogConfig:
        return self.sections["log"]

    def evolve(self, section: str, **changes: Any) -> "Config":
        new = dict(self.sections)
        new[section] = attrs.evolve(new[section], **changes)
        return attrs.evolve(self, sections=new)

    def to_dict(self) -> dict[str, Any]:
        return {name: unstructure(value) for name, value in self.sections.items()}


# --- loading -----------------------------------------------------------------------
def _field_type(cls: type, key: str) -> Any:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        return None
    return hints.get(key)


def _env_value(raw: str, tp: Any) -> Any:
    """Env values are TOML literals (``8081``, ``true``, ``["a","b"]``) unless the key is a string."""
    if tp is str:
        return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        origin = typing.get_origin(tp)
        if origin in (list, tuple, set, frozenset):
            # bare words for a list of names: FORGE_NODE__ROLES=worker,gateway
            if typing.get_args(tp)[:1] == (str,):
                return [part.strip() for part in raw.split(",") if part.strip()]
            # a list without brackets: FORGE_NODE__GC_THRESHOLDS=50000,10,10
            try:
                return tomllib.loads(f"v = [{raw}]")["v"]
            except tomllib.TOMLDecodeError:
                pass
        return raw


def _kind_at(table: Mapping[str, Any], path: str) -> str:
    """The type name of the raw value at ``path`` (``api_keys[0].sha256``) in ``table``."""
    value: Any = table
    for part in re.findall(r"[^.\[\]]+", path):
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return "a value"
    return type(value).__name__


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(
    sections: Mapping[str, type],
    *,
    path: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    data: Mapping[str, Any] | None = None,
    owners: Mapping[str, str] | None = None,
    foreign: Mapping[str, str] | None = None,
) -> Config:
    """Build a :class:`Config` from a TOML file (or ``data``) and environment overrides.

    ``sections`` maps section name to attrs class (kernel plus plugins); ``owners`` maps
    section to the distribution that owns it, for error messages; ``foreign`` maps sections
    of FORGE packages not loaded on this node to their package: those are ignored.
    """
    env = os.environ if env is None else env
    foreign = foreign or {}
    source, file = "<defaults>", None
    raw: dict[str, Any] = {}
    if data is not None:
        raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
        source = "<data>"
    else:
        explicit = path or env.get("FORGE_CONFIG")
        candidate = Path(explicit) if explicit else Path("forge.toml")
        if candidate.is_file():
            raw = read_toml(candidate)
            source = file = str(candidate)
        elif explicit:
            what = "does not exist" if not candidate.exists() else "is not a file"
            raise ConfigError(f"config file {candidate} (from {'--config' if path else 'FORGE_CONFIG'}) {what}")

    problems: list[Problem] = []
    ignored: dict[str, list[str]] = {}
    where = f" (in {source})" if file else ""
    for name, value in list(raw.items()):
        if name not in sections and name in foreign:
            ignored.setdefault(foreign[name], []).append(name)
            del raw[name]
        elif name not in sections:
            problems.append(Problem(f"[{name}]", f"unknown section{where}; known sections: {', '.join(sorted(sections))}"))
        elif not isinstance(value, Mapping):
            problems.append(Problem(f"[{name}]", f"expected a table, got {type(value).__name__} {value!r}{where}"))

    #: (section, key) -> the environment variable that set it
    from_env: dict[tuple[str, str], str] = {}
    for key, rawval in sorted(env.items()):
        if not key.startswith(ENV_PREFIX) or "__" not in key or key == "FORGE_CONFIG":
            continue
        section, _, field = key[len(ENV_PREFIX):].partition("__")
        section, field = section.lower(), field.lower()
        if section not in sections:
            if section in foreign:
                if section not in ignored.get(foreign[section], []):
                    ignored.setdefault(foreign[section], []).append(section)
            else:
                problems.append(Problem(f"[{section}] {field}", f"unknown section (set by environment variable {key}); "
                                                                f"known sections: {', '.join(sorted(sections))}"))
            continue
        table = raw.setdefault(section, {})
        if isinstance(table, Mapping):
            table = dict(table)
            table[field] = _env_value(rawval, _field_type(sections[section], field))
            raw[section] = table
            from_env[(section, field)] = key

    built: dict[str, Any] = {}
    for name, cls in sections.items():
        table = raw.get(name, {})
        if not isinstance(table, Mapping):
            continue
        try:
            built[name] = structure(dict(table), cls)
        except StructureError as exc:
            for p in exc.problems:
                field = p.path.split(".")[0].split("[")[0] if p.path else ""
                value = table.get(field, None) if field else None
                owner = f" (section of {owners[name]})" if owners and owners.get(name, "forge-kernel") != "forge-kernel" else ""
                key = f"[{name}] {p.path}" if p.path else f"[{name}]"
                origin = (f" (set by environment variable {from_env[(name, field)]})" if (name, field) in from_env
                          else where)
                if any(is_secret_field(part) for part in re.split(r"[.\[\]]", p.path) if part):
                    # a secret (or a raw key where its hash belongs) is never echoed: its type only
                    message = p.message.split(", got ")[0] + f", got {_kind_at(table, p.path)} (value not shown: a secret)"
                    problems.append(Problem(key, message + owner + origin))
                    continue
                if isinstance(value, str):
                    value = redact_url(value)
                shown = f" = {value!r}" if value is not None and "unknown key" not in p.message else ""
                problems.append(Problem(key + shown, p.message + owner + origin))
        except (ValueError, TypeError) as exc:  # cross-field checks in __attrs_post_init__
            set_by = sorted(v for (sec, _), v in from_env.items() if sec == name)
            origin = where + (f" (environment variables: {', '.join(set_by)})" if set_by else "")
            problems.append(Problem(f"[{name}]", str(exc) + origin))
    if problems:
        listing = "\n".join(f"  - {p.path}: {p.message}" for p in problems)
        scrub = Redactor()  # the config never loaded, so the process-wide redactor knows none of its secrets
        scrub.add_values(secret_values(raw))
        raise ConfigError(scrub(f"invalid configuration in {source}:\n{listing}"))
    return Config(sections=built, source=source, path=file,
                  ignored={pkg: tuple(secs) for pkg, secs in ignored.items()})
