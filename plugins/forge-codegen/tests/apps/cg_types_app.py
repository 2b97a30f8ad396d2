"""Every kind of type the TypeScript generator supports, as arguments and results."""


import dataclasses
import datetime as dt
import decimal
import enum
import uuid
from typing import Literal, NotRequired, Optional, TypedDict

import attrs
import msgspec

from forge_kernel import mutation, query


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@attrs.define
class Point:
    x: float
    y: float


@attrs.define
class Circle:
    kind: Literal["circle"]
    center: Point
    radius: float


@attrs.define
class Square:
    kind: Literal["square"]
    corner: Point
    side: float = 1.0


@dataclasses.dataclass
class Money:
    amount: decimal.Decimal
    currency: Literal["EUR", "USD"] = "EUR"


class Address(TypedDict):
    street: str
    zip: NotRequired[str]


class Ping(msgspec.Struct, tag=True):
    at: dt.datetime


class Pong(msgspec.Struct, tag=True):
    at: dt.datetime
    latency_ms: int = 0


class Renamed(msgspec.Struct, rename="camel"):
    first_name: str


@attrs.define
class Everything:
    text: str
    count: int
    ratio: float
    flag: bool
    maybe: Optional[int]
    choice: Literal["a", "b", 3]
    color: Color
    level: Level
    when: dt.datetime
    day: dt.date
    ident: uuid.UUID
    price: decimal.Decimal
    blob: bytes
    wait: dt.timedelta
    tags: list[str]
    unique: frozenset[int]
    pair: tuple[int, str]
    many: tuple[float, ...]
    scores: dict[str, int]
    by_color: dict[Color, list[Point]]
    shape: Circle | Square
    money: Money
    address: Address
    event: Ping | Pong
    renamed: Renamed
    children: list["Everything"] = attrs.field(factory=list)


attrs.resolve_types(Everything)  # the self-reference: cattrs reads resolved field types only


@query(public=True)
async def echo_everything(ctx, value: Everything) -> Everything:
    return value


@mutation(public=True)
async def shapes(ctx, shapes: list[Circle | Square], note: str | None = None) -> dict[str, Circle | Square]:
    return {str(i): s for i, s in enumerate(shapes)}


@query(public=True)
async def stamp(ctx, day: dt.date, ids: list[uuid.UUID] = ()) -> tuple[dt.datetime, Money]:  # type: ignore[assignment]
    raise NotImplementedError
