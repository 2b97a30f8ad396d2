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
import datetime as dt
import secrets
import time
import traceback
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

import asyncpg
import attrs
from loguru import logger

from .app import FunctionDef, Registry, definition
from .convert import StructureError, converter, structure, unstructure
from .db import Database, TableRead
from .errors import ForgeError, Forbidden, InvalidArgument, NotFound, Timeout, Unauthenticated
from .telemetry import Telemetry, current, format_traceparent, new_span_id


# --- auth ------------------------------------------------------------------------------
@attrs.frozen
class Auth:
    """Who is calling. ``kind`` is ``anonymous``, ``user`` or ``service`` (an API key)."""

    user_id: str | None = None
    roles: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = attrs.field(factory=dict)
    kind: str = "anonymous"
    expires_at: dt.datetime | None = None

    @property
    def authenticated(self) -> bool:
        return self.kind != "anonymous"

    def has_roles(self, required: Iterable[str]) -> bool:
        return set(required) <= self.roles

    def scope_key(self) -> str:
        return f"{self.kind}:{self.user_id or ''}"


ANONYMOUS = Auth()
SYSTEM = Auth(user_id="system", roles=frozenset({"system"}), kind="service")


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
    caller: str | None = None
    options: Mapping[str, Any] = attrs.field(factory=dict)


def job_request(defn: FunctionDef | str, args: Mapping[str, Any], *, caller: str | None = None,
                delay: dt.timedelta | float | None = None, run_at: dt.datetime | None = None,
                priority: int | None = None, queue: str | None = None, unique_key: str | None = None,
                on_conflict: str = "skip", max_attempts: int | None = None, capability: str | None = None,
                timeout: float | None = None) -> JobRequest:
    """Validate ``args`` against the job's signature and build a :class:`JobRequest`."""
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
        caller=caller,
        options={k: v for k, v in opts.items() if k not in ("queue", "priority", "max_attempts", "capability")},
    )


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


class Context:
    """What a function receives as ``ctx``."""

    def __init__(self, executor: "FunctionExecutor", call: Call, db: Database | None) -> None:
        self._executor = executor
        self._call = call
        self.db = db
        self.request_id = call.request_id
        self.log = logger.bind(request_id=call.request_id, function=call.defn.name)

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
        req = job_request(defn, args, caller=self._call.auth.user_id, delay=delay, run_at=run_at,
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


def _name(fn: Any) -> str:
    d = definition(fn)
    return d if isinstance(d, str) else d.name


def bind_arguments(defn: FunctionDef, args: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Structure JSON-ish ``args`` into the function's typed keyword arguments."""
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


def new_request_id() -> str:
    return secrets.token_hex(8)


class FunctionExecutor:
    """Runs registered functions against a pool."""

    def __init__(self, registry: Registry, pool: asyncpg.Pool, *, default_timeout: float = 30.0,
                 middleware: Sequence[Callable[[Call, Callable[[Call], Awaitable[Any]]], Awaitable[Any]]] = (),
                 dispatcher: Any = None, node: Any = None, query_pool: asyncpg.Pool | None = None) -> None:
        self.registry = registry
        self.pool = pool
        #: connections whose sessions are read-only by default (``db.create_pool(read_only=True)``);
        #: without one, queries run in BEGIN READ ONLY ... COMMIT on ``pool``
        self.query_pool = query_pool
        self.default_timeout = default_timeout
        self.middleware = list(middleware)
        self._dispatcher = dispatcher
        self.node = node
        #: where calls are recorded (``node.telemetry``; an unattached one records nothing)
        self.telemetry: Telemetry = getattr(node, "telemetry", None) or Telemetry()
        chain: Callable[[Call], Awaitable[Any]] = self._invoke
        for mw in reversed(self.middleware):
            chain = (lambda m, nxt: (lambda c: m(c, nxt)))(mw, chain)
        self._chain = chain

    def dispatcher(self) -> Any:
        if self._dispatcher is None:
            raise ForgeError("ctx.dispatch needs a job store: install forge-worker (pip install forge-worker) "
                             "on this node; it need not run the worker role")
        return self._dispatcher

    def authorize(self, defn: FunctionDef, auth: Auth) -> None:
        if defn.public:
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

    async def call(self, name: str, args: Mapping[str, Any] | Any, auth: Auth = ANONYMOUS, *,
                   request_id: str | None = None, track_reads: bool = False, unstructured: bool = True,
                   call_out: list | None = None) -> Any:
        """Call ``name`` with JSON-ish ``args`` as ``auth``; returns the (unstructured) result.

        Raises :class:`ForgeError` only. ``call_out`` (a list) receives the :class:`Call`, for
        callers that need its read set or whether it used ``ctx.auth``.
        """
        defn = self.lookup(name)
        self.authorize(defn, auth)
        call = Call(defn, bind_arguments(defn, args), auth, request_id or new_request_id(), track_reads)
        if call_out is not None:
            call_out.append(call)
        timeout = defn.timeout or self.default_timeout
        tel = self.telemetry
        if tel.enabled:  # one ``call`` event; a span only where it can matter (Telemetry.call_started)
            parent = current()
            span = None if parent is not None and not parent.sampled else tel.call_started(defn.name, defn.kind,
                                                                                          call.request_id)
            t0, code = time.time_ns(), "OK"
        else:
            t0 = 0
        try:
            # asyncio.timeout, not wait_for: no extra task per call (measured in bench/rpc)
            async with asyncio.timeout(timeout):
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
        except Exception:
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
                tel.call_ended(span, defn.name, defn.kind, call.request_id, t0, code)
        return unstructure(result) if unstructured else result

    async def _invoke(self, call: Call) -> Any:
        defn = call.defn
        if defn.kind == "action":
            return await defn.fn(ActionContext(self, call, None), **call.args)
        if defn.kind == "query" and self.query_pool is not None:
            # Each statement runs in its own read-only transaction (the session default). At READ
            # COMMITTED that is what BEGIN READ ONLY gave (a snapshot per statement), minus two round trips.
            async with self.query_pool.acquire() as conn:
                db = Database(conn, readonly=True)
                result = await defn.fn(QueryContext(self, call, db), **call.args)
                if call.track_reads:
                    call.reads = await db.read_set()
                return result
        async with self.pool.acquire() as conn:
            if defn.kind == "query":
                async with conn.transaction(readonly=True):
                    db = Database(conn, readonly=True)
                    result = await defn.fn(QueryContext(self, call, db), **call.args)
                    if call.track_reads:
                        call.reads = await db.read_set()
                    return result
            async with conn.transaction():
                span = current()
                if span is not None and span.sampled:
                    # what this transaction's writes trigger (a live query's re-run) joins its trace
                    await conn.execute(SET_TRACE, span.traceparent())
                return await defn.fn(MutationContext(self, call, Database(conn)), **call.args)
