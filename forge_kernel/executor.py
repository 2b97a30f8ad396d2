"""Running app functions: argument binding, auth checks, transactions, timeouts, contexts.

Every surface (HTTP, WebSocket, jobs, tests) calls functions through
:meth:`FunctionExecutor.call`, so the rules are the same everywhere:

* queries run in a read-only transaction and record what they read;
* mutations run in one transaction; ``ctx.dispatch`` writes jobs into it;
* actions run without a transaction and call queries/mutations through ``ctx``;
* arguments are structured from the type hints, errors name the argument;
* every call has a timeout; an exception in user code becomes ``INTERNAL`` and is
  logged with the request id, never re-raised into the server.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import functools
import json
import os
import secrets
import time
import traceback
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

import asyncpg
import attrs
from loguru import logger

from .app import FunctionDef, Registry, definition
from .convert import StructureError, converter, structure, unstructure
from .batch import BATCH, NotBatchable, QueryBatch, RefusedConnection, detach
from .db import Database, TableRead, statements_run
from .errors import DatabaseUnavailable, ForgeError, Forbidden, InvalidArgument, NotFound, Timeout, Unauthenticated
from .reads import QueryReads, ReadPool
from .telemetry import MAX_CALL_BATCH, Telemetry, call_clock, current, format_traceparent, new_span_id



# --- auth ------------------------------------------------------------------------------
#: user ids of API-key callers start with this, so no token subject can be one of them
API_KEY_PREFIX = "apikey:"
#: the user id of the system identity; token subjects may not take it either
SYSTEM_USER_ID = "system"


@attrs.frozen
class Auth:
    """Who is calling. ``kind``:

    * ``anonymous`` - no credential;
    * ``user`` - a verified token (``user_id`` is its subject, see :meth:`for_user`);
    * ``service`` - an API key (``user_id`` is ``apikey:<name>``, see :meth:`for_api_key`);
    * ``system`` - the node itself (:data:`SYSTEM`): crons, jobs enqueued from plain Python, and
      code that elevates explicitly with ``ctx.as_system()``. It passes every roles check.

    A job runs as the identity that dispatched it (kind, user id and roles are stored with the
    job; token claims are not).
    """

    user_id: str | None = None
    roles: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = attrs.field(factory=dict)
    kind: str = "anonymous"
    expires_at: dt.datetime | None = None

    @classmethod
    def for_user(cls, user_id: str, roles: Iterable[str] = (), claims: Mapping[str, Any] | None = None,
                 expires_at: dt.datetime | None = None) -> "Auth":
        """The caller of a verified token. Raises ``ValueError`` for a subject in a reserved
        namespace (``apikey:...`` or ``system``): a token must not pose as a service or the node."""
        if user_id == SYSTEM_USER_ID or user_id.startswith(API_KEY_PREFIX):
            raise ValueError(f"subject {user_id!r} is reserved ('{SYSTEM_USER_ID}' and '{API_KEY_PREFIX}...' "
                             f"name the node and API keys)")
        return cls(user_id=user_id, roles=frozenset(roles), claims=dict(claims or {}), kind="user",
                   expires_at=expires_at)

    @classmethod
    def for_api_key(cls, name: str, roles: Iterable[str] = ()) -> "Auth":
        """The caller of an API key: ``user_id`` is ``apikey:<name>``, its own namespace."""
        return cls(user_id=API_KEY_PREFIX + name, roles=frozenset(roles), claims={"api_key": name}, kind="service")

    @property
    def authenticated(self) -> bool:
        return self.kind != "anonymous"

    def has_roles(self, required: Iterable[str]) -> bool:
        return self.kind == "system" or set(required) <= self.roles

    def scope_key(self) -> str:
        return f"{self.kind}:{self.user_id or ''}"

    def to_job(self) -> dict[str, Any]:
        """What a job stores of its dispatcher (``run_as``)."""
        return {"kind": self.kind, "user_id": self.user_id, "roles": sorted(self.roles)}

    @classmethod
    def from_job(cls, run_as: Mapping[str, Any] | None, caller: str | None = None) -> "Auth":
        """The identity a stored job runs as. Rows without ``run_as`` predate it: their ``caller``
        ran as a user without roles, no caller as the system."""
        if run_as is None:
            return cls(user_id=caller, kind="user") if caller else SYSTEM
        kind = run_as.get("kind")
        if kind == "system":
            return SYSTEM
        if kind == "anonymous":
            return ANONYMOUS
        return cls(user_id=run_as.get("user_id"), roles=frozenset(run_as.get("roles") or ()), kind=kind or "user")


ANONYMOUS = Auth()
SYSTEM = Auth(user_id=SYSTEM_USER_ID, roles=frozenset({"system"}), kind="system")


# --- jobs dispatched from contexts --------------------------------------------------------
@attrs.frozen
class JobRequest:
    """A job to store. Fields left ``None`` take the job definition's defaults."""

    name: str
    args: Mapping[str, Any]
    queue: str = "default"
    priority: int = 0
    run_at: dt.datetime | None = None
    max_attempts: int = 5
    capability: str | None = None
    timeout: float | None = None
    unique_key: str | None = None
    on_conflict: str = "skip"  # skip | replace
    #: who asked, shown in job listings (the dispatcher's user id, or a label such as "scheduler")
    caller: str | None = None
    options: Mapping[str, Any] = attrs.field(factory=dict)
    #: the identity the job runs as (``Auth.to_job()``); ``job_request`` fills it (the system by default)
    run_as: Mapping[str, Any] | None = None


