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

COMMIT;
