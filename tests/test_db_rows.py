"""``ctx.db`` model helpers: rows become model instances exactly as the converter makes them, whether
``Database._row`` builds a plain model directly or hands the row to the converter."""

from __future__ import annotations

import datetime as dt

import asyncpg
import attrs
import pytest
from cattrs.errors import ClassValidationError

from forge_kernel import db as dbmod
from forge_kernel import model
from forge_kernel.convert import converter


@model(table="row_items")
class Item:
    id: int
    owner: str
    n: int | None
    done: bool
    score: float
    note: str = "none"  # the table has no such column: the default stays


@model(table="row_items")
class Stamped:
    id: int
    owner: str
    at: dt.datetime | None = None  # not a plain type: always the converter


@model(table="row_items")
class WrongType:
    id: int
    done: int  # a boolean column: the converter refuses True for an int


@model(table="row_items")
class Widened:
    id: int
    n: float | None  # an integer column: the converter turns 3 into 3.0


@pytest.fixture
async def conn(forge_db_url):
    c = await dbmod.connect(forge_db_url)
    await c.execute("CREATE TABLE row_items (id bigint PRIMARY KEY, owner text NOT NULL, n int, done boolean NOT NULL, "
                    "score float8 NOT NULL, at timestamptz)")
    await c.executemany("INSERT INTO row_items VALUES ($1, $2, $3, $4, $5, $6)",
                        [(1, "ann", 3, True, 1.5, dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)),
                         (2, "ann", None, False, 2.0, None), (3, "bob", 7, False, 0.25, None)])
    try:
        yield c
    finally:
        await c.close()


def _converted(cls: type, rec: asyncpg.Record) -> object:
    return converter.structure({c: rec[c] for c in cls.__forge_model__.columns if c in rec}, cls)


async def test_plain_models_are_built_directly_and_equal_what_the_converter_makes(conn):
    db = dbmod.Database(conn, readonly=True)
    rows = await db.select(Item, owner="ann", order_by="id")
    assert dbmod._PLAIN_FIELDS[Item] is not None  # the direct path applies to this model
    records = await conn.fetch("SELECT * FROM row_items WHERE owner = 'ann' ORDER BY id")
    assert rows == [_converted(Item, r) for r in records]
    assert rows[1] == Item(2, "ann", None, False, 2.0)
    assert attrs.asdict(rows[0]) == {"id": 1, "owner": "ann", "n": 3, "done": True, "score": 1.5, "note": "none"}


async def test_other_field_types_and_values_of_another_type_go_through_the_converter(conn):
    db = dbmod.Database(conn, readonly=True)
    stamped = await db.select(Stamped, owner="ann", order_by="id")
    assert dbmod._PLAIN_FIELDS[Stamped] is None
    assert [s.at for s in stamped] == [dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc), None]
    widened = await db.select(Widened, order_by="id")
    assert [(w.n, type(w.n)) for w in widened] == [(3.0, float), (None, type(None)), (7.0, float)]
    with pytest.raises(ClassValidationError):  # True is no int, as before
        await db.select(WrongType, id=1)


async def test_a_select_statement_is_built_once_per_shape_and_still_checks_its_columns(conn):
    db = dbmod.Database(conn, readonly=True)
    assert [i.id for i in await db.select(Item, owner="ann", order_by="-id", limit=1)] == [2]
    assert [i.id for i in await db.select(Item, owner="bob", order_by="-id", limit=1)] == [3]
    assert [(r.table, r.filters) for r in await db.read_set()] == [("row_items", (("owner", "ann"),)),
                                                                  ("row_items", (("owner", "bob"),))]
    for _ in range(2):
        with pytest.raises(ValueError, match="no column 'nope'"):
            await db.select(Item, nope=1)
        with pytest.raises(ValueError, match="no column 'nope' to order by"):
            await db.select(Item, order_by="nope")
