"""The files that run fanout elsewhere: docker-compose.yml, the Dockerfile, the CI and Kubernetes recipes.

No Docker engine, GitHub runner or cluster runs here, so these tests check what can be
checked: the compose file validates with `docker-compose config`, environments/compose.toml
names only hosts, ports, buckets and variables the compose file provides, the catalog's SQL
really runs and answers compose.toml's query, and every fanout command line in the recipes
parses with fanout's own CLI.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import yaml
from click.testing import CliRunner
from conftest import REPO, unique
from psycopg2 import sql
from yoyo import read_migrations

from fanout.cli import cli
from fanout.embedded import EmbeddedPostgres
from fanout.engines.mysql import Endpoint, MySQLSession
from fanout.locking import Owner
from fanout.rollout import Slice, Waves
from fanout.secret import Secret

COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_ENV = REPO / "environments" / "compose.toml"
MARIADB_ENV = REPO / "environments" / "compose-mariadb.toml"
MARIADB_SHARD = "shard-mariadb"
WORKFLOW = REPO / "deploy" / "github-actions" / "migrate-fleet.yml"
APPLY_JOB = REPO / "deploy" / "kubernetes" / "fanout-apply-job.yaml"
MERGE_JOB = REPO / "deploy" / "kubernetes" / "fanout-merge-job.yaml"
VARIABLE = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)")


@dataclass(frozen=True)
class Part:
    """One environment of the compose stack: its file, its shard servers, the script making their user."""

    env_file: Path
    flavor: str
    port: int
    init_script: str
    creates_user: str  # what the script runs to make the environment's `user`, up to the user's name

    def shard_servers(self, services: dict[str, Any]) -> list[str]:
        postgresql = self.flavor == "postgresql"
        return [n for n in services if n.startswith("shard-") and (n != MARIADB_SHARD) == postgresql]


PARTS = [
    Part(COMPOSE_ENV, "postgresql", 5432, "init-shard.sh", "CREATE ROLE "),
    Part(MARIADB_ENV, "mariadb", 3306, "init-mariadb-shard.sh", "CREATE USER '"),
]


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment with compose's ${NAME:-default} resolved to its default."""
    env = service.get("environment", {})
    return {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}


def test_docker_compose_config_validates_the_file() -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's package)")
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("part", PARTS, ids=lambda p: p.env_file.stem)
def test_compose_env_names_only_what_the_compose_file_provides(part: Part) -> None:
    services = compose()["services"]
    raw = part.env_file.read_text()
    env = tomllib.loads(raw)
    runner_env = environment_of(services["fanout"])

    # Every variable the environment file reads is set for the fanout containers.
    for name in set(VARIABLE.findall(raw)):
        assert name in runner_env, f"{part.env_file.name} reads ${{{name}}}, which the fanout service does not set"
        assert name in environment_of(services["publish"])

    # The bucket is the one the create-bucket job makes, on the MinIO the endpoint names.
    bucket = env["source"]["bucket"]
    assert f"local/{bucket}" in services["create-bucket"]["entrypoint"]
    endpoint = runner_env["FANOUT_S3_ENDPOINT"]
    assert re.fullmatch(r"http://minio:9000", endpoint)
    assert runner_env["AWS_ACCESS_KEY_ID"] == environment_of(services["minio"])["MINIO_ROOT_USER"]
    assert runner_env["AWS_SECRET_ACCESS_KEY"] == environment_of(services["minio"])["MINIO_ROOT_PASSWORD"]

    # The catalog DSN names the catalog service on PostgreSQL's port, with the password it was given.
    catalog_dsn = env["directory"]["dsn"]
    match = re.fullmatch(r"postgresql://(\w+):\$\{(\w+)\}@([\w-]+):(\d+)/(\w+)", catalog_dsn)
    assert match, catalog_dsn
    user, password_variable, host, port, _database = match.groups()
    assert host in services and port == "5432"
    assert runner_env[password_variable] == environment_of(services[host])[password_variable]
    assert f"CREATE ROLE {user} " in (REPO / "docker" / "init-catalog.sh").read_text()
    # The query reads each row's flavor, so a MySQL row is never taken for a PostgreSQL one.
    assert "flavor" in env["directory"]["query"]

    # Shard credentials: the user the init script creates, with the password every shard server gets.
    assert f"{part.creates_user}{env['directory']['user']}" in (REPO / "docker" / part.init_script).read_text()
    shard_variable = VARIABLE.findall(env["directory"]["password"])[0]
    servers = part.shard_servers(services)
    assert servers
    for name in servers:
        assert environment_of(services[name])[shard_variable] == runner_env[shard_variable]
        assert f"./docker/{part.init_script}:" in services[name]["volumes"][0]
        assert services[name]["healthcheck"]["test"]

    # fanout runs the compose environment, after publish, once every server is healthy.
    assert services["fanout"]["command"][:3] == ["apply", "--env", "compose"]
    assert services["publish"]["command"] == ["publish", "--env", "compose"]
    waits_for = services["fanout"]["depends_on"]
    assert {"publish", "catalog"} <= set(waits_for)
    assert {n for n in services if n.startswith("shard-")} <= set(waits_for)


