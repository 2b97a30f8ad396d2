"""One node's mesh: the gRPC server other nodes call, and the forwarder the kernel's executor uses.

Forwarding rules (see README):

* a query goes to the least busy healthy node that can run it; when the transport fails it is
  tried on another node, as long as the deadline lasts;
* a mutation or action carries a call id; a retry on another node with the same id returns the
  stored result when the first run committed (forge_mesh_calls, written in the mutation's own
  transaction) and runs it otherwise. An action whose first run may have started is never run
  again: the retry answers "outcome unknown";
* a call that reaches a node which does not take it (another process, draining, protocol) is
  refused before anything runs and goes elsewhere, whatever its kind;
* ``TIMEOUT`` when the deadline passes, ``UNAVAILABLE`` when no node can run the call now.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

import asyncpg
import grpc
from loguru import logger

from forge_kernel.app import FunctionDef
from forge_kernel.errors import ForgeError, InvalidArgument, StartupError, Timeout, Unavailable
from forge_kernel.listen import tcp_listener
from forge_kernel.logs import add_sink

from . import engine, wire
from .channels import Stubs, open_stubs, server_options
from .config import MIN_PROTOCOL, MeshConfig, is_loopback
from .front import TlsFront
from .ledger import Ledger
from .peers import PEERS_SQL, Directory, Peer
from .streams import BATCH_BYTES, BATCHED_PROTOCOL, StreamPool, serve_stream
from .protocol import mesh_pb2 as pb
from .tls import Material, load_material, log_plaintext, material_stamp, server_context
from .token import cluster_token, token_matches

_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError)
#: answers of a live but overloaded peer (too many streams, cancelled by the server)
_BUSY = {grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED}
_LOG_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}"
#: test failpoints: FORGE_MESH_FAILPOINT="<point>:<function>" SIGKILLs this process at that point
#: of every forwarded call of <function> (before_start, after_commit). For kill tests only.
FAILPOINT_ENV = "FORGE_MESH_FAILPOINT"


def _failpoint_from_env() -> tuple[str, str] | None:
    raw = os.environ.get(FAILPOINT_ENV, "")
    point, _, function = raw.partition(":")
    return (point, function) if point in ("before_start", "after_commit") and function else None


def advertised_host(listen_host: str) -> str:
    """The host peers dial when the node listens on ``listen_host``: the host itself, or for a
    wildcard address the first non-loopback address of this machine's name."""
    if listen_host not in ("0.0.0.0", "::", ""):
        return f"[{listen_host}]" if ":" in listen_host else listen_host
    name = socket.gethostname()
    with contextlib.suppress(OSError):
        for family, _, _, _, addr in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM):
            ip = addr[0]
            if not is_loopback(ip):
                return f"[{ip}]" if family == socket.AF_INET6 else ip
    return name


