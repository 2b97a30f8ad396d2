"""Every hook a FORGE plugin can implement.

A plugin is a module (or object) registered through the ``forge.plugins`` entry-point
group. It implements any of the hooks below with ``@forge_kernel.hookimpl``.

pluggy calls hooks synchronously, so hooks return *descriptions* (attrs instances,
classes, callables). Everything asynchronous - servers, loops, listeners - is a
:class:`forge_kernel.services.Service` whose lifespan the kernel enters in dependency
order and exits in reverse.

Conventions: hooks returning lists are collected from every plugin (pluggy returns one
result per implementation); hooks marked *firstresult* stop at the first non-``None``.
Hooks may be called more than once (the CLI and tests build several nodes per process)
and must therefore not keep global state.

Events and spans are not hooks: packages record them through ``node.telemetry``
(:mod:`forge_kernel.telemetry`: ``emit(kind, *fields)`` into a bounded ring, ``start_span`` /
``end_span`` with W3C trace context), which costs nothing until an observer attaches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from .admin import AdminAction
    from .app import Registry
    from .migrations import Migration
    from .node import Node
    from .services import MaintenanceTask, Service
    from .telemetry import ClusterGauge

hookspec = pluggy.HookspecMarker("forge")
hookimpl = pluggy.HookimplMarker("forge")


# --- what a plugin is ---------------------------------------------------------------
@hookspec
def forge_roles() -> list[str]:
    """Names of the roles this plugin provides (``gateway``, ``worker``, ...).

    Called once when the plugin is loaded and again when a node decides what to run.
    Return a list of role names. A node runs the roles its plugins provide, narrowed by
    ``[node] roles``. Implemented by role packages; capability plugins (codegen,
    metrics) do not implement it.
    """


@hookspec
def forge_config_sections() -> Mapping[str, type]:
    """Map of config section name to the attrs class that structures it.

    Called before configuration is loaded; implemented by every plugin that has settings.
    Each section belongs to exactly one plugin;
    two plugins claiming the same section is a load error for the second. Field defaults
    must give a working node; validators raise ``forge_kernel.convert.InvalidValue`` so
    the error names the key, the value and what was expected.
    """


@hookspec
def forge_migrations() -> list["Migration"]:
    """The plugin's versioned, forward-only SQL migrations.

    Called by ``forge-node migrate`` and at node start-up; implemented by every plugin
    that owns tables. Return
    ``forge_kernel.migrations.from_package("my_plugin.migrations", namespace="my_plugin")``
    or a list of ``Migration``. A namespace belongs to one plugin; versions inside it
    are applied in order, each once, in its own transaction. Editing an applied
    migration is reported as drift: add a new version instead.
    """


# --- what a node runs ---------------------------------------------------------------
@hookspec
def forge_services(node: "Node") -> list["Service"]:
    """Return the long-running parts of this plugin for ``node``.

    Called once per node start, after migrations and app loading, with the node's
    config, pool and registry available. Implemented by role packages and any plugin
    with a background component. Return a ``Service`` per component; the node
    starts those whose ``role`` it runs (or whose role is ``None``) in dependency
    order (``after``) and stops them in exact reverse. Nothing may start running
    inside this hook itself.
    """


@hookspec
def forge_maintenance_tasks(node: "Node") -> list["MaintenanceTask"]:
    """Return periodic cluster chores that exactly one node (the scheduler leader) runs.

    Called once per node start. Each ``MaintenanceTask`` has a name, an interval and
    an ``async run(conn)`` that receives a pool connection; the leader re-checks its
    leadership before each run. Plugins that own tables contribute their own chores
    (the worker rescues expired leases, observability drops old partitions), so the
    scheduler never needs to know another plugin's SQL.
    """


@hookspec
def forge_app_modules() -> list[str]:
    """Importable module names that contain app functions (``@query``, ``@job``...).

    Called when the node builds its registry (and by ``forge-node migrate``), in addition
    to ``[app] modules``. Return a list of module names. Implemented by any plugin that
    ships functions (an admin API, an example app) so they need no configuration.
    """


@hookspec
def forge_registry_loaded(registry: "Registry", node: "Node | None") -> None:
    """Check the loaded app registry and raise to stop start-up.

    Called after every app module is imported and before migrations and services. Return
    nothing; raise ``forge_kernel.errors.StartupError`` naming the function to stop
    start-up. Implemented by plugins that run a kind of function: the scheduler parses
    every cron expression and time zone here.
    """


@hookspec
def forge_registry_reloaded(node: "Node", registry: "Registry") -> Any:
    """The node now serves ``registry`` in place of the one it had (``forge-node dev`` reloaded the app).

    Called by ``Node.reload_registry`` on the node's event loop, after ``registry`` passed
    ``forge_registry_loaded``, its new migrations were applied, and ``node.registry`` and
    ``node.executor.registry`` point at it; never during start-up. Return ``None`` or an
    awaitable (the node awaits it); an exception is logged and does not undo the swap.
    Implemented by plugins that keep something derived from the registry: the gateway
    rebuilds its OpenAPI document, realtime re-runs every live query as its subscriber and
    pushes only results that changed (open WebSockets stay open). Must not keep the old
    registry's functions around.
    """


@hookspec
def forge_dev_notice(node: "Node", notice: Mapping[str, Any]) -> None:
    """A message for the developers watching a node run by ``forge-node dev``.

    Called by the dev command after each reload attempt, with a JSON-safe mapping:
    ``event`` (``"reloaded"`` or ``"reload_failed"``), ``message``, ``file`` and ``line``
    (where a failed reload's error is, or ``None``), ``functions`` (names now served). Return
    nothing; must not block. Implemented by plugins with connected clients: realtime sends it
    to every open WebSocket as ``{"type": "dev", ...}`` so a page can show the error.
    """


@hookspec(firstresult=True)
def forge_job_dispatcher(node: "Node") -> Any:
    """The object that turns ``ctx.dispatch(...)`` into stored jobs.

    Called once per node start, when the function executor is built. Implemented by
    the worker package (firstresult: the first plugin wins). Return an
    object with ``async dispatch(conn, requests: Sequence[JobRequest]) -> list[int]``
    that writes every request on ``conn`` - inside the caller's transaction, so a
    rolled-back mutation leaves no job. Return ``None`` to decline.

    The object may also offer ``async ended(conn, job_ids: Sequence[int]) -> dict[int,
    JobOutcome | None]``: for each of ``job_ids`` that has ended for good (succeeded,
    dead-lettered, cancelled, discarded) its outcome, ``None`` for an id the store has no
    record of, and nothing for a job still waiting or running. Followers of jobs (the
    scheduler's run history) use it to learn of endings that no ``forge_job_finished``
    call reported: a job cancelled before it ran, or one whose worker died.
    """


@hookspec(firstresult=True)
def forge_workflow_engine(node: "Node") -> Any:
    """The object that starts durable workflow runs and delivers events to them.

    Called once per node start, when the function executor is built. Implemented by the
    worker package (firstresult: the first plugin wins); return ``None`` to decline. The
    object offers:

    * ``async start(conn, requests: Sequence[WorkflowRequest]) -> list[str]``: store one run
      per request on ``conn`` - inside the caller's transaction when there is one, so a run
      started by a mutation exists exactly when the mutation commits and never after a
      rollback - and return the run ids in request order. A request whose
      ``idempotency_key`` is already held by a run returns that run's id and starts nothing.
      A request it cannot store raises ``forge_kernel.errors.InvalidArgument`` naming it.
    * ``async send_event(conn, target: str, name: str, payload) -> int``: store the event for
      every live run whose id or correlation key is ``target`` (again on ``conn``, inside its
      transaction) and return how many runs it reached; ``NotFound`` when none. An event sent
      before a run waits for it is kept and delivered to the first wait for that name, once.
    """


@hookspec(firstresult=True)
def forge_call_forwarder(node: "Node") -> Any:
    """The object that runs a call on another node when this node should not run it itself.

    Called once per node start, when the function executor is built. Implemented by
    forge-mesh (firstresult); return ``None`` to decline (every call then runs here). The
    executor uses the object like this:

    * ``wants(defn: FunctionDef) -> bool`` - asked for every call that did not arrive from
      another node: ``True`` sends it elsewhere (this node runs ``gateway`` but not
      ``function``, or the function needs a capability this node lacks). Cheap and pure.
    * ``async forward(call: Call, args, timeout: float) -> Any`` - run ``call`` (its definition,
      auth, request id; ``args`` is the arguments object as the caller sent it) on another node
      within ``timeout`` seconds and return the result unstructured (JSON-safe). When
      ``call.track_reads`` is set, fill ``call.reads`` and ``call.used_auth`` from the remote
      run. Raise ``ForgeError`` only: ``UNAVAILABLE`` when no node can run it now, ``TIMEOUT``
      when the deadline passed, the remote run's own error otherwise. A mutation or action must
      never run twice because of a retry here.
    * ``async claim(conn, call_id: str, defn: FunctionDef) -> tuple[bool, Any]`` - called by
      the node that runs a forwarded mutation (inside the mutation's transaction, before the
      function runs) or action (in a statement of its own) that carries a call id. Return
      ``(True, stored_result)`` when that call id already completed; ``(False, None)`` when
      this run now owns it; raise ``ForgeError`` when it started elsewhere and its outcome is
      unknown (an action whose node died).
    * ``async record(conn, call_id: str, result: Any) -> None`` - store the result under the
      call id (for a mutation: in its transaction, so the result exists exactly when it commits).
    * ``problem() -> str | None`` - why this node cannot forward right now (no reachable node
      runs ``function``), for readiness checks; ``None`` when it can.
    """


@hookspec
def forge_call_middleware(node: "Node") -> list[Callable[..., Any]]:
    """Wrappers around every function call, outermost first.

    Called once per node start; implemented by plugins that observe or wrap calls.
    Return a list; each item is ``async def mw(call, next) -> result``
    where ``call`` is a ``forge_kernel.executor.Call`` (definition, args, auth,
    request id) and ``next(call)`` runs the rest of the chain. Observability uses it
    for spans and metrics. Must not swallow ``ForgeError``.
    """


# --- gateway extension points (published by the kernel so plugins need not import the gateway)
@hookspec
def forge_gateway_routes(node: "Node") -> list[Any]:
    """Return Litestar route handlers (or Routers) to mount on the node's HTTP server.

    Called once when the gateway builds its app; implemented by plugins that serve HTTP
    or WebSocket routes. Realtime adds ``/ws``, observability
    adds ``/metrics`` and ``/_forge/``. Paths must not collide with the gateway's own
    (``/health``, ``/ready``, ``/rpc``, ``/openapi.json``).
    """


# --- command line -------------------------------------------------------------------
@hookspec
def forge_cli_commands(subparsers: Any) -> None:
    """Add ``forge-node`` sub-commands to an ``argparse`` sub-parser group.

    Called when the CLI starts, before arguments are parsed; implemented by plugins with
    operator commands. Return nothing. Each added parser sets ``func=async_or_sync_callable``
    taking one argument ``cli``: ``cli.args`` is the parsed namespace, ``cli.config()`` the
    loaded configuration, ``cli.loader`` the plugin loader, and ``async with cli.connection() as
    conn`` a database connection (starting or joining the embedded PostgreSQL when no URL is set,
    released on exit). The return value is the exit code (``None`` is 0).
    The worker adds ``jobs``, the scheduler adds ``crons``.
    """


# --- cross-plugin contracts the kernel publishes ------------------------------------
@hookspec
def forge_job_finished(node: "Node", outcome: Any) -> Any:
    """Called by the worker after every job attempt ends, with a ``forge_kernel.executor.JobOutcome``.

    Return ``None`` or an awaitable (the worker awaits it, with errors logged and ignored).
    Implemented by plugins that follow jobs: the scheduler records cron run history,
    observability counts jobs.
    Must be quick: it runs on the worker's path for every job.
    """


@hookspec(firstresult=True)
def forge_auth_verifier(node: "Node") -> Any:
    """The object that turns a bearer credential into a ``forge_kernel.Auth``.

    Called once per node start by plugins that accept credentials outside HTTP (realtime).
    Implemented by the gateway (firstresult). Returns an object with
    ``async verify(token: str) -> Auth`` raising ``forge_kernel.errors.Unauthenticated``
    for a bad or expired credential (never returning an anonymous caller for a bad token).
    Token callers are built with ``Auth.for_user`` (which refuses the reserved subjects
    ``system`` and ``apikey:...``), API-key callers with ``Auth.for_api_key`` (user id
    ``apikey:<name>``), so no token can pose as a key or the node.
    Realtime uses it for the WebSocket ``auth`` message.
    """


@hookspec
def forge_job_cancel_requested(config: Any, conn: Any, job_id: int, node_id: str) -> Any:
    """Called by the worker package right after it recorded a cancel request for a job that is
    running on node ``node_id`` (from the CLI, the Python API or the dashboard).

    Implemented by forge-mesh. Return ``None`` or an awaitable that tells that node at once (over
    the mesh) and resolves to ``True`` when the node answered that it stopped the job. It must not
    take more than about a second and must not raise: the database request (seen by the running
    worker within moments) stays the fallback. ``config`` is the caller's configuration and
    ``conn`` a database connection it may use to find the node.
    """


@hookspec(firstresult=True)
def forge_cancel_running_job(node: "Node", job_id: int) -> Any:
    """Stop job ``job_id`` if it is running on ``node`` now, as a cancel request would.

    Called on the node that runs the job when a cancel request reaches it outside the database
    (forge-mesh calls it when a ``forge_job_cancel_requested`` message arrives). Implemented by
    the worker package (firstresult). Return ``True`` when the job was running here and has been
    told to stop, ``False`` when it is not running here; ``None`` means no plugin runs jobs.
    Must be quick and must not touch the database (the request is already recorded).
    """


@hookspec
def forge_node_activity(node: "Node") -> Mapping[str, Any]:
    """What this plugin is doing on ``node`` right now, for live cluster status.

    Called on demand (``forge-node status --live`` asks every node, with a 1 s deadline).
    Implemented by plugins with in-flight work: the worker reports running jobs, realtime its
    sockets and subscriptions, the mesh its forwarded calls. Return a small JSON-safe mapping
    (counts and at most a few dozen ids) under keys named after the plugin's area, or ``None``.
    Must be quick and must not touch the database.
    """


@hookspec(firstresult=True)
def forge_live_status(config: Any, conn: Any, timeout: float) -> Any:
    """Ask every live node what it is doing now, for ``forge-node status --live``.

    Called by the kernel's CLI with the loaded configuration and a database connection.
    Implemented by forge-mesh (firstresult). Return an awaitable resolving to a list of dicts,
    one per node that ``forge_nodes`` lists as not stopped: ``{"id", "reachable", "error",
    "activity"}`` - within ``timeout`` seconds overall, partial results included (a node that
    did not answer in time is ``reachable: False`` with the reason).
    """


@hookspec
def forge_cluster_gauges(node: "Node") -> list["ClusterGauge"]:
    """Cluster-wide gauges computed from shared tables (queue depth, dead letters, nodes).

    Called once per node start by the observer (forge-observe); implemented by plugins that own
    such tables (the worker: jobs per queue and status). Return a list of
    ``forge_kernel.telemetry.ClusterGauge`` (name, help, label names, ``async collect(conn)``
    returning ``[(label values, value)]``). Only the scheduler leader collects them (as a
    maintenance task) and exports them, so scraping every node never counts the cluster twice.
    ``collect`` must be one cheap query: it runs every few seconds.
    """


@hookspec
def forge_admin_actions(node: "Node") -> list["AdminAction"]:
    """Operator actions on the tables this plugin owns (retry a job, pause a queue, trigger a cron).

    Called when an operator tool (the admin dashboard) starts on a node; implemented by every
    plugin whose state operators change: the worker (``job.retry``, ``job.cancel``,
    ``job.discard``, ``queue.pause``, ``queue.resume``), the scheduler (``cron.trigger``,
    ``cron.pause``, ``cron.resume``), the workflow runtime (``workflow.cancel``,
    ``workflow.retry``, ``workflow.send_event``) and the kernel (``node.drain``). Return a list of
    ``forge_kernel.admin.AdminAction``; a name belongs to one plugin.

    ``await action.run(conn, targets, params, actor)`` must: do all its writes on ``conn`` (the
    caller runs it inside a transaction and commits its own audit row with it); raise
    ``forge_kernel.errors.InvalidArgument`` for a malformed target or parameter (``NotFound`` for
    a target the owner cannot act on, e.g. an unknown cron), naming it, the caller's transaction
    then being rolled back; leave alone targets already in the end state, so
    running it again with the same targets changes nothing and reports ``affected == 0``
    (a cron trigger and a workflow event are the exceptions: each run asks for one more run or
    sends one more event, so tools de-duplicate repeated requests themselves); and work whichever node leads the cluster (write requests the
    leader picks up, never state only one process holds).
    """


@hookspec(firstresult=True)
def forge_rate_limiter(node: "Node") -> Any:
    """The functions' declared rate limits (``@query(rate_limit=RateLimit(...))``) for calls that
    reach the node other than through the gateway's ``/rpc``, so no transport walks around them.

    Called once per node start by plugins that run functions for remote callers (realtime, for
    every WebSocket ``subscribe``). Implemented by the gateway (firstresult); ``None`` when no
    plugin limits calls. Returns one object per node, shared with ``/rpc`` (a call spends the
    same window whichever way it came), with:

    * ``client_address(scope) -> str``: the caller's address for an ASGI ``http`` or ``websocket``
      connection scope, believing forwarded headers only as the gateway's config says;
    * ``async admit(definition, auth, client) -> None``: spend one call of the
      ``forge_kernel.app.FunctionDef``'s limit for ``auth`` calling from ``client``; returns at once
      for a function without a limit; raises ``forge_kernel.errors.RateLimited`` with
      ``details["retry_after"]`` (whole seconds, at least 1) when the limit is used up. Callers
      authorise first, so an unauthorised caller never spends another caller's calls.
    """
