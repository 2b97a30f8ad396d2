"""What the kernel and the role packages record for whoever observes them (forge-observe).

Two things, both free when nothing observes the node:

* **events** - ``node.telemetry.emit(kind, *fields)`` appends one tuple to a bounded ring
  (``collections.deque``). The observer drains it off the hot path and aggregates. When the
  ring is full the oldest event goes and ``dropped`` counts it. With no observer attached,
  ``emit`` returns at once.
* **spans** - ``span = node.telemetry.start_span(name, kind, remote=traceparent)`` opens a span
  as the child of the current one (a ``contextvars`` variable, so it follows ``await`` and
  tasks), or starts a new local trace continuing ``remote`` (a W3C ``traceparent``) or a fresh
  one. ``end_span(span)`` closes it; when the last open span of a local trace closes, the
  observer's ``on_trace(trace)`` gets every span of it and decides whether to keep them (tail
  sampling). ``start_span`` returns ``None`` when nothing observes, and ``end_span(None)`` does
  nothing, so callers need no second branch. A finished span is plain data: it no longer
  points at its trace (no reference cycle, so an unkept trace is freed at once, never by the
  cyclic garbage collector).
* **requests** - the gateway opens a request's root span with :meth:`Telemetry.start_request` and
  closes it with :meth:`Telemetry.end_request`: a fresh trace is head-sampled with one
  ``random()`` draw, and an unsampled one's root draws its trace and span ids, reads the wall clock
  and gets its attributes only when something asks for them (a log line, a ``traceparent``, a
  child) or the observer may keep it, so a request that ends well and fast costs two
  ``call_clock`` readings, the ``contextvars`` round trip and a counter.
  A child recorded on such a root (``Span.record``: a dispatch, a push) is only noted until the
  local trace is needed.
* **function calls** - the executor records each call with :meth:`Telemetry.call_started` /
  :meth:`Telemetry.call_ended`: its seconds appended to its function's batch of successful calls
  (a ``calls`` event when drained) or, when it failed, one ``call`` event; and a span only where
  it can matter: a real child span in a sampled trace (so its SQL statements nest under it), a
  finished span added afterwards when the call failed or took at least ``keep_over`` seconds
  (tail sampling may keep those traces), nothing more otherwise. An unsampled call that went well
  costs one float in a list: no tuple per call, and the observer folds a whole batch at once.

The head decision ``trace.sampled`` is known when a trace starts: the remote parent's sampled
flag (when the observer honours it) or the trace id's low 64 bits under the sampling rate (a
fresh request's trace id is drawn to agree with the decision made for it). It
is the same on every node for the same trace id, so a job run on another node keeps its part of
a trace exactly when the request that dispatched it did; the observer may keep more at the end
(errors, slow work). Costly recording (SQL statements) happens only in sampled traces.

Event kinds emitted by FORGE's packages (fields in order; times in seconds):

=====================  ==========================================================  ================
kind                   fields                                                      emitted by
=====================  ==========================================================  ================
``call``               function name, kind, outcome code, seconds                  kernel (executor)
``calls``              function name, kind, ``OK``, list of seconds (one per call)  kernel (``drain``)
``job.dispatched``     job name, queue                                             kernel (dispatch)
``job.finished``       job name, queue, outcome, due, started (datetimes), seconds  worker (per attempt)
``jobs``               job name, queue, ``succeeded``, lists of due, started and   kernel (``drain``)
                       seconds (one per attempt)
``cron.run``           cron name, outcome, lag from its slot (or None)             scheduler
``cron.missed``        cron name, slots dropped by its catch_up policy             scheduler
``rt.connections``     change (+1 / -1)                                            realtime
``rt.subscriptions``   change (+1 / -1)                                            realtime
``rt.push``            kind (``data`` / ``unchanged``), count (one per fan-out)    realtime
``rt.rerun``           query function, seconds                                     realtime
``workflow.run``       workflow name, status (started, succeeded, failed, ...)     workflow runtime
``workflow.step``      workflow name, step name, status, seconds                   workflow runtime
``workflow.compensation``  workflow name, step name, status                        workflow runtime
=====================  ==========================================================  ================

Ids that log lines should carry are kept on the local trace (``trace.ids``: ``job``,
``cron_run``, ``workflow_run``); whoever starts the work sets them.
"""

from __future__ import annotations

import collections
import contextvars
import random
import re
import time
from typing import Any, Awaitable, Callable

import attrs