class Mesh:
    """Created once per node (:func:`mesh_for`); the forwarder the kernel gets is this object."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.config: MeshConfig = node.config["mesh"]
        self.epoch = secrets.token_hex(8)
        self.protocol = self.config.protocol_version
        self.directory = Directory(node.id)
        self.ledger = Ledger(node.id)
        self.gateway_only = node.runs("gateway") and not node.runs("function")
        self.capabilities = frozenset(node.capabilities)
        self.started = False
        self.draining = False
        self.address = ""
        self.tls = False
        #: this node's certificate material (None on plaintext loopback without a CA)
        self.material: Material | None = None
        self.front: TlsFront | None = None
        self.server: Any = None
        self._tmpdir: str | None = None
        self.serving = 0
        self.forwarding = 0
        self.stats = {"forwarded": 0, "retried": 0, "refused_unstarted": 0, "unavailable": 0, "timeouts": 0,
                      "served": 0, "fenced": 0}
        self._stubs: dict[tuple[str, str], Stubs] = {}
        self._retiring: list[Peer] = []
        self._streams: dict[tuple[str, str], StreamPool] = {}
        self._followers: dict[asyncio.Queue, int] = {}
        self._sink_id: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._failpoint = _failpoint_from_env()
        #: the cluster's mesh token (read at start); requests without it are refused and counted
        self.token = ""
        self.refused_token = 0

    # --- the forwarder the kernel executor uses (forge_call_forwarder) --------------------------
    def wants(self, defn: FunctionDef) -> bool:
        if self.gateway_only:
            return True
        cap = defn.options.get("capability")
        return cap is not None and cap not in self.capabilities

    async def claim(self, conn: Any, call_id: str, defn: FunctionDef) -> tuple[bool, Any]:
        return await self.ledger.claim(conn, call_id, defn)

    async def record(self, conn: Any, call_id: str, result: Any) -> None:
        await self.ledger.record(conn, call_id, result)

    def problem(self) -> str | None:
        if not self.started:
            return "the mesh is not running yet"
        if not self.directory.loaded:
            return "the mesh has not read its peers yet"
        if not self.directory.candidates(None, self.protocol, 1):
            return "no node that runs 'function' is in the cluster"
        if self.directory.choose(None, self.protocol, 1, set()) is None:
            return "no node that runs 'function' is reachable over the mesh"
        return None

    async def forward(self, call: Any, args: Any, timeout: float) -> Any:
        defn: FunctionDef = call.defn
        if not self.started:
            raise Unavailable(f"no node can run {defn.name} now: this node's mesh is not running")
        loop = self._loop  # set at start; asyncio.get_running_loop() is a system call on Python 3.11
        deadline = loop.time() + timeout
        needs = 2 if call.track_reads else 1
        if self.protocol < needs:
            raise Unavailable(f"no node can run {defn.name} now: live-query re-runs need mesh protocol 2 and this "
                              f"node speaks {self.protocol} ([mesh] protocol_version)")
        cap = defn.options.get("capability")
        if defn.kind in ("mutation", "action") and call.call_id is None:
            call.call_id = secrets.token_hex(16)
        args_json = wire.encode_json(args if args is not None else {})
        caller = wire.caller_message(call.auth)
        tried: set[tuple[str, str]] = set()
        reasons: list[str] = []
        maybe_ran: Peer | None = None
        while True:
            peer = self.directory.choose(cap, self.protocol, needs, tried)
            if peer is None:
                break
            remaining = deadline - loop.time()
            if remaining <= 0.001:
                raise self._timeout(defn, timeout, peer)
            proto = min(self.protocol, peer.protocol)
            req = pb.CallRequest(function=defn.name, args_json=args_json, caller=caller, request_id=call.request_id,
                                 call_id=call.call_id or "", target_node=peer.node_id, target_epoch=peer.epoch,
                                 timeout_ms=max(1, int(remaining * 1000)), protocol=proto,
                                 track_reads=bool(call.track_reads) and proto >= 2)
            peer.in_flight += 1
            self.forwarding += 1
            try:
                try:
                    # a hair before the executor's own deadline, so the peer is judged here
                    budget = max(0.001, remaining - 0.002)
                    if proto >= 3:
                        reply = await self._stream_for(peer, proto).request(req, budget)
                    else:
                        stubs = self._stubs_for(peer)
                        reply = await stubs.call(req, timeout=budget, metadata=stubs.metadata)
                except asyncio.CancelledError:
                    if asyncio.current_task().cancelling():
                        if loop.time() >= deadline - 0.005:  # the caller's deadline ended it: the peer is slow
                            peer.suspect("a call ran into its deadline")
                        raise  # our caller went away or gave up
                    # the channel closed under the call (the peer left the table): a transport failure
                    raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                               grpc.aio.Metadata(), "channel closed") from None
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    peer.suspect("a call ran into its deadline")
                    raise self._timeout(defn, timeout, peer) from None
                if code not in _BUSY:  # a busy peer is alive: try another without taking it out of rotation
                    peer.suspect(f"{code.name}: {exc.details()}")
                tried.add(peer.key)
                reasons.append(f"{peer.node_id}: {code.name}")
                if defn.kind != "query":
                    maybe_ran = peer
                self.stats["retried"] += 1
                continue
            except ConnectionError as exc:  # no credentials for a TLS peer
                peer.suspect(str(exc))
                tried.add(peer.key)
                reasons.append(f"{peer.node_id}: {exc}")
                continue
            finally:
                peer.in_flight -= 1
                self.forwarding -= 1
            if reply.WhichOneof("outcome") == "error":
                if reply.error.not_started:
                    tried.add(peer.key)
                    reasons.append(f"{peer.node_id}: {reply.error.message}")
                    self.stats["refused_unstarted"] += 1
                    if "draining" in reply.error.message:
                        peer.suspect("draining")
                    continue
                raise wire.error_from(reply.error)
            self.stats["forwarded"] += 1
            try:
                result = wire.decode_json(reply.result_json, "CallReply.result_json")
                if call.track_reads:
                    call.reads = wire.reads_from(reply.reads)
                    call.used_auth = reply.used_auth
            except wire.ProtocolError as exc:
                logger.error(f"mesh: node {peer.node_id} answered {defn.name} with a bad reply: {exc}")
                raise ForgeError(f"internal error (request {call.request_id})",
                                 details={"request_id": call.request_id}) from None
            return result
        if maybe_ran is not None and call.call_id is not None:
            # a run may have started on a node that stopped answering and no other node took the
            # retry: settle the call id ourselves so the answer is true (stored result, or never ran)
            self.stats["fenced"] += 1
            async with self.node.pool.acquire() as conn:
                done, stored = await self.ledger.fence(conn, call.call_id, defn,
                                                       lock_timeout=min(2.0, max(0.05, deadline - loop.time())))
            if done:
                return stored
        self.stats["unavailable"] += 1
        why = "; ".join(reasons) or self.problem() or "no node that can run it is reachable"
        if cap is not None and not self.directory.candidates(cap, self.protocol, needs):
            why = f"no node with capability {cap!r} runs 'function'"
        raise Unavailable(f"no node can run {defn.name} now ({why})", details={"function": defn.name})

    def _timeout(self, defn: FunctionDef, timeout: float, peer: Peer) -> Timeout:
        self.stats["timeouts"] += 1
        return Timeout(f"{defn.name} did not finish within {timeout:g}s (forwarded to node {peer.node_id})")

    def _stubs_for(self, peer: Peer) -> Stubs:
        stubs = self._stubs.get(peer.key)
        if stubs is None:
            stubs = open_stubs(peer.address, peer.tls, self.material, self.config.max_message_bytes, self.token)
            self._stubs[peer.key] = stubs
        return stubs

    @property
    def _batch_bytes(self) -> int:
        """A batch stays well under the largest message a peer takes (a lone frame may use all of it)."""
        return min(BATCH_BYTES, self.config.max_message_bytes // 2)

    def _stream_for(self, peer: Peer, proto: int) -> StreamPool:
        """The call streams to ``peer`` (a process: its protocol never changes): protocol 4's
        batches, or protocol 3's one call per message for a peer of protocol 3."""
        pool = self._streams.get(peer.key)
        if pool is None:
            stubs = self._stubs_for(peer)
            if proto >= BATCHED_PROTOCOL:
                pool = StreamPool(lambda: stubs.batches(metadata=stubs.metadata), batched=True,
                                  batch_bytes=self._batch_bytes)
            else:
                pool = StreamPool(lambda: stubs.calls(metadata=stubs.metadata), batched=False)
            self._streams[peer.key] = pool
        return pool

    async def _close_stubs(self, key: tuple[str, str]) -> None:
        pool = self._streams.pop(key, None)
        if pool is not None:
            await pool.close()
        stubs = self._stubs.pop(key, None)
        if stubs is not None:
            with contextlib.suppress(Exception):
                await stubs.close()

    # --- lifecycle --------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, node: Any) -> AsyncIterator["Mesh"]:
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    async def start(self) -> None:
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.tls = cfg.needs_tls
        if self.tls:
            self.material = load_material(cfg, self.node.id)
        else:
            log_plaintext(cfg.host)
            # a loopback node still dials TLS peers when the cluster CA is at hand
            with contextlib.suppress(StartupError):
                if Path(cfg.ca_file or Path(cfg.tls_dir) / "ca.pem").exists():
                    self.material = load_material(cfg, self.node.id)
        async with self.node.pool.acquire() as conn:
            self.token = await cluster_token(conn)
        self.server = grpc.aio.server(options=server_options(cfg.max_message_bytes))
        self.server.add_generic_rpc_handlers((self._handlers(),))
        if self.tls:
            self._tmpdir = tempfile.mkdtemp(prefix="forge-mesh-")  # 0700: only this user reaches the socket
            backend = os.path.join(self._tmpdir, "grpc.sock")
            if not self.server.add_insecure_port(f"unix:{backend}"):
                raise StartupError(f"[mesh] cannot listen on the private socket {backend}")
            sock = tcp_listener(cfg.host, cfg.port, section="mesh", backlog=512)
            port = sock.getsockname()[1]
            self.front = TlsFront(sock, backend, server_context(self.material))
        else:
            target = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
            port = self.server.add_insecure_port(target)
            if not port:
                raise StartupError(f"[mesh] cannot listen on {target}; choose another [mesh] port (0 picks a free one)")
        await self.server.start()
        if self.front is not None:
            await self.front.start()
        self.address = cfg.advertise or f"{advertised_host(cfg.host)}:{port}"
        await self.node.pool.execute(
            """INSERT INTO forge_mesh_nodes (node_id, address, epoch, protocol, min_protocol, tls, draining, updated_at)
               VALUES ($1, $2, $3, $4, $5, $6, false, now())
               ON CONFLICT (node_id) DO UPDATE SET address = EXCLUDED.address, epoch = EXCLUDED.epoch,
                 protocol = EXCLUDED.protocol, min_protocol = EXCLUDED.min_protocol, tls = EXCLUDED.tls,
                 draining = false, updated_at = now()""",
            self.node.id, self.address, self.epoch, self.protocol, MIN_PROTOCOL, self.tls)
        self.node.ports["mesh"] = port
        await self.node.publish_ports()
        sup = self.node.supervisor
        sup.spawn("mesh.refresh", self._refresh_loop, service="mesh")
        sup.spawn("mesh.probe", self._probe_loop, service="mesh")
        if self.tls:
            sup.spawn("mesh.tls-reload", self._reload_loop, service="mesh")
        self.started = True
        logger.info(f"mesh listening on {cfg.host}:{port} ({'mutual TLS' if self.tls else 'plaintext, loopback only'}), "
                    f"advertised as {self.address}, epoch {self.epoch}, protocol {self.protocol}")
        if engine.not_applied:
            logger.warning(f"mesh: grpc runs on its EventEngine I/O path, which costs each forwarded call more thread "
                           f"wake-ups: {engine.not_applied} (forge_mesh/engine.py)")

    async def stop(self) -> None:
        await self.begin_drain()
        # calls already running here finish (the node's drain bounds this); new ones were refused
        deadline = time.monotonic() + self.node.config.node.drain_timeout
        while (self.serving or self.forwarding) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self.started = False
        if self.front is not None:
            await self.front.stop()
        if self.server is not None:
            await self.server.stop(grace=1.0)
        for key in list(self._stubs):
            await self._close_stubs(key)
        self._unsink()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    async def begin_drain(self) -> None:
        """Refuse new calls from now on (unstarted, so callers go elsewhere) and tell peers."""
        if self.draining:
            return
        self.draining = True
        with contextlib.suppress(*_DB_ERRORS):
            await asyncio.wait_for(self.node.pool.execute(
                "UPDATE forge_mesh_nodes SET draining = true, updated_at = now() WHERE node_id = $1 AND epoch = $2",
                self.node.id, self.epoch), 2)

    # --- background loops --------------------------------------------------------------------------
    async def refresh(self) -> None:
        rows = await self.node.pool.fetch(PEERS_SQL, self.node.config.node.dead_after)
        self._retiring.extend(self.directory.update(rows))
        # a peer that left keeps its channel until the calls on it are answered
        keep = []
        for peer in self._retiring:
            if peer.in_flight:
                keep.append(peer)
            else:
                await self._close_stubs(peer.key)
        self._retiring = keep

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except _DB_ERRORS as exc:
                logger.warning(f"mesh: cannot read peers ({type(exc).__name__}: {exc}); keeping the last list")
            await asyncio.sleep(self.config.refresh_interval)

    async def _probe_loop(self) -> None:
        while True:
            peers = list(self.directory.peers.values())
            if peers:
                await asyncio.gather(*(self.probe(p) for p in peers))
            await asyncio.sleep(self.config.probe_interval)

    async def probe(self, peer: Peer) -> bool:
        """Ping ``peer``; a right answer clears it; another process, draining or a refused
        connection mark it suspect, and so do two probes in a row without an answer in time."""
        try:
            stubs = self._stubs_for(peer)
            reply = await stubs.ping(pb.PingRequest(protocol=self.protocol, target_node=peer.node_id),
                                     timeout=max(0.2, min(1.0, self.config.probe_interval)), metadata=stubs.metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                peer.probe_missed(f"no answer to a probe in time: {exc.details()}")
            else:
                peer.suspect(exc.details())
            return False
        except ConnectionError as exc:
            peer.suspect(str(exc))
            return False
        if reply.node_id != peer.node_id or reply.epoch != peer.epoch:
            peer.suspect(f"answered as {reply.node_id} epoch {reply.epoch}")
            return False
        if reply.draining:
            peer.suspect("draining")
            return False
        if peer.probe_answered():
            logger.info(f"mesh: node {peer.node_id} answers again")
        return True

    async def _reload_loop(self) -> None:
        stamp = self.material.stamp if self.material else ()
        while True:
            await asyncio.sleep(self.config.tls_reload_interval)
            now = await asyncio.to_thread(material_stamp, self.config)
            if now == stamp:
                continue
            try:
                material = await asyncio.to_thread(load_material, self.config, self.node.id)
                context = server_context(material)
            except Exception as exc:  # keep serving with what works; say what is wrong
                logger.error(f"mesh: certificate files changed but cannot be used, keeping the old ones: {exc}")
                stamp = now
                continue
            self.material, stamp = material, material.stamp
            if self.front is not None:
                self.front.context = context
            for key in list(self._stubs):  # new channels use the new client certificate
                await self._close_stubs(key)
            logger.info("mesh: reloaded the cluster certificates (new connections use them)")

    # --- the server side -----------------------------------------------------------------------------
    async def _check_token(self, context: Any) -> None:
        if not token_matches(context.invocation_metadata(), self.token):
            self.refused_token += 1
            logger.warning(f"mesh: refused a request from {context.peer()} without the cluster's mesh token "
                           f"({self.refused_token} so far)")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the cluster's mesh token is missing or wrong")

    def _handlers(self) -> Any:
        def guarded(fn: Any) -> Any:
            async def handler(req: Any, context: Any) -> Any:
                await self._check_token(context)
                return await fn(req, context)
            return handler

        def unary(fn: Any, req: Any, rep: Any) -> Any:
            return grpc.unary_unary_rpc_method_handler(guarded(fn), request_deserializer=req.FromString,
                                                       response_serializer=rep.SerializeToString)

        async def logs(req: Any, context: Any) -> AsyncIterator[pb.LogLine]:
            await self._check_token(context)
            async for line in self._serve_logs(req, context):
                yield line

        def streamed(batched: bool) -> Any:
            async def handler(messages: Any, context: Any) -> AsyncIterator[Any]:
                await self._check_token(context)
                async for out in serve_stream(messages, lambda req: self._serve_call(req, None), batched,
                                              self._batch_bytes):
                    yield out
            return handler

        return grpc.method_handlers_generic_handler(wire.SERVICE, {
            "Call": unary(self._serve_call, pb.CallRequest, pb.CallReply),
            "Ping": unary(self._serve_ping, pb.PingRequest, pb.PingReply),
            "Status": unary(self._serve_status, pb.StatusRequest, pb.StatusReply),
            "Logs": grpc.unary_stream_rpc_method_handler(logs, request_deserializer=pb.LogsRequest.FromString,
                                                         response_serializer=pb.LogLine.SerializeToString),
            "Drain": unary(self._serve_drain, pb.DrainRequest, pb.DrainReply),
            "CancelJob": unary(self._serve_cancel_job, pb.CancelJobRequest, pb.CancelJobReply),
            "Calls": grpc.stream_stream_rpc_method_handler(streamed(False), request_deserializer=pb.CallFrame.FromString,
                                                           response_serializer=pb.CallResult.SerializeToString),
            "Batches": grpc.stream_stream_rpc_method_handler(streamed(True), request_deserializer=pb.CallBatch.FromString,
                                                             response_serializer=pb.ResultBatch.SerializeToString),
        })

    @staticmethod
    def _unstarted(message: str) -> pb.CallReply:
        return pb.CallReply(error=pb.CallError(code="UNAVAILABLE", message=message, not_started=True))

    def _check_failpoint(self, point: str, function: str) -> None:
        if self._failpoint == (point, function):
            os.kill(os.getpid(), signal.SIGKILL)

    async def _serve_call(self, req: pb.CallRequest, context: Any) -> pb.CallReply:
        node = self.node
        if self.draining or not self.started:
            return self._unstarted(f"node {node.id} is draining")
        if req.target_node != node.id or req.target_epoch != self.epoch:
            return self._unstarted(f"this is node {node.id} epoch {self.epoch}; the call was meant for "
                                   f"{req.target_node} epoch {req.target_epoch}")
        if req.protocol < MIN_PROTOCOL:
            return self._unstarted(f"node {node.id} speaks mesh protocol {MIN_PROTOCOL}-{self.protocol}, "
                                   f"the call came in protocol {req.protocol}")
        self._check_failpoint("before_start", req.function)
        try:
            auth = wire.caller_auth(req.caller)
            args = wire.decode_json(req.args_json, "CallRequest.args_json")
        except wire.ProtocolError as exc:
            return pb.CallReply(error=wire.error_message(InvalidArgument(f"mesh protocol: {exc}")))
        # answer a little before the caller gives up, so a mutation rolls back before its TIMEOUT
        timeout = max(0.001, req.timeout_ms / 1000 - 0.01) if req.timeout_ms else None
        track = req.track_reads and self.protocol >= 2 and req.protocol >= 2
        calls: list[Any] = []
        self.serving += 1
        try:
            result = await node.executor.call(req.function, args if args is not None else {}, auth,
                                              request_id=req.request_id or None, track_reads=track, call_out=calls,
                                              call_id=req.call_id or None, timeout=timeout, forwarded=True)
            body = wire.encode_result(result)
        except ForgeError as exc:
            return pb.CallReply(error=wire.error_message(exc))
        finally:
            self.serving -= 1
            self.stats["served"] += 1
        self._check_failpoint("after_commit", req.function)
        reply = pb.CallReply(result_json=body)
        if track and calls:
            reply.reads.extend(wire.read_messages(calls[0].reads))
            reply.used_auth = calls[0].used_auth
        return reply

    async def _serve_ping(self, req: pb.PingRequest, context: Any) -> pb.PingReply:
        return pb.PingReply(node_id=self.node.id, epoch=self.epoch, protocol=self.protocol, draining=self.draining)

    async def _serve_status(self, req: pb.StatusRequest, context: Any) -> pb.StatusReply:
        activity: dict[str, Any] = {}
        for part in self.node.loader.hook.forge_node_activity(node=self.node):
            if part:
                activity.update(part)
        try:
            body = wire.encode_json(activity)
        except (TypeError, ValueError) as exc:
            body = wire.encode_json({"error": f"activity is not JSON-safe: {exc}"})
        return pb.StatusReply(node_id=self.node.id, epoch=self.epoch, protocol=self.protocol, version=self.node.version,
                              activity_json=body)

    def activity(self) -> dict[str, Any]:
        peers = {p.node_id: {"in_flight": p.in_flight, "suspect": p.suspect_since is not None,
                             **({"error": p.last_error} if p.last_error else {})} for p in self.directory.peers.values()}
        out = {"address": self.address, "epoch": self.epoch, "protocol": self.protocol, "tls": self.tls,
               "draining": self.draining, "serving": self.serving, "forwarding": self.forwarding,
               "stats": dict(self.stats), "peers": peers}
        out["refused"] = {"token": self.refused_token, **(self.front.refused if self.front is not None else {})}
        return {"mesh": out}

    async def _serve_logs(self, req: pb.LogsRequest, context: Any) -> AsyncIterator[pb.LogLine]:
        level = (req.level or "INFO").upper()
        try:
            threshold = logger.level(level).no
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown log level {level!r}")
            return
        queue: asyncio.Queue = asyncio.Queue(maxsize=2000)
        self._follow(queue, threshold)
        try:
            while True:
                yield pb.LogLine(text=await queue.get())
        finally:
            self._unfollow(queue)

    def _follow(self, queue: asyncio.Queue, threshold: int) -> None:
        self._followers[queue] = threshold
        if self._sink_id is None:
            # through the kernel's add_sink: followers get redacted lines, like every other sink
            self._sink_id = add_sink(self._sink, level="TRACE", format="{level.no}|" + _LOG_FORMAT + "\n",
                                     colorize=False, catch=True)

    def _unfollow(self, queue: asyncio.Queue) -> None:
        self._followers.pop(queue, None)
        if not self._followers:
            self._unsink()

    def _unsink(self) -> None:
        if self._sink_id is not None:
            with contextlib.suppress(ValueError):
                logger.remove(self._sink_id)
            self._sink_id = None

    def _sink(self, message: str) -> None:
        """Called by loguru in whatever thread logged (with the redacted ``<level no>|<line>``);
        hands the line to the followers' queues."""
        head, _, text = message.rstrip("\n").partition("|")
        no = int(head) if head.isdigit() else 0
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            self._deliver(text, no)
        else:
            loop.call_soon_threadsafe(self._deliver, text, no)

    def _deliver(self, text: str, no: int) -> None:
        for queue, threshold in list(self._followers.items()):
            if no >= threshold and not queue.full():  # a slow follower loses lines, the node never waits
                queue.put_nowait(text)

    async def _serve_drain(self, req: pb.DrainRequest, context: Any) -> pb.DrainReply:
        if req.target_node != self.node.id or (req.target_epoch and req.target_epoch != self.epoch):
            return pb.DrainReply(accepted=False)
        in_flight = self.serving
        logger.info(f"mesh: drain requested; refusing new calls, {in_flight} in flight finish within the grace period")
        await self.begin_drain()
        asyncio.get_running_loop().call_soon(self.node.request_stop)
        return pb.DrainReply(accepted=True, in_flight=in_flight)

    async def _serve_cancel_job(self, req: pb.CancelJobRequest, context: Any) -> pb.CancelJobReply:
        if req.target_node and req.target_node != self.node.id:
            return pb.CancelJobReply(cancelled=False)
        done = self.node.loader.hook.forge_cancel_running_job(node=self.node, job_id=req.job_id)
        if done:
            logger.info(f"mesh: job {req.job_id} cancelled by a request over the mesh")
        return pb.CancelJobReply(cancelled=bool(done))




_ATTR = "_forge_mesh"


def mesh_for(node: Any) -> Mesh:
    """One mesh per node, kept on the node (hooks keep no global state)."""
    mesh = getattr(node, _ATTR, None)
    if mesh is None:
        mesh = Mesh(node)
        setattr(node, _ATTR, mesh)
    return mesh