def test_the_mariadb_shard_server_is_mariadb_11_checked_by_its_own_healthcheck() -> None:
    service = compose()["services"][MARIADB_SHARD]
    assert service["image"] == "mariadb:11"
    assert service["healthcheck"]["test"] == ["CMD", "healthcheck.sh", "--connect", "--innodb_initialized"]
    assert environment_of(service)["MARIADB_ROOT_PASSWORD"]  # the image refuses to initialize without one
    assert service["volumes"] == ["./docker/init-mariadb-shard.sh:/docker-entrypoint-initdb.d/10-init-shard.sh:ro"]
    assert os.access(REPO / "docker" / "init-mariadb-shard.sh", os.X_OK)  # run, not sourced, by the entrypoint


def test_the_catalog_lists_databases_that_the_shard_servers_create(postgres: EmbeddedPostgres) -> None:
    services = compose()["services"]
    catalog = unique("catalog")
    postgres.create_databases([catalog])
    try:
        with postgres.connect(catalog) as connection, connection.cursor() as cursor:
            cursor.execute("CREATE ROLE catalog_reader")
            try:
                cursor.execute((REPO / "docker" / "catalog.sql").read_text())
                answers = {}
                for part in PARTS:
                    env = tomllib.loads(part.env_file.read_text())
                    cursor.execute(env["directory"]["query"], {"env": part.env_file.stem})
                    columns = [c.name for c in cursor.description]
                    answers[part.env_file] = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
            finally:
                cursor.execute("DROP OWNED BY catalog_reader; DROP ROLE catalog_reader")
    finally:
        postgres.drop_databases([catalog])
    for part in PARTS:
        created = {
            name: set(environment_of(services[name])["TENANT_DATABASES"].split())
            for name in part.shard_servers(services)
        }
        rows = answers[part.env_file]
        assert len(rows) == sum(len(databases) for databases in created.values()), part
        for row in rows:
            assert row["host"] in created, row
            assert row["port"] == part.port
            assert row["dbname"] in created[row["host"]], row
            assert row["flavor"] == part.flavor


# What a generated or hand-typed password may hold: both quotes, a backslash, shell syntax.
HOSTILE_PASSWORD = 'it\'s "x" \\ $(false) `false` ;-- '


