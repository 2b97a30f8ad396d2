"""A live todo list: prints the caller's todos every time they change.

Start a node that serves the example app with a JWT secret, e.g.::

    FORGE_GATEWAY__JWT_SECRET=dev-secret-at-least-32-bytes-long!! forge-node start

then, in another terminal::

    python examples/todo/live_todos.py --secret dev-secret-at-least-32-bytes-long!! --user alice --demo

``--demo`` adds a few todos through ``POST /rpc/add_todo`` (as the same user) so you can
watch the list update; without it, add todos from anywhere else (another client, psql)
and they appear here. ``--token`` passes a ready-made token instead of ``--secret``.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from forge_realtime import ForgeClient


def mint_token(secret: str, user: str, ttl: float = 3600.0) -> str:
    import jwt  # PyJWT, installed with forge-gateway

    return jwt.encode({"sub": user, "exp": int(time.time() + ttl)}, secret, algorithm="HS256")


async def add_some(http_url: str, token: str) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=http_url, headers={"Authorization": f"Bearer {token}"}) as http:
        for title in ("buy milk", "write the report", "call mum"):
            await asyncio.sleep(1.0)
            r = await http.post("/rpc/add_todo", json={"title": title})
            if r.status_code != 200:
                print(f"add_todo failed: {r.status_code} {r.text}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="ws://127.0.0.1:8080/ws")
    ap.add_argument("--token", help="a bearer token the node's gateway accepts")
    ap.add_argument("--secret", help="[gateway] jwt_secret, to mint a token for --user")
    ap.add_argument("--user", default="alice")
    ap.add_argument("--demo", action="store_true", help="also add a few todos to watch the list change")
    args = ap.parse_args()
    token = args.token or (mint_token(args.secret, args.user) if args.secret else None)
    if token is None:
        ap.error("give --token or --secret: list_todos shows the caller's todos, so it needs a caller")
    async with ForgeClient(args.url, token=token) as client:
        if args.demo:
            http_url = args.url.replace("ws://", "http://").replace("wss://", "https://").rsplit("/ws", 1)[0]
            asyncio.get_running_loop().create_task(add_some(http_url, token))
        async for todos in client.subscribe("list_todos"):
            print(f"\n{len(todos)} todo(s) for {args.user}:")
            for todo in todos:
                print(f"  [{'x' if todo['done'] else ' '}] {todo['title']}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
