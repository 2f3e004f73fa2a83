-- The shard directory of the compose stack: one row per tenant database.
CREATE TABLE shards (
    shard_id TEXT PRIMARY KEY,
    env TEXT NOT NULL,
    host TEXT NOT NULL,
    port INT NOT NULL DEFAULT 5432,
    dbname TEXT NOT NULL,
    tenants TEXT[] NOT NULL DEFAULT '{}',
    active BOOLEAN NOT NULL DEFAULT true,
    -- The row's engine: postgresql, or mysql/mariadb (fanout's sql directory reads it).
    flavor TEXT NOT NULL DEFAULT 'postgresql'
);
INSERT INTO shards (shard_id, env, host, dbname, tenants) VALUES
    ('acme', 'compose', 'shard-1', 'tenant_acme', '{acme}'),
    ('globex', 'compose', 'shard-1', 'tenant_globex', '{globex}'),
    ('shared-1', 'compose', 'shard-1', 'shared_1', '{soylent,wonka}'),
    ('initech', 'compose', 'shard-2', 'tenant_initech', '{initech}'),
    ('shared-2', 'compose', 'shard-2', 'shared_2', '{stark,wayne}'),
    ('umbrella', 'compose', 'shard-3', 'tenant_umbrella', '{umbrella}'),
    ('hooli', 'compose', 'shard-3', 'tenant_hooli', '{hooli}'),
    ('shared-3', 'compose', 'shard-3', 'shared_3', '{tyrell,cyberdyne}');
-- The MariaDB shard server's databases: an environment of their own, since their migrations
-- speak MySQL's dialect.
INSERT INTO shards (shard_id, env, host, port, dbname, tenants, flavor) VALUES
    ('nakatomi', 'compose-mariadb', 'shard-mariadb', 3306, 'tenant_nakatomi', '{nakatomi}', 'mariadb'),
    ('oscorp', 'compose-mariadb', 'shard-mariadb', 3306, 'tenant_oscorp', '{oscorp}', 'mariadb');
-- A retired tenant stays in the catalog but is not migrated.
INSERT INTO shards (shard_id, env, host, dbname, tenants, active) VALUES
    ('retired', 'compose', 'shard-2', 'tenant_retired', '{retired}', false);
GRANT SELECT ON shards TO catalog_reader;