def job_request(defn: FunctionDef | str, args: Mapping[str, Any], *, caller: str | None = None,
                run_as: Auth | None = None,
                delay: dt.timedelta | float | None = None, run_at: dt.datetime | None = None,
                priority: int | None = None, queue: str | None = None, unique_key: str | None = None,
                on_conflict: str = "skip", max_attempts: int | None = None, capability: str | None = None,
                timeout: float | None = None) -> JobRequest:
    """Validate ``args`` against the job's signature and build a :class:`JobRequest`.

    ``run_as``: the identity the job runs as; ``None`` (crons, plain Python) is the system."""
    if isinstance(defn, str):
        name, opts, jt = defn, {}, None
        payload = dict(args)
    else:
        if defn.kind not in ("job", "cron"):
            raise TypeError(f"{defn.name} is a {defn.kind}, not a job")
        name, opts, jt = defn.name, defn.options, defn.timeout
        payload = unstructure(bind_arguments(defn, args))
    if delay is not None and run_at is not None:
        raise ValueError("give either delay or run_at, not both")
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, dt.timedelta) else float(delay)
        run_at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)
    if on_conflict not in ("skip", "replace"):
        raise ValueError(f"on_conflict must be 'skip' or 'replace', got {on_conflict!r}")
    return JobRequest(
        name=name, args=payload,
        queue=queue or opts.get("queue", "default"),
        priority=opts.get("priority", 0) if priority is None else priority,
        run_at=run_at,
        max_attempts=max_attempts or opts.get("max_attempts", 5),
        capability=capability if capability is not None else opts.get("capability"),
        timeout=timeout if timeout is not None else jt,
        unique_key=unique_key,
        on_conflict=on_conflict,
        caller=caller if caller is not None or run_as is None else run_as.user_id,
        options={k: v for k, v in opts.items() if k not in ("queue", "priority", "max_attempts", "capability")},
        run_as=(run_as or SYSTEM).to_job(),
    )


@attrs.frozen
class WorkflowRequest:
    """A workflow run to start (see ``forge_workflow_engine``). ``args`` are already unstructured
    (JSON-safe); ``version`` ``None`` lets the engine record the version the name has on its node."""

    name: str
    args: Mapping[str, Any]
    version: str | None = None
    #: a second start with the same key returns the first run's id instead of starting another
    idempotency_key: str | None = None
    #: a key events can be sent to instead of the run id (``send_event("order-42", ...)``)
    correlation_key: str | None = None
    run_at: dt.datetime | None = None
    caller: str | None = None
    #: the identity the run (its steps) acts as, ``Auth.to_job()``; ``None`` is the system
    run_as: Mapping[str, Any] | None = None


def workflow_request(defn: FunctionDef | str, args: Mapping[str, Any], *, run_as: "Auth | None" = None,
                     idempotency_key: str | None = None, correlation_key: str | None = None,
                     delay: dt.timedelta | float | None = None, run_at: dt.datetime | None = None) -> WorkflowRequest:
    """Validate ``args`` against the workflow's signature and build a :class:`WorkflowRequest`.
    ``run_as``: who started it - the run acts as that identity, like a job (default: the system)."""
    if isinstance(defn, str):
        name, version, payload = defn, None, dict(args)
    else:
        if defn.kind != "workflow":
            raise TypeError(f"{defn.name} is a {defn.kind}, not a workflow")
        name, version = defn.name, defn.options.get("version")
        payload = unstructure(bind_arguments(defn, args))
    for what, key in (("idempotency_key", idempotency_key), ("correlation_key", correlation_key)):
        if key is not None and (not isinstance(key, str) or not key or len(key) > 512):
            raise InvalidArgument(f"workflow {name!r}: {what} must be a non-empty string of at most 512 "
                                  f"characters, got {key!r}")
    if delay is not None and run_at is not None:
        raise InvalidArgument(f"workflow {name!r}: give either delay or run_at, not both")
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, dt.timedelta) else float(delay)
        run_at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)
    if run_at is not None and (not isinstance(run_at, dt.datetime) or run_at.tzinfo is None):
        raise InvalidArgument(f"workflow {name!r}: run_at must be a timezone-aware datetime, got {run_at!r}")
    who = run_as or SYSTEM
    return WorkflowRequest(name=name, args=payload, version=version, idempotency_key=idempotency_key,
                           correlation_key=correlation_key, run_at=run_at, caller=who.user_id, run_as=who.to_job())