def test_the_postgres_init_scripts_quote_what_they_are_given(postgres: EmbeddedPostgres, tmp_path: Path) -> None:
    """docker/init-shard.sh and init-catalog.sh, run as the image's entrypoint runs them (psql as the
    superuser), against the suite's PostgreSQL: a password and a database name full of quotes
    become exactly that password and that name."""
    assert postgres.bin_dir is not None
    shard_password, catalog_password = HOSTILE_PASSWORD + "shard", HOSTILE_PASSWORD + "catalog"
    databases = [unique("tenant"), unique('Tenant"Odd')]
    # The image mounts docker/ at /fanout; here the catalog's SQL is read where it is.
    catalog_script = tmp_path / "init-catalog.sh"
    catalog_script.write_text(
        (REPO / "docker" / "init-catalog.sh")
        .read_text()
        .replace("/fanout/catalog.sql", str(REPO / "docker" / "catalog.sql"))
    )
    env = {
        "PATH": f"{postgres.bin_dir}:{os.environ['PATH']}", "PGHOST": postgres.host, "PGPORT": str(postgres.port),
        "PGPASSWORD": postgres.password.reveal(), "POSTGRES_USER": postgres.user,
        "SHARD_PASSWORD": shard_password, "CATALOG_PASSWORD": catalog_password, "TENANT_DATABASES": " ".join(databases),
    }  # fmt: skip
    try:
        for script in (REPO / "docker" / "init-shard.sh", catalog_script):
            made = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=60)
            assert made.returncode == 0, made.stderr
        for user, password, database in [
            ("fanout", shard_password, databases[0]),
            ("fanout", shard_password, databases[1]),
            ("catalog_reader", catalog_password, "catalog"),
        ]:
            login = psycopg2.connect(
                host=postgres.host, port=postgres.port, user=user, password=password, dbname=database
            )
            with contextlib.closing(login), login.cursor() as cursor:
                cursor.execute("SELECT current_database(), current_user")
                assert cursor.fetchone() == (database, user)
        with postgres.connect("postgres") as connection, connection.cursor() as cursor:
            cursor.execute(
                "SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname = ANY(%s)", [databases]
            )
            assert sorted(cursor.fetchall()) == sorted((name, "fanout") for name in databases)
    finally:
        with postgres.connect("postgres") as connection, connection.cursor() as cursor:
            for database in [*databases, "catalog"]:
                cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(database)))
            cursor.execute("DROP ROLE IF EXISTS fanout")
            cursor.execute("DROP ROLE IF EXISTS catalog_reader")


def test_the_mariadb_init_script_makes_a_user_that_applies_the_compose_mariadb_migrations(
    mariadb: Any, tmp_path: Path
) -> None:
    """docker/init-mariadb-shard.sh, run as the image's entrypoint runs it (root over the socket),
    against the suite's MariaDB; then its user applies migrations/*/compose-mariadb/ with fanout's engine."""
    service = compose()["services"][MARIADB_SHARD]
    databases = environment_of(service)["TENANT_DATABASES"].split()
    password = HOSTILE_PASSWORD + secrets.token_urlsafe(12)
    # The image's client finds its server's socket in the image's config; here the suite's server
    # has its own, so the script's `mariadb` is the real client pointed at it (and no my.cnf).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    client = shutil.which("mariadb")
    assert client is not None
    (bin_dir / "mariadb").write_text(f'#!/bin/sh\nexec {client} --no-defaults --socket={mariadb.socket} "$@"\n')
    (bin_dir / "mariadb").chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "TENANT_DATABASES": " ".join(databases), "SHARD_PASSWORD": password,
        "MARIADB_ROOT_PASSWORD": "",
    }  # fmt: skip
    user = tomllib.loads(MARIADB_ENV.read_text())["directory"]["user"]
    try:
        made = subprocess.run(
            ["sh", str(REPO / "docker" / "init-mariadb-shard.sh")], env=env, capture_output=True, text=True, timeout=60
        )
        assert made.returncode == 0, made.stderr
        services = tomllib.loads(MARIADB_ENV.read_text())["services"]
        for database in databases:
            session = MySQLSession(
                Endpoint(mariadb.host, database, user, Secret(password), mariadb.port),
                Owner(pid=os.getpid(), run_id="compose"),
            )
            try:
                with session.lock(wait=30):
                    for service_name in services:  # in the environment's order: billing builds on people
                        folder = REPO / "migrations" / service_name / "compose-mariadb"
                        for migration in sorted(read_migrations(str(folder)), key=lambda m: m.id):
                            assert session.apply(migration)
                    assert len(session.applied()) == 5
            finally:
                session.close()
            with mariadb.admin() as admin, admin.cursor() as cursor:
                cursor.execute(
                    "SELECT table_name, index_name FROM information_schema.statistics WHERE table_schema = %s",
                    (database,),
                )
                indexes = set(cursor.fetchall())
            assert {("person", "person_email_idx"), ("invoice", "invoice_status_idx")} <= indexes
    finally:
        with mariadb.admin() as admin, admin.cursor() as cursor:
            for database in databases:
                cursor.execute(f"DROP DATABASE IF EXISTS `{database}`")
            cursor.execute(f"DROP USER IF EXISTS '{user}'@'%'")


