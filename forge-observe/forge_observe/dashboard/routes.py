"""The dashboard's HTTP routes under ``/_forge`` (mounted on every gateway node).

``GET /_forge/<page>[/<item>]`` renders a page, ``GET /_forge/api/<page>[/<item>]`` returns the same
data as JSON, ``GET /_forge/live/<page>[/<item>]`` streams the page's live region (Server-Sent
Events), ``POST /_forge/api/actions/<name>`` runs an admin action, ``POST /_forge/api/bulk/<verb>``
previews (without ``confirm``) or runs a job action on a whole filter.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from typing import Annotated, Any, AsyncIterator, Mapping

import asyncpg
import msgspec
from litestar import Request, Response, Router, get, post
from litestar.params import Parameter
from litestar.response import Redirect, ServerSentEvent
from litestar.response.sse import ServerSentEventMessage
from loguru import logger

from forge_kernel import migrations as migmod
from forge_kernel.errors import ForgeError, Forbidden, InvalidArgument, NotFound, Unauthenticated
from forge_kernel.node import all_migrations

from . import views
from .access import COOKIE, LOGIN_COOKIE, Access, Viewer
from .actions import JOB_VERBS, Actions
from .live import Hub
from .render import PREFIX, Renderer

_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'")
SECURITY_HEADERS = {"content-security-policy": _CSP, "x-frame-options": "DENY", "referrer-policy": "no-referrer",
                    "x-content-type-options": "nosniff", "cache-control": "no-store"}
_encode = msgspec.json.Encoder(enc_hook=lambda o: o.isoformat() if hasattr(o, "isoformat") else str(o)).encode
# a path parameter declared as one (Litestar 2.25 deprecates inferring it from the path)
PathStr = Annotated[str, Parameter()]

NAV = [(name, title) for name, (title, _, _) in views.PAGES.items()]


class Dashboard:
    """What the handlers share on one node."""

    def __init__(self, node: Any, config: Any, pools: Any, hub: Hub, actions: Actions, access: Access,
                 have: frozenset[str]) -> None:
        self.node = node
        self.config = config
        self.pools = pools
        self.hub = hub
        self.actions = actions
        self.access = access
        self.render = Renderer()
        self.ctx = views.Ctx(node, config, have)

    # --- queries ----------------------------------------------------------------------
    def query(self, page: str, params: Mapping[str, str], item: str | None = None) -> views.Query:
        if page not in views.PAGES or page == "migrations":
            raise NotFound(f"no dashboard page {page!r}")
        _, build, table = views.PAGES[page]
        if table is not None and table not in self.ctx.have:
            raise NotFound(f"the {page} page needs a package this cluster does not have installed")
        if item is None:
            return build(self.ctx, params)
        detail = views.DETAILS.get(page)
        if detail is None:
            raise NotFound(f"no dashboard page {page}/{item}")
        if page == "jobs":
            if not item.isdigit():
                raise InvalidArgument(f"a job id is a whole number, got {item!r}")
            return detail(self.ctx, params, int(item))
        return detail(self.ctx, params, item)

    async def data(self, query: views.Query) -> dict[str, Any]:
        try:
            if query.fetch is not None:
                raw = await query.fetch(self.pools.read)
            else:
                raw = await self.pools.read.fetchval(query.sql, *query.args)
        except asyncpg.QueryCanceledError:
            raise ForgeError(f"this view took longer than [dashboard] statement_timeout = "
                             f"{self.config.statement_timeout:g} s: narrow the filter", code="TIMEOUT") from None
        return query.shape(raw)

    async def migrations(self) -> dict[str, Any]:
        async with self.pools.read.acquire() as conn:
            states = await migmod.status(conn, all_migrations(self.node.loader, self.node.registry))
        rows = [{"namespace": s.namespace, "version": s.version, "name": s.name, "state": s.state,
                 "applied_at": s.applied_at} for s in states]
        summary = {k: sum(1 for r in rows if r["state"] == k) for k in ("applied", "pending", "drift", "unknown")}
        return {"now": dt.datetime.now(dt.timezone.utc).isoformat(), "migrations": rows, "summary": summary}

    # --- rendering ----------------------------------------------------------------------
    def template_of(self, query_page: str) -> str:
        return {"job": "job.html", "workflow": "workflow.html", "trace": "trace.html"}.get(query_page, f"{query_page}.html")

    def fragment(self, query: views.Query, raw: Any, viewer: Viewer | None = None) -> str:
        """The live region of a page from the snapshot's value (or the error that replaced it)."""
        if isinstance(raw, BaseException):
            message = raw.message if isinstance(raw, ForgeError) else f"this view could not be read: {type(raw).__name__}"
            return self.render.page("error_fragment.html", message=message)
        data = query.shape(raw)
        return self.render.block(self.template_of(query.page), "live", d=data, f=query.filters,
                                 admin=viewer.admin if viewer else False, page=query.page)


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(_encode(data), status_code=status, media_type="application/json",
                    headers={**SECURITY_HEADERS, **(headers or {})})


