"""The files that run fanout elsewhere: docker-compose.yml, the Dockerfile, the CI and Kubernetes recipes.

No Docker engine, GitHub runner or cluster runs here, so these tests check what can be
checked: the compose file validates with `docker-compose config`, environments/compose.toml
names only hosts, ports, buckets and variables the compose file provides, the catalog's SQL
really runs and answers compose.toml's query, and every fanout command line in the recipes
parses with fanout's own CLI.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from conftest import REPO, unique

from fanout.cli import cli
from fanout.embedded import EmbeddedPostgres
from fanout.rollout import Slice, Waves

COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_ENV = REPO / "environments" / "compose.toml"
WORKFLOW = REPO / "deploy" / "github-actions" / "migrate-fleet.yml"
APPLY_JOB = REPO / "deploy" / "kubernetes" / "fanout-apply-job.yaml"
MERGE_JOB = REPO / "deploy" / "kubernetes" / "fanout-merge-job.yaml"
VARIABLE = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)")


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


def test_compose_env_names_only_what_the_compose_file_provides() -> None:
    services = compose()["services"]
    raw = COMPOSE_ENV.read_text()
    env = tomllib.loads(raw)
    runner_env = environment_of(services["fanout"])

    # Every variable the environment file reads is set for the fanout containers.
    for name in set(VARIABLE.findall(raw)):
        assert name in runner_env, f"compose.toml reads ${{{name}}}, which the fanout service does not set"
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

    # Shard credentials: the role init-shard.sh creates, with the password every shard server gets.
    assert f"CREATE ROLE {env['directory']['user']} " in (REPO / "docker" / "init-shard.sh").read_text()
    shard_variable = VARIABLE.findall(env["directory"]["password"])[0]
    for name, service in services.items():
        if name.startswith("shard-"):
            assert environment_of(service)[shard_variable] == runner_env[shard_variable]

    # fanout runs the compose environment, after publish, once every server is healthy.
    assert services["fanout"]["command"][:3] == ["apply", "--env", "compose"]
    assert services["publish"]["command"] == ["publish", "--env", "compose"]
    waits_for = services["fanout"]["depends_on"]
    assert {"publish", "catalog"} <= set(waits_for)
    assert {n for n in services if n.startswith("shard-")} <= set(waits_for)


def test_the_catalog_lists_databases_that_the_shard_servers_create(postgres: EmbeddedPostgres) -> None:
    services = compose()["services"]
    created = {
        name: set(environment_of(service)["TENANT_DATABASES"].split())
        for name, service in services.items()
        if name.startswith("shard-")
    }
    query = tomllib.loads(COMPOSE_ENV.read_text())["directory"]["query"]
    catalog = unique("catalog")
    postgres.create_databases([catalog])
    try:
        with postgres.connect(catalog) as connection, connection.cursor() as cursor:
            cursor.execute("CREATE ROLE catalog_reader")
            try:
                cursor.execute((REPO / "docker" / "catalog.sql").read_text())
                cursor.execute(query, {"env": "compose"})
                columns = [c.name for c in cursor.description]
                rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
            finally:
                cursor.execute("DROP OWNED BY catalog_reader; DROP ROLE catalog_reader")
    finally:
        postgres.drop_databases([catalog])
    assert len(rows) == sum(len(databases) for databases in created.values())
    for row in rows:
        assert row["host"] in created, row
        assert row["port"] == 5432
        assert row["dbname"] in created[row["host"]], row


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
