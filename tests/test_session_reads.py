"""``forge_kernel.db.leaves_session_alone``: which raw SQL lets a query's read-only session go back
to the pool without the reset (RESET ALL, UNLISTEN *, advisory unlock, CLOSE ALL). A wrong "yes"
would carry one caller's session settings or locks into the next call, so the rule errs on "no"."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from forge_kernel.db import _PLAIN_CALLS, leaves_session_alone

PLAIN = [
    "SELECT $1::int + 1",
    "select count(*) from todos where owner = $1",
    'SELECT * FROM "todos" WHERE "id" = $1',
    "WITH x AS (SELECT 1) SELECT * FROM x",
    "SELECT a FROM t WHERE b IN (SELECT c FROM d) ORDER BY (a) LIMIT $1",
    "SELECT coalesce(a, 0)::numeric(10,2), now(), pg_catalog.lower(s) FROM t",
    "SELECT 'set_config(' || x, 'it''s' FROM t",
    "VALUES (1), (2)",
    "SELECT jsonb_build_object('a', a) FROM t WHERE id = ANY($1::int[])",
]

NOT_PLAIN = [
    "SELECT set_config('search_path', 'evil', false)",
    "SELECT pg_catalog.set_config('a.b', 'c', false)",
    'SELECT "set_config"(\'a.b\', \'c\', false)',
    "SELECT pg_advisory_lock(1)",
    "SELECT pg_try_advisory_lock($1)",
    "SELECT my_function($1)",  # the app's own function may do anything
    "SELECT public.lower(x) FROM t",
    "SELECT * FROM my_set_returning_function()",
    "SET search_path = evil",
    "SHOW search_path",
    "RESET ALL",
    "LISTEN channel",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "SELECT 1; SET search_path = evil",
    "SELECT 1 -- a comment",
    "SELECT 1 /* a comment */",
    "SELECT $q$text$q$",
    "SELECT E'\\\\x'",
    "SELECT x INTO new_table FROM t",
    "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
    "SELECT nextval('s')",
    "SELECT dblink_exec('x')",
    "",
]


@pytest.mark.parametrize("sql", PLAIN)
def test_plain_reads_leave_the_session_alone(sql):
    assert leaves_session_alone(sql)


@pytest.mark.parametrize("sql", NOT_PLAIN)
def test_anything_that_could_change_the_session_keeps_the_reset(sql):
    assert not leaves_session_alone(sql)


_NAME = st.from_regex(r"[a-z_][a-z0-9_]{0,20}", fullmatch=True)


@given(name=_NAME.filter(lambda n: n not in _PLAIN_CALLS), where=st.sampled_from(PLAIN))
def test_a_call_of_any_function_not_on_the_list_keeps_the_reset(name, where):
    # wherever the call stands: the select list, a FROM item, a WHERE clause
    assert not leaves_session_alone(f"SELECT {name}($1)")
    assert not leaves_session_alone(f"SELECT * FROM {name}()")
    assert not leaves_session_alone(f"{where} UNION ALL SELECT 1 WHERE {name}(1) IS NOT NULL")


@given(tail=st.text(max_size=40), where=st.sampled_from(PLAIN))
def test_a_second_statement_keeps_the_reset(tail, where):
    assert not leaves_session_alone(f"{where}; {tail}")
