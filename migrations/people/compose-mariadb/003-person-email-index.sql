-- An index built without blocking writes: MySQL's online DDL (ALGORITHM=INPLACE, LOCK=NONE)
-- is what CONCURRENTLY is on PostgreSQL; the server refuses it rather than lock the table.
-- depends: 002-add-address
CREATE INDEX person_email_idx ON person (email) ALGORITHM=INPLACE LOCK=NONE;
