"""``forge-node mesh init-ca | issue-cert | logs``, ``forge-node drain NODE`` and ``forge-node logs --follow --node NODE``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import grpc

from forge_kernel.errors import ForgeError, StartupError

from . import client
from .tls import init_ca, issue_cert


def add_commands(subparsers: Any) -> None:
    mesh = subparsers.add_parser("mesh", help="the node mesh: cluster CA, certificates, live logs")
    sub = mesh.add_subparsers(dest="mesh_command", required=True)
    ca = sub.add_parser("init-ca", help="create the cluster CA (ca.pem, ca.key) in [mesh] tls_dir or --dir")
    ca.add_argument("--dir", help="folder for ca.pem and ca.key (default: [mesh] tls_dir)")
    ca.add_argument("--force", action="store_true", help="replace an existing CA")
    ca.set_defaults(func=_init_ca)
    cert = sub.add_parser("issue-cert", help="a node certificate and key signed by the cluster CA")
    cert.add_argument("name", help="the node's name (written into the certificate)")
    cert.add_argument("--out", required=True, help="folder to write NAME.pem and NAME.key into")
    cert.add_argument("--dir", help="folder holding ca.pem and ca.key (default: [mesh] tls_dir)")
    cert.set_defaults(func=_issue_cert)
    _logs_arguments(sub.add_parser("logs", help="follow a node's live log over the mesh"))
    if "logs" not in subparsers.choices:  # forge-observe's stored-log command takes the name when installed
        _logs_arguments(subparsers.add_parser("logs", help="follow a node's live log over the mesh (--follow --node X)"))
    drain = subparsers.add_parser("drain", help="make a node stop taking new work now and drain (as SIGTERM does)")
    drain.add_argument("node", help="node id (forge-node status lists them)")
    drain.set_defaults(func=_drain)


def _logs_arguments(p: Any) -> None:
    p.add_argument("--node", required=True, help="node id (forge-node status lists them)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines (required over the mesh)")
    p.add_argument("--level", default="INFO", help="lowest level to show (default INFO)")
    p.set_defaults(func=_logs)


def _tls_dir(cli: Any) -> Path:
    return Path(cli.args.dir or cli.config()["mesh"].tls_dir)


def _init_ca(cli: Any) -> int:
    cert, key = init_ca(_tls_dir(cli), force=cli.args.force)
    print(f"cluster CA written: {cert} and {key} (keep the key private: whoever holds it can join the mesh)")
    return 0


def _issue_cert(cli: Any) -> int:
    folder = _tls_dir(cli)
    try:
        ca, ca_key = (folder / "ca.pem").read_bytes(), (folder / "ca.key").read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read the cluster CA in {folder}: {exc.strerror}; run 'forge-node mesh init-ca' first")
    cert, key = issue_cert(ca, ca_key, cli.args.name)
    out = Path(cli.args.out)
    from .tls import _write_private

    _write_private(out / f"{cli.args.name}.pem", cert)
    _write_private(out / f"{cli.args.name}.key", key)
    print(f"wrote {out / (cli.args.name + '.pem')} and {out / (cli.args.name + '.key')}; set them as [mesh] cert_file "
          f"and key_file on that node, with [mesh] ca_file = {folder / 'ca.pem'}")
    return 0


async def _logs(cli: Any) -> int:
    if not cli.args.follow:
        print("forge-node: error: forge-node logs --node X over the mesh shows live lines only: add --follow "
              "(stored logs come from forge-observe)", file=sys.stderr)
        return 2
    async with cli.connection() as conn:
        try:
            async for line in client.follow_logs(cli.config(), conn, cli.args.node, cli.args.level):
                print(line, flush=True)
        except ForgeError as exc:
            print(f"forge-node logs: {exc.message}", file=sys.stderr)
            return 1
        except grpc.aio.AioRpcError as exc:
            print(f"forge-node logs: node {cli.args.node} stopped answering ({exc.code().name}: {exc.details()})",
                  file=sys.stderr)
            return 1
    return 0


async def _drain(cli: Any) -> int:
    async with cli.connection() as conn:
        try:
            reply = await client.drain(cli.config(), conn, cli.args.node)
        except ForgeError as exc:
            print(f"forge-node drain: {exc.message}", file=sys.stderr)
            return 1
        except grpc.aio.AioRpcError as exc:
            print(f"forge-node drain: node {cli.args.node} did not answer ({exc.code().name}: {exc.details()})",
                  file=sys.stderr)
            return 1
    if not reply.accepted:
        print(f"forge-node drain: node {cli.args.node} restarted meanwhile; nothing done", file=sys.stderr)
        return 1
    print(f"node {cli.args.node} is draining: it takes no new calls; {reply.in_flight} in flight finish within its "
          f"grace period")
    return 0
