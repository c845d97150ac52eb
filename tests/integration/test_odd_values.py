"""Every value the source can hold replicates exactly: producer.py, the broker and
consumer_final.py as real daemons, checked by ``verify`` (md5 of each row's JSON in each database)."""

from __future__ import annotations

import pytest

from cdc.kafka.client import MARK_HEADER, MARK_VALUE
from cdc.ops.verify import verify
from employee import INT4_MAX, INT4_MIN
from tests.support import Daemons, execute
from tests.support.consumer import consumer_env, outcomes
from tests.support.producer import producer_env, read_topic

pytestmark = pytest.mark.daemon

LONG = "é" * 99 + "👩"  # 100 characters, 201 bytes
ROWS = [
    # emp_id, first_name, last_name, dob, city, salary
    (0, "👩🏽‍🔬 Zoë", "e\u0301\u0301", "infinity", "שלום עולם", 0),
    (-1, LONG, 'O\'Brien \\ "q"', "-infinity", "\u202eRTL override", INT4_MIN),
    (INT4_MIN, "", None, "0044-03-15 BC", "東京", INT4_MAX),
    (INT4_MAX, "tab\tnew\nline", "\\x00 not a NUL", "12345-01-01", None, None),
    (7, "\u200d\ufeff", "x" * 100, "4713-11-24 BC", "Ⅻ", -1),
    (8, "a", "b", "5874897-12-31", "c", 1),
]
UPDATES = [
    ("UPDATE employees SET dob = '-infinity', first_name = %s WHERE emp_id = 0", ("\U0001f600" * 100,)),
    ("UPDATE employees SET dob = 'infinity', last_name = NULL WHERE emp_id = -1", None),
    ("UPDATE employees SET dob = '0001-01-01 BC', city = %s WHERE emp_id = %s", ("\u02bbŌlelo", INT4_MIN)),
    ("UPDATE employees SET dob = '99999-12-31', salary = %s WHERE emp_id = %s", (INT4_MIN, INT4_MAX)),
    ("UPDATE employees SET emp_id = -2 WHERE emp_id = 8", None),  # a DELETE and an INSERT
]
DELETES = "DELETE FROM employees WHERE emp_id IN (0, 7, -2)"


def test_every_value_the_source_holds_replicates_exactly(
    settings, clean_source, clean_dest, producers, tmp_path
):
    consumers = Daemons("consumer_final.py", tmp_path)
    try:
        producers.start(producer_env(settings))
        # Once assigned, the group's coordinator answers verify's offset queries.
        consumers.start(consumer_env(settings)).wait_for_log("partitions assigned")
        for row in ROWS:
            execute(clean_source, "INSERT INTO employees VALUES (%s, %s, %s, %s, %s, %s)", row)
        execute(clean_source, "INSERT INTO employees (first_name, dob) VALUES ('serial', '1815-12-10 BC')")
        _identical(settings)
        for statement, params in UPDATES:
            execute(clean_source, statement, params)
        _identical(settings)
        execute(clean_source, DELETES)
        _identical(settings)
    finally:
        consumers.kill_all()
    assert set(outcomes(clean_dest).values()) <= {"applied", "stale"}  # nothing dead-lettered
    records = read_topic(settings, want=len(ROWS) + 1 + len(UPDATES) + 1 + 3)
    assert all((MARK_HEADER, MARK_VALUE) in r.headers for r in records)


def _identical(settings) -> None:
    result = verify(settings, wait=60, events=True)
    assert result.ok, "\n".join(result.lines())
    assert result.rows is not None and result.rows.source_rows > 0
