"""gRPC channels to peers: options, credentials and the typed method callables.

Channels are created on first use inside the running event loop (never at import or before
a fork). Keepalive is on (grpcio leaves it off), retries are off (the forwarder decides what
may be retried), reconnect backoff is short so a restarted peer is reachable again at once.
"""

from __future__ import annotations

from typing import Any

import attrs
import grpc

from . import wire
from .protocol import mesh_pb2 as pb
from .tls import CLUSTER_NAME, Material, channel_credentials
from .token import METADATA_KEY


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 3_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),
        # grpc shares connections (subchannels) between every channel of a process to the same
        # address, with their reconnect back-off: a peer restarted on the same address (a fixed
        # [mesh] port, or a free port handed out again) would get a new channel (a new epoch) that
        # fails at once with the dead process's "connection refused" until that back-off ends, and be
        # marked suspect. Each channel here is one peer process, so it connects on its own.
        ("grpc.use_local_subchannel_pool", 1),
    ]


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 3_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # clients ping every 10 s even when idle: allow it instead of answering GOAWAY(too_many_pings)
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]


@attrs.define
class Stubs:
    """One channel and the callables of every mesh method on it; pass ``metadata=stubs.metadata``."""

    channel: Any
    metadata: tuple[tuple[str, str], ...]
    call: Any
    ping: Any
    status: Any
    logs: Any
    drain: Any
    cancel_job: Any
    #: protocol 3: opens the call stream (CallFrame in, CallResult out)
    calls: Any
    #: protocol 4: opens a batched call stream (CallBatch in, ResultBatch out)
    batches: Any

    async def close(self) -> None:
        await self.channel.close(grace=None)


def open_stubs(address: str, tls: bool, material: Material | None, max_message_bytes: int, token: str) -> Stubs:
    """Must run inside the event loop that will use the channel. A TLS peer needs ``material``;
    ``token`` is the cluster's mesh token (token.py)."""
    options = channel_options(max_message_bytes)
    if tls:
        if material is None:
            raise ConnectionError(f"peer {address} requires mutual TLS and this node has no cluster certificate "
                                  f"([mesh] tls_dir / ca_file, cert_file, key_file)")
        channel = grpc.aio.secure_channel(address, channel_credentials(material),
                                          options=options + [("grpc.ssl_target_name_override", CLUSTER_NAME)])
    else:
        channel = grpc.aio.insecure_channel(address, options=options)

    def unary(path: str, req: Any, rep: Any) -> Any:
        return channel.unary_unary(path, request_serializer=req.SerializeToString, response_deserializer=rep.FromString)

    return Stubs(
        channel=channel,
        metadata=((METADATA_KEY, token),),
        call=unary(wire.CALL, pb.CallRequest, pb.CallReply),
        ping=unary(wire.PING, pb.PingRequest, pb.PingReply),
        status=unary(wire.STATUS, pb.StatusRequest, pb.StatusReply),
        logs=channel.unary_stream(wire.LOGS, request_serializer=pb.LogsRequest.SerializeToString,
                                  response_deserializer=pb.LogLine.FromString),
        drain=unary(wire.DRAIN, pb.DrainRequest, pb.DrainReply),
        cancel_job=unary(wire.CANCEL_JOB, pb.CancelJobRequest, pb.CancelJobReply),
        calls=channel.stream_stream(wire.CALLS, request_serializer=pb.CallFrame.SerializeToString,
                                    response_deserializer=pb.CallResult.FromString),
        batches=channel.stream_stream(wire.BATCHES, request_serializer=pb.CallBatch.SerializeToString,
                                      response_deserializer=pb.ResultBatch.FromString),
    )