@attrs.frozen
class JobOutcome:
    """How one job attempt ended (passed to ``forge_job_finished``)."""

    job_id: int
    name: str
    args: Mapping[str, Any]
    options: Mapping[str, Any]
    #: succeeded | failed (will retry) | dead (attempts exhausted) | cancelled | retry_later
    status: str
    attempt: int
    #: None for a job that never started (cancelled, or discarded, before a worker ran it)
    started_at: dt.datetime | None
    finished_at: dt.datetime
    error: str | None = None
    node_id: str | None = None


# --- calls and contexts ----------------------------------------------------------------------
@attrs.define
class Call:
    """One invocation, as middleware sees it."""

    defn: FunctionDef
    args: dict[str, Any]
    auth: Auth
    request_id: str
    track_reads: bool = False
    #: set after a query ran with ``track_reads``
    reads: list[TableRead] = attrs.field(factory=list)
    #: True when the function looked at ``ctx.auth`` (realtime keys results by caller then)
    used_auth: bool = False
    #: a forwarded mutation's or action's id: a retry with the same id returns the stored result
    call_id: str | None = None
    #: a query whose statements were all ``ctx.db.select``: it can run in a batch (forge_kernel.batch)
    batchable: bool = False


@attrs.define
class BatchStats:
    batches: int = 0
    round_trips: int = 0
    statements: int = 0


class Context:
    """What a function receives as ``ctx``."""

    def __init__(self, executor: "FunctionExecutor", call: Call, db: Database | None) -> None:
        self._executor = executor
        self._call = call
        self.db = db
        self.request_id = call.request_id

    @functools.cached_property
    def log(self) -> Any:
        """A logger whose lines carry the request id and the function (made on first use: binding
        one per call cost more than the rest of building the context)."""
        return logger.bind(request_id=self._call.request_id, function=self._call.defn.name)

    @property
    def auth(self) -> Auth:
        self._call.used_auth = True
        return self._call.auth

    @property
    def function(self) -> FunctionDef:
        return self._call.defn

    @property
    def node(self):
        return self._executor.node

    def as_system(self) -> "Context":
        """This context acting as the system identity: ``ctx.as_system().query(...)``,
        ``.mutation(...)`` and ``.dispatch(...)`` run as :data:`SYSTEM` (every roles check passes,
        jobs run as system). The one way app code elevates; grep for ``as_system``. The elevated
        context shares this call's connection: its ``db`` is still the caller's transaction."""
        elevated = copy.copy(self)
        elevated._call = attrs.evolve(self._call, auth=SYSTEM)
        logger.bind(request_id=self.request_id).debug(
            f"{self._call.defn.name}: elevated to system (was {self._call.auth.scope_key()})")
        return elevated


class QueryContext(Context):
    pass