__all__ = ["ClusterGauge", "Span", "Telemetry", "Trace", "current_span", "format_traceparent", "parse_traceparent",
           "traceparent"]

_current: contextvars.ContextVar["Span | None"] = contextvars.ContextVar("forge_span", default=None)
#: the current span without a Python call (hot paths: ``span = current()``)
current = _current.get
_getrandbits = random.getrandbits
_time_ns = time.time_ns
#: the clock a function call is timed with (``Telemetry.call_ended``'s ``start``): seconds as a float,
#: so a call's duration needs no big-integer arithmetic and no division on every call
call_clock = time.perf_counter

#: spans one local trace keeps; later ones are counted in ``Trace.overflow`` and not kept
MAX_SPANS_PER_TRACE = 512
#: successful calls of one function kept between two drains; later ones become ``call`` events (the
#: ring's bound and drop count then apply: an observer that stops draining holds bounded memory)
MAX_CALL_BATCH = 16384
#: succeeded attempts of one job type kept between two drains (the same for ``jobs`` batches as for
#: ``calls``; a drain of 50,000 jobs/s aggregated every 0.5 s fits)
MAX_JOB_BATCH = 65536
_LOW64 = (1 << 64) - 1

# The W3C trace-context grammar (https://www.w3.org/TR/trace-context/#traceparent-header), read as
# OpenTelemetry's propagator reads it: surrounding whitespace allowed, version ff invalid, version 00
# exactly four fields, later versions may add fields after a dash, all-zero ids invalid.
_TRACEPARENT = re.compile(r"^\s*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\s*$")
#: a valid traceparent of the form FORGE writes (format_traceparent: version 00, nothing around it,
#: ids not all zero). The head decision on it needs no groups and no int: half of a full parse
_TRACEPARENT_00 = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}").fullmatch
_ODD_HEX = frozenset("13579bdf")
_random = random.random


def parse_traceparent(value: Any) -> tuple[int, int, int] | None:
    """``(trace_id, parent_span_id, flags)`` of a W3C ``traceparent`` value, or ``None`` when it is
    not a valid one (never raises: the header comes from anyone)."""
    if not isinstance(value, str) or len(value) > 512:
        return None
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(flags_hex, 16)


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def current_span() -> "Span | None":
    """The span the running code is inside of (``None`` outside any, or when nothing observes)."""
    return _current.get()


def traceparent() -> str | None:
    """The current span as a W3C ``traceparent`` value, for work handed to another process (jobs)."""
    span = _current.get()
    return None if span is None else span.traceparent()


class Trace:
    """The part of one trace recorded in this process for one piece of work (a request, a job run).

    Made when the local work has more than its root span (a child, a recorded SQL statement, a
    failed call) or when it is handed to the observer: an unsampled request or job that went well
    is one :class:`Span` and never gets one."""

    __slots__ = ("trace_id", "sampled", "spans", "open", "_ids", "overflow", "remote_parent", "errors", "last")

    def __init__(self, trace_id: int, sampled: bool, remote_parent: int = 0) -> None:
        self.trace_id = trace_id
        #: the head decision: keep this trace whatever happens (see the module docstring)
        self.sampled = sampled
        self.spans: list[Span] = []
        self.open = 0
        #: ids log lines of this work carry: job, cron_run, workflow_run (see ``ids``)
        self._ids: dict[str, Any] | None = None
        self.overflow = 0
        #: the span id of the remote parent this local trace continues (0: it starts the trace)
        self.remote_parent = remote_parent
        #: spans that ended with an error (the observer looks at them only when there are any)
        self.errors = 0
        #: the span whose end closed the trace (normally the local root)
        self.last: Span | None = None

    @property
    def ids(self) -> dict[str, Any]:
        """Ids log lines of this work carry (``job``, ``cron_run``, ``workflow_run``), shared with the
        local root span's ``ids``; whoever starts the work sets them (``start_span(ids=...)``)."""
        if self._ids is None:
            self._ids = {}
        return self._ids

    @property
    def root(self) -> "Span | None":
        """The local root: the span this process started the work with (the last to end)."""
        last = self.last
        if last is not None and last.parent_id == self.remote_parent:
            return last
        for s in self.spans:
            if s.parent_id == self.remote_parent:
                return s
        return self.spans[-1] if self.spans else None

    def add(self, span: "Span") -> None:
        if span.error is not None:
            self.errors += 1
        if len(self.spans) < MAX_SPANS_PER_TRACE:
            self.spans.append(span)
        else:
            self.overflow += 1


