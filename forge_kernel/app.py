"""The app API: decorators that describe functions, and the registry that collects them.

Decorators only attach a :class:`FunctionDef` to the function (``fn.__forge__``); nothing
global is mutated, so several nodes (or tests) can load the same modules side by side.
A :class:`Registry` is built from modules by collecting what they define.
"""

from __future__ import annotations

import datetime as dt
import importlib
import inspect
import re
import typing
from types import ModuleType
from typing import Any, Callable, Iterable, Literal, Mapping

import attrs

from .errors import StartupError

Kind = Literal["query", "mutation", "action", "job", "cron", "workflow"]
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_EMPTY = inspect.Parameter.empty


@attrs.frozen
class Param:
    name: str
    type: Any
    default: Any = _EMPTY

    @property
    def required(self) -> bool:
        return self.default is _EMPTY


@attrs.frozen
class RateLimit:
    """``requests`` per ``per`` seconds, counted per ``key`` (``user``, ``ip`` or ``global``)."""

    requests: int
    per: float = 1.0
    key: Literal["user", "ip", "global"] = "user"


@attrs.frozen
class FunctionDef:
    """Everything FORGE knows about one app function."""

    name: str
    kind: Kind
    fn: Callable[..., Any]
    params: tuple[Param, ...]
    returns: Any
    public: bool = False
    roles: tuple[str, ...] = ()
    timeout: float | None = None
    rate_limit: RateLimit | None = None
    #: tables a query declares it reads (realtime uses these when it cannot trace reads)
    reads: tuple[str, ...] = ()
    #: kind-specific settings: job (max_attempts, priority, queue, capability, ...), cron (schedule, timezone, ...)
    options: Mapping[str, Any] = attrs.field(factory=dict)
    doc: str = ""

    @property
    def module(self) -> str:
        return getattr(self.fn, "__module__", "")

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def _signature(fn: Callable[..., Any], kind: str) -> tuple[tuple[Param, ...], Any]:
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"@{kind} {fn.__qualname__}: must be an 'async def' function")
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        raise TypeError(f"@{kind} {fn.__qualname__}: cannot resolve type hints: {exc}") from exc
    items = list(sig.parameters.values())
    if not items or items[0].kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        raise TypeError(f"@{kind} {fn.__qualname__}: the first parameter must be the context (ctx)")
    params = []
    for p in items[1:]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise TypeError(f"@{kind} {fn.__qualname__}: *args/**kwargs are not allowed (argument {p.name!r})")
        if p.name not in hints:
            raise TypeError(f"@{kind} {fn.__qualname__}: argument {p.name!r} needs a type hint")
        params.append(Param(p.name, hints[p.name], p.default))
    return tuple(params), hints.get("return", Any)


def _make(kind: Kind, fn: Callable[..., Any], *, name: str | None = None, public: bool = False,
          roles: Iterable[str] = (), timeout: float | dt.timedelta | None = None,
          rate_limit: RateLimit | None = None, reads: Iterable[str] = (), **options: Any) -> Callable[..., Any]:
    fname = name or fn.__name__
    if not _NAME.match(fname):
        raise ValueError(f"@{kind}: invalid function name {fname!r} (letters, digits, '_' and '.')")
    if isinstance(timeout, dt.timedelta):
        timeout = timeout.total_seconds()
    if timeout is not None and timeout <= 0:
        raise ValueError(f"@{kind} {fname}: timeout must be positive, got {timeout!r}")
    params, returns = _signature(fn, kind)
    fn.__forge__ = FunctionDef(  # type: ignore[attr-defined]
        name=fname, kind=kind, fn=fn, params=params, returns=returns, public=public,
        roles=tuple(roles), timeout=timeout, rate_limit=rate_limit, reads=tuple(reads),
        options=options, doc=inspect.getdoc(fn) or "",
    )
    return fn


def _decorator(kind: Kind):
    def decorator(fn: Callable[..., Any] | None = None, /, **settings: Any):
        if fn is not None:
            return _make(kind, fn, **settings)
        return lambda f: _make(kind, f, **settings)

    decorator.__name__ = kind
    decorator.__doc__ = f"Register an async function as a FORGE {kind}. Settings: name, public, roles, timeout, rate_limit, ..."
    return decorator


#: ``@query`` - read-only, runs in a read-only transaction, subscribable over WebSocket.
query = _decorator("query")
#: ``@mutation`` - runs in one transaction; ``ctx.dispatch`` writes jobs into it.
mutation = _decorator("mutation")
#: ``@action`` - may call the outside world; calls queries/mutations through ``ctx``.
action = _decorator("action")


def job(fn: Callable[..., Any] | None = None, /, *, max_attempts: int = 5, priority: int = 0,
        queue: str = "default", capability: str | None = None, timeout: float | dt.timedelta | None = None,
        **settings: Any):
    """``@job`` - a background job run at least once by a worker.

    ``priority``: higher runs first. ``capability``: only nodes with that ``[node] capabilities``
    entry run it. ``max_attempts``: attempts before dead letter. Further settings
    (``concurrency``, ``backoff``) are interpreted by the worker plugin; uniqueness is per
    dispatch (``ctx.dispatch(..., unique_key=...)``).
    """
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"@job: max_attempts must be a whole number >= 1, got {max_attempts!r}")
    opts = dict(max_attempts=max_attempts, priority=priority, queue=queue, capability=capability, **settings)
    if fn is not None:
        return _make("job", fn, timeout=timeout, **opts)
    return lambda f: _make("job", f, timeout=timeout, **opts)


