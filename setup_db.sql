-- Source database: the employees table, its change capture (outbox) and the producer's cursor.
-- Idempotent and atomic: safe to run any number of times, also while writers run (`psql -f`
-- runs it statement by statement, so it is one transaction and the capture trigger is replaced,
-- never dropped). Needs PostgreSQL 14+ (CREATE OR REPLACE TRIGGER; xid8).

BEGIN;

CREATE TABLE IF NOT EXISTS employees (
    emp_id      SERIAL PRIMARY KEY,
    first_name  VARCHAR(100),
    last_name   VARCHAR(100),
    dob         DATE,
    city        VARCHAR(100),
    salary      INTEGER
);

-- Writers lock employees first and the outbox second (through the trigger): take the locks in
-- that order too, so re-applying this file under load cannot deadlock with them.
LOCK TABLE employees IN SHARE ROW EXCLUSIVE MODE;

-- One row per captured change, with the full row image. txid is the writing transaction's id:
-- the producer reads only rows whose transaction has ended (see producer.py), so a transaction
-- that commits late is never skipped.
CREATE TABLE IF NOT EXISTS emp_records_cdc (
    action_id   BIGSERIAL PRIMARY KEY,
    emp_id      INTEGER NOT NULL,
    first_name  VARCHAR(100),
    last_name   VARCHAR(100),
    dob         DATE,
    city        VARCHAR(100),
    salary      INTEGER,
    action      VARCHAR(10) NOT NULL
                CHECK (action IN ('INSERT', 'UPDATE', 'DELETE', 'SNAPSHOT')),
    txid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    captured_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX IF NOT EXISTS emp_records_cdc_txid_action_id_idx
    ON emp_records_cdc (txid, action_id);

-- The producer's durable cursor: the last (txid, action_id) whose delivery Kafka acknowledged.
CREATE TABLE IF NOT EXISTS cdc_producer_state (
    name            TEXT PRIMARY KEY,
    last_txid       xid8 NOT NULL DEFAULT '0',
    last_action_id  BIGINT NOT NULL DEFAULT 0,
    published_total BIGINT NOT NULL DEFAULT 0,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

INSERT INTO cdc_producer_state (name) VALUES ('default') ON CONFLICT (name) DO NOTHING;

CREATE OR REPLACE FUNCTION emp_records_cdc_capture() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE'
       OR (TG_OP = 'UPDATE' AND NEW.emp_id IS DISTINCT FROM OLD.emp_id) THEN
        -- A changed primary key is a delete of the old id followed by an insert of the new one.
        INSERT INTO emp_records_cdc (emp_id, first_name, last_name, dob, city, salary, action)
        VALUES (OLD.emp_id, OLD.first_name, OLD.last_name, OLD.dob, OLD.city, OLD.salary, 'DELETE');
    END IF;
    IF TG_OP = 'INSERT'
       OR (TG_OP = 'UPDATE' AND NEW.emp_id IS DISTINCT FROM OLD.emp_id) THEN
        INSERT INTO emp_records_cdc (emp_id, first_name, last_name, dob, city, salary, action)
        VALUES (NEW.emp_id, NEW.first_name, NEW.last_name, NEW.dob, NEW.city, NEW.salary, 'INSERT');
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO emp_records_cdc (emp_id, first_name, last_name, dob, city, salary, action)
        VALUES (NEW.emp_id, NEW.first_name, NEW.last_name, NEW.dob, NEW.city, NEW.salary, 'UPDATE');
    END IF;
    -- Delivered at commit; identical payloads in one transaction fold into one notification.
    PERFORM pg_notify('emp_records_cdc', '');
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER employees_cdc_capture
    AFTER INSERT OR UPDATE OR DELETE ON employees
    FOR EACH ROW EXECUTE FUNCTION emp_records_cdc_capture();

-- TRUNCATE fires no row triggers: capture it as a DELETE of every row, so the destination
-- follows. The statement already holds its exclusive lock here: at READ COMMITTED the SELECT
-- takes a fresh snapshot and sees every row. At REPEATABLE READ or SERIALIZABLE the transaction's
-- snapshot was taken before the lock wait (a function cannot take a newer one), so rows committed
-- during the wait would be truncated without their DELETE. If any transaction the snapshot does
-- not see has committed since (those in progress then, and every xid assigned after it), raise a
-- serialization failure: such clients retry SQLSTATE 40001 anyway, and the retry's snapshot sees
-- them. It can also fire for a commit elsewhere (the xid does not say which table it wrote);
-- locking the table first (LOCK TABLE employees IN ACCESS EXCLUSIVE MODE) makes that unlikely.
CREATE OR REPLACE FUNCTION cdc_truncate_check(tbl text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    snap pg_snapshot := pg_current_snapshot();
    x xid8;
BEGIN
    IF current_setting('transaction_isolation') NOT IN ('read committed', 'read uncommitted') THEN
        x := (SELECT min(xip) FROM pg_snapshot_xip(snap) AS xip WHERE pg_xact_status(xip) = 'committed');
        IF x IS NULL THEN
            x := pg_snapshot_xmax(snap);
            BEGIN
                -- Up to the next xid to be assigned: pg_xact_status raises for that one.
                WHILE pg_xact_status(x) IS DISTINCT FROM 'committed' LOOP
                    x := (x::text::bigint + 1)::text::xid8;
                END LOOP;
            EXCEPTION WHEN invalid_parameter_value THEN
                x := NULL;
            END;
        END IF;
        IF x IS NOT NULL THEN
            RAISE EXCEPTION 'TRUNCATE % at %: transaction % committed after this transaction''s snapshot; rows it wrote would be truncated without a captured DELETE', tbl, current_setting('transaction_isolation'), x
                USING ERRCODE = 'serialization_failure',
                      HINT = 'Retry the transaction; or take LOCK TABLE ... IN ACCESS EXCLUSIVE MODE as its first statement, or TRUNCATE at READ COMMITTED.';
        END IF;
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION emp_records_cdc_capture_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM cdc_truncate_check('employees');
    INSERT INTO emp_records_cdc (emp_id, first_name, last_name, dob, city, salary, action)
    SELECT emp_id, first_name, last_name, dob, city, salary, 'DELETE' FROM employees ORDER BY emp_id;
    PERFORM pg_notify('emp_records_cdc', '');
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER employees_cdc_capture_truncate
    BEFORE TRUNCATE ON employees
    FOR EACH STATEMENT EXECUTE FUNCTION emp_records_cdc_capture_truncate();

-- ---------------------------------------------------------------------------------------------
-- Any other table with a primary key (`python -m cdc tables add`): one generic outbox and one
-- generic capture function. The outbox draws its action_ids from emp_records_cdc's sequence, so
-- an action_id names one change across every table.

-- hstore(record) turns a row into each column's text output (what `SELECT col::text` gives): the
-- exact value of every type, array bounds, json's own bytes and jsonb's 'null' (as distinct from
-- SQL NULL) included. It is a trusted extension: a database owner may create it.
CREATE EXTENSION IF NOT EXISTS hstore;

-- What is captured: one row per table, written by `cdc tables add`, removed by `cdc tables remove`.
CREATE TABLE IF NOT EXISTS cdc_tables (
    table_schema TEXT NOT NULL,
    table_name   TEXT NOT NULL,
    topic        TEXT NOT NULL UNIQUE,
    primary_key  TEXT[] NOT NULL,
    added_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    added_by     TEXT NOT NULL DEFAULT current_user,
    PRIMARY KEY (table_schema, table_name)
);

-- One row per captured change of a table in cdc_tables. row_image: every column but generated
-- ones, by name, as its text output (JSON null for SQL NULL); key: the primary key's columns of
-- it. A partitioned table's changes are recorded under the root's name.
CREATE TABLE IF NOT EXISTS cdc_outbox (
    action_id    BIGINT PRIMARY KEY DEFAULT nextval(pg_get_serial_sequence('emp_records_cdc', 'action_id')::regclass),
    table_schema TEXT NOT NULL,
    table_name   TEXT NOT NULL,
    action       VARCHAR(10) NOT NULL
                 CHECK (action IN ('INSERT', 'UPDATE', 'DELETE', 'SNAPSHOT')),
    key          JSONB NOT NULL,
    row_image    JSONB NOT NULL,
    txid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    captured_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX IF NOT EXISTS cdc_outbox_txid_action_id_idx ON cdc_outbox (txid, action_id);

-- The row trigger of every table in cdc_tables. Arguments (fixed by `cdc tables add`): the
-- table's primary key columns and its generated columns, each as a text[] literal. The table's
-- name is taken from the catalog, never from an argument (a partition's changes under its root's
-- name): SECURITY DEFINER lets a writer need no grant on the outbox, and no one can make it
-- record changes under another table's name. The settings that change text output are pinned,
-- so one row always yields one image and one key, whoever writes it.
CREATE OR REPLACE FUNCTION cdc_capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'postgres'
SET extra_float_digits = 1
SET bytea_output = 'hex'
AS $$
DECLARE
    key_columns text[] := TG_ARGV[0]::text[];
    root oid := coalesce(pg_partition_root(TG_RELID), TG_RELID);
    root_schema name := TG_TABLE_SCHEMA;
    root_name name := TG_TABLE_NAME;
    old_image hstore;
    new_image hstore;
BEGIN
    IF root <> TG_RELID THEN
        SELECT n.nspname, c.relname INTO root_schema, root_name
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = root;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        old_image := hstore(OLD) - TG_ARGV[1]::text[];
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_image := hstore(NEW) - TG_ARGV[1]::text[];
    END IF;
    IF TG_OP = 'UPDATE' AND slice(new_image, key_columns) = slice(old_image, key_columns) THEN
        INSERT INTO cdc_outbox (table_schema, table_name, action, key, row_image)
        VALUES (root_schema, root_name, 'UPDATE',
                hstore_to_jsonb(slice(new_image, key_columns)), hstore_to_jsonb(new_image));
    ELSE
        -- A changed primary key is a delete of the old key followed by an insert of the new one.
        IF old_image IS NOT NULL THEN
            INSERT INTO cdc_outbox (table_schema, table_name, action, key, row_image)
            VALUES (root_schema, root_name, 'DELETE',
                    hstore_to_jsonb(slice(old_image, key_columns)), hstore_to_jsonb(old_image));
        END IF;
        IF new_image IS NOT NULL THEN
            INSERT INTO cdc_outbox (table_schema, table_name, action, key, row_image)
            VALUES (root_schema, root_name, 'INSERT',
                    hstore_to_jsonb(slice(new_image, key_columns)), hstore_to_jsonb(new_image));
        END IF;
    END IF;
    PERFORM pg_notify('emp_records_cdc', '');
    RETURN NULL;
END;
$$;

-- Rows of a table as changes of one action (`DELETE` for a TRUNCATE, `SNAPSHOT` for `cdc tables
-- add --snapshot`), recorded under the root's name, under the same pinned settings as the row
-- trigger. `only`: this table's own rows (a partition truncated), else its whole tree. Returns
-- how many. Runs with its caller's rights.
CREATE OR REPLACE FUNCTION cdc_copy_rows(
    action text, source regclass, only_this boolean, root_schema text, root_name text,
    key_columns text[], generated text[]
) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'postgres'
SET extra_float_digits = 1
SET bytea_output = 'hex'
AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE format(
        'INSERT INTO cdc_outbox (table_schema, table_name, action, key, row_image)'
        ' SELECT $1, $2, $3, hstore_to_jsonb(slice(i, $4)), hstore_to_jsonb(i)'
        ' FROM (SELECT hstore(t) - $5 AS i FROM %s %s AS t) AS s',
        CASE WHEN only_this THEN 'ONLY' ELSE '' END, source)
    USING root_schema, root_name, action, key_columns, generated;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM pg_notify('emp_records_cdc', '');
    RETURN n;
END;
$$;

-- TRUNCATE of a table in cdc_tables (and of each of its partitions: statement triggers are not
-- inherited): a DELETE of every row, under the root's name, after the same snapshot check as
-- employees' (cdc_truncate_check). Same arguments as cdc_capture; SECURITY DEFINER as it.
CREATE OR REPLACE FUNCTION cdc_capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    root_schema name;
    root_name name;
BEGIN
    SELECT n.nspname, c.relname INTO root_schema, root_name
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = coalesce(pg_partition_root(TG_RELID), TG_RELID);
    PERFORM cdc_truncate_check(TG_RELID::regclass::text);
    PERFORM cdc_copy_rows('DELETE', TG_RELID::regclass, true, root_schema, root_name,
                          TG_ARGV[0]::text[], TG_ARGV[1]::text[]);
    RETURN NULL;
END;
$$;

COMMIT;