def _html(text: str, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(text, status_code=status, media_type="text/html; charset=utf-8",
                    headers={**SECURITY_HEADERS, **(headers or {})})


def _error(dash: Dashboard, request: Request, exc: ForgeError, api: bool) -> Response:
    if api:
        return _json({"error": exc.to_dict()}, exc.status)
    if request.headers.get("hx-request"):
        return _html(dash.render.page("toast.html", ok=False, message=exc.message), exc.status)
    return _html(dash.render.page("error.html", status=exc.status, message=exc.message, nav=NAV, viewer=None,
                                  notice=dash.access.describe(), csrf="", page="", title=str(exc.status),
                                  node_id=dash.node.id, live_interval=dash.config.live_interval), exc.status)


def routes(dash: Dashboard) -> Router:
    access = dash.access

    async def viewer_of(request: Request, api: bool) -> Viewer | Response:
        try:
            viewer = await access.viewer(request.headers, dict(request.cookies), _client(request))
        except ForgeError as exc:
            return _error(dash, request, exc, api)
        if viewer is not None:
            return viewer
        if access.config.open_on_loopback:
            # a loopback visitor gets a session so its POSTs can carry a CSRF token
            sid, viewer, expires = await access.open_session("loopback", "loopback", "admin", _client(request))
            request.state.new_session = (sid, expires)
            return viewer
        if api:
            return _json({"error": {"code": "UNAUTHENTICATED", "message": "send Authorization: Bearer <token or API "
                                    f"key> or {access.api_key_header}: <key>", "details": None}}, 401)
        return Redirect(f"{PREFIX}/login", status_code=303)

    def with_session(request: Request, response: Response) -> Response:
        new = getattr(request.state, "new_session", None)
        if new is not None:
            sid, expires = new
            response.set_cookie(COOKIE, sid, path=PREFIX, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https", expires=int(expires.timestamp()))
        return response

    def base(viewer: Viewer, page: str, title: str) -> dict[str, Any]:
        return {"viewer": viewer, "nav": NAV, "page": page, "title": title, "notice": access.describe(),
                "admin": viewer.admin, "csrf": viewer.csrf or "", "node_id": dash.node.id,
                "live_interval": dash.config.live_interval, "budget": dash.config.search_budget}

    # --- static files -----------------------------------------------------------------
    @get("/static/{name:str}", include_in_schema=False)
    async def static(name: PathStr) -> Response:
        found = dash.render.static.by_url.get(name)
        if found is None:
            return _json({"error": {"code": "NOT_FOUND", "message": f"no static file {name}", "details": None}}, 404)
        data, media = found
        return Response(data, media_type=media, headers={"cache-control": "public, max-age=31536000, immutable",
                                                        "x-content-type-options": "nosniff"})

    # --- sign in / out --------------------------------------------------------------------
    @get("/login", include_in_schema=False)
    async def login_form(request: Request) -> Response:
        token = request.cookies.get(LOGIN_COOKIE) or uuid.uuid4().hex
        resp = _html(dash.render.page("login.html", csrf=token, error=None, notice=access.describe(),
                                      open=access.config.open_on_loopback))
        resp.set_cookie(LOGIN_COOKIE, token, path=PREFIX, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", max_age=3600)
        return resp

    @post("/login", include_in_schema=False, status_code=303)
    async def login(request: Request) -> Response:
        form = await request.form()
        token = request.cookies.get(LOGIN_COOKIE)
        if not token or form.get("csrf") != token:
            return _html(dash.render.page("login.html", csrf=token or "", error="the sign-in form expired: try again",
                                          notice=access.describe(), open=False), 403)
        if access.config.open_on_loopback:
            return Redirect(f"{PREFIX}/", status_code=303)
        try:
            sid, viewer, expires = await access.sign_in(str(form.get("credential") or ""), _client(request))
        except ForgeError as exc:
            return _html(dash.render.page("login.html", csrf=token, error=exc.message, notice=access.describe(),
                                          open=False), exc.status)
        resp = Redirect(f"{PREFIX}/", status_code=303)
        resp.set_cookie(COOKIE, sid, path=PREFIX, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", expires=int(expires.timestamp()))
        return resp

    @post("/logout", include_in_schema=False, status_code=303)
    async def logout(request: Request) -> Response:
        viewer = await viewer_of(request, api=False)
        if isinstance(viewer, Response):
            return viewer
        form = await request.form()
        if not access.csrf_ok(viewer, form.get("csrf") or request.headers.get("x-csrf-token")):
            return _error(dash, request, Forbidden("missing or wrong CSRF token"), api=False)
        sid = request.cookies.get(COOKIE)
        if sid:
            await access.sign_out(sid)
        resp = Redirect(f"{PREFIX}/login", status_code=303)
        resp.delete_cookie(COOKIE, path=PREFIX)
        return resp

    # --- pages and their JSON twins -------------------------------------------------------
    async def page(request: Request, name: str, item: str | None) -> Response:
        viewer = await viewer_of(request, api=False)
        if isinstance(viewer, Response):
            return viewer
        try:
            title = views.PAGES[name][0] if name in views.PAGES else name
            if name == "migrations":
                data = await dash.migrations()
                html = dash.render.page("migrations.html", d=data, f={}, **base(viewer, name, title))
                return with_session(request, _html(html))
            query = dash.query(name, request.query_params, item)
            data = await dash.data(query)
        except ForgeError as exc:
            return with_session(request, _error(dash, request, exc, api=False))
        live_path = f"{PREFIX}/live/{name}" + (f"/{item}" if item else "")
        if request.url.query:
            live_path += "?" + request.url.query
        html = dash.render.page(dash.template_of(query.page), d=data, f=query.filters,
                                live_url=live_path if query.live else None, **base(viewer, name, title))
        return with_session(request, _html(html))

    @get("/", include_in_schema=False)
    async def overview_get(request: Request) -> Response:
        return await page(request, "overview", None)

    @get("/{name:str}", include_in_schema=False)
    async def page_get(request: Request, name: PathStr) -> Response:
        return await page(request, name, None)

    @get("/{name:str}/{item:str}", include_in_schema=False)
    async def detail_get(request: Request, name: PathStr, item: PathStr) -> Response:
        return await page(request, name, item)

    async def api(request: Request, name: str, item: str | None) -> Response:
        viewer = await viewer_of(request, api=True)
        if isinstance(viewer, Response):
            return viewer
        try:
            if name == "live":
                return _json({"statements": dash.hub.statements, "ticks": dash.hub.ticks,
                              "views": len(dash.hub.watched), "subscribers": dash.hub.subscribers,
                              "interval": dash.hub.interval, "poll": dash.hub.pacer.poll, "hints": dash.hub.hints,
                              "listening": dash.hub.listening, "node": dash.node.id})
            if name == "session":
                return with_session(request, _json({"who": viewer.who, "role": viewer.role, "via": viewer.via,
                                                    "csrf": viewer.csrf, "actions": dash.actions.names(),
                                                    "action_params": dash.actions.params(),
                                                    "notice": access.describe()}))
            if name == "migrations":
                return with_session(request, _json(await dash.migrations()))
            query = dash.query(name, request.query_params, item)
            return with_session(request, _json({**await dash.data(query), "filters": query.filters}))
        except ForgeError as exc:
            return _error(dash, request, exc, api=True)

    @get("/api/{name:str}", include_in_schema=False)
    async def api_get(request: Request, name: PathStr) -> Response:
        return await api(request, name, None)

    @get("/api/{name:str}/{item:str}", include_in_schema=False)
    async def api_detail(request: Request, name: PathStr, item: PathStr) -> Response:
        return await api(request, name, item)

    # --- live regions -------------------------------------------------------------------------
    async def live(request: Request, name: str, item: str | None) -> Response:
        viewer = await viewer_of(request, api=True)
        if isinstance(viewer, Response):
            return viewer
        try:
            query = dash.query(name, request.query_params, item)
        except ForgeError as exc:
            return _error(dash, request, exc, api=True)
        if not query.live:
            return _error(dash, request, NotFound(f"the {name} page has no live updates"), api=True)

        def render(q: views.Query, raw: Any) -> str:
            return dash.fragment(q, raw, viewer)

        async def stream() -> AsyncIterator[ServerSentEventMessage]:
            # the shared entry renders for the first subscriber's role: a read-only viewer shares
            # only with read-only viewers (the key carries the role)
            queue = dash.hub.subscribe(keyed, render)
            idle = 0
            try:
                while True:
                    try:
                        fragment = await asyncio.wait_for(queue.get(), 1.0)
                    except asyncio.TimeoutError:
                        if dash.node.status not in ("running", "starting"):
                            return  # draining: let the HTTP server finish instead of waiting on this stream
                        idle += 1
                        if idle % 15 == 0:
                            yield ServerSentEventMessage(comment="keep-alive")
                        continue
                    if fragment is None:
                        return
                    yield ServerSentEventMessage(data=fragment, event="update")
            finally:
                dash.hub.unsubscribe(keyed, queue)

        import attrs as _attrs

        keyed = _attrs.evolve(query, key=f"{query.key}#{viewer.role}")
        return ServerSentEvent(stream(), headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    @get("/live/{name:str}", include_in_schema=False)
    async def live_get(request: Request, name: PathStr) -> Response:
        return await live(request, name, None)

    @get("/live/{name:str}/{item:str}", include_in_schema=False)
    async def live_detail(request: Request, name: PathStr, item: PathStr) -> Response:
        return await live(request, name, item)

    # --- actions ------------------------------------------------------------------------------
    async def body_of(request: Request) -> tuple[dict[str, Any], bool]:
        """The POST's fields (JSON object or form), and whether it came from the page (htmx)."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            try:
                data = json.loads(await request.body() or b"{}")
            except ValueError as exc:
                raise InvalidArgument(f"malformed JSON: {exc}") from None
            if not isinstance(data, dict):
                raise InvalidArgument("the body must be a JSON object")
            return data, False
        form = await request.form()
        data: dict[str, Any] = {}
        for k in form.keys():
            values = form.getall(k)
            data[k] = values if k == "targets" else values[-1]
        if isinstance(data.get("targets"), list) and len(data["targets"]) == 1 and "," in data["targets"][0]:
            data["targets"] = [t for t in data["targets"][0].split(",") if t]
        for k in ("params",):
            if isinstance(data.get(k), str) and data[k]:
                try:
                    data[k] = json.loads(data[k])
                except ValueError as exc:
                    raise InvalidArgument(f"{k}: malformed JSON: {exc}") from None
        # a form's own fields: "param.<name>" is a text parameter, "json.<name>" one given as JSON
        # text (a payload textarea); an empty field is a parameter not given
        params = data.get("params") if isinstance(data.get("params"), dict) else {}
        for k in [k for k in data if k.startswith(("param.", "json."))]:
            value = data.pop(k)
            kind, name = k.split(".", 1)
            if not name or not isinstance(value, str) or not value.strip():
                continue
            if kind == "json":
                try:
                    value = json.loads(value)
                except ValueError as exc:
                    raise InvalidArgument(f"{name}: malformed JSON ({exc})") from None
            params[name] = value
        if params:
            data["params"] = params
        return data, True

    async def acting(request: Request) -> Viewer | Response:
        viewer = await viewer_of(request, api=True)
        if isinstance(viewer, Response):
            return viewer
        if not viewer.admin:
            return _error(dash, request, Forbidden(f"{viewer.who} may look but not act (read-only role)"), api=True)
        given = request.headers.get("x-csrf-token")
        if given is None and not request.headers.get("content-type", "").startswith("application/json"):
            given = (await request.form()).get("csrf")
        if not access.csrf_ok(viewer, given):
            return _error(dash, request, Forbidden("missing or wrong CSRF token (X-CSRF-Token header or csrf field)"),
                          api=True)
        origin = request.headers.get("origin")
        if origin and origin != "null" and origin.split("://", 1)[-1] != request.headers.get("host", ""):
            return _error(dash, request, Forbidden(f"cross-origin POST from {origin} refused"), api=True)
        return viewer

    def answer(request: Request, result: dict[str, Any], from_page: bool) -> Response:
        dash.hub.poke()
        if from_page:
            return _html(dash.render.page("toast.html", ok=True, message=result["message"], result=result))
        return _json(result)

    @post("/api/actions/{name:str}", include_in_schema=False, status_code=200)
    async def action(request: Request, name: PathStr) -> Response:
        viewer = await acting(request)
        if isinstance(viewer, Response):
            return viewer
        try:
            data, from_page = await body_of(request)
            targets = data.get("targets")
            if isinstance(targets, str):
                targets = [targets]
            if targets is None and isinstance(data.get("target"), str):
                targets = [data["target"].strip()]  # one target as typed (a correlation key may hold commas)
            result = await dash.actions.perform(viewer, name, targets or [], data.get("params") or {},
                                                _client(request), data.get("idempotency_key"))
        except ForgeError as exc:
            return _error(dash, request, exc, api=not request.headers.get("hx-request"))
        return answer(request, result, from_page)

    @post("/api/bulk/{verb:str}", include_in_schema=False, status_code=200)
    async def bulk(request: Request, verb: PathStr) -> Response:
        viewer = await acting(request)
        if isinstance(viewer, Response):
            return viewer
        try:
            data, from_page = await body_of(request)
            filt = {k: str(v) for k, v in data.items() if k in ("status", "name", "queue", "node", "since", "until", "args")}
            if not data.get("confirm"):
                preview = await dash.actions.bulk_preview(verb, filt)
                if from_page:
                    return _html(dash.render.page("bulk_confirm.html", p=preview, verb=verb, filt=filt,
                                                  key=uuid.uuid4().hex))
                return _json(preview)
            result = await dash.actions.bulk(viewer, verb, filt, _client(request), data.get("idempotency_key"))
        except ForgeError as exc:
            return _error(dash, request, exc, api=not request.headers.get("hx-request"))
        return answer(request, result, from_page)

    return Router(path=PREFIX, route_handlers=[static, login_form, login, logout, overview_get, page_get, detail_get, api_get,
                                               api_detail, live_get, live_detail, action, bulk],
                  include_in_schema=False)


__all__ = ["Dashboard", "routes", "JOB_VERBS"]
