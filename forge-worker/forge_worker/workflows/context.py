"""What a workflow function receives as ``ctx``: durable steps, sleeps, events, children,
parallel branches and recorded ``now()`` / ``random()`` / ``uuid()``.

The function is executed again from the start whenever its run resumes (after a crash, a
sleep, an event). Every operation has a *key*, its position in the code ("3"; "4.2.1" is the
first operation of branch 2 of the ``gather`` at position 4). An operation whose key has a
record returns the recorded value without running anything; the first operation without a
record runs and records its result before anything else happens. A record whose name differs
from what the code asks for at that key is a divergence: the run is blocked, never guessed.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import functools
import importlib
import inspect
import random as _random
import time
import traceback
import typing
import uuid
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

import attrs
from loguru import logger

from forge_kernel.app import FunctionDef
from forge_kernel.convert import StructureError, structure, unstructure
from forge_kernel.executor import Auth

from ..runtime import backoff_delay, storable_error
from . import store

UTC = dt.timezone.utc


# --- what workflow code sees ----------------------------------------------------------------------
class StepFailed(Exception):
    """A step failed for good (its retries are used up, or its result cannot be stored). Raised
    into the workflow function; letting it escape fails the run and runs the compensations."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"step {step!r} failed: {message}")
        self.step = step
        self.message = message


class ChildFailed(Exception):
    """A child run ended without succeeding (failed or cancelled)."""

    def __init__(self, run_id: str, status: str, error: str | None) -> None:
        super().__init__(f"child run {run_id} {status}" + (f": {error}" if error else ""))
        self.run_id, self.status, self.error = run_id, status, error


@attrs.frozen
class Event:
    """An event a run received: ``name`` (one of those it waited for) and its ``payload``."""

    name: str
    payload: Any


@attrs.frozen
class ChildRun:
    """A started child run (``await ctx.wait_child(handle)`` for its result)."""

    run_id: str
    name: str


# --- control flow of the runtime (BaseException: workflow code's ``except Exception`` cannot swallow them)
class Suspended(BaseException):
    """The runtime gave the run up until a timer or an event; this execution ends here."""


class Park(BaseException):
    """The run must wait (a long sleep, a retry's back-off, an event, a child): this execution
    ends and the runtime gives the run up until ``until`` or one of ``events`` (``seen``: the
    event count the mailbox was read at). Parallel branches park together (see ``gather``)."""

    def __init__(self, until: dt.datetime | None, wait: dict[str, Any], events: list[str] | None = None,
                 seen: int | None = None) -> None:
        super().__init__(wait.get("kind", "wait"))
        self.until, self.wait, self.events, self.seen = until, wait, events, seen

    @classmethod
    def combine(cls, parks: list["Park"]) -> "Park":
        if len(parks) == 1:
            return parks[0]
        untils = [p.until for p in parks if p.until is not None]
        events = sorted({e for p in parks for e in (p.events or [])})
        seens = [p.seen for p in parks if p.seen is not None]
        return cls(min(untils) if untils else None, {"kind": "parallel", "waits": [p.wait for p in parks]},
                   events or None, min(seens) if seens else None)


class Diverged(BaseException):
    """The code asks for something else than the history recorded at ``key``."""

    def __init__(self, key: str, recorded: str, code: str) -> None:
        super().__init__(f"at step {key} the run recorded {recorded!r} but the code now asks for {code!r}")
        self.key, self.recorded, self.code = key, recorded, code


class LeaseLost(BaseException):
    """A fenced write was rejected: another claim owns the run now (or it was cancelled)."""


class ReplayEnd(BaseException):
    """Replay-only execution (``workflows check``) reached the end of the recorded history."""


@attrs.define
class Record:
    key: str
    name: str
    kind: str
    status: str
    result: Any
    error: str | None
    attempts: int


@attrs.define
class _Scope:
    prefix: str
    counter: int = 0

    def next(self) -> str:
        self.counter += 1
        return f"{self.prefix}{self.counter}"


_scope: contextvars.ContextVar[_Scope] = contextvars.ContextVar("forge_workflow_scope")