def test_the_dockerfile_is_slim_non_root_and_pinned() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.M)
    assert re.search(r"pip install -c requirements.lock \.", dockerfile)
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


def fanout_command_lines(script: str) -> list[list[str]]:
    """Every `fanout ...` command in a shell script, with CI/shell expressions replaced by sample values."""
    script = re.sub(r"\$\{\{\s*matrix\.slice\s*\}\}", "3", script)
    script = re.sub(r"\$\{\{[^}]*\}\}", "x", script)
    script = script.replace("$((JOB_COMPLETION_INDEX + 1))", "2").replace('"$FANOUT_ENV"', "production")
    commands = []
    for line in re.split(r"\n|&&|;", script.replace("\\\n", " ")):
        words = shlex.split(line, comments=True)
        if words[:1] == ["exec"]:
            words = words[1:]
        if words[:1] == ["fanout"]:
            commands.append(words[1:])
    return commands


def workflow_scripts(workflow: dict[str, Any]) -> list[str]:
    return [str(step["run"]) for job in workflow["jobs"].values() for step in job["steps"] if "run" in step]


def assert_parses(words: list[str]) -> None:
    """fanout's own parser accepts the options (an unknown option or a missing value fails)."""
    result = CliRunner().invoke(cli, [*words, "--help"])
    assert result.exit_code == 0, f"fanout {shlex.join(words)}: {result.output}"
    for option, parse in (("--slice", Slice.parse), ("--waves", Waves.parse)):
        if option in words:
            parse(words[words.index(option) + 1])


def test_the_github_actions_recipe_runs_one_slice_per_matrix_job_then_merges() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    jobs = workflow["jobs"]
    slices = jobs["apply"]["strategy"]["matrix"]["slice"]
    assert jobs["apply"]["strategy"]["fail-fast"] is False
    apply_steps = " ".join(str(step.get("run", "")) for step in jobs["apply"]["steps"])
    assert f"--slice ${{{{ matrix.slice }}}}/{len(slices)}" in apply_steps
    assert slices == list(range(1, len(slices) + 1))
    assert jobs["apply"]["needs"] == "publish"
    assert jobs["report"]["needs"] == "apply" and jobs["report"]["if"] == "always()"
    assert "fanout report merge" in " ".join(str(step.get("run", "")) for step in jobs["report"]["steps"])
    commands = [words for script in workflow_scripts(workflow) for words in fanout_command_lines(script)]
    assert {c[0] for c in commands} == {"publish", "plan", "apply", "report"}
    for words in commands:
        assert_parses(words)


def test_the_kubernetes_recipe_is_an_indexed_job_with_a_merge_step() -> None:
    (job,) = yaml.safe_load_all(APPLY_JOB.read_text())
    spec = job["spec"]
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 4
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    script = " ".join(container["args"])
    assert '--slice "$((JOB_COMPLETION_INDEX + 1))/4"' in script
    assert all("valueFrom" in v or "value" in v for v in container["env"])
    assert not any("PASSWORD" in v["name"] or "TOKEN" in v["name"] for v in container["env"] if "value" in v)
    (words,) = fanout_command_lines(script)
    assert_parses(words)
    release = next(v["value"] for v in container["env"] if v["name"] == "RELEASE")
    report_to = words[words.index("--report-to") + 1].replace("${RELEASE}", release)

    (merge,) = yaml.safe_load_all(MERGE_JOB.read_text())
    args = merge["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["report", "merge"]
    slices_prefix = report_to.rsplit("/", 1)[0] + "/"
    assert slices_prefix in args  # merges the prefix the slices write to ...
    fleet_report = args[args.index("--report-to") + 1]
    assert not fleet_report.startswith(slices_prefix)  # ... and writes outside it, so a rerun reads slices only
    assert_parses(args)
