"""inspect: every shard's live schema, grouped by (version, fingerprint), outliers described; read-only."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import psycopg2
import pytest
from conftest import PASSWORD_VARIABLE, Fleet
from pgbouncer import PgBouncer, binary

from fanout import schema
from fanout.embedded import EmbeddedPostgres
from fanout.errors import EXIT_CONFIG, EXIT_OK, EXIT_TARGETS_FAILED
from fanout.report import from_dict, to_dict

SET = {
    "001-create-person.sql": "CREATE TABLE person (id SERIAL PRIMARY KEY, name TEXT NOT NULL, email TEXT);",
    "002-add-address.sql": """\
        -- depends: 001-create-person
        ALTER TABLE person ADD COLUMN address TEXT;
        CREATE UNIQUE INDEX person_name_idx ON person (name);
        """,
    "003-create-order.sql": """\
        -- depends: 002-add-address
        CREATE TABLE customer_order (id SERIAL PRIMARY KEY, person_id INT REFERENCES person (id));
        """,
}
PASSWORD = "Insp3ct-Secret-Pa55"


def _inspect(fleet: Fleet, *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    result = fleet.cli("inspect", "--env", "test", "--format", "json", *args)
    return result.exit_code, json.loads(result.stdout)


def _groups(report: dict) -> dict[tuple[str, ...], dict]:  # type: ignore[type-arg]
    return {tuple(g["targets"]): g for g in report["inspection"]["groups"]}


def test_inspect_groups_the_fleet_and_says_how_each_outlier_differs(fleet: Fleet) -> None:
    names = fleet.add_databases(7)
    a, b, c, d, e, f, g = names
    fleet.publish(SET)
    fleet.write_env([{"id": n, "dsn": fleet.dsn(n)} for n in names])
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.query(b, "CREATE INDEX person_email_idx2 ON person (email)")  # by hand, during an incident
    fleet.query(c, "ALTER TABLE person ALTER COLUMN address TYPE varchar(200)")
    fleet.query(d, "DROP TABLE customer_order")  # a shard one migration behind
    fleet.query(d, "DELETE FROM _yoyo_migration WHERE migration_id = '003-create-order'")
    fleet.query(e, "DROP INDEX person_name_idx")
    fleet.query(e, "INSERT INTO person (name) VALUES ('twin'), ('twin')")
    with pytest.raises(psycopg2.errors.UniqueViolation):  # leaves the index INVALID
        fleet.query(e, "CREATE UNIQUE INDEX CONCURRENTLY person_name_idx ON person (name)")
    assert fleet.cli("verify", "--env", "test").exit_code == EXIT_TARGETS_FAILED  # d is behind

    code, report = _inspect(fleet)

    assert code == report["exit_code"] == EXIT_TARGETS_FAILED
    groups = _groups(report)
    reference = groups[(a, f, g)]
    assert reference["reference"] is True and reference["version"] == {"app": "003-create-order"}
    details = {targets: [x["detail"] for x in grp["differences"]] for targets, grp in groups.items()}
    assert details[(b,)] == ["extra index person_email_idx2 on person (email)"]
    assert details[(c,)] == ["column person.address is character varying(200), the reference has text"]
    assert details[(e,)] == ["index person_name_idx is INVALID"]
    for outlier in (b, c, e):
        assert groups[(outlier,)]["compared_with"] == f"group {reference['group']}"
    older = groups[(d,)]
    assert older["version"] == {"app": "002-add-address"}
    assert older["reference"] is True and older["differences"] == []  # another version: apart, not flagged
    assert report["inspection"]["outliers"] == [b, c, e]
    assert report["inspection"]["reference"] == "largest"
    assert {r["target"]: r["pending"] for r in report["results"]}[d] == ["003-create-order"]
    assert to_dict(from_dict(report)) == report

    text = fleet.cli("inspect", "--env", "test").stdout
    assert "extra index person_email_idx2 on person (email)" in text
    assert "schema differs on 3 shard(s)" in text
    markdown = fleet.cli("inspect", "--env", "test", "--format", "markdown").stdout
    assert "- column person.address is character varying(200), the reference has text" in markdown
    junit = ET.fromstring(fleet.cli("inspect", "--env", "test", "--format", "junit").stdout)
    suite = junit.find("testsuite[@name='test.schema']")
    assert suite is not None and suite.get("tests") == "7" and suite.get("failures") == "3"
    failed = {case.get("name"): case.find("failure") for case in suite.iter("testcase")}
    assert failed[e] is not None and failed[e].get("message") == "index person_name_idx is INVALID"
    assert failed[a] is None and failed[d] is None
    page = fleet.cli("inspect", "--env", "test", "--format", "html").stdout
    assert "<section class=schema id=schema>" in page
    assert page.count("data-reference=false") == 3 and page.count("data-reference=true") == 2
    assert "index person_name_idx is INVALID" in page
    assert "schema differs from group 1: extra index person_email_idx2 on person (email)</td>" in page  # its row

    verified = fleet.cli("verify", "--env", "test", "--schema", "--format", "json")
    assert verified.exit_code == EXIT_TARGETS_FAILED
    assert json.loads(verified.stdout)["inspection"]["outliers"] == [b, c, e]


def test_verify_schema_fails_only_on_a_schema_difference(fleet: Fleet) -> None:
    _, other = fleet.add_databases(2)
    fleet.publish(SET)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.query(other, "CREATE SCHEMA fanout_scratch_0badf00d")  # a build's scratch, not dropped yet
    fleet.query(other, "CREATE TABLE fanout_scratch_0badf00d.person (id int)")
    assert fleet.cli("verify", "--env", "test", "--schema").exit_code == EXIT_OK
    assert _inspect(fleet)[0] == EXIT_OK

    fleet.query(other, "ALTER TABLE person ALTER COLUMN email SET NOT NULL")

    assert fleet.cli("verify", "--env", "test").exit_code == EXIT_OK  # the records agree
    schema_verify = fleet.cli("verify", "--env", "test", "--schema")
    assert schema_verify.exit_code == EXIT_TARGETS_FAILED
    assert "column person.email is NOT NULL, the reference is nullable" in schema_verify.stdout


def test_reference_build_and_reference_target(fleet: Fleet) -> None:
    clean, extra = fleet.add_databases(2)
    fleet.publish(SET)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.query(extra, "CREATE INDEX person_email_idx2 ON person (email)")
    fleet.query(extra, "CREATE TABLE audit (id int, at timestamptz DEFAULT now())")
    fleet.query(extra, "CREATE FUNCTION twice(a int) RETURNS int LANGUAGE sql AS 'SELECT 2 * a'")
    scratch = "SELECT datname FROM pg_database WHERE datname LIKE 'fanout\\_scratch\\_%%'"

    code, built = _inspect(fleet, "--reference", "build")

    assert code == EXIT_TARGETS_FAILED
    groups = _groups(built)
    assert groups[(clean,)]["reference"] is True  # equal to what the migration set builds
    assert groups[(clean,)]["fingerprint"] == built["inspection"]["build_fingerprint"]
    assert groups[(extra,)]["compared_with"] == "build"
    assert [x["detail"] for x in groups[(extra,)]["differences"]] == [
        "extra table audit",  # its columns are not listed one by one
        "extra index person_email_idx2 on person (email)",
        "extra function twice(integer) returning integer",  # identified by argument types, as PostgreSQL does
    ]
    assert fleet.query(clean, scratch) == []  # the scratch database is gone

    code, named = _inspect(fleet, "--reference", extra)
    assert code == EXIT_TARGETS_FAILED
    assert [x["detail"] for x in _groups(named)[(clean,)]["differences"]] == [
        "missing table audit",
        "missing index person_email_idx2 on person (email)",
        "missing function twice(integer) returning integer",
    ]
    unknown = fleet.cli("inspect", "--env", "test", "--reference", "nope")
    assert unknown.exit_code == EXIT_CONFIG
    assert "--reference 'nope': no such target" in unknown.stderr


def test_schema_per_tenant_targets_compare_equal_across_schema_names(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    for tenant in ("tenant_a", "tenant_b", "Tenant-3"):
        fleet.query(database, f'CREATE SCHEMA "{tenant}"')
    fleet.publish(SET)
    fleet.write_env(
        extra="[directory.schemas]\nquery = \"SELECT nspname FROM pg_namespace WHERE nspname ILIKE 'tenant%' ORDER BY 1\"\n"
    )
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.query(database, "ALTER TABLE \"Tenant-3\".person ADD COLUMN nickname text DEFAULT 'x'")

    code, report = _inspect(fleet, "--reference", "build")

    assert code == EXIT_TARGETS_FAILED
    groups = _groups(report)
    assert groups[(f"{database}/tenant_a", f"{database}/tenant_b")]["reference"] is True
    (odd,) = [g for g in groups.values() if not g["reference"]]
    assert odd["targets"] == [f"{database}/Tenant-3"]
    assert [x["detail"] for x in odd["differences"]] == ["extra column person.nickname (text DEFAULT 'x'::text)"]
    leftovers = "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'fanout\\_scratch\\_%%'"
    assert fleet.query(database, leftovers) == []  # the scratch schema is dropped


def test_inspect_as_a_select_only_role_writes_nothing_and_waits_for_no_lock(fleet: Fleet) -> None:
    names = fleet.add_databases(2)
    fleet.publish(SET)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    role = "inspector_" + names[0][-6:]
    fleet.query(names[0], f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
    for database in names:
        fleet.query(database, f"REVOKE ALL ON DATABASE {database} FROM PUBLIC")
        fleet.query(database, "REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        fleet.query(database, f"GRANT CONNECT ON DATABASE {database} TO {role}")
        fleet.query(database, f"GRANT USAGE ON SCHEMA public TO {role}")
        fleet.query(database, f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    fleet.write_env([{"id": n, "dsn": fleet.dsn(n, user=role, password=PASSWORD)} for n in names])
    catalog = "SELECT relname, relkind FROM pg_class WHERE relnamespace = 'public'::regnamespace ORDER BY 1"
    writes = "SELECT tup_inserted + tup_updated + tup_deleted FROM pg_stat_database WHERE datname = current_database()"
    before = [fleet.query(n, catalog) for n in names]
    written = [fleet.query(n, writes) for n in names]
    # An apply holding every shard's lock tables exclusively does not hold inspect up.
    holders = [psycopg2.connect(**fleet.postgres.connect_kwargs(n)) for n in names]
    try:
        for holder in holders:
            with holder.cursor() as cursor:
                cursor.execute("LOCK TABLE yoyo_lock, fanout_lock IN ACCESS EXCLUSIVE MODE")
        result = fleet.cli("inspect", "--env", "test", "--format", "json")
    finally:
        for holder in holders:
            holder.close()

    assert result.exit_code == EXIT_OK, result.output
    report = json.loads(result.stdout)
    assert len(report["inspection"]["groups"]) == 1 and report["inspection"]["outliers"] == []
    assert [len(r["applied_before"]) for r in report["results"]] == [3, 3]
    assert [fleet.query(n, catalog) for n in names] == before
    assert [fleet.query(n, writes) for n in names] == written
    # Building the reference needs CREATEDB: one line, and no shard is read.
    refused = fleet.cli("inspect", "--env", "test", "--reference", "build")
    assert refused.exit_code == EXIT_TARGETS_FAILED and refused.stdout == ""
    assert refused.stderr.startswith("fanout: error: --reference build: cannot create the scratch database")
    assert "it needs CREATEDB" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_inspect_through_a_transaction_mode_pooler_reads_each_tenant_and_leaves_no_session_state(
    fleet: Fleet, postgres: EmbeddedPostgres
) -> None:
    (database,) = fleet.add_databases(1)
    for tenant in ("tenant_a", "tenant_b", "tenant_c"):
        fleet.query(database, f"CREATE SCHEMA {tenant}")
    fleet.publish(SET)
    tenants = [
        {"id": f"{database}/{t}", "dsn": fleet.dsn(database), "schema": t} for t in ("tenant_a", "tenant_b", "tenant_c")
    ]
    fleet.write_env(tenants)
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.query(database, "DROP TABLE tenant_c.customer_order")
    fleet.query(database, "DELETE FROM tenant_c._yoyo_migration WHERE migration_id = '003-create-order'")
    fleet.query(database, "CREATE INDEX extra_idx ON tenant_b.person (email)")
    direct = _inspect(fleet)
    with PgBouncer(binary(), postgres, "transaction") as bouncer:
        through = f"postgresql://postgres:${{{PASSWORD_VARIABLE}}}@{bouncer.host}:{bouncer.port}/{database}"
        fleet.write_env([{**t, "dsn": through} for t in tenants])

        code, pooled = _inspect(fleet, "--concurrency", "1")

        pooler = psycopg2.connect(
            host=bouncer.host, port=bouncer.port, dbname=database, user="postgres", password=postgres.password.reveal()
        )
        try:
            with pooler.cursor() as cursor:  # PgBouncer hands out the server session it got back last
                cursor.execute("SELECT current_setting('search_path'), current_setting('statement_timeout')")
                leftover = cursor.fetchone()
        finally:
            pooler.close()

    assert code == direct[0] == EXIT_TARGETS_FAILED
    assert pooled["inspection"]["groups"] == direct[1]["inspection"]["groups"]
    assert [len(r["applied_before"]) for r in pooled["results"]] == [3, 3, 2]  # each tenant's own yoyo table
    assert pooled["inspection"]["outliers"] == [f"{database}/tenant_b"]
    assert leftover == ('"$user", public', "0")


def test_no_secret_in_any_inspect_output(fleet: Fleet) -> None:
    good, wrong = fleet.add_databases(2)
    fleet.query(good, f"CREATE ROLE leaky_inspect LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
    fleet.publish(SET)
    fleet.write_env([{"id": "good", "dsn": fleet.dsn(good)}])
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.write_env(
        [
            {"id": "good", "dsn": fleet.dsn(good, user="leaky_inspect", password=PASSWORD)},
            {"id": "wrong", "dsn": fleet.dsn(wrong, user="leaky_inspect", password=PASSWORD + "x")},
        ]
    )
    outputs = []
    for fmt in ("text", "json", "markdown", "junit", "html"):
        for reference in ("largest", "build"):
            result = fleet.cli("-vv", "inspect", "--env", "test", "--format", fmt, "--reference", reference)
            assert result.exit_code == EXIT_TARGETS_FAILED  # "wrong" cannot be read
            outputs.append(result.output)
    combined = "\n".join(outputs)
    assert "password authentication failed" in combined
    assert PASSWORD not in combined and "Pa55" not in combined


# ---- the pure part: description, differences, grouping ------------------------------------


def _description(*rows: dict, home: str = "public") -> schema.SchemaDescription:  # type: ignore[type-arg]
    return schema.describe(rows, home)


def _column(table: str, name: str, type_: str, home: str = "public", **attrs: object) -> dict:  # type: ignore[type-arg]
    return {"kind": "column", "schema": home, "name": name, "table": table, "attrs": {"type": type_, **attrs}}


def _index(name: str, definition: str, valid: bool = True, home: str = "public") -> dict:  # type: ignore[type-arg]
    attrs = {"definition": definition, "unique": False, "valid": valid}
    return {"kind": "index", "schema": home, "name": name, "table": "person", "attrs": attrs}


def test_tenant_schema_names_are_normalized_away() -> None:
    a = _description(
        _index("i", "CREATE INDEX i ON tenant_a.person USING btree (email)", home="tenant_a"), home="tenant_a"
    )
    b = _description(
        _index("i", 'CREATE INDEX i ON "Tenant-3".person USING btree (email)', home="Tenant-3"), home="Tenant-3"
    )
    other = _description({"kind": "table", "schema": "audit", "name": "log", "table": None, "attrs": {}})
    assert a.fingerprint == b.fingerprint
    assert a.objects[0].get("definition") == "CREATE INDEX i ON person USING btree (email)"
    assert other.objects[0].name == "audit.log"  # outside the home schema, names keep their schema


def test_differences_read_like_a_person_wrote_them() -> None:
    reference_rows = (
        _column("person", "address", "character varying(200)"),
        _column("person", "name", "text", not_null=True),
        _index("person_name_idx", "CREATE INDEX person_name_idx ON public.person USING btree (name)"),
    )
    reference = _description(*reference_rows)
    shard = _description(
        _column("person", "address", "text"),
        _column("person", "name", "text", not_null=True, default="'x'::text"),
        _index("person_name_idx", "CREATE INDEX person_name_idx ON public.person USING btree (name)", valid=False),
        _index("person_email_idx2", "CREATE INDEX person_email_idx2 ON public.person USING btree (email)"),
    )
    assert [d.detail for d in schema.diff(reference, shard)] == [
        "column person.address is text, the reference has character varying(200)",
        "column person.name has default 'x'::text, the reference has none",
        "extra index person_email_idx2 on person (email)",
        "index person_name_idx is INVALID",
    ]
    trigger = {
        "kind": "trigger", "schema": "public", "name": "t", "table": "person",
        "attrs": {"definition": "CREATE TRIGGER t BEFORE INSERT ON public.person FOR EACH ROW EXECUTE FUNCTION f()"},
    }  # fmt: skip
    function = {
        "kind": "function",
        "schema": "public",
        "name": "f(integer)",
        "table": None,
        "attrs": {"returns": "int"},
    }
    assert [d.detail for d in schema.diff(reference, _description(*reference_rows, trigger, function))] == [
        "extra function f(integer) returning int",
        "extra trigger t on person (BEFORE INSERT ON person FOR EACH ROW EXECUTE FUNCTION f())",
    ]
    reverse = [d.detail for d in schema.diff(shard, reference)]
    assert "missing index person_email_idx2 on person (email)" in reverse
    assert "index person_name_idx is valid, the reference's is INVALID" in reverse


def _shard(target: str, migration: str, position: int, *rows: dict) -> schema.ShardSchema:  # type: ignore[type-arg]
    return schema.ShardSchema(target, (schema.VersionPart("app", migration, position),), _description(*rows))


def test_grouping_compares_only_within_a_version_and_breaks_ties_by_directory_order() -> None:
    plain = _column("t", "c", "text")
    wide = _column("t", "c", "bigint")
    shards = [
        _shard("s1", "002", 1, wide),
        _shard("s2", "002", 1, plain),
        _shard("s3", "001", 0, plain),
        _shard("s4", "001", 0),
        _shard("s5", "001", 0),
    ]

    inspection = schema.group(shards)

    assert [(g.id, g.targets, g.reference, g.compared_with) for g in inspection.groups] == [
        (1, ("s1",), True, None),  # a tie at version 002: the first shard in the directory wins
        (2, ("s2",), False, "group 1"),
        (3, ("s4", "s5"), True, None),
        (4, ("s3",), False, "group 3"),
    ]
    assert inspection.outliers == ("s2", "s3")
    named = schema.group(shards, reference="s3")
    assert [g.targets for g in named.groups if g.reference] == [("s1",), ("s3",)]
    assert schema.from_dict(schema.to_dict(inspection)) == inspection


def test_merged_slices_keep_every_outlier_of_every_slice() -> None:
    plain, wide = _column("t", "c", "text"), _column("t", "c", "bigint")
    first = schema.group([_shard("a1", "002", 1, plain), _shard("a2", "002", 1, plain), _shard("a3", "002", 1, wide)])
    second = schema.group([_shard("b1", "002", 1, wide), _shard("b2", "002", 1, wide), _shard("b3", "002", 1, plain)])

    merged = schema.combine([first, second])

    assert merged is not None and merged.outliers == ("a3", "b3")
    assert [(g.id, g.compared_with) for g in merged.groups] == [(1, None), (2, "group 1"), (3, None), (4, "group 3")]
    assert "merged from 2 slices" in merged.notes[-1]
    assert schema.combine([]) is None
