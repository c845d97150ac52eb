-- Destination database: the replicated employees table plus the sink's bookkeeping.
-- Idempotent and atomic (one transaction): safe to run any number of times, also under load.

BEGIN;

CREATE TABLE IF NOT EXISTS employees (
    emp_id      INTEGER PRIMARY KEY,
    first_name  VARCHAR(100),
    last_name   VARCHAR(100),
    dob         DATE,
    city        VARCHAR(100),
    salary      INTEGER
);

-- Every action_id the sink has decided on, once: the idempotency record.
CREATE TABLE IF NOT EXISTS processed_events (
    action_id    BIGINT PRIMARY KEY,
    emp_id       INTEGER,
    action       VARCHAR(10),
    outcome      VARCHAR(10) NOT NULL CHECK (outcome IN ('applied', 'stale', 'dlq')),
    topic        TEXT,
    "partition"  INTEGER,
    "offset"     BIGINT,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The event's captured_at: a later event under the same action_id with another one means
    -- the source's action_id sequence went back (the consumer stops instead of dropping it).
    captured_at  TIMESTAMPTZ
);

-- Destinations set up before captured_at was recorded.
ALTER TABLE processed_events ADD COLUMN IF NOT EXISTS captured_at TIMESTAMPTZ;

-- A change of another captured table (`python -m cdc tables add`): its table and primary key
-- (the key's column texts as a JSON object); emp_id is NULL then. NULL table: employees.
ALTER TABLE processed_events ADD COLUMN IF NOT EXISTS table_schema TEXT;
ALTER TABLE processed_events ADD COLUMN IF NOT EXISTS table_name TEXT;
ALTER TABLE processed_events ADD COLUMN IF NOT EXISTS row_key JSONB;

-- Nothing reads processed_events by emp_id, and this index cost about a tenth of the
-- destination's work per event: destinations set up before lose it. An operator who looks
-- events up by emp_id can create one under another name.
DROP INDEX IF EXISTS processed_events_emp_id_idx;

-- The version guard: the newest action_id applied per emp_id, kept after a DELETE as a
-- tombstone, so a late or replayed older event can never overwrite newer state.
CREATE TABLE IF NOT EXISTS emp_versions (
    emp_id          INTEGER PRIMARY KEY,
    last_action_id  BIGINT NOT NULL,
    deleted         BOOLEAN NOT NULL DEFAULT false,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The version guard of every other captured table: the newest action_id applied per row, kept
-- after a DELETE as a tombstone. One text per row: the table's name, each part double-quoted as
-- in SQL ("public"."Order Items"), then its primary key's column texts as a compact JSON object,
-- members sorted ({"id":"42"}). COLLATE "C": compared byte for byte. One column rather than
-- (schema, table, key): a third less to compare and to store per row, the apply's biggest share.
CREATE TABLE IF NOT EXISTS cdc_versions (
    key             TEXT COLLATE "C" PRIMARY KEY,
    last_action_id  BIGINT NOT NULL,
    deleted         BOOLEAN NOT NULL DEFAULT false,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A guard of the first shape, keyed by (table_schema, table_name, key), gets the one-column key.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_attribute
                WHERE attrelid = 'cdc_versions'::regclass AND attname = 'table_schema' AND NOT attisdropped) THEN
        ALTER TABLE cdc_versions DROP CONSTRAINT cdc_versions_pkey;
        UPDATE cdc_versions
           SET key = '"' || replace(table_schema, '"', '""') || '"."' || replace(table_name, '"', '""') || '"' || key;
        ALTER TABLE cdc_versions DROP COLUMN table_schema, DROP COLUMN table_name, ADD PRIMARY KEY (key);
    END IF;
END
$$;

-- The destination's record of what it consumed: per topic partition, the offset after the last
-- message decided (applied, stale, duplicate or dead-lettered), written in the same transaction
-- as the rows. The consumer starts each partition here, not at the group's committed offset, and
-- topic_id (Kafka's topic id) tells a recreated topic from the one these offsets belong to.
-- Rows of the dead-letter topic are the --replay-dlq cursor: the letters replayed.
CREATE TABLE IF NOT EXISTS applied_offsets (
    topic        TEXT NOT NULL,
    "partition"  INTEGER NOT NULL,
    next_offset  BIGINT NOT NULL CHECK (next_offset >= 0),
    topic_id     TEXT,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, "partition")
);

-- Destinations set up before applied_offsets: their positions, from the messages processed_events
-- recorded (topic id unknown: the consumer takes the topic's current one). Only while it is empty.
INSERT INTO applied_offsets (topic, "partition", next_offset)
SELECT topic, "partition", max("offset") + 1
  FROM processed_events
 WHERE topic IS NOT NULL AND "partition" IS NOT NULL AND "offset" IS NOT NULL
   AND NOT EXISTS (SELECT FROM applied_offsets)
 GROUP BY topic, "partition"
ON CONFLICT DO NOTHING;

-- Gaps an operator accepted (`python -m cdc offsets accept-gap`): offsets first_lost up to
-- next_kept were removed from the topic before this destination applied them.
CREATE TABLE IF NOT EXISTS accepted_gaps (
    topic        TEXT NOT NULL,
    "partition"  INTEGER NOT NULL,
    topic_id     TEXT,
    first_lost   BIGINT NOT NULL,
    next_kept    BIGINT NOT NULL,
    accepted_by  TEXT NOT NULL,
    accepted_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

COMMIT;