class MutationContext(Context):
    async def dispatch(self, job: Any, /, *, delay: dt.timedelta | float | None = None,
                       run_at: dt.datetime | None = None, priority: int | None = None,
                       queue: str | None = None, unique_key: str | None = None,
                       on_conflict: str = "skip", **args: Any) -> int:
        """Store a job in this mutation's transaction; it becomes visible when the mutation commits."""
        defn = definition(job)
        if isinstance(defn, str):
            found = self._executor.registry.get(defn)
            defn = found if found is not None else defn
        # the job runs as whoever dispatched it (anonymous stays anonymous)
        req = job_request(defn, args, run_as=self._call.auth, delay=delay, run_at=run_at,
                          priority=priority, queue=queue, unique_key=unique_key, on_conflict=on_conflict)
        span = current()
        if span is None:
            ids = await self._executor.dispatcher().dispatch(self.db.conn, [req])
            return ids[0] if ids else 0
        # traced: the job row carries the trace on (its run continues it, on whatever node), with
        # this dispatch span as the run's parent
        sid, t0 = new_span_id(), time.time_ns()
        req = attrs.evolve(req, options={**req.options,
                                         "traceparent": format_traceparent(span.trace_id, sid, span.sampled)})
        ids = await self._executor.dispatcher().dispatch(self.db.conn, [req])
        job_id = ids[0] if ids else 0
        span.record(f"dispatch {req.name}", "producer", t0, time.time_ns(), {"job.name": req.name, "job.id": job_id},
                    span_id=sid)
        return job_id

    async def start_workflow(self, workflow: Any, /, *, idempotency_key: str | None = None,
                             correlation_key: str | None = None, delay: dt.timedelta | float | None = None,
                             run_at: dt.datetime | None = None, **args: Any) -> str:
        """Start a workflow run in this mutation's transaction (it exists exactly when the mutation
        commits); returns the run id. A second start with the same ``idempotency_key`` returns the
        first run's id."""
        defn = self._executor.resolve(workflow)
        # the run acts as whoever started it, like a dispatched job
        req = workflow_request(defn, args, run_as=self._call.auth, idempotency_key=idempotency_key,
                               correlation_key=correlation_key, delay=delay, run_at=run_at)
        return (await self._executor.workflow_engine().start(self.db.conn, [req]))[0]

    async def send_event(self, target: str, name: str, payload: Any = None) -> int:
        """Send an event to a run (its id or correlation key) in this mutation's transaction;
        returns how many live runs it reached (0 raises ``NotFound``)."""
        return await self._executor.workflow_engine().send_event(self.db.conn, str(target), name, unstructure(payload))


class ActionContext(Context):
    async def query(self, fn: Any, /, **args: Any) -> Any:
        return await self._executor.call(_name(fn), args, self._call.auth, request_id=self.request_id, unstructured=False)

    async def mutation(self, fn: Any, /, **args: Any) -> Any:
        return await self._executor.call(_name(fn), args, self._call.auth, request_id=self.request_id, unstructured=False)

    async def dispatch(self, job: Any, /, **kw: Any) -> int:
        """Store a job at once (its own transaction)."""
        async with self._executor.pool.acquire() as conn:
            ctx = MutationContext(self._executor, self._call, Database(conn))
            return await ctx.dispatch(job, **kw)

    async def start_workflow(self, workflow: Any, /, **kw: Any) -> str:
        """Start a workflow run at once (its own transaction); returns the run id."""
        async with self._executor.pool.acquire() as conn:
            return await MutationContext(self._executor, self._call, Database(conn)).start_workflow(workflow, **kw)

    async def send_event(self, target: str, name: str, payload: Any = None) -> int:
        """Send an event to a run (its id or correlation key) at once."""
        async with self._executor.pool.acquire() as conn:
            return await MutationContext(self._executor, self._call, Database(conn)).send_event(target, name, payload)


def _name(fn: Any) -> str:
    d = definition(fn)
    return d if isinstance(d, str) else d.name