def workflow(fn: Callable[..., Any] | None = None, /, *, version: str | int | None = None,
             previous: Mapping[str | int, Callable[..., Any]] | None = None, concurrency: int | None = None,
             max_recoveries: int | None = None, **settings: Any):
    """``@workflow`` - a durable multi-step process run by worker nodes (forge-worker).

    ``version``: the code version new runs record (default: a hash of the function's code);
    ``previous``: ``{old_version: old_function}`` so runs started on an older version keep
    running that version's code; ``concurrency``: most runs of this workflow executing at
    once, cluster-wide; ``max_recoveries``: how often a run may be recovered after its worker
    died before it fails (a run that kills its worker must not loop forever). Further settings
    are interpreted by the worker plugin.
    """
    if version is not None and (isinstance(version, bool) or not isinstance(version, (str, int))
                                or not str(version).strip()):
        raise ValueError(f"@workflow: version must be a non-empty string or an integer, got {version!r}")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                    or concurrency < 1):
        raise ValueError(f"@workflow: concurrency must be a whole number >= 1, got {concurrency!r}")
    if max_recoveries is not None and (isinstance(max_recoveries, bool) or not isinstance(max_recoveries, int)
                                       or max_recoveries < 0):
        raise ValueError(f"@workflow: max_recoveries must be a whole number >= 0, got {max_recoveries!r}")
    old: dict[str, Callable[..., Any]] = {}
    for key, value in dict(previous or {}).items():
        if not inspect.iscoroutinefunction(value):
            raise ValueError(f"@workflow: previous[{key!r}] must be an 'async def' function, got {value!r}")
        old[str(key)] = value

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        ver = str(version) if version is not None else code_version(f)
        if ver in old:
            raise ValueError(f"@workflow {f.__name__}: version {ver!r} is also listed in previous")
        return _make("workflow", f, version=ver, previous=old, concurrency=concurrency,
                     max_recoveries=max_recoveries, **settings)

    return wrap(fn) if fn is not None else wrap


def code_version(fn: Callable[..., Any]) -> str:
    """A short hash of a function's source (its bytecode when the source is not available)."""
    import hashlib

    try:
        text = inspect.getsource(fn).encode()
    except (OSError, TypeError):
        code = fn.__code__
        text = code.co_code + repr(code.co_consts).encode() + repr(code.co_names).encode()
    return hashlib.sha256(text).hexdigest()[:12]


def cron(schedule: str, /, *, timezone: str = "UTC", name: str | None = None, **settings: Any):
    """``@cron("*/5 * * * *", timezone="Europe/Berlin")`` - run as a job once per scheduled slot.

    The scheduler validates the expression and the time zone at start-up and names the
    cron in the error. Settings such as ``catch_up`` and ``overlap`` belong to the scheduler.
    """
    if not isinstance(schedule, str) or not schedule.strip():
        raise ValueError(f"@cron: schedule must be a non-empty cron expression, got {schedule!r}")
    return lambda f: _make("cron", f, name=name, schedule=schedule, timezone=timezone, **settings)


# --- models ---------------------------------------------------------------------------
_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")
ON_DELETE = ("cascade", "restrict", "set null", "set default", "no action")


@attrs.frozen
class Column:
    """Column options of a ``@model`` field (``field(index=True, ...)``); the schema tools
    (``forge-node generate migration``) read them. Nullability comes from ``X | None`` unless
    ``nullable`` says otherwise; the SQL type from the Python type unless ``sql_type`` does."""

    index: bool = False
    unique: bool = False
    #: a ``@model`` class (or its table name) whose primary key this column refers to
    references: Any = None
    on_delete: str | None = None
    #: a SQL boolean expression over the row (``"length(title) <= 200"``)
    check: str | None = None
    #: a SQL expression the database fills in (``"now()"``); a plain Python default (a number, a
    #: string, a boolean) becomes the column's DEFAULT by itself
    server_default: str | None = None
    sql_type: str | None = None
    nullable: bool | None = None


COLUMN_KEY = "forge.column"


def field(*, default: Any = attrs.NOTHING, factory: Callable[[], Any] | None = None, index: bool = False,
          unique: bool = False, references: Any = None, on_delete: str | None = None, check: str | None = None,
          server_default: str | None = None, sql_type: str | None = None, nullable: bool | None = None,
          **settings: Any) -> Any:
    """A ``@model`` field with column options: ``board: str = field(index=True)``,
    ``owner: UUID = field(references=User, on_delete="cascade")``. Other keyword arguments go
    to ``attrs.field``."""
    if on_delete is not None and on_delete.lower() not in ON_DELETE:
        raise ValueError(f"field: on_delete must be one of {', '.join(ON_DELETE)}, got {on_delete!r}")
    if on_delete is not None and references is None:
        raise ValueError("field: on_delete needs references=...")
    col = Column(index=index, unique=unique, references=references, on_delete=on_delete and on_delete.lower(),
                 check=check, server_default=server_default, sql_type=sql_type, nullable=nullable)
    metadata = {**settings.pop("metadata", {}), COLUMN_KEY: col}
    if factory is not None:
        return attrs.field(factory=factory, metadata=metadata, **settings)
    return attrs.field(default=default, metadata=metadata, **settings)


