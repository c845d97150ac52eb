-- Destination: the consumer's least-privilege role. Run after setup_db_with_idempotency.sql, as
-- the tables' owner. Idempotent and atomic; re-running it also takes back any broader grant.
-- The role is created without a password: set one (ALTER ROLE cdc_consumer PASSWORD '...').
--
-- cdc_consumer may only write the tables it keeps: the replicated rows, the idempotency record,
-- the version guards and the applied offsets, and add to the record of accepted gaps (the
-- operator's `python -m cdc offsets accept-gap` runs with the same .env). No DDL, no TRUNCATE,
-- nothing else. Every other replicated table needs its own grant, given by its owner:
--   GRANT SELECT, INSERT, UPDATE, DELETE ON <table> TO cdc_consumer;
-- (until then its changes are held, not lost: the consumer says which table and why). Re-running
-- this file keeps that grant on a table of `public` that has all four, and takes back anything
-- more (TRUNCATE, REFERENCES, TRIGGER) and any grant on a table that has fewer.
--
-- It may set session_replication_role (PostgreSQL 15+): changes are applied under `replica`, as
-- PostgreSQL's logical replication applies them, so foreign keys between replicated tables are
-- not checked against an order of arrival that differs from the source's commit order (and the
-- destination's own triggers do not fire for replicated rows).

BEGIN;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cdc_consumer') THEN
        CREATE ROLE cdc_consumer LOGIN;
    END IF;
END
$$;

DO $$
DECLARE
    replicated regclass[];
    rel regclass;
BEGIN
    -- The other replicated tables: every table of public where cdc_consumer holds all of SELECT,
    -- INSERT, UPDATE and DELETE, but the sink's own (their grants are exactly the ones below).
    SELECT coalesce(array_agg(oid::regclass), '{}') INTO replicated
      FROM (SELECT c.oid
              FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
             WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
               AND a.grantee = 'cdc_consumer'::regrole
               AND c.relname NOT IN ('employees', 'processed_events', 'emp_versions', 'cdc_versions',
                                     'applied_offsets', 'accepted_gaps')
             GROUP BY c.oid
            HAVING array_agg(a.privilege_type::text) @> ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) AS t;
    REVOKE ALL ON ALL TABLES IN SCHEMA public FROM cdc_consumer;
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM cdc_consumer;
    FOREACH rel IN ARRAY replicated LOOP
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO cdc_consumer', rel);
    END LOOP;
END
$$;

GRANT SELECT, INSERT, UPDATE, DELETE ON employees TO cdc_consumer;
GRANT SELECT, INSERT, UPDATE ON processed_events, emp_versions, cdc_versions, applied_offsets TO cdc_consumer;
GRANT SELECT, INSERT ON accepted_gaps TO cdc_consumer;
GRANT SET ON PARAMETER session_replication_role TO cdc_consumer;

COMMIT;
