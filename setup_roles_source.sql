-- Source: the producer's least-privilege role. Run after setup_db.sql, as the tables' owner.
-- Idempotent and atomic; re-running it also takes back any broader grant given since.
-- The role is created without a password: set one (ALTER ROLE cdc_producer PASSWORD '...').
--
-- cdc_producer may only: read both outboxes (emp_records_cdc, and cdc_outbox of the tables added
-- with `python -m cdc tables add`), prune them, read the list of captured tables (cdc_tables),
-- read/create/move its cursor, LISTEN, take its advisory lock, and read the activity statistics
-- (the horizon warning names the oldest open transaction, which pg_stat_activity shows other
-- roles only with pg_read_all_stats).
-- Not granted: reading or locking employees (`producer.py --snapshot`), rewriting the outboxes
-- (`producer.py --reset-cursor`) and changing what is captured (`python -m cdc tables`): run those
-- operator commands as the owner.

BEGIN;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cdc_producer') THEN
        CREATE ROLE cdc_producer LOGIN;
    END IF;
END
$$;

REVOKE ALL ON ALL TABLES IN SCHEMA public FROM cdc_producer;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM cdc_producer;

GRANT SELECT, DELETE ON emp_records_cdc TO cdc_producer;
GRANT SELECT, DELETE ON cdc_outbox TO cdc_producer;
GRANT SELECT ON cdc_tables TO cdc_producer;
GRANT SELECT, INSERT, UPDATE ON cdc_producer_state TO cdc_producer;
GRANT pg_read_all_stats TO cdc_producer;

COMMIT;