@attrs.frozen
class ModelDef:
    cls: type
    table: str
    primary_key: str
    columns: tuple[str, ...]
    #: column options by column name (``Column()`` for plain fields)
    options: Mapping[str, Column] = attrs.field(factory=dict)
    #: indexes over several columns: ``(("owner", "created_at"), ...)``
    indexes: tuple[tuple[str, ...], ...] = ()
    #: unique constraints over several columns
    unique_together: tuple[tuple[str, ...], ...] = ()

    def column(self, name: str) -> Column:
        return self.options.get(name) or Column()


def model(cls: type | None = None, /, *, table: str | None = None, primary_key: str = "id",
          indexes: Iterable[Iterable[str]] = (), unique_together: Iterable[Iterable[str]] = ()):
    """``@model`` turns a class into an attrs class mapped to a table (``table`` defaults to the
    lower-cased class name plus ``s``). ``ctx.db.insert/get/select/update/delete`` use it, and
    ``forge-node generate migration`` writes its table from the fields (see :func:`field`)."""

    def wrap(c: type) -> type:
        if not attrs.has(c):
            c = attrs.define(c)
        tname = table or c.__name__.lower() + "s"
        if not re.match(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$", tname):
            raise ValueError(f"@model {c.__name__}: invalid table name {tname!r}")
        cols = tuple(a.name for a in attrs.fields(c))
        if primary_key not in cols:
            raise ValueError(f"@model {c.__name__}: primary key {primary_key!r} is not a field")
        multi = []
        for what, groups in (("indexes", indexes), ("unique_together", unique_together)):
            out = []
            for group in groups:
                group = (group,) if isinstance(group, str) else tuple(group)
                unknown = [g for g in group if g not in cols]
                if not group or unknown:
                    raise ValueError(f"@model {c.__name__}: {what} {group!r} names no field or unknown fields {unknown}")
                out.append(group)
            multi.append(tuple(out))
        options = {a.name: a.metadata[COLUMN_KEY] for a in attrs.fields(c) if COLUMN_KEY in a.metadata}
        c.__forge_model__ = ModelDef(c, tname, primary_key, cols, options, *multi)  # type: ignore[attr-defined]
        return c

    return wrap(cls) if cls is not None else wrap


def model_def(cls: type) -> ModelDef:
    md = getattr(cls, "__forge_model__", None)
    if md is None:
        raise TypeError(f"{getattr(cls, '__name__', cls)!r} is not a @model class")
    return md


# --- registry ---------------------------------------------------------------------------
@attrs.define
class Registry:
    """Functions and models of the app a node serves, by name."""

    functions: dict[str, FunctionDef] = attrs.field(factory=dict)
    models: dict[str, ModelDef] = attrs.field(factory=dict)
    modules: list[str] = attrs.field(factory=list)

    def add(self, defn: FunctionDef) -> None:
        existing = self.functions.get(defn.name)
        if existing is not None and existing.fn is not defn.fn:
            raise StartupError(
                f"two app functions are named {defn.name!r}: {existing.module}.{existing.fn.__qualname__} "
                f"and {defn.module}.{defn.fn.__qualname__}; pass name=... to one of them"
            )
        self.functions[defn.name] = defn

    def add_module(self, module: ModuleType) -> None:
        for value in vars(module).values():
            defn = getattr(value, "__forge__", None)
            if isinstance(defn, FunctionDef):
                self.add(defn)
            md = getattr(value, "__forge_model__", None)
            if isinstance(md, ModelDef) and isinstance(value, type):
                self.models[md.table] = md
        self.modules.append(module.__name__)

    @classmethod
    def from_modules(cls, names: Iterable[str]) -> "Registry":
        reg = cls()
        for name in names:
            if name in reg.modules:
                continue
            try:
                module = importlib.import_module(name)
            except Exception as exc:
                raise StartupError(f"[app] modules: cannot import {name!r}: {type(exc).__name__}: {exc}") from exc
            reg.add_module(module)
        return reg

    def get(self, name: str) -> FunctionDef | None:
        return self.functions.get(name)

    def of_kind(self, *kinds: str) -> list[FunctionDef]:
        return [d for d in self.functions.values() if d.kind in kinds]


def definition(fn_or_name: Any) -> FunctionDef | str:
    """The FunctionDef behind a decorated function, or the name given as a string."""
    if isinstance(fn_or_name, str):
        return fn_or_name
    defn = getattr(fn_or_name, "__forge__", None)
    if defn is None:
        raise TypeError(f"{fn_or_name!r} is not a FORGE function (decorate it with @job, @query, ...)")
    return defn