def function_ref(fn: Any) -> str:
    """``module:qualname`` of a module-level function, checked to resolve back to ``fn``."""
    defn = getattr(fn, "__forge__", None)
    if isinstance(defn, FunctionDef):
        return f"app:{defn.name}"
    module, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qual or "<" in qual:
        raise TypeError(f"{fn!r} must be a module-level function (it is stored by name and called after a restart)")
    if resolve_ref(f"{module}:{qual}") is not fn:
        raise TypeError(f"{module}.{qual} does not resolve back to the function given; use a module-level function")
    return f"{module}:{qual}"


def resolve_ref(ref: str, app_modules: Iterable[str] | None = None) -> Any:
    """The function ``ref`` (``module:qualname``) names. With ``app_modules`` (what a worker passes
    for a ref read back from the database) only a function defined in the app's own packages
    resolves: a row someone wrote by hand cannot make the worker import or call anything else."""
    module, _, qual = ref.partition(":")
    if app_modules is not None:
        roots = {m.split(".")[0] for m in app_modules}
        if module.split(".")[0] not in roots or not qual or any(p.startswith("_") for p in qual.split(".")):
            raise LookupError(f"compensation {ref!r} is not a function of the app's modules ({', '.join(sorted(roots))})")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    if app_modules is not None and not (inspect.isfunction(obj) and obj.__module__ == module):
        raise LookupError(f"compensation {ref!r} is not a function defined in {module}")
    return obj


@functools.lru_cache(maxsize=4096)
def _return_hint(fn: Any) -> Any:
    """The type a step's result is structured back into (cached: resolving hints compiles them)."""
    defn = getattr(fn, "__forge__", None)
    if isinstance(defn, FunctionDef):
        return defn.returns
    try:
        return typing.get_type_hints(fn).get("return", Any)
    except Exception:
        return Any


#: JSON scalars: the converter returns them as they are, both ways
_SCALARS = frozenset((int, float, str, bool, type(None)))


def _plain(value: Any) -> Any:
    """``value`` unstructured for JSON (a scalar is already: no converter dispatch per step)."""
    return value if type(value) in _SCALARS else unstructure(value)


def _decode(value: Any, hint: Any) -> Any:
    if hint is Any or hint is None or hint is type(None) or hint is inspect.Parameter.empty:
        return value
    if type(value) is hint and hint in _SCALARS:
        return value
    try:
        return structure(value, hint)
    except StructureError:
        return value


