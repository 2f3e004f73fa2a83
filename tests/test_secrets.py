"""A DSN password or token never appears in output, logs, exceptions or repr."""

from __future__ import annotations

import json
import socket
from urllib.parse import quote

import pytest
from conftest import MIGRATIONS, Fleet
from sharding_service import ShardingService

from fanout.config import load_environment
from fanout.directory import Target, masked_dsn
from fanout.errors import EXIT_OK, ConfigError
from fanout.secret import Secret, redact

PASSWORD = "Sup3r-Secret-Pa55"


def test_passwords_never_appear_in_any_output_log_or_error(fleet: Fleet) -> None:
    good, wrong = fleet.add_databases(2)
    fleet.query(good, f"CREATE ROLE leaky LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    fleet.publish({**MIGRATIONS, "004-fails.sql": "-- depends: 003-create-order\nSELECT 1/0;"})
    fleet.write_env(
        [
            {"id": "good", "dsn": fleet.dsn(good, user="leaky", password=PASSWORD)},
            {"id": "wrong", "dsn": fleet.dsn(wrong, user="leaky", password=PASSWORD + "x")},
            {"id": "dead", "dsn": f"postgresql://leaky:{PASSWORD}@127.0.0.1:{dead}/db"},
            {"id": "schema", "dsn": fleet.dsn(good, user="leaky", password=PASSWORD), "schema": "missing_schema"},
        ]
    )

    outputs = []
    for command in ("plan", "apply", "status", "shards"):
        for fmt in ("text", "json"):
            result = fleet.cli("-vv", command, "--env", "test", "--format", fmt)
            outputs.append(result.output)
    process = fleet.spawn("-vv", "apply", "--env", "test")
    stdout, stderr = process.communicate(timeout=60)
    outputs += [stdout, stderr]

    combined = "\n".join(outputs)
    assert "division by zero" in combined  # the failures did happen and were reported
    assert "password authentication failed" in combined
    assert PASSWORD not in combined
    assert "Pa55" not in combined
    env = load_environment("test", search_dir=fleet.environments_dir)
    targets = [Target.from_dsn(t.id, t.dsn.reveal()) for t in env.directory.targets]
    assert PASSWORD not in repr(env) + str(env) + repr(targets) + str(targets)


def test_aws_secret_key_and_session_token_never_appear_in_debug_logs(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore's debug log (-vv) prints every request's canonical form, session token included."""
    fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "Sekr3t-aws-secret-key")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "Sekr3t-aws-session-token")
    process = fleet.spawn("-vv", "plan", "--env", "test")
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-2000:]
    assert "x-amz-security-token:***" in stderr  # the request was logged, its token masked
    assert "Sekr3t" not in stdout + stderr


def test_a_mysql_password_pymysql_cannot_send_fails_the_target_without_a_piece_of_it(fleet: Fleet) -> None:
    """PyMySQL sends passwords as latin-1; its UnicodeEncodeError names the character and its position."""
    fleet.publish(MIGRATIONS)
    fleet.write_env([{"id": "m", "dsn": f"mysql://u:{quote('Sekr3t-€-pw')}@127.0.0.1:1/db"}])
    result = fleet.cli("plan", "--env", "test", "--format", "json")
    assert result.exit_code == 5, result.output
    assert "a character outside latin-1, which PyMySQL cannot send" in result.stdout
    assert "Sekr3t" not in result.output and "\\u20ac" not in result.output and "€" not in result.output


def test_sharding_service_credentials_in_a_url_or_a_tenant_entry_are_never_printed(fleet: Fleet) -> None:
    """An API key in tenants_path is in urllib3's debug log; a tenant entry may carry credentials."""
    with ShardingService() as sharding:
        sharding.state.pages = [["acme", {"tenant": "globex", "db_password": "Sekr3t-db"}]]
        fleet.environments_dir.mkdir(exist_ok=True)
        (fleet.environments_dir / "test.toml").write_text(
            f'services = ["app"]\n[source]\nbucket = "{fleet.bucket}"\nendpoint_url = "{fleet.s3.endpoint_url}"\n'
            f'[directory]\nkind = "http"\nendpoint = "{sharding.url}"\nretries = 0\n'
            'tenants_path = "/tenants?api_key=Sekr3t-key&sort_key=name"\n'
        )
        process = fleet.spawn("-vv", "shards", "--env", "test")
        stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 4, stderr[-2000:]
    assert '"GET /tenants?api_key=***&sort_key=name HTTP/1.1" 200' in stderr  # logged, masked
    assert "holds an entry that is not a tenant id: an object with keys 'tenant', 'db_password'" in stderr
    assert "Sekr3t" not in stdout + stderr


def test_secret_reveals_only_on_request() -> None:
    secret = Secret("tok-abcdef-123")
    assert str(secret) == repr(secret).replace("Secret(", "").replace(")", "").strip("'") == "***"
    assert f"{secret}" == "***"
    assert secret.reveal() == "tok-abcdef-123"
    assert redact("bearer tok-abcdef-123 failed") == "bearer *** failed"


def test_redact_masks_url_passwords_even_when_unregistered() -> None:
    text = "could not connect to postgresql://app:never-registered@db.internal:5432/x"
    assert redact(text) == "could not connect to postgresql://app:***@db.internal:5432/x"
    # An unencoded `@` in the password: masked up to the last `@` of the word, not the first.
    assert redact("(postgresql://app:p@ss@Sekr3t@db/x)") == "(postgresql://app:***@db/x)"
    # JSON and HTML around a URL survive: a `"` or `<` ends the word.
    document = json.dumps({"dsn": "postgresql://db:5432/x", "tenant": "ops@example.com"}, separators=(",", ":"))
    assert redact(document) == document
    assert redact("<td>postgresql://db:5432/x</td><td>a@b</td>") == "<td>postgresql://db:5432/x</td><td>a@b</td>"


def test_redact_masks_key_value_passwords_even_when_unregistered() -> None:
    assert redact("host=db password=Sekr3t dbname=x") == "host=db password=*** dbname=x"
    assert redact("host=db password = 'Sek r3t' dbname=x") == "host=db password = *** dbname=x"
    assert redact("postgresql://u@db/x?sslpassword=Sekr3t&sslmode=require") == (
        "postgresql://u@db/x?sslpassword=***&sslmode=require"
    )
    document = json.dumps({"error": "bad: password=Sekr3t", "n": 1}, separators=(",", ":"))
    assert json.loads(redact(document)) == {"error": "bad: password=***", "n": 1}
    document = json.dumps({"error": 'password="x"', "n": 1}, separators=(",", ":"))
    assert json.loads(redact(document))["n"] == 1  # still JSON


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("shards", "--env", "postgresql://u:Sekr3tPw@h/db"), "does not exist"),
        (("shards", "--env", "postgresql://u:p@Sekr3tPw@h/db"), "does not exist"),
        (("shards", "--env", "test", "postgresql://u:p@Sekr3tPw@h/db"), "unexpected extra argument"),
        (("bootstrap", "--env", "test", "--target", "host=h user=u password=Sekr3tPw"), "not shown"),
        (("unlock", "--env", "test", "--target", "host=h password=Sekr3tPw dbname=d"), "not shown"),
        (("shards", "--env", "test", "--format", "host=h password=a://Sekr3tPw"), "is not one of"),
    ],
)
def test_a_dsn_given_where_a_name_belongs_is_refused_without_its_password(
    fleet: Fleet, args: tuple[str, ...], said: str
) -> None:
    """A DSN passed to --env, as an extra argument or as a --target id is echoed by no error."""
    fleet.add_databases(1)
    fleet.write_env()
    result = fleet.cli(*args)
    assert result.exit_code == 2, result.output
    assert said in result.stderr
    assert "Sekr3t" not in result.output


