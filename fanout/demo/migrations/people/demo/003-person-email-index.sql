-- An index built without blocking writes: CONCURRENTLY cannot run in a transaction.
-- transactional: false
-- depends: 002-add-address
CREATE INDEX CONCURRENTLY IF NOT EXISTS person_email_idx ON person (email);