def _structured_args(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """Stored (JSON) arguments structured by ``fn``'s type hints, so a compensation called after a
    restart gets the same types the step had."""
    try:
        hints = typing.get_type_hints(fn)
        params = [p for p in inspect.signature(fn).parameters.values()]
    except (TypeError, ValueError, NameError):
        return list(args), dict(kwargs)
    out_args = []
    for i, value in enumerate(args):
        hint = hints.get(params[i].name, Any) if i < len(params) else Any
        out_args.append(_decode(value, hint))
    return out_args, {k: _decode(v, hints.get(k, Any)) for k, v in kwargs.items()}


def _now() -> dt.datetime:
    return dt.datetime.now(UTC)


def _error_text(exc: BaseException) -> str:
    """A step's error as its row takes it (no NUL, cut: ``storable_error``)."""
    tb = "".join(traceback.format_exception(exc)[-4:])
    return storable_error(f"{type(exc).__name__}: {exc}\n{tb}")


class WorkflowContext:
    """``ctx`` of a ``@workflow`` function.

    ``run_id``, ``name``, ``version``, ``args``, ``log``, ``auth`` (who started it), and the
    durable operations ``step``, ``sleep``, ``sleep_until``, ``wait_for_event``,
    ``start_child``, ``wait_child``, ``child``, ``gather``, ``now``, ``random``, ``uuid``.
    """

    def __init__(self, execution: Any, history: dict[str, Record]) -> None:
        self._x = execution
        self._history = history
        self._visited: set[str] = set()
        # operations done but not written yet: recorded values, and a step's result until the next
        # operation starts (or the run ends: then it is written with the ending, in one statement)
        self._pending: list[tuple] = []
        # held while pending rows are written: an operation starts only after they are committed,
        # also when a parallel branch is the one writing them
        self._writing = asyncio.Lock()
        self.run_id: str = str(execution.run_id)
        self.name: str = execution.name
        self.version: str = execution.version
        self.auth: Auth = execution.auth
        self.log = logger.bind(workflow=execution.name, run_id=self.run_id)

    # --- keys and history -----------------------------------------------------------------
    def _key(self) -> str:
        scope = _scope.get(None)
        if scope is None:
            raise RuntimeError("workflow operations must run inside the workflow's own task (use ctx.gather, "
                               "not asyncio.gather/create_task, for parallel steps)")
        return scope.next()

    def _recorded(self, key: str, name: str, kind: str) -> Record | None:
        self._visited.add(key)
        rec = self._history.get(key)
        if rec is not None and (rec.name != name or rec.kind != kind):
            raise Diverged(key, f"{rec.kind} {rec.name}", f"{kind} {name}")
        if rec is None and self._x.replay_only:
            raise ReplayEnd()
        return rec

    def unvisited(self) -> list[str]:
        return sorted(set(self._history) - self._visited, key=_key_order)

    async def _write(self, key: str, name: str, kind: str, status: str, *, args: Any = None, result: Any = None,
                     error: str | None = None, attempts: int = 1, compensation: Any = None,
                     started_at: dt.datetime | None = None) -> None:
        async with self._writing:
            rows = self._pending + [(key, name, kind, status, args, result, error, attempts, compensation, started_at)]
            self._pending = []
            await self._x.checkpoint(rows)

    async def _flush(self) -> None:
        """Write the pending operations (or wait until a parallel branch has written them)."""
        async with self._writing:
            if self._pending:
                rows, self._pending = self._pending, []
                await self._x.checkpoint(rows)

    def _take(self) -> list[tuple]:
        """The pending operations, for the run's ending to write (the function has returned)."""
        rows, self._pending = self._pending, []
        return rows

    # --- deterministic values ------------------------------------------------------------------
    def _value(self, kind: str, make: Callable[[], Any], encode: Callable[[Any], Any],
               decode: Callable[[Any], Any]) -> Any:
        key = self._key()
        rec = self._recorded(key, kind, kind)
        if rec is not None:
            return decode(rec.result)
        value = make()
        self._pending.append((key, kind, kind, "succeeded", None, store.dumps(encode(value), kind), None, 1, None,
                              None))
        return value

    def now(self) -> dt.datetime:
        """The current time, recorded: a resumed run sees the same value here."""
        return self._value("now", _now, lambda v: v.isoformat(), dt.datetime.fromisoformat)

    def random(self) -> float:
        """A random float in [0, 1), recorded."""
        return self._value("random", _random.random, lambda v: v, float)

    def uuid(self) -> uuid.UUID:
        """A random UUID, recorded."""
        return self._value("uuid", uuid.uuid4, str, uuid.UUID)

    # --- steps ------------------------------------------------------------------------------------
    async def step(self, fn: Callable[..., Any], /, *args: Any, name: str | None = None, retries: int | None = None,
                   backoff: float | dt.timedelta | None = None, timeout: float | dt.timedelta | None = None,
                   compensate: Callable[..., Any] | None = None,
                   compensate_args: Sequence[Any] | Callable[[Any], Sequence[Any]] | None = None,
                   **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` once, durably: its result is recorded before the workflow
        goes on, and a resumed run gets the recorded result without calling ``fn`` again.

        ``fn`` is a function (async or not) or an app ``@query``/``@mutation``/``@action``
        (called through the executor as the run's caller, keyword arguments only). ``retries``
        (default ``[workflows] step_retries``) with exponential ``backoff`` seconds; ``timeout``
        per attempt. ``compensate``: a module-level function that undoes the step, called with
        ``compensate_args`` (a sequence, or a function of the step's result returning one;
        default: the step's own arguments) if the run later fails or is cancelled.
        """
        step_name = name or getattr(getattr(fn, "__forge__", None), "name", None) or getattr(fn, "__name__", None)
        if not isinstance(step_name, str) or not step_name:
            raise TypeError(f"ctx.step: give name= for {fn!r}")
        key = self._key()
        try:
            hint = _return_hint(fn)
        except TypeError:  # an unhashable callable
            hint = _return_hint.__wrapped__(fn)
        rec = self._recorded(key, step_name, "step")
        if rec is not None and rec.status == "succeeded":
            return _decode(rec.result, hint)
        if rec is not None and rec.status == "failed":
            raise StepFailed(step_name, rec.error or "failed")
        cfg = self._x.config
        retries = cfg.step_retries if retries is None else retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise TypeError(f"ctx.step {step_name}: retries must be a whole number >= 0, got {retries!r}")
        base = backoff.total_seconds() if isinstance(backoff, dt.timedelta) else backoff
        base = cfg.step_backoff if base is None else float(base)
        limit = timeout.total_seconds() if isinstance(timeout, dt.timedelta) else timeout
        comp_ref = function_ref(compensate) if compensate is not None else None
        app = getattr(fn, "__forge__", None)
        if isinstance(app, FunctionDef) and args:
            raise TypeError(f"ctx.step {step_name}: app functions take keyword arguments only")
        try:
            stored_args = store.dumps({"args": [_plain(a) for a in args],
                                       "kwargs": {k: _plain(v) for k, v in kwargs.items()}},
                                      "arguments", cfg.max_value_bytes)
        except Exception as exc:
            stored_args = None
            args_problem = f"its arguments cannot be stored: {exc}"
        else:
            args_problem = None
        attempts = rec.attempts if rec is not None else 0
        next_at = _when(rec.result.get("next_at")) if rec is not None and isinstance(rec.result, dict) else None
        await self._flush()  # what the run did before this step is committed before the step runs
        while True:
            if next_at is not None:
                await self._wait_until(next_at, {"kind": "retry", "step": step_name, "key": key,
                                                 "attempt": attempts + 1, "of": retries + 1,
                                                 "at": next_at.isoformat()})
            attempts += 1
            started = _now()
            if args_problem is not None:
                await self._write(key, step_name, "step", "failed", error=args_problem, attempts=attempts,
                                  started_at=started)
                raise StepFailed(step_name, f"workflow {self.name}: {args_problem}")
            try:
                if limit is None:
                    value = await self._call(fn, app, args, kwargs)
                else:
                    async with asyncio.timeout(limit):
                        value = await self._call(fn, app, args, kwargs)
            except (asyncio.CancelledError, Park, LeaseLost, Diverged):
                raise
            except Exception as exc:
                error = (f"timed out after {limit:g}s" if isinstance(exc, TimeoutError) and limit
                         else _error_text(exc))
                if attempts > retries:
                    await self._write(key, step_name, "step", "failed", args=stored_args, error=error,
                                      attempts=attempts, started_at=started)
                    raise StepFailed(step_name, error.splitlines()[0]) from None
                delay = backoff_delay(attempts, base, cfg.step_backoff_max)
                next_at = _now() + dt.timedelta(seconds=delay)
                await self._write(key, step_name, "step", "retrying", args=stored_args,
                                  result=store.dumps({"next_at": next_at.isoformat()}, "retry"), error=error,
                                  attempts=attempts, started_at=started)
                self.log.warning(f"step {step_name} attempt {attempts}/{retries + 1} failed; next at {next_at:%H:%M:%S}: "
                                 f"{error.splitlines()[0]}")
                continue
            try:
                plain = _plain(value)
                text = store.dumps(plain, f"the result of step {step_name!r}", cfg.max_value_bytes)
                comp = None
                if comp_ref is not None:
                    cargs = compensate_args(value) if callable(compensate_args) else compensate_args
                    cargs = list(args) if cargs is None else list(cargs)
                    ckw = dict(kwargs) if compensate_args is None else {}
                    comp = store.dumps({"function": comp_ref, "args": unstructure(cargs), "kwargs": unstructure(ckw),
                                        "retries": retries, "backoff": base},
                                       f"the compensation of step {step_name!r}", cfg.max_value_bytes)
            except Exception as exc:
                error = f"workflow {self.name}, step {step_name}: the result cannot be stored: {exc}"
                await self._write(key, step_name, "step", "failed", args=stored_args, error=error, attempts=attempts,
                                  started_at=started)
                raise StepFailed(step_name, error) from None
            # written before the next operation starts (or with the run's ending)
            self._pending.append((key, step_name, "step", "succeeded", stored_args, text, None, attempts, comp,
                                  started))
            return _decode(plain, hint)

    async def _call(self, fn: Any, app: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if isinstance(app, FunctionDef):
            return await self._x.call_app(app, dict(kwargs))
        value = fn(*args, **kwargs)
        if inspect.isawaitable(value):
            value = await value
        return value

    # --- time -------------------------------------------------------------------------------------
    async def sleep(self, duration: float | dt.timedelta) -> None:
        """Sleep durably: a resumed run sleeps only what is left. Long sleeps free the worker."""
        seconds = duration.total_seconds() if isinstance(duration, dt.timedelta) else duration
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise ValueError(f"ctx.sleep: duration must be seconds >= 0 or a timedelta, got {duration!r}")
        await self._sleep(lambda: _now() + dt.timedelta(seconds=seconds))

    async def sleep_until(self, when: dt.datetime) -> None:
        """Sleep until ``when`` (timezone-aware)."""
        if not isinstance(when, dt.datetime) or when.tzinfo is None:
            raise ValueError(f"ctx.sleep_until: expected a timezone-aware datetime, got {when!r}")
        await self._sleep(lambda: when)

    async def _sleep(self, wake: Callable[[], dt.datetime]) -> None:
        key = self._key()
        rec = self._recorded(key, "sleep", "sleep")
        if rec is not None:
            until = _when(rec.result["until"])
        else:
            until = wake().astimezone(UTC)
            await self._write(key, "sleep", "sleep", "succeeded",
                              result=store.dumps({"until": until.isoformat()}, "sleep"), started_at=_now())
        await self._wait_until(until, {"kind": "sleep", "key": key, "until": until.isoformat()})

    async def _wait_until(self, when: dt.datetime, wait: dict[str, Any]) -> None:
        left = (when - _now()).total_seconds()
        if left <= 0:
            return
        if self._x.replay_only:
            raise ReplayEnd()
        if left <= self._x.config.suspend_after:
            await asyncio.sleep(left)
            return
        await self._flush()
        raise Park(when, {**wait, "until": when.isoformat()} if "until" not in wait else wait)

    # --- events -----------------------------------------------------------------------------------
    async def wait_for_event(self, name: str | Iterable[str], /, *,
                             timeout: float | dt.timedelta | None = None) -> Event | None:
        """Wait for an event sent to this run (by id or correlation key) named ``name`` (or any of
        several names). Events sent before the wait began are kept and delivered here, once.
        Returns the :class:`Event`, or ``None`` if ``timeout`` passed first."""
        names = [name] if isinstance(name, str) else list(name)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"ctx.wait_for_event: expected an event name or a list of names, got {name!r}")
        seconds = timeout.total_seconds() if isinstance(timeout, dt.timedelta) else timeout
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0):
            raise ValueError(f"ctx.wait_for_event: timeout must be seconds >= 0 or a timedelta, got {timeout!r}")
        got = await self._wait_event(names, "event:" + ",".join(names), seconds, {"kind": "event", "events": names})
        return None if got is None else Event(got["name"], got["payload"])

    async def _wait_event(self, names: list[str], op_name: str, seconds: float | None,
                          wait: dict[str, Any]) -> dict[str, Any] | None:
        key = self._key()
        rec = self._recorded(key, op_name, "event")
        if rec is not None and rec.status == "succeeded":
            return None if rec.result.get("timed_out") else rec.result
        if rec is not None:
            deadline = _when(rec.result.get("deadline"))
        else:
            deadline = _now() + dt.timedelta(seconds=seconds) if seconds is not None else None
        info = {"deadline": deadline.isoformat() if deadline else None}
        if self._x.replay_only:
            raise ReplayEnd()
        await self._flush()
        got, seen = await self._x.consume(key, op_name, names, store.dumps(info, "wait"))
        if got is not None:
            return got
        if deadline is not None and _now() >= deadline:
            await self._write(key, op_name, "event", "succeeded",
                              result=store.dumps({"timed_out": True, **info}, "wait"))
            return None
        raise Park(deadline, {**wait, "key": key, **info}, names, seen)

    # --- children ---------------------------------------------------------------------------------
    async def start_child(self, workflow: Any, /, **args: Any) -> ChildRun:
        """Start a child run (exactly once, whatever happens to this one); returns its handle."""
        defn = self._x.resolve(workflow)
        name = defn.name if isinstance(defn, FunctionDef) else str(defn)
        key = self._key()
        rec = self._recorded(key, name, "child")
        if rec is not None:
            return ChildRun(rec.result["run_id"], name)
        child_id = uuid.uuid5(uuid.UUID(self.run_id), key)
        await self._flush()
        await self._x.start_child(defn, args, child_id, key)
        await self._write(key, name, "child", "succeeded",
                          args=store.dumps(unstructure(dict(args)), "arguments", self._x.config.max_value_bytes),
                          result=store.dumps({"run_id": str(child_id)}, "child"), started_at=_now())
        return ChildRun(str(child_id), name)

    async def wait_child(self, child: ChildRun | str, /, *, timeout: float | dt.timedelta | None = None) -> Any:
        """Wait for a child run to end; returns its result or raises :class:`ChildFailed`."""
        run_id = child.run_id if isinstance(child, ChildRun) else str(child)
        seconds = timeout.total_seconds() if isinstance(timeout, dt.timedelta) else timeout
        event = store.CHILD_EVENT + run_id
        got = await self._wait_event([event], f"child:{run_id}", seconds, {"kind": "child", "run": run_id})
        if got is None:
            raise ChildFailed(run_id, "still running", f"no result within {seconds:g}s")
        payload = got["payload"] or {}
        if payload.get("status") != "succeeded":
            raise ChildFailed(run_id, payload.get("status", "failed"), payload.get("error"))
        hint = Any
        if isinstance(child, ChildRun):
            defn = self._x.resolve(child.name)
            hint = defn.returns if isinstance(defn, FunctionDef) else Any
        return _decode(payload.get("result"), hint)

    async def child(self, workflow: Any, /, **args: Any) -> Any:
        """Start a child run and wait for its result."""
        return await self.wait_child(await self.start_child(workflow, **args))

    # --- parallel ---------------------------------------------------------------------------------
    async def gather(self, *aws: Awaitable[Any]) -> list[Any]:
        """Run operations in parallel (``await ctx.gather(ctx.step(a), ctx.step(b))``); results
        in order. Each branch numbers its operations on its own, so a branch's keys do not
        depend on how fast the others are. Every branch runs to its end even when another
        fails (so which steps completed - and get compensated - never depends on timing); then
        the first failure in branch order is raised."""
        key = self._key()
        self._visited.add(key)  # a gather records nothing itself; its branches do
        rec = self._history.get(key)
        if rec is not None:
            raise Diverged(key, f"{rec.kind} {rec.name}", "gather")
        tasks = []
        for i, aw in enumerate(aws, 1):
            ctx = contextvars.copy_context()
            ctx.run(_scope.set, _Scope(f"{key}.{i}."))
            tasks.append(asyncio.get_running_loop().create_task(_awaited(aw), context=ctx))
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                # the runtime's own signals (lease lost, diverged, cancelled) end every branch
                stop = next((t.exception() for t in done if not t.cancelled() and t.exception() is not None
                             and not isinstance(t.exception(), (Exception, Park))), None)
                if stop is not None:
                    raise stop
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        for t in tasks:
            if isinstance(t.exception(), Exception):
                raise t.exception()
        # branches that must wait wait together, once every other branch got as far as it can
        parks = [t.exception() for t in tasks if isinstance(t.exception(), Park)]
        if parks:
            raise Park.combine(parks)
        return [t.result() for t in tasks]


async def _awaited(aw: Awaitable[Any]) -> Any:
    return await aw


def _when(text: Any) -> dt.datetime | None:
    if text is None:
        return None
    return dt.datetime.fromisoformat(text) if isinstance(text, str) else text


def _key_order(key: str) -> tuple:
    parts = []
    for p in key.replace("c:", "").split("."):
        parts.append(int(p) if p.isdigit() else 0)
    return tuple(parts)


def new_scope() -> None:
    """Start key numbering for a run (called at the top of the run's task)."""
    _scope.set(_Scope(""))