def test_a_key_value_string_with_a_scheme_inside_is_refused_without_its_password() -> None:
    with pytest.raises(ConfigError, match=r"must start with .* \(got no scheme\)") as caught:
        Target.from_dsn("t", "host=h password=ab://Sekr3t")
    assert "Sekr3t" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"got jdbc:postgresql scheme"):
        Target.from_dsn("t", "jdbc:postgresql://h/db")


SPECIAL = "p%zz/1@2:3?4#5=6-é€-Sekr3t"  # every character that breaks a DSN, unencoded


def test_sql_directory_dsn_with_a_stray_percent_is_refused_with_its_password_masked(fleet: Fleet) -> None:
    (catalog,) = fleet.add_databases(1)
    fleet.environments_dir.mkdir(exist_ok=True)
    (fleet.environments_dir / "test.toml").write_text(
        f'services = ["app"]\n[source]\nbucket = "{fleet.bucket}"\nendpoint_url = "{fleet.s3.endpoint_url}"\n'
        f'[directory]\nkind = "sql"\nquery = "SELECT 1"\n'
        f'dsn = "postgresql://reader:ab%zzSekr3tPass@{fleet.postgres.host}:{fleet.postgres.port}/{catalog}"\n'
    )

    for fmt in ("text", "json"):
        result = fleet.cli("--log-format", fmt, "shards", "--env", "test")
        assert result.exit_code == 2, result.output
        assert "Sekr3tPass" not in result.output and "zzSekr" not in result.output
        assert "'%' that does not start a %XX escape" in result.stderr
        assert "postgresql://reader:***@" in result.stderr


