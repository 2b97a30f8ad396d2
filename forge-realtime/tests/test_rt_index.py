"""The read index finds every query a change touches (it may find more, never fewer), and
removing a query's reads leaves nothing of it behind. Pure: no database, no plugin manager."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from forge_kernel.db import TableRead
from forge_realtime.changes import Change
from forge_realtime.engine import ReadIndex, change_touches

TABLES = ["todos", "items"]
COLUMNS = ["owner", "topic", "done"]
values = st.one_of(st.sampled_from(["a", "b", "c"]), st.integers(0, 3), st.booleans(), st.none(),
                   st.lists(st.integers(), max_size=2))  # a list is not comparable: filed as a whole-table read

reads = st.builds(
    TableRead, st.sampled_from(TABLES),
    st.one_of(st.none(), st.lists(st.tuples(st.sampled_from(COLUMNS), values), min_size=1, max_size=2,
                                  unique_by=lambda f: f[0]).map(tuple)))
rows = st.dictionaries(st.sampled_from(COLUMNS), st.one_of(st.sampled_from(["a", "b", "c"]), st.integers(0, 3),
                                                           st.booleans(), st.none()))
changes = st.builds(Change, st.sampled_from(TABLES), st.sampled_from(["INSERT", "UPDATE", "DELETE", "TRUNCATE"]),
                    st.lists(rows, max_size=3).map(tuple), st.lists(rows, max_size=3).map(tuple))
queries = st.lists(st.lists(reads, min_size=1, max_size=3), max_size=8)


@given(queries, changes)
def test_candidates_include_every_touched_query(read_sets, change):
    index = ReadIndex()
    for q, rs in enumerate(read_sets):
        index.add(q, rs)
    touched = {q for q, rs in enumerate(read_sets) if any(change_touches(r, change) for r in rs)}
    assert touched <= index.candidates(change)


@given(queries, st.data())
def test_removing_reads_leaves_nothing_behind(read_sets, data):
    index = ReadIndex()
    for q, rs in enumerate(read_sets):
        index.add(q, rs)
    gone = data.draw(st.sets(st.sampled_from(range(len(read_sets)))) if read_sets else st.just(set()))
    for q in gone:
        index.remove(q, read_sets[q])
    everything = Change("todos", "TRUNCATE"), Change("items", "TRUNCATE")
    left = set().union(*(index.candidates(c) for c in everything))
    assert left == set(range(len(read_sets))) - gone
    if not left:
        assert index.whole == {} and index.keyed == {} and index.columns == {}


def test_a_write_to_another_owner_is_not_a_candidate():
    index = ReadIndex()
    index.add("alice", [TableRead("todos", (("owner", "alice"),))])
    index.add("bob", [TableRead("todos", (("owner", "bob"),))])
    change = Change("todos", "UPDATE", ({"id": 1, "owner": "bob"},), ({"id": 1, "owner": "bob"},))
    assert index.candidates(change) == {"bob"}
    moved = Change("todos", "UPDATE", ({"id": 1, "owner": "bob"},), ({"id": 1, "owner": "alice"},))
    assert index.candidates(moved) == {"alice", "bob"}  # a row moving between results touches both


def test_equal_numbers_match_however_jsonb_spells_them():
    # images come through jsonb: a float8 2.0 or numeric 2.00 may arrive as 2 or 2.0, and
    # PostgreSQL takes True for an integer column
    cases = [("n", 2.0, 2), ("n", 2, 2.0), ("flag", True, 1), ("flag", False, 0), ("n", 1, True)]
    for col, wanted, stored in cases:
        read = TableRead("t", ((col, wanted),))
        change = Change("t", "INSERT", (), ({col: stored},))
        assert change_touches(read, change), (wanted, stored)
        index = ReadIndex()
        index.add("q", [read])
        assert "q" in index.candidates(change), (wanted, stored)
    assert not change_touches(TableRead("t", (("n", 2.5),)), Change("t", "INSERT", (), ({"n": 2},)))
