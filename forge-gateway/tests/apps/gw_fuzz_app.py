"""A well-behaved app for fuzzing: any input must yield a documented status and never a 5xx."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from typing import Literal

import attrs

from forge_kernel import mutation, query


class Size(enum.Enum):
    S = "s"
    M = "m"


@attrs.frozen
class Item:
    name: str
    qty: int
    price: decimal.Decimal
    size: Size = Size.M
    note: str | None = None


@query(public=True)
async def add(ctx, a: int, b: int = 0) -> int:
    return a + b


@query(public=True)
async def echo_text(ctx, text: str, times: int = 1) -> str:
    return text * max(0, min(times, 10))


@query(public=True)
async def total(ctx, items: list[Item]) -> dict[str, int]:
    return {"items": len(items), "qty": sum(i.qty for i in items)}


@query(public=True)
async def when(ctx, at: dt.datetime, id: uuid.UUID, days: float = 0.0, unit: Literal["d", "h"] = "d") -> dict[str, str]:
    return {"id": str(id), "at": at.isoformat(), "unit": unit}


@query(public=True)
async def flags(ctx, on: bool, tags: dict[str, int] | None = None) -> list[str]:
    return sorted((tags or {}).keys()) if on else []


@mutation
async def needs_login(ctx, note: str) -> str:
    return ctx.auth.user_id or ""