@pytest.mark.parametrize(
    ("words", "problem"),
    [
        ("password=ab cdSekr3tPass", 'missing "=" after "***" in connection info string'),
        ("password=ab Sekr3tPass=x", 'invalid connection option "***"'),
    ],
)
def test_sql_directory_key_value_dsn_libpq_cannot_read_is_refused_without_its_password(
    fleet: Fleet, words: str, problem: str
) -> None:
    """libpq quotes the word it could not read: a password with an unquoted space, its second half."""
    fleet.environments_dir.mkdir(exist_ok=True)
    (fleet.environments_dir / "test.toml").write_text(
        f'services = ["app"]\n[source]\nbucket = "{fleet.bucket}"\nendpoint_url = "{fleet.s3.endpoint_url}"\n'
        f'[directory]\nkind = "sql"\nquery = "SELECT 1"\n'
        f'dsn = "host={fleet.postgres.host} port={fleet.postgres.port} dbname=postgres user=postgres {words}"\n'
    )

    result = fleet.cli("-vv", "shards", "--env", "test")
    assert result.exit_code == 2, result.output
    assert f"directory.dsn: not a valid key=value connection string: {problem}" in result.stderr
    assert "Sekr3t" not in result.output


def test_bootstrap_target_with_an_unencoded_slash_is_refused_and_never_printed(fleet: Fleet) -> None:
    (shard,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    dsn = f"postgresql://postgres:Pa/Sekr3t@{fleet.postgres.host}:{fleet.postgres.port}/{shard}"

    for fmt in ("text", "json", "markdown"):
        result = fleet.cli("bootstrap", "--env", "test", "--target", dsn, "--format", fmt)
        assert result.exit_code == 2, result.output
        assert "Sekr3t" not in result.output
        assert "must be percent-encoded" in result.stderr
    assert fleet.applied(shard) == []


def test_a_password_with_every_special_character_connects_when_percent_encoded(fleet: Fleet) -> None:
    (shard,) = fleet.add_databases(1)
    fleet.query(shard, "CREATE ROLE special_chars LOGIN SUPERUSER PASSWORD %s", (SPECIAL,))
    fleet.publish(MIGRATIONS)
    try:
        fleet.write_env([{"id": "s", "dsn": fleet.dsn(shard, user="special_chars", password=quote(SPECIAL, safe=""))}])
        outputs = [fleet.cli("apply", "--env", "test", "--format", fmt) for fmt in ("text", "json")]
        assert outputs[0].exit_code == EXIT_OK, outputs[0].output
        assert fleet.applied(shard) == ["001-create-person", "002-add-address", "003-create-order"]
        combined = "".join(r.output for r in outputs)
        assert "Sekr3t" not in combined and quote(SPECIAL, safe="") not in combined
    finally:
        fleet.query(shard, "DROP OWNED BY special_chars; DROP ROLE special_chars")


@pytest.mark.parametrize(
    ("dsn", "problem"),
    [
        ("postgresql://u:ab/Sekr3t@h/db", "must be percent-encoded"),
        ("postgresql://u:ab?Sekr3t@h/db", "must be percent-encoded"),
        ("postgresql://u:ab#Sekr3t@h/db", "must be percent-encoded"),
        ("postgresql://u:ab%zSekr3t@h/db", "does not start a %XX escape"),
        ("postgresql://u:ab%ffSekr3t@h/db", "not UTF-8"),
        ("postgresql://u:Sekr3t@[::1/db", "malformed host"),
        ("postgresql://u:Sekr3t@h:5x32/db", "invalid port"),
        ("postgresql://u:Sekr3t@[fe80::zz]/db", "malformed"),
        ("postgresql://u:Sekr3t@h:99999/db", "invalid port"),
        ("postgresql://u:Sekr3t@h/db?sslmode=bogus", "sslmode 'bogus'"),
        ("postgresql://u:Sekr3t@h/db?sslmdoe=require", "unknown connection option 'sslmdoe'"),
        ("postgresql://u@h/db?password=Sekr3t", "put the password in the DSN's user:password@ part"),
        (
            "postgresql://u:Sekr3t@h/" + "d" * 64,
            "the database name has 64 bytes, and PostgreSQL keeps only the first 63",
        ),
        ("postgresql://u:Sekr3t@h/db?schema=" + "%C3%A9" * 32, "the schema name has 64 bytes"),
        ("mysql://u:ab/Sekr3t@h/db", "must be percent-encoded"),
        ("mariadb://u:ab%zSekr3t@h/db", "does not start a %XX escape"),
        ("mysql://u:Sekr3t@h:5x32/db", "invalid port"),
        ("mysql://u:Sekr3t@h/db?schema=s", "has no schemas"),
        ("mysql://u:Sekr3t@h/db?sslmode=require", "unknown connection option 'sslmode'"),
        ("mysql://u:Sekr3t@h/db?ssl_mode=bogus", "ssl_mode 'bogus'"),
        ("mysql://u@h/db?password=Sekr3t", "put the password in the DSN's user:password@ part"),
        ("mysql://u:Sekr3t@h/", "must name a host and a database"),
        ("mysql://u:Sekr3t@h/" + "d" * 65, "at most 64 characters"),
        ("oracle://u:Sekr3t@h/db", "must start with postgresql:// or mysql:// or mariadb://"),
    ],
)
def test_a_dsn_that_cannot_be_parsed_is_refused_with_its_password_masked(dsn: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Target.from_dsn("t", dsn)
    assert problem in str(caught.value)
    assert "Sekr3t" not in str(caught.value)
    assert "Sekr3t" not in redact(dsn)  # and registered: an echo elsewhere is masked too


def test_an_sslpassword_reaches_libpq_and_nothing_else() -> None:
    """libpq's sslpassword (the client key's passphrase) is a secret like the password."""
    target = Target.from_dsn("t", "postgresql://u@h/db?sslpassword=Sekr3t-key&sslmode=require")
    assert "Sekr3t" not in repr(target) + str(target) + target.display
    assert redact("bad passphrase Sekr3t-key") == "bad passphrase ***"
    kwargs = target.libpq_kwargs(application_name="t", connect_timeout=3)
    assert (kwargs["sslpassword"], kwargs["sslmode"]) == ("Sekr3t-key", "require")


def test_a_postgresql_name_of_63_bytes_is_kept_whole() -> None:
    """63 bytes is what the server keeps (NAMEDATALEN - 1); only a longer name is refused."""
    target = Target.from_dsn("t", "postgresql://u@h/" + "d" * 63, schema="\u00e9" * 31 + "s")
    assert (len(target.dbname), len((target.schema or "").encode())) == (63, 63)


def test_masked_dsn_hides_everything_that_may_be_the_password() -> None:
    assert masked_dsn("postgresql://u:a/b?c@d@host:5432/db") == "postgresql://u:***@host:5432/db"
    assert masked_dsn("postgresql://u@host/db?password=x&sslmode=require") == (
        "postgresql://u@host/db?password=***&sslmode=require"
    )


def test_a_mysql_dsn_is_a_mysql_target_whose_password_only_the_driver_sees() -> None:
    target = Target.from_dsn(
        "m", "mariadb://mig%40rator:p%2Fa%40Sekr3t@db-7/tenant_7?ssl_mode=required&charset=utf8mb3"
    )
    assert (target.engine, target.host, target.port, target.dbname, target.user) == (
        "mysql", "db-7", 3306, "tenant_7", "mig@rator",
    )  # fmt: skip
    assert target.server == "db-7:3306"
    assert target.display == "mysql://mig@rator@db-7:3306/tenant_7"
    assert "Sekr3t" not in repr(target) + target.display + redact("p/a@Sekr3t")
    kwargs = target.mysql_kwargs(connect_timeout=3, read_timeout=30, write_timeout=10)
    assert kwargs["password"] == "p/a@Sekr3t"
    assert (kwargs["charset"], kwargs["port"], kwargs["database"]) == ("utf8mb3", 3306, "tenant_7")
    assert kwargs["ssl"].verify_mode.name == "CERT_NONE"  # required: encrypted, certificate not checked
    with pytest.raises(ValueError, match="not a PostgreSQL database"):
        target.libpq_kwargs(application_name="t", connect_timeout=3)
    plain = Target.from_dsn("p", "postgresql://u:Sekr3t@h/db")
    assert plain.engine == "postgresql"
    with pytest.raises(ValueError, match="not a MySQL/MariaDB database"):
        plain.mysql_kwargs(connect_timeout=3, read_timeout=30, write_timeout=10)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", {}),  # PyMySQL's own preferred mode: TLS when the server offers it
        ("?ssl_mode=disabled", {"ssl_disabled": True}),
        ("?ssl_mode=verify_identity", {"check_hostname": True, "verify_mode": "CERT_REQUIRED"}),
        ("?ssl_mode=verify_ca", {"check_hostname": False, "verify_mode": "CERT_REQUIRED"}),
    ],
)
def test_a_mysql_dsn_ssl_mode_reads_as_the_mysql_clients(query: str, expected: dict[str, object]) -> None:
    kwargs = Target.from_dsn("m", f"mysql://u@h:3307/db{query}").mysql_kwargs(
        connect_timeout=3, read_timeout=30, write_timeout=10
    )
    context = kwargs.get("ssl")
    found: dict[str, object] = {"ssl_disabled": True} if kwargs.get("ssl_disabled") else {}
    if context is not None:
        found = {"check_hostname": context.check_hostname, "verify_mode": context.verify_mode.name}
    assert found == expected
    assert kwargs["port"] == 3307 and "password" not in kwargs


def test_a_catalog_dsn_must_be_postgresql() -> None:
    with pytest.raises(ConfigError, match=r"directory\.dsn: DSN must start with postgresql://"):
        Target.from_dsn("catalog", "mysql://u:Sekr3t@h/db", what="directory.dsn", engines=("postgresql",))