def bind_arguments(defn: FunctionDef, args: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Structure JSON-ish ``args`` into the function's typed keyword arguments; ``InvalidArgument``
    naming every problem otherwise."""
    entry = _BINDERS.get(defn.name)
    if entry is None or entry[0] is not defn:
        entry = _BINDERS[defn.name] = (defn, _binder(defn))
    return entry[1](args)


#: a compiled binder per function name, with the FunctionDef it was made for (a reload makes new ones)
_BINDERS: dict[str, tuple[FunctionDef, Callable[[Any], dict[str, Any]]]] = {}


def _binder(defn: FunctionDef) -> Callable[[Any], dict[str, Any]]:
    """``bind(args)`` for ``defn``: each parameter's structure hook looked up once (the converter's
    dispatch per call was measured on the /rpc path); anything off - not an object, a missing or
    unknown argument, a value its hook refuses - goes to :func:`_bind_or_explain` for the full list
    of problems."""
    params = [(p.name, p.required, p.type, converter.get_structure_hook(p.type)) for p in defn.params]

    def bind(args: Any) -> dict[str, Any]:
        if isinstance(args, dict):
            out: dict[str, Any] = {}
            try:
                for name, required, tp, hook in params:
                    if name in args:
                        out[name] = hook(args[name], tp)
                    elif required:
                        break
                else:
                    if len(out) == len(args):  # every key was a parameter
                        return out
            except Exception:  # noqa: BLE001 - explained below, with every other problem
                pass
        return _bind_or_explain(defn, args)

    return bind


def _bind_or_explain(defn: FunctionDef, args: Mapping[str, Any] | Any) -> dict[str, Any]:
    if not isinstance(args, Mapping):
        raise InvalidArgument(f"{defn.name}: arguments must be an object, got {type(args).__name__}")
    problems = []
    out: dict[str, Any] = {}
    known = {p.name for p in defn.params}
    for key in args:
        if key not in known:
            problems.append({"argument": key, "message": "unknown argument"})
    for p in defn.params:
        if p.name not in args:
            if p.required:
                problems.append({"argument": p.name, "message": "required, missing"})
            continue
        try:
            out[p.name] = structure(args[p.name], p.type)
        except StructureError as exc:
            for prob in exc.problems:
                where = f"{p.name}.{prob.path}" if prob.path and not prob.path.startswith("[") else p.name + prob.path
                problems.append({"argument": where, "message": prob.message})
    if problems:
        text = "; ".join(f"{q['argument']}: {q['message']}" for q in problems)
        raise InvalidArgument(f"invalid arguments for {defn.name}: {text}", details=problems)
    return out


#: a sampled mutation's transaction names its trace in this transaction-local setting (see
#: forge_kernel.telemetry); realtime's change log stores it with each captured write
SET_TRACE = "SELECT set_config('forge.traceparent', $1, true)"


# The caller's data, refused by PostgreSQL: class 22 (invalid text incl. NUL bytes, value too long,
# numeric out of range, bad datetime), class 23 (not-null, foreign-key, check, exclusion; unique is
# CONFLICT and caught before), and asyncpg refusing to encode an argument (e.g. out of int32 range).
_REFUSED_DATA = (asyncpg.exceptions.DataError, asyncpg.exceptions.IntegrityConstraintViolationError,
                 asyncpg.exceptions._base.DataError)


# The call's database connection was lost or could not be made: the server is restarting,
# shutting down or unreachable (class 08, 57P01-57P03), or the connection broke under asyncpg.
# The call's code did nothing wrong: UNAVAILABLE, not INTERNAL, and no traceback per request.
_DATABASE_LOST = (asyncpg.PostgresConnectionError, asyncpg.exceptions.AdminShutdownError,
                  asyncpg.exceptions.CrashShutdownError, asyncpg.exceptions.CannotConnectNowError,
                  asyncpg.exceptions._base.InternalClientError, ConnectionError, FileNotFoundError)


def database_lost(exc: BaseException) -> bool:
    """True when ``exc`` says the database went away, not that the call failed on its own."""
    if isinstance(exc, asyncpg.InterfaceError):
        return "closed" in str(exc) or "released back to the pool" in str(exc)
    return isinstance(exc, _DATABASE_LOST)


def refused_by_database(function: str, request_id: str, exc: Exception) -> InvalidArgument:
    """``INVALID_ARGUMENT`` naming what the database refused (constraint, column, table), logged
    at INFO without a traceback: bad input is the caller's problem, not the node's."""
    where = {k: v for k, v in (("constraint", getattr(exc, "constraint_name", None)),
                               ("column", getattr(exc, "column_name", None)),
                               ("table", getattr(exc, "table_name", None))) if v}
    sqlstate = getattr(exc, "sqlstate", None)
    message = getattr(exc, "message", None) or str(exc)
    named = ", ".join(f"{k} {v}" for k, v in where.items())
    logger.bind(request_id=request_id).info(
        f"{function}: the database refused the call's data ({sqlstate or type(exc).__name__}"
        f"{'; ' + named if named else ''}; request {request_id})")
    return InvalidArgument(f"{function}: invalid argument: {message}" + (f" ({named})" if named else ""),
                           details={**where, "sqlstate": sqlstate} if sqlstate else where or None)


#: request ids drawn ahead: ``os.urandom`` per id was a system call on every call (5 % of a live
#: query's re-run). One draw serves 256 ids, as unpredictable as before
_REQUEST_IDS: list[str] = []
os.register_at_fork(after_in_child=_REQUEST_IDS.clear)  # a child never repeats its parent's ids


def new_request_id() -> str:
    if not _REQUEST_IDS:
        drawn = secrets.token_hex(8 * 256)
        _REQUEST_IDS.extend(drawn[i:i + 16] for i in range(0, len(drawn), 16))
    return _REQUEST_IDS.pop()


class FunctionExecutor:
    """Runs registered functions against a pool."""

    def __init__(self, registry: Registry, pool: asyncpg.Pool, *, default_timeout: float = 30.0,
                 middleware: Sequence[Callable[[Call, Callable[[Call], Awaitable[Any]]], Awaitable[Any]]] = (),
                 dispatcher: Any = None, node: Any = None, reads: QueryReads | None = None,
                 workflow_engine: Any = None, forwarder: Any = None) -> None:
        self.registry = registry
        self.pool = pool
        #: where queries read (replica or primary, read-only sessions or BEGIN READ ONLY); without
        #: it, queries run in BEGIN READ ONLY ... COMMIT on ``pool``
        self.reads = reads or QueryReads(ReadPool(pool))
        self.default_timeout = default_timeout
        self.middleware = list(middleware)
        self._dispatcher = dispatcher
        self._workflow_engine = workflow_engine
        self.node = node
        #: runs calls this node should not run on another node (``forge_call_forwarder``)
        self.forwarder = forwarder
        #: where calls are recorded (``node.telemetry``; an unattached one records nothing)
        self.telemetry: Telemetry = getattr(node, "telemetry", None) or Telemetry()
        #: every call's transaction carries the caller (``set_caller``); see ``[app] row_security``
        self.row_security = False
        #: what :meth:`batched` did: batches, round trips, statements they carried
        self.batch_stats = BatchStats()
        chain: Callable[[Call], Awaitable[Any]] = self._invoke
        for mw in reversed(self.middleware):
            chain = (lambda m, nxt: (lambda c: m(c, nxt)))(mw, chain)
        self._chain = chain

    def dispatcher(self) -> Any:
        if self._dispatcher is None:
            raise ForgeError("ctx.dispatch needs a job store: install forge-worker (pip install forge-worker) "
                             "on this node; it need not run the worker role", code="UNAVAILABLE")
        return self._dispatcher

    def workflow_engine(self) -> Any:
        if self._workflow_engine is None:
            raise ForgeError("starting workflows and sending events needs a workflow engine: install "
                             "forge-worker (pip install forge-worker) on this node; it need not run the worker role")
        return self._workflow_engine

    def resolve(self, fn_or_name: Any) -> FunctionDef | str:
        """The FunctionDef of a decorated function or a registered name (a bare name otherwise)."""
        if isinstance(fn_or_name, FunctionDef):
            return fn_or_name
        defn = definition(fn_or_name)
        if isinstance(defn, str):
            found = self.registry.get(defn)
            return found if found is not None else defn
        return defn

    def authorize(self, defn: FunctionDef, auth: Auth) -> None:
        if defn.public or auth.kind == "system":
            return
        if not auth.authenticated:
            raise Unauthenticated(f"{defn.name} requires an authenticated caller")
        if defn.roles and not auth.has_roles(defn.roles):
            missing = sorted(set(defn.roles) - auth.roles)
            raise Forbidden(f"{defn.name} requires role(s) {', '.join(missing)}")

    def lookup(self, name: str, kinds: Iterable[str] = ("query", "mutation", "action")) -> FunctionDef:
        defn = self.registry.get(name)
        if defn is None or defn.kind not in kinds:
            raise NotFound(f"no function named {name!r}")
        return defn

    async def call(self, name: str | FunctionDef, args: Mapping[str, Any] | Any, auth: Auth = ANONYMOUS, *,
                   request_id: str | None = None, track_reads: bool = False, unstructured: bool = True,
                   call_out: list | None = None, call_id: str | None = None, timeout: float | None = None,
                   forwarded: bool = False) -> Any:
        """Call ``name`` (or the FunctionDef :meth:`lookup` gave) with JSON-ish ``args`` as ``auth``;
        returns the (unstructured) result.

        Raises :class:`ForgeError` only. ``call_out`` (a list) receives the :class:`Call`, for
        callers that need its read set or whether it used ``ctx.auth``. A call the forwarder
        wants runs on another node, unless it came from one (``forwarded``); those carry what is
        left of the caller's deadline (``timeout``) and, for mutations and actions, a ``call_id``.
        """
        defn = name if isinstance(name, FunctionDef) else self.lookup(name)
        self.authorize(defn, auth)
        call = Call(defn, bind_arguments(defn, args), auth, request_id or new_request_id(), track_reads,
                    call_id=call_id)
        if call_out is not None:
            call_out.append(call)
        if timeout is None:
            timeout = defn.timeout or self.default_timeout
        forwarder = None if forwarded else self.forwarder
        tel = self.telemetry
        if tel.enabled:  # one ``call`` event; a span only where it can matter (Telemetry.call_started)
            parent = current()
            span = None if parent is not None and not parent.sampled else tel.call_started(defn.name, defn.kind,
                                                                                          call.request_id)
            t0, code = call_clock(), "OK"
        else:
            t0 = 0.0  # not recording (the clock's readings are never 0: seconds since boot)
        try:
            # asyncio.timeout, not wait_for: no extra task per call (measured in bench/rpc); the queries
            # of a batch (live-query re-runs) share the batch's one timer
            batch = BATCH.get()
            async with (batch is not None and batch.timeout(timeout)) or asyncio.timeout(timeout):
                if forwarder is not None and forwarder.wants(defn):
                    return await forwarder.forward(call, args, timeout)
                result = await self._chain(call)
        except ForgeError as exc:
            code = exc.code
            raise
        except asyncio.TimeoutError:
            code = Timeout.code
            raise Timeout(f"{defn.name} did not finish within {timeout:g}s") from None
        except asyncpg.exceptions.ReadOnlySQLTransactionError:
            code = ForgeError.code
            logger.bind(request_id=call.request_id).exception(f"{defn.name}: query tried to write")
            raise ForgeError(f"{defn.name} is a query and cannot write; make it a mutation "
                             f"(request {call.request_id})") from None
        except asyncpg.exceptions.UniqueViolationError as exc:
            code = "CONFLICT"
            raise ForgeError(f"conflict: {exc.detail or 'a unique constraint was violated'}", code="CONFLICT") from None
        except _REFUSED_DATA as exc:
            code = InvalidArgument.code
            raise refused_by_database(defn.name, call.request_id, exc) from None
        except Exception as exc:
            if defn.kind != "action" and database_lost(exc):  # an action's own I/O errors stay INTERNAL
                code = DatabaseUnavailable.code
                logger.bind(request_id=call.request_id).warning(
                    f"{defn.name}: the database is unavailable ({type(exc).__name__}: {exc}; request {call.request_id})")
                maybe = "; it may have taken effect" if defn.kind == "mutation" else ""
                raise DatabaseUnavailable(f"the database is unavailable, retry (request {call.request_id}){maybe}",
                                          details={"request_id": call.request_id}) from None
            code = ForgeError.code
            logger.bind(request_id=call.request_id).error(
                f"{defn.name} raised (request {call.request_id}):\n{traceback.format_exc()}")
            raise ForgeError(f"internal error (request {call.request_id})",
                             details={"request_id": call.request_id}) from None
        except BaseException:
            code = "CANCELLED"  # the caller went away (its task was cancelled)
            raise
        finally:
            if t0:
                # Telemetry.call_ended's usual case inline (a successful, fast call without a span of its
                # own: its seconds into its function's batch), a Python call less on every call
                took = call_clock() - t0
                batch = tel.ok_calls.get(defn.name) if span is None and code == "OK" and took < tel.keep_over else None
                if batch is not None and batch.kind is defn.kind and len(batch) < MAX_CALL_BATCH:
                    batch.append(took)
                else:
                    tel.call_ended(span, defn.name, defn.kind, call.request_id, t0, code)
        return unstructure(result) if unstructured else result

    async def batched(self, jobs: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
        """Run ``jobs`` (each awaiting one or more query calls: live-query re-runs) at once, their
        ``ctx.db.select`` statements sharing one read connection and, for the same statement text,
        one round trip (see :mod:`forge_kernel.batch`). Returns each job's result or exception."""
        reading = self.reads.connection()
        batch = QueryBatch(len(jobs), reading.__aenter__)

        async def one(job: Callable[[], Awaitable[Any]]) -> Any:
            try:
                return await job()
            finally:
                batch.job_finished()

        token = BATCH.set(batch)
        try:
            results = await asyncio.gather(*(one(job) for job in jobs), return_exceptions=True)
        finally:
            BATCH.reset(token)
            batch.close()
            while batch.flush_task is not None:  # a job that timed out may leave a statement running
                await asyncio.gather(batch.flush_task, return_exceptions=True)
            if batch.conn is not None:
                reading.untouched = True  # only plain SELECTs ran on it
                try:
                    await reading.__aexit__(None, None, None)
                except Exception as exc:  # every job has its result; a connection lost now only matters to the pool
                    logger.warning(f"releasing a batch's read connection failed ({type(exc).__name__}: {exc})")
        self.batch_stats.batches += 1
        self.batch_stats.round_trips += batch.round_trips
        self.batch_stats.statements += batch.statements
        return results

    async def _invoke(self, call: Call) -> Any:
        defn = call.defn
        if defn.kind == "action":
            if call.call_id is not None:  # at most once: the claim commits before the action starts
                async with self.pool.acquire() as conn:
                    done, stored = await self.forwarder.claim(conn, call.call_id, defn)
                if done:
                    return stored
            result = await defn.fn(ActionContext(self, call, None), **call.args)
            if call.call_id is not None:
                async with self.pool.acquire() as conn:
                    await self.forwarder.record(conn, call.call_id, result)
            return result
        if defn.kind == "query":
            batch = BATCH.get()
            if batch is not None:
                BATCH.set(None)  # queries this one calls run on their own connections
                if not self.row_security:  # the caller's settings would need a transaction per call
                    db = Database(None, readonly=True, batch=batch)
                    db.conn = refused = RefusedConnection(db)
                    try:
                        result = await call.defn.fn(QueryContext(self, call, db), **call.args)
                    except NotBatchable:
                        pass
                    else:
                        if not db.refused:  # (a function may have caught NotBatchable itself)
                            call.batchable = True
                            if call.track_reads:
                                call.reads = await db.read_set()  # select reads only: no round trip
                            return result
                    finally:
                        detach(refused)  # no cycle left for the GC (see RefusedConnection)
                    call.used_auth = False
            # with row security on, the caller's settings need a transaction of their own (read-only)
            reading = self.reads.connection(transaction=self.row_security)
            async with reading as conn:
                if self.row_security:
                    await set_caller(conn, call.auth)
                before = statements_run(conn)
                db = Database(conn, readonly=True)
                result = await call.defn.fn(QueryContext(self, call, db), **call.args)
                after = statements_run(conn)
                # only the model helpers ran: the pool may skip the session reset (a round trip)
                reading.untouched = before is not None and after is not None and db.untouched(after - before)
                # only ``select`` ran: a batch of re-runs may share its round trip next time
                call.batchable = (not self.row_security and before is not None and after is not None
                                  and after - before == db.selects)
                if call.track_reads:
                    call.reads = await db.read_set()
                return result
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                if self.row_security:
                    await set_caller(conn, call.auth)
                if call.call_id is not None:
                    # the call id commits with the mutation: a retry after this node died finds it (and
                    # its result) or finds nothing and runs the mutation; a retry while it runs waits for it
                    done, stored = await self.forwarder.claim(conn, call.call_id, defn)
                    if done:
                        return stored
                span = current()
                if span is not None and span.sampled:
                    # what this transaction's writes trigger (a live query's re-run) joins its trace
                    await conn.execute(SET_TRACE, span.traceparent())
                result = await defn.fn(MutationContext(self, call, Database(conn)), **call.args)
                if call.call_id is not None:
                    await self.forwarder.record(conn, call.call_id, result)
            await self.reads.committed(conn)  # read-your-writes on a replica
            return result


