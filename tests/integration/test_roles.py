"""The daemons' least-privilege roles (``setup_roles_source.sql``, ``setup_roles_dest.sql``).

The roles must hold exactly the documented privileges: a broader grant fails the first test.
The fault suite (``tests/faults/test_pipeline.py``) runs every daemon as these roles; here, a missing
grant must stop a daemon with one line naming it.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest

from cdc.local.paths import SETUP_ROLES_DEST_SQL, SETUP_ROLES_SOURCE_SQL
from cdc.local.runner import Daemon, settings_env
from cdc.local.services import LocalServices
from cdc.model.topics import topic_for
from cdc.ops import tables
from cdc.runtime.settings import Settings
from tests.support import clean_dest, clean_source, execute, query
from tests.support.consumer import event, produce
from tests.support.producer import read_topic

pytestmark = pytest.mark.daemon

# What USAGE.md ("Least-privilege roles") documents, table by table.
DOCUMENTED = {
    "cdc_producer": {
        ("emp_records_cdc", "SELECT"),
        ("emp_records_cdc", "DELETE"),
        ("cdc_outbox", "SELECT"),
        ("cdc_outbox", "DELETE"),
        ("cdc_tables", "SELECT"),
        ("cdc_producer_state", "SELECT"),
        ("cdc_producer_state", "INSERT"),
        ("cdc_producer_state", "UPDATE"),
    },
    "cdc_consumer": {
        ("employees", "SELECT"),
        ("employees", "INSERT"),
        ("employees", "UPDATE"),
        ("employees", "DELETE"),
        ("processed_events", "SELECT"),
        ("processed_events", "INSERT"),
        ("processed_events", "UPDATE"),
        ("emp_versions", "SELECT"),
        ("emp_versions", "INSERT"),
        ("emp_versions", "UPDATE"),
        ("cdc_versions", "SELECT"),
        ("cdc_versions", "INSERT"),
        ("cdc_versions", "UPDATE"),
        ("applied_offsets", "SELECT"),
        ("applied_offsets", "INSERT"),
        ("applied_offsets", "UPDATE"),
        ("accepted_gaps", "SELECT"),
        ("accepted_gaps", "INSERT"),
    },
}
MEMBER_OF = {"cdc_producer": {"pg_read_all_stats"}, "cdc_consumer": set()}


@pytest.mark.parametrize("role", sorted(DOCUMENTED))
def test_role_has_exactly_the_documented_privileges(local_services: LocalServices, role: str):
    local_services.up()
    url = local_services.source.url if role == "cdc_producer" else local_services.dest.url
    grants = set(
        query(
            url,
            "SELECT table_name, privilege_type FROM information_schema.role_table_grants WHERE grantee = %s",
            (role,),
        )
    )
    assert grants == DOCUMENTED[role]
    (flags,) = query(
        url,
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolinherit"
        " FROM pg_roles WHERE rolname = %s",
        (role,),
    )
    assert flags == (False, False, False, False, False, True)
    members = query(
        url,
        "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member"
        " JOIN pg_roles g ON g.oid = m.roleid WHERE r.rolname = %s",
        (role,),
    )
    assert {m for (m,) in members} == MEMBER_OF[role]
    # No column-level, sequence or schema-creation rights on the side.
    assert query(
        url,
        "SELECT count(*) FROM information_schema.role_column_grants WHERE grantee = %s AND "
        "(table_name, privilege_type) NOT IN (SELECT table_name, privilege_type FROM "
        "information_schema.role_table_grants WHERE grantee = %s)",
        (role, role),
    ) == [(0,)]
    assert query(
        url, "SELECT count(*) FROM information_schema.role_usage_grants WHERE grantee = %s", (role,)
    ) == [(0,)]
    assert query(url, "SELECT has_schema_privilege(%s, 'public', 'CREATE')", (role,)) == [(False,)]
    assert query(url, "SELECT has_database_privilege(%s, current_database(), 'CREATE')", (role,)) == [
        (False,)
    ]


def _role_settings(local_services: LocalServices, settings: Settings) -> dict[str, str]:
    roles = local_services.role_env()
    return settings_env(settings) | {
        "SOURCE_DB_URL": roles["SOURCE_DB_URL"],
        "DEST_DB_URL": roles["DEST_DB_URL"],
    }


def _one_error(daemon: Daemon) -> str:
    errors = [ln for ln in daemon.output().splitlines() if " ERROR " in ln]
    assert len(errors) == 1, daemon.output()[-3000:]
    assert "Traceback" not in daemon.output()
    return errors[0]


def test_consumer_without_a_grant_stops_with_one_line_naming_it(
    local_services: LocalServices, private_settings: Settings, tmp_path: Path
):
    clean_dest(private_settings.dest_db_url)
    produce(private_settings, [event(1, "INSERT", 1)])
    execute(private_settings.dest_db_url, "REVOKE UPDATE ON emp_versions FROM cdc_consumer")
    try:
        daemon = Daemon(
            "consumer_final.py", _role_settings(local_services, private_settings), tmp_path
        ).start()
        try:
            assert daemon.wait(60) != 0
        finally:
            daemon.kill()
        line = _one_error(daemon)
        assert "permission denied for table emp_versions" in line and "setup_roles" in line
    finally:
        local_services.dest.apply_sql(SETUP_ROLES_DEST_SQL)


def test_producer_without_a_grant_stops_with_one_line_naming_it(
    local_services: LocalServices, private_settings: Settings, tmp_path: Path
):
    clean_source(private_settings.source_db_url)
    execute(private_settings.source_db_url, "INSERT INTO employees (first_name) VALUES ('x')")
    execute(private_settings.source_db_url, "REVOKE UPDATE ON cdc_producer_state FROM cdc_producer")
    try:
        daemon = Daemon("producer.py", _role_settings(local_services, private_settings), tmp_path).start()
        try:
            assert daemon.wait(60) != 0
        finally:
            daemon.kill()
        line = _one_error(daemon)
        assert "permission denied for table cdc_producer_state" in line and "setup_roles" in line
    finally:
        local_services.source.apply_sql(SETUP_ROLES_SOURCE_SQL)


def test_producer_role_publishes_and_prunes_both_outboxes(
    local_services: LocalServices, private_settings: Settings, tmp_path: Path
):
    url = private_settings.source_db_url
    settings = dataclasses.replace(private_settings, cdc_topic_prefix=f"role{uuid.uuid4().hex[:8]}")
    clean_source(url)
    execute(url, "CREATE TABLE role_items (id int PRIMARY KEY, note text)")
    try:
        tables.add(settings, ["role_items"])
        execute(
            url, "INSERT INTO role_items VALUES (1, 'x'); INSERT INTO employees (first_name) VALUES ('y')"
        )
        env = _role_settings(local_services, settings) | {"CDC_TOPIC_PREFIX": settings.cdc_topic_prefix}
        daemon = Daemon("producer.py", env, tmp_path, "--once", "--prune").start()
        try:
            assert daemon.wait(60) == 0, daemon.output()[-3000:]
        finally:
            daemon.kill()
        assert query(
            url, "SELECT (SELECT count(*) FROM emp_records_cdc), (SELECT count(*) FROM cdc_outbox)"
        ) == [(0, 0)]
        topic = topic_for(settings.cdc_topic_prefix, "public", "role_items")
        [record] = read_topic(dataclasses.replace(settings, cdc_topic=topic), want=1)
        assert record.key == '{"id": "1"}' and record.value["row"] == {"id": "1", "note": "x"}
        assert len(read_topic(settings, want=1)) == 1
    finally:
        tables.remove(settings, ["role_items"])
        execute(url, "DROP TABLE role_items; DELETE FROM cdc_outbox")


def test_rerunning_the_destination_roles_keeps_a_replicated_tables_grant_and_nothing_more(
    local_services: LocalServices,
):
    """A table granted as USAGE.md says for a replicated one keeps its four privileges when the
    file is applied again; anything more, a partial grant, and more on the sink's tables go."""
    local_services.up()
    url = local_services.dest.url
    execute(
        url,
        'CREATE TABLE "Role kept" (id int PRIMARY KEY); CREATE TABLE role_partial (id int PRIMARY KEY);'
        ' GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON "Role kept" TO cdc_consumer;'
        " GRANT SELECT ON role_partial TO cdc_consumer; GRANT DELETE ON processed_events TO cdc_consumer",
    )
    try:
        local_services.dest.apply_sql(SETUP_ROLES_DEST_SQL)
        grants = set(
            query(
                url,
                "SELECT table_name, privilege_type FROM information_schema.role_table_grants"
                " WHERE grantee = 'cdc_consumer' AND table_name IN ('Role kept', 'role_partial', 'processed_events')",
            )
        )
        assert grants == {
            ("Role kept", "SELECT"),
            ("Role kept", "INSERT"),
            ("Role kept", "UPDATE"),
            ("Role kept", "DELETE"),
            ("processed_events", "SELECT"),
            ("processed_events", "INSERT"),
            ("processed_events", "UPDATE"),
        }
    finally:
        execute(url, 'DROP TABLE "Role kept", role_partial')
        local_services.dest.apply_sql(SETUP_ROLES_DEST_SQL)
