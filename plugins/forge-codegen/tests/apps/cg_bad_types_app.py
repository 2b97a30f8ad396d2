"""Functions whose types the TypeScript client cannot express (the generator must name each)."""

import datetime as dt
from typing import Any

import attrs

from forge_kernel import mutation, query


class Opaque:
    pass


@attrs.define
class Event:
    name: str
    at: dt.time


@query(public=True)
async def takes_any(ctx, value: Any) -> int:
    return 1


@query(public=True)
async def no_result_hint(ctx, n: int):
    return n


@mutation(public=True)
async def either(ctx, value: int | str) -> None:
    return None


@query(public=True)
async def nested(ctx, event: Event) -> list[Event]:
    return [event]


@query(public=True)
async def int_keys(ctx) -> dict[int, str]:
    return {}


@query(public=True)
async def bare(ctx, items: list) -> Opaque:
    return Opaque()