class Span:
    """One timed operation. Times are wall-clock nanoseconds (``time.time_ns``)."""

    __slots__ = ("_trace", "trace_id", "span_id", "parent_id", "name", "kind", "start_ns", "end_ns", "attrs",
                 "error", "sampled", "ids", "_token", "_later", "_t0", "_t1")

    def __init__(self, trace: Trace | None, trace_id: int, sampled: bool, span_id: int, parent_id: int, name: str,
                 kind: str, attrs: dict[str, Any] | None, start_ns: int) -> None:
        self._trace = trace
        self.trace_id = trace_id
        #: the trace's head decision (the flag its ``traceparent`` carries)
        self.sampled = sampled
        self.span_id = span_id
        self.parent_id = parent_id
        self.name = name
        #: server (an HTTP request), consumer (a job run), internal (a function call), client (SQL)
        self.kind = kind
        self.attrs = attrs
        self.error: str | None = None
        self.start_ns = start_ns
        self.end_ns = 0
        #: ids log lines of this work carry (local roots only; see ``Trace.ids``)
        self.ids: dict[str, Any] | None = None
        self._token: contextvars.Token | None = None
        #: children recorded on an unsampled root that has no local trace yet (see ``record``)
        self._later: list[tuple] | None = None

    @property
    def trace(self) -> Trace | None:
        """The local trace while the span is open (made on first use for a root span); ``None``
        once the span ended (it is then in ``trace.spans``, or was discarded)."""
        trace = self._trace
        if trace is None and not self.end_ns:
            trace = _local_trace(self)
        return trace

    def set(self, key: str, value: Any) -> None:
        if self.attrs is None:
            self.attrs = {}
        self.attrs[key] = value

    def traceparent(self) -> str:
        return "00-%032x-%016x-%s" % (self.trace_id, self.span_id, "01" if self.sampled else "00")

    def record(self, name: str, kind: str, start_ns: int, end_ns: int, attrs: dict[str, Any] | None = None,
               error: str | None = None, span_id: int = 0) -> None:
        """Add a finished child span measured by the caller (a SQL statement, a dispatch) to this open
        span's trace; ``span_id`` when the caller handed the id on before the span ended (a job's parent).

        On an unsampled root without a local trace yet (a request's, a job's) a child that went well
        is only noted: it becomes a span when the local trace is made (the root gets a child span, or
        ended failed or slow, so the observer may keep it). Most such work ends fast and well, and a
        ``ctx.dispatch`` in it then costs no span and no trace."""
        if self._trace is None and not self.sampled and error is None and not self.end_ns:
            later = self._later
            if later is None:
                self._later = [(name, kind, start_ns, end_ns, attrs, span_id)]
                return
            if len(later) < MAX_SPANS_PER_TRACE:
                later.append((name, kind, start_ns, end_ns, attrs, span_id))
                return
        child = self._finished_child(name, kind, start_ns, end_ns, attrs, error, span_id)
        trace = self.trace
        if trace is not None:
            trace.add(child)

    def _finished_child(self, name: str, kind: str, start_ns: int, end_ns: int, attrs: dict[str, Any] | None,
                        error: str | None, span_id: int) -> "Span":
        child = Span(None, self.trace_id, self.sampled, span_id or _getrandbits(64) or 1, self.span_id, name, kind,
                     attrs, start_ns)
        child.end_ns, child.error = end_ns, error
        return child

    @property
    def duration(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e9

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"<Span {self.name} {self.trace_id:032x}/{self.span_id:016x} parent={self.parent_id:016x}>"


def _local_trace(root: Span) -> Trace:
    """The local trace of an open root span that had none yet (its first child, record or hand-over)."""
    if isinstance(root, _UnsampledRoot):
        _promote(root)
    trace = root._trace = Trace(root.trace_id, root.sampled, root.parent_id)
    trace.open = 1
    if root.ids is None:
        root.ids = {}
    trace._ids = root.ids  # one dict: ids set on either are seen by both
    later = root._later
    if later is not None:  # the children it noted while it had no trace (Span.record)
        root._later = None
        for name, kind, start_ns, end_ns, attrs, child_id in later:
            trace.add(root._finished_child(name, kind, start_ns, end_ns, attrs, None, child_id))
    return trace


_new_span = object.__new__


def _leave(span: Span) -> None:
    """Make the span that was current before ``span`` started current again."""
    token, span._token = span._token, None
    try:
        _current.reset(token)
    except ValueError:  # ended in another context than it started in
        pass


class _UnsampledRoot(Span):
    """A request's local root in a fresh unsampled trace (:meth:`Telemetry.start_request`), made with
    only its name, head decision, context token and two :data:`call_clock` readings (start, end) set:
    no trace id, span id or wall-clock time yet. The rest are the class-level defaults below until
    something needs more (its ids: a log line, a ``traceparent``, a dispatch; a child, an attribute,
    the observer getting it; its times), which makes it a plain :class:`Span` (``_promote``: its ids
    drawn, its readings turned into wall-clock nanoseconds). Most requests end fast and well without
    anyone asking, and then never draw a 128-bit id nor read the wall clock.

    Each attached :class:`Telemetry` makes its own subclass holding its sampling threshold
    (``_below``), so a trace id drawn later still says "not sampled" to ``head_sampled_remote``.
    The defaults are plain class attributes: they shadow Span's slots for reading, and a write to
    one raises (every writer of those fields promotes the span first)."""

    __slots__ = ()
    #: the trace ids' low 64 bits at or above which a trace is not head-sampled (the subclass's)
    _below = 0
    parent_id = 0
    kind = "server"
    attrs = ids = error = _later = _trace = None

    # properties shadow Span's slots until promoted; then the instance is a Span and the slots answer
    @property
    def trace_id(self) -> int:
        _promote(self)
        return self.trace_id

    @property
    def span_id(self) -> int:
        _promote(self)
        return self.span_id

    @property
    def start_ns(self) -> int:
        _promote(self)
        return self.start_ns

    @property
    def end_ns(self) -> int:
        if not self._t1:  # open: read on hot paths (is the parent still open?), so no promotion
            return 0
        _promote(self)
        return self.end_ns

    def set(self, key: str, value: Any) -> None:
        _promote(self)
        Span.set(self, key, value)

    def record(self, name: str, kind: str, start_ns: int, end_ns: int, attrs: dict[str, Any] | None = None,
               error: str | None = None, span_id: int = 0) -> None:
        _promote(self)
        Span.record(self, name, kind, start_ns, end_ns, attrs, error, span_id)


def _promote(span: Span) -> None:
    """Make an :class:`_UnsampledRoot` the plain :class:`Span` it stands for: its trace id drawn with
    low bits at or above its threshold (not head-sampled, as decided), its span id drawn, its clock
    readings turned into wall-clock nanoseconds (both from one reading of each clock)."""
    below = span._below
    t0, t1 = span._t0, span._t1
    now_ns, now = _time_ns(), call_clock()
    span.__class__ = Span
    span.trace_id = _draw_trace_id(False, below)
    span.span_id = _getrandbits(64) or 1
    span.parent_id, span.kind = 0, "server"
    span.attrs = span.ids = span.error = span._later = span._trace = None
    span.start_ns = start = now_ns - int((now - t0) * 1e9)
    span.end_ns = start + int((t1 - t0) * 1e9) if t1 else 0


def new_span_id() -> int:
    return _getrandbits(64) or 1


def _draw_trace_id(sampled: bool, below: int) -> int:
    """A fresh trace id whose low 64 bits say ``sampled`` against the sampling threshold ``below``
    (what ``head_sampled_remote`` reads from it on any node), for a head decision made before the id
    was drawn. At rate 0 no id says sampled, at rate 1 none says unsampled: those get the nearest."""
    if sampled:
        low = _getrandbits(64) % min(below, 1 << 64) if below else 0
    else:
        below = min(below, _LOW64)
        low = below + _getrandbits(64) % ((1 << 64) - below)
    return (_getrandbits(64) << 64) | low or 1


class Telemetry:
    """One per node (``node.telemetry``). Role packages record into it; one observer attaches."""

    def __init__(self) -> None:
        #: True while an observer is attached; hot paths test it before doing any work
        self.enabled = False
        self.events: collections.deque | None = None
        self._ring_size = 0
        #: function name -> the seconds of its successful calls since the last drain (see call_ended; the
        #: executor appends to a batch of the right kind with room itself, the usual case inline)
        self.ok_calls: dict[str, _CallBatch] = {}
        #: job name -> its attempts that succeeded since the last drain, in one queue (see
        #: job_ended; the worker appends to a batch with room itself, the usual case inline)
        self.ok_jobs: dict[str, _JobBatch] = {}
        #: events lost because the ring was full
        self.dropped = 0
        self._on_trace: Callable[[Trace], None] | None = None
        self._sample_below = 0
        self._sample_below_hex: str | None = "0" * 16
        #: the head-sampling rate (0..1) of fresh traces (``attach``; read on hot paths)
        self.sample_rate = 0.0
        self._unsampled_root: type[_UnsampledRoot] = _UnsampledRoot
        self._honor_sampled = True
        #: seconds; an unsampled function call this slow (or failing) still gets its span (see call_ended),
        #: and an unsampled local trace without errors reaches the observer only when its root took this long
        self.keep_over = float("inf")
        #: the same in nanoseconds (compared with time.time_ns() differences on hot paths)
        self.keep_over_ns = 1 << 62
        #: local traces ended with nothing to keep them for (unsampled, no error, fast)
        self.discarded = 0
        #: name -> (help, labels, read): values read when the observer samples, never on a hot path
        self.gauges: dict[str, tuple[str, tuple[str, ...], Callable[[], Any]]] = {}

    def gauge(self, name: str, help: str, read: Callable[[], Any], labels: tuple[str, ...] = ()) -> None:
        """Register a gauge of this node read when the observer samples (a scrape, a flush).
        ``read()`` returns a number, or with ``labels`` a list of ``(label values, number)``.
        It must be cheap and must not await. Registering a name again replaces it."""
        self.gauges[name] = (help, tuple(labels), read)

    # --- the observer side -------------------------------------------------------------
    def attach(self, on_trace: Callable[[Trace], None], *, sample_rate: float = 0.01, ring_size: int = 65536,
               honor_remote_sampled: bool = True, keep_over: float = float("inf")) -> None:
        """Start recording. ``on_trace`` receives each finished local trace that may be worth keeping
        (on the event loop, synchronously: it must only queue): head-sampled ones, ones with a span
        that ended with an error, and ones whose local root took at least ``keep_over`` seconds (the
        observer's slow threshold; an unsampled function call that slow also gets its span, see
        :meth:`call_ended`). The others are only counted (``discarded``). ``sample_rate`` (0..1) is
        the head-sampling rate."""
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be between 0 and 1, got {sample_rate!r}")
        self._on_trace = on_trace
        self._sample_below = int(sample_rate * (1 << 64))
        #: the same as 16 hex digits; None: every trace id is below it (rate 1)
        self._sample_below_hex = f"{self._sample_below:016x}" if self._sample_below <= _LOW64 else None
        self.sample_rate = sample_rate
        #: the class of this telemetry's unsampled request roots (its threshold for their trace ids)
        self._unsampled_root = type("_UnsampledRoot", (_UnsampledRoot,),
                                    {"__slots__": (), "_below": min(self._sample_below, _LOW64)})
        self._honor_sampled = honor_remote_sampled
        self.keep_over = keep_over
        self.keep_over_ns = min(1 << 62, int(keep_over * 1e9)) if keep_over != float("inf") else 1 << 62
        self.events = collections.deque(maxlen=ring_size)
        self._ring_size = ring_size
        self.enabled = True

    def detach(self) -> None:
        self.enabled = False
        self._on_trace = None
        self.events = None
        self.ok_calls = {}
        self.ok_jobs = {}

    def drain(self) -> list[tuple]:
        """Every event recorded since the last drain, oldest first, then one ``calls`` event per
        function that had successful calls (their seconds, in call order) and one ``jobs`` event per
        job type that had succeeded attempts (their due and start times and seconds, in end order)."""
        ev, batches, jobs = self.events, self.ok_calls, self.ok_jobs
        out: list[tuple] = []
        if ev:
            # a fresh ring in, the old one read whole (in C): no await in between, so nothing is lost
            self.events = collections.deque(maxlen=ev.maxlen)
            out = list(ev)
        if batches:
            self.ok_calls = {}
            out.extend([("calls", (name, batch.kind, "OK", batch)) for name, batch in batches.items()])
        if jobs:
            self.ok_jobs = {}
            out.extend([("jobs", (name, b.queue, "succeeded", b.due, b.started, b)) for name, b in jobs.items()])
        return out

    # --- the recording side --------------------------------------------------------------
    def emit(self, kind: str, *fields: Any) -> None:
        """Record one event (see the table in the module docstring). Never raises, never blocks."""
        ev = self.events
        if ev is None:
            return
        if len(ev) == self._ring_size:
            self.dropped += 1
        ev.append((kind, fields))

    def head_sampled(self, trace_id: int, flags: int | None) -> bool:
        if flags is not None and flags & 1 and self._honor_sampled:
            return True
        return (trace_id & _LOW64) < self._sample_below

    def head_sampled_remote(self, remote: str | None) -> bool:
        """The head decision for work continuing ``remote`` (a ``traceparent``, or None for a fresh
        trace): what ``start_span(remote=...)`` would decide, without opening anything. Lets a
        caller leave unsampled work without a span until it needs one (the worker does)."""
        if not remote or type(remote) is not str:  # none, or no text (a job's options hold any JSON)
            return _random() < self.sample_rate
        if len(remote) == 55 and _TRACEPARENT_00(remote) is not None:
            # parse_traceparent would accept it: only the flags and the trace id's low 64 bits matter,
            # the bits compared as 16 lowercase hex digits (the same order as the numbers)
            if self._honor_sampled and remote[54] in _ODD_HEX:
                return True
            below = self._sample_below_hex
            return below is None or remote[19:35] < below
        ctx = parse_traceparent(remote)
        if ctx is None:
            return _random() < self.sample_rate
        return self.head_sampled(ctx[0], ctx[2])

    def start_span(self, name: str, kind: str = "internal", *, remote: str | None = None,
                   attrs: dict[str, Any] | None = None, ids: dict[str, Any] | None = None,
                   start_ns: int = 0, sampled: bool | None = None) -> Span | None:
        """Open a span and make it current. ``remote`` (a ``traceparent``) starts a new local trace
        continuing it (an invalid value starts a fresh trace). ``ids`` (a new local trace's root
        only) are the ids its log lines carry; ``start_ns`` when the work began earlier than now
        (a span opened late). ``sampled``: for a fresh trace, the head decision already made for it
        (``head_sampled_remote``'s, e.g. the worker's for a job without a valid ``traceparent``): its
        trace id is drawn to agree; without it the trace id's draw decides. ``None`` when nothing
        observes."""
        if not self.enabled:
            return None
        parent = _current.get() if remote is None else None
        if parent is not None and not parent.end_ns:
            trace = parent._trace
            if trace is None:
                trace = _local_trace(parent)
            span = Span(trace, trace.trace_id, trace.sampled, _getrandbits(64) or 1, parent.span_id, name, kind,
                        attrs, start_ns or _time_ns())
            trace.open += 1
            span._token = _current.set(span)
            return span
        ctx = parse_traceparent(remote) if remote else None
        if ctx is not None:
            trace_id, parent_id, flags = ctx
            sampled = self.head_sampled(trace_id, flags)
            span_id = _getrandbits(64) or 1
        elif sampled is None:  # a fresh trace: one draw gives its id and the root span's
            bits = _getrandbits(192)
            trace_id, span_id, parent_id = (bits >> 64) or 1, (bits & _LOW64) or 1, 0
            sampled = (trace_id & _LOW64) < self._sample_below
        else:  # a fresh trace decided before: its id agrees (a second draw would sample sampled work again)
            trace_id, span_id, parent_id = _draw_trace_id(sampled, self._sample_below), _getrandbits(64) or 1, 0
        # A new local root: built field by field (no __init__ call) and without a Trace, which is
        # made only if the work gets a child (see Span.trace): most unsampled work never does.
        span = _new_span(Span)
        span._trace = None
        span.trace_id, span.sampled, span.span_id, span.parent_id = trace_id, sampled, span_id, parent_id
        span.name, span.kind, span.attrs, span.ids = name, kind, attrs, ids
        span.error, span.end_ns, span._later = None, 0, None
        span.start_ns = start_ns or _time_ns()
        span._token = _current.set(span)
        return span

    def end_span(self, span: Span | None, error: str | None = None) -> None:
        """Close ``span`` (``None`` is ignored). ``error`` marks it failed. When it was the last open
        span of its local trace, the observer gets the trace if it may keep it (see ``attach``)."""
        if span is None or span.end_ns:  # nothing, or ended before
            return
        if isinstance(span, _UnsampledRoot):  # a request's root closed as a plain span: it gets its fields
            _promote(span)
        span.end_ns = end = _time_ns()
        if span._token is not None:
            _leave(span)
        trace = span._trace
        if trace is None:  # a root that had no child: the local trace is this one span
            if error is None and not span.sampled and end - span.start_ns < self.keep_over_ns:
                self.discarded += 1  # nothing the observer could keep it for: the common case
                return
            trace = _local_trace(span)
        if error is not None:
            span.error = error
        span._trace = None  # a finished span is data: no reference cycle with its trace
        trace.open -= 1
        if (trace.open <= 0 and error is None and not trace.errors and not trace.sampled
                and span.parent_id == trace.remote_parent and end - span.start_ns < self.keep_over_ns):
            self.discarded += 1
            return
        if error is not None:
            trace.errors += 1
        if len(trace.spans) < MAX_SPANS_PER_TRACE:
            trace.spans.append(span)
        else:
            trace.overflow += 1
        if trace.open > 0:
            return
        trace.last = span
        on_trace = self._on_trace
        if on_trace is not None:
            try:
                on_trace(trace)
            except Exception:  # an observer must never break the work it observes
                self.dropped += 1

    # --- requests (the gateway) ------------------------------------------------------------
    def start_request(self, name: str, remote: str | None) -> Span | None:
        """The local root span of a request (kind ``server``), continuing ``remote`` (the caller's
        ``traceparent``) or a fresh trace: ``start_span(name, "server", remote=remote)`` for less.
        A fresh trace is head-sampled at the sampling rate; an unsampled one's root (99 % at the
        default rate) draws its ids and reads the wall clock only when something asks for them
        (``_UnsampledRoot``), and gets its attributes from :meth:`end_request` only when the observer
        gets it. ``None`` when nothing observes."""
        if not self.enabled:
            return None
        if remote is None and (_random() >= self.sample_rate or not self._sample_below):
            span = _new_span(self._unsampled_root)
            span.sampled = False
            span.name = name
            span._t1 = 0.0
            span._t0 = call_clock()
            span._token = _current.set(span)
            return span
        if remote is not None:
            return self.start_span(name, "server", remote=remote)
        # head-sampled: a full span, its trace id's low 64 bits below the threshold (what
        # head_sampled_remote decides from them on any node)
        span = _new_span(Span)
        span.trace_id = _draw_trace_id(True, self._sample_below)
        span.sampled, span.span_id, span.parent_id, span.kind = True, _getrandbits(64) or 1, 0, "server"
        span.attrs = span.ids = span.error = span._later = span._trace = None
        span.name = name
        span.end_ns = 0
        span.start_ns = _time_ns()
        span._token = _current.set(span)
        return span

    def end_request(self, span: Span | None, status: int, request_id: str) -> None:
        """Close a request's root span (from :meth:`start_request`) answered with HTTP ``status``: a
        status of 500 or more marks it failed. Its attributes (``request.id``, ``http.status_code``)
        are set only when the observer may keep it; an unsampled request that went well and fast
        ends with a clock reading, the ``contextvars`` reset and a counter."""
        if span is None:
            return
        if type(span) is self._unsampled_root and status < 500 and not span._t1:
            end = call_clock()
            if end - span._t0 < self.keep_over:
                span._t1 = end
                try:
                    _current.reset(span._token)
                except ValueError:  # ended in another context than it started in
                    pass
                self.discarded += 1
                return
        if span.end_ns:
            return
        if isinstance(span, _UnsampledRoot):  # it gets attributes: a plain span
            _promote(span)
        elif status < 500 and span._trace is None and not span.sampled:  # continuing an unsampled remote
            end = _time_ns()
            if end - span.start_ns < self.keep_over_ns:
                span.end_ns = end
                if span._token is not None:
                    _leave(span)
                self.discarded += 1
                return
        attrs = span.attrs
        if attrs is None:
            span.attrs = {"request.id": request_id, "http.status_code": status}
        else:
            attrs.setdefault("request.id", request_id)
            attrs["http.status_code"] = status
        self.end_span(span, f"HTTP {status}" if status >= 500 else None)

    # --- function calls (the executor) ------------------------------------------------------
    def call_started(self, name: str, kind: str, call_id: str) -> Span | None:
        """Where a function call starts: a real span when it is the root of the work (no current
        span) or its trace is sampled; ``None`` otherwise (see :meth:`call_ended`)."""
        parent = _current.get()
        if parent is None or parent.sampled:
            return self.start_span(name, "internal", attrs={"function.kind": kind, "call.id": call_id})
        return None

    def call_ended(self, span: Span | None, name: str, kind: str, call_id: str, start: float, code: str) -> None:
        """Counts the call - a successful one into its function's batch (a ``calls`` event when
        drained), any other as a ``call`` event - and ends ``span``, or (unsampled trace) adds the
        call's span afterwards when it failed or took at least ``keep_over`` seconds, since the
        observer may keep that trace. ``start`` is a reading of :data:`call_clock` taken as the call began."""
        took = call_clock() - start
        if code == "OK":
            batch = self.ok_calls.get(name)
            if batch is not None and batch.kind is kind and len(batch) < MAX_CALL_BATCH:
                batch.append(took)
            else:
                self._call_counted(name, kind, code, took)
            if span is None and took < self.keep_over:
                return  # the usual call: counted, nothing more
        else:
            self._call_counted(name, kind, code, took)
        if span is not None:
            self.end_span(span, None if code == "OK" else code)
            return
        parent = _current.get()
        if parent is not None:  # its span, on the wall clock spans are stored with
            end = _time_ns()
            parent.record(name, "internal", end - int(max(0.0, took) * 1e9), end,
                          {"function.kind": kind, "call.id": call_id}, None if code == "OK" else code)

    def _call_counted(self, name: str, kind: str, code: str, seconds: float) -> None:
        """A call :meth:`call_ended` did not add to a batch: the first successful one of its function
        since the last drain starts the batch; a failed one, one of a full batch or of a name seen
        with another kind is a ``call`` event."""
        if self.events is None:  # nothing observes
            return
        if code == "OK":
            batch = self.ok_calls.get(name)
            if batch is None:
                batch = self.ok_calls[name] = _CallBatch()
                batch.kind = kind
                batch.append(seconds)
                return
            if batch.kind == kind and len(batch) < MAX_CALL_BATCH:  # an equal kind that is another str object
                batch.append(seconds)
                return
        self.emit("call", name, kind, code, seconds)


    def job_ended(self, name: str, queue: str, outcome: str, due: Any, started: Any, seconds: float) -> None:
        """Count an attempt of job ``name`` that ended (``due`` and ``started`` datetimes, ``seconds``
        it ran). A succeeded one goes into its job type's batch (a ``jobs`` event when drained: no
        tuple per job on the ring, and the observer folds the batch's columns at once); any other,
        or one of a full batch or of a queue other than the batch's, is a ``job.finished`` event.
        The worker appends to a batch with room itself (the usual case); this is the rest."""
        if self.events is None:  # nothing observes
            return
        if outcome != "succeeded":
            self.emit("job.finished", name, queue, outcome, due, started, seconds)
            return
        batch = self.ok_jobs.get(name)
        if batch is None:
            batch = self.ok_jobs[name] = _JobBatch()
            batch.queue, batch.due, batch.started = queue, [], []
        elif batch.queue != queue or len(batch) >= MAX_JOB_BATCH:
            self.emit("job.finished", name, queue, "succeeded", due, started, seconds)
            return
        batch.append(seconds)
        batch.due.append(due)
        batch.started.append(started)


class _JobBatch(list):
    """The seconds of one job type's succeeded attempts in one queue since the last drain, beside
    their due and start times (``Telemetry.job_ended``). Lists of datetimes and floats: no
    object the garbage collector tracks is made per job."""

    __slots__ = ("queue", "due", "started")


class _CallBatch(list):
    """The seconds of one function's successful calls since the last drain (``Telemetry.call_ended``)."""

    __slots__ = ("kind",)


@attrs.frozen
class ClusterGauge:
    """A cluster-wide gauge (``forge_cluster_gauges``): the leader collects it, so a scrape of every
    node does not count it once per node. ``collect(conn)`` returns ``[(label values, value)]``, one
    label value per name in ``labels``."""

    name: str
    help: str
    labels: tuple[str, ...]
    collect: Callable[[Any], Awaitable[list[tuple[tuple[str, ...], float]]]]


def job_wait(run_at: Any, started_at: Any) -> float:
    """Seconds a job waited in its queue: from when it was due to when a worker started it."""
    try:
        return max(0.0, (started_at - run_at).total_seconds())
    except (TypeError, AttributeError):
        return 0.0


class CountingDispatcher:
    """The node's job dispatcher, counting what it stores (``job.dispatched`` events); every other
    attribute (``ended``...) is the wrapped dispatcher's."""

    def __init__(self, inner: Any, telemetry: Telemetry) -> None:
        self.inner = inner
        self.telemetry = telemetry

    async def dispatch(self, conn: Any, requests: Any) -> list[int]:
        ids = await self.inner.dispatch(conn, requests)
        tel = self.telemetry
        if tel.enabled:
            for r in requests:
                tel.emit("job.dispatched", r.name, r.queue)
        return ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