# --- row-level security -------------------------------------------------------------------
#: Transaction-local settings that carry the caller into PostgreSQL, for row-level security
#: policies: ``current_setting('forge.user_id', true)`` (empty for anonymous),
#: ``forge.auth_kind`` (anonymous | user | service | system) and ``forge.roles`` (a JSON array:
#: ``current_setting('forge.roles', true)::jsonb ? 'admin'``).
SET_CALLER = ("SELECT set_config('forge.user_id', $1, true), set_config('forge.auth_kind', $2, true), "
              "set_config('forge.roles', $3, true)")


async def set_caller(conn: asyncpg.Connection, auth: Auth) -> None:
    """Put ``auth`` into the current transaction's settings (gone at its end, so a pooled
    connection never carries one caller into the next)."""
    await conn.execute(SET_CALLER, auth.user_id or "", auth.kind, json.dumps(sorted(auth.roles)))


async def row_security(conn: asyncpg.Connection, mode: str) -> tuple[bool, str, bool]:
    """Whether calls carry the caller (``[app] row_security``: ``on``, ``off``, or ``auto`` - on
    when a table of this database has row-level security enabled), a line saying so, and whether
    the connection's role bypasses every policy (a superuser or BYPASSRLS role)."""
    tables = await conn.fetch("SELECT c.oid::regclass::text AS name FROM pg_class c JOIN pg_namespace n ON "
                              "n.oid = c.relnamespace WHERE c.relrowsecurity AND c.relkind IN ('r', 'p') "
                              "AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1")
    on = mode == "on" or (mode == "auto" and bool(tables))
    if not on:
        return False, "", False
    bypass = await conn.fetchval("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user")
    names = ", ".join(r["name"] for r in tables[:10]) or "none yet"
    line = f"row security: calls carry the caller (tables with policies: {names})"
    if bypass:
        user = await conn.fetchval("SELECT current_user")
        line += (f"; but the node connects as {user}, a superuser or BYPASSRLS role, which no policy restricts - "
                 f"connect as a role without SUPERUSER and BYPASSRLS for the policies to apply")
    return True, line, bool(bypass)
