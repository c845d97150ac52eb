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
-- follows. The statement already holds its exclusive lock here, so no row can be missed.
CREATE OR REPLACE FUNCTION emp_records_cdc_capture_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO emp_records_cdc (emp_id, first_name, last_name, dob, city, salary, action)
    SELECT emp_id, first_name, last_name, dob, city, salary, 'DELETE' FROM employees ORDER BY emp_id;
    PERFORM pg_notify('emp_records_cdc', '');
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER employees_cdc_capture_truncate
    BEFORE TRUNCATE ON employees
    FOR EACH STATEMENT EXECUTE FUNCTION emp_records_cdc_capture_truncate();

COMMIT;
