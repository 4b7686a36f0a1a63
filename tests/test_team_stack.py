"""The team setup of infra/docker-compose.yml, run for real without Docker.

A PostgreSQL cluster of the test's own (Debian's ``postgresql``: ``initdb``/``pg_ctl`` on loopback, a
free port, password auth) backs an ``mlflow server`` started by ``infra/mlflow_server.sh`` (the compose
service's entry point: basic auth, users in the same database) and a ``prefect server`` with its
built-in auth string. ``easyanimate pipeline`` then runs in a throwaway project against both, signed in
the way a team member's machine is (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, ``PREFECT_API_AUTH_STRING``),
and one deployment of ``prefect.yaml`` runs on a process worker.

The fast test checks that the compose file turns both auth mechanisms on from the environment.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.test_deployments import (
    POOL,
    free_port,
    kill_group,
    make_deploy_project,
    project_env,
    run_bounded,
    wait_healthy,
)

BIN = Path(sys.executable).parent
DB_USER = "easy"
DB_PASSWORD = "pg-test-secret"
MLFLOW_ADMIN = ("admin", "mlflow-test-admin-password")
PREFECT_AUTH = "team:prefect-test-auth"
DEPLOYMENT = "new-raw-data"  # curate_flow: reuses the curated records, so it is the quickest real flow


# ------------------------------------------------------------------------------------ fast check
def test_compose_turns_on_mlflow_and_prefect_auth_from_the_environment():
    compose = (REPO / "infra" / "docker-compose.yml").read_text()
    services = yaml.safe_load(compose)["services"]
    prefect_env = services["prefect-server"]["environment"]
    mlflow = services["mlflow"]
    assert prefect_env["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_API_AUTH_STRING:?")
    assert mlflow["command"].split()[0] == "mlflow_server.sh"  # --app-name basic-auth, see the script
    mlflow_env = mlflow["environment"]
    assert mlflow_env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    assert mlflow_env["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("${MLFLOW_FLASK_SERVER_SECRET_KEY:?")
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    # Every secret is required: compose refuses to start without it, so none can silently be empty.
    for name in re.findall(r"\$\{(\w*(?:PASSWORD|SECRET\w*|AUTH_STRING))\b", compose):
        assert re.search(rf"\$\{{{name}:\?", compose) and not re.search(rf"\$\{{{name}(?:\}}|:-)", compose), name
    script = (REPO / "infra" / "mlflow_server.sh").read_text()
    assert "--app-name basic-auth" in script and "MLFLOW_AUTH_CONFIG_PATH" in script
    assert "mlflow_server.sh" in (REPO / "infra" / "mlflow.Dockerfile").read_text()
    example = dict(
        line.split("=", 1) for line in (REPO / "infra" / ".env.example").read_text().splitlines() if "=" in line
    )
    assert re.fullmatch(r"[^:\s]+:\S+", example["PREFECT_API_AUTH_STRING"]), "user:password"
    for key in ("MLFLOW_ADMIN_USERNAME", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert example[key], key


# ------------------------------------------------------------------------------------ PostgreSQL
def postgres_bin() -> Path | None:
    """Debian's server binaries (newest major version), else ones on PATH."""

    def major(path: str) -> int:
        part = Path(path).parents[1].name
        return int(part) if part.isdigit() else 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=major)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).resolve().parent if on_path else None


@dataclass
class Postgres:
    bin: Path
    root: Path
    port: int
    as_user: list[str]

    def url(self, database: str, driver: str) -> str:
        return f"postgresql+{driver}://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def pg_ctl(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def start_postgres() -> Postgres:
    pg_bin = postgres_bin()
    if pg_bin is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL's initdb is missing: .ci/run installs Debian's postgresql")
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    # The server refuses to run as root: as root, the cluster belongs to Debian's `postgres` user.
    root = Path(tempfile.mkdtemp(prefix="easyanimate-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            pytest.fail("running as root needs the `postgres` system user (Debian's postgresql creates it)")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    (root / "pwfile").write_text(DB_PASSWORD + "\n")
    if as_user:
        shutil.chown(root / "pwfile", "postgres", "postgres")
    initdb = subprocess.run(
        [
            *as_user,
            str(pg_bin / "initdb"),
            "-D",
            str(root / "data"),
            "-U",
            DB_USER,
            f"--pwfile={root / 'pwfile'}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--no-sync",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert initdb.returncode == 0, initdb.stdout + initdb.stderr
    pg = Postgres(pg_bin, root, free_port(), as_user)
    # Loopback only, sockets in the cluster's own folder; durability is not what this test is about.
    options = f"-p {pg.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
    started = pg.pg_ctl("-l", str(root / "postgres.log"), "-w", "-t", "60", "-o", options, "start")
    assert started.returncode == 0, started.stdout + started.stderr + _tail(root / "postgres.log")
    env = dict(os.environ, PGPASSWORD=DB_PASSWORD)
    for database in ("mlflow", "prefect"):
        subprocess.run(
            [str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", DB_USER, database],
            env=env,
            check=True,
            timeout=60,
        )
    return pg


def stop_postgres(pg: Postgres) -> None:
    pg.pg_ctl("stop", "-m", "fast", "-w", "-t", "60")
    shutil.rmtree(pg.root, ignore_errors=True)


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"


# ------------------------------------------------------------------------------------ the stack
@dataclass
class Stack:
    pg: Postgres
    mlflow_uri: str
    prefect_api: str
    logs: Path

    def client_env(self, project: Path) -> dict:
        """What a team member's machine sets to use the shared services."""
        return project_env(
            project,
            MLFLOW_TRACKING_URI=self.mlflow_uri,
            MLFLOW_TRACKING_USERNAME=MLFLOW_ADMIN[0],
            MLFLOW_TRACKING_PASSWORD=MLFLOW_ADMIN[1],
            PREFECT_API_URL=self.prefect_api,
            PREFECT_API_AUTH_STRING=PREFECT_AUTH,
        )

    def prefect(self, path: str, body: dict | None = None, auth: str | None = PREFECT_AUTH) -> object:
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.prefect_api}{path}", data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


def _start(args: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # a file, not a pipe nobody reads: a full pipe stalls the server
        return subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("team-stack")
    base_env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_URL"):
        base_env.pop(key, None)
    base_env.pop("PREFECT_API_AUTH_STRING", None)
    pg = start_postgres()
    servers: list[subprocess.Popen] = []
    try:
        mlflow_port, prefect_port = free_port(), free_port()
        # The compose service's entry point, with the test's own credentials.
        servers.append(
            _start(
                [
                    "sh",
                    str(REPO / "infra" / "mlflow_server.sh"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(mlflow_port),
                    "--workers",
                    "1",
                    "--artifacts-destination",
                    str(logs / "mlflow-artifacts"),
                ],
                dict(
                    base_env,
                    MLFLOW_BACKEND_STORE_URI=pg.url("mlflow", "psycopg2"),
                    MLFLOW_AUTH_ADMIN_USERNAME=MLFLOW_ADMIN[0],
                    MLFLOW_AUTH_ADMIN_PASSWORD=MLFLOW_ADMIN[1],
                    MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret-key",
                    MLFLOW_AUTH_CACHE_TTL_SECONDS="60",  # as infra/.env.example: one hash check, not one a request
                ),
                logs / "mlflow.log",
                logs,
            )
        )
        # As the compose service: Postgres backend, auth string on.
        servers.append(
            _start(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                dict(
                    base_env,
                    PREFECT_HOME=str(logs / "prefect-server"),
                    PREFECT_API_DATABASE_CONNECTION_URL=pg.url("prefect", "asyncpg"),
                    PREFECT_SERVER_API_AUTH_STRING=PREFECT_AUTH,
                    PREFECT_API_AUTH_STRING=PREFECT_AUTH,
                    PREFECT_SERVER_ANALYTICS_ENABLED="false",
                ),
                logs / "prefect.log",
                logs,
            )
        )
        stack = Stack(pg, f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api", logs)
        for url, server, log in (
            (f"{stack.mlflow_uri}/health", servers[0], "mlflow.log"),
            (f"{stack.prefect_api}/health", servers[1], "prefect.log"),
        ):
            try:
                wait_healthy(url, server, timeout=180)
            except (RuntimeError, TimeoutError) as exc:
                raise AssertionError(f"{exc}\n{_tail(logs / log)}") from exc
        yield stack
    finally:
        for server in servers:
            kill_group(server)
        stop_postgres(pg)


@pytest.fixture(scope="module")
def pipeline_project(stack, tmp_path_factory):
    """``easyanimate pipeline`` in a throwaway project (test_e2e's FAST params, cut further) against the stack."""
    project = make_deploy_project(tmp_path_factory.mktemp("team-project") / "project", new_video=False)
    began = time.perf_counter()
    proc = run_bounded(
        [str(BIN / "easyanimate"), "pipeline", "--no-version-data"], project, stack.client_env(project), timeout=1200
    )
    seconds = time.perf_counter() - began
    assert proc.returncode == 0, (
        proc.stdout[-4000:] + proc.stderr[-8000:] + "\n--- mlflow server\n" + _tail(stack.logs / "mlflow.log")
    )
    print(f"pipeline against the team stack: {seconds:.1f} s")
    return project, proc


# ------------------------------------------------------------------------------------ slow tests
@pytest.mark.slow
def test_services_on_postgres_refuse_requests_without_credentials(stack):
    for request in (
        urllib.request.Request(f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"),
        urllib.request.Request(
            f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1",
            headers={"Authorization": "Basic " + base64.b64encode(b"admin:wrong").decode()},
        ),
    ):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 401
    for auth in (None, "team:wrong"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            stack.prefect("/flows/filter", {}, auth=auth)
        assert refused.value.code == 401
    assert isinstance(stack.prefect("/flows/filter", {}), list)  # signed in: answered
    # Both really keep their state in PostgreSQL.
    env = dict(os.environ, PGPASSWORD=DB_PASSWORD)
    tables = {}
    for database in ("mlflow", "prefect"):
        out = subprocess.run(
            [str(stack.pg.bin / "psql"), "-h", "127.0.0.1", "-p", str(stack.pg.port), "-U", DB_USER, "-d", database]
            + ["-Atc", "select tablename from pg_tables where schemaname = 'public'"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.split()
        tables[database] = set(out)
    assert {"experiments", "runs", "registered_models", "users"} <= tables["mlflow"]
    assert {"flow", "flow_run", "deployment"} <= tables["prefect"]


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first of these runs the pipeline (fixture time counts)
def test_pipeline_tracks_and_registers_on_the_team_servers(stack, pipeline_project, monkeypatch):
    from mlflow.tracking import MlflowClient

    from easyanimate.config import load_settings

    project, proc = pipeline_project
    settings = load_settings(project / "params.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_ADMIN[1])
    client = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    name = settings.registry.model_name
    assert f"registered model: models:/{name}/1" in proc.stdout + proc.stderr
    version = client.get_model_version(name, "1")
    assert version.status == "READY" and version.aliases, "registered, and given the promotion's alias"

    experiment = client.get_experiment_by_name(settings.registry.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.artifact_uri.startswith("mlflow-artifacts:"), "artifacts go through the server"
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {"curate", "vae_stage1", "dit_stage1", "lora", "evaluate", "register"} <= children
    assert client.get_run(version.run_id).data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    for local in ("mlflow.db", "mlruns", "mlartifacts"):
        assert not (project / local).exists(), f"{local}: nothing may go to a local store"

    # The flow ran on the team's Prefect server, not on a temporary one.
    flows = {f["id"]: f["name"] for f in stack.prefect("/flows/filter", {})}
    pipeline_runs = [r for r in stack.prefect("/flow_runs/filter", {}) if flows.get(r["flow_id"]) == "pipeline"]
    assert [r["state"]["type"] for r in pipeline_runs] == ["COMPLETED"]
    assert "Starting temporary server" not in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first of these runs the pipeline (fixture time counts)
def test_a_deployment_runs_on_a_worker_against_the_team_servers(stack, pipeline_project, monkeypatch):
    project, _ = pipeline_project
    env = stack.client_env(project)

    def prefect_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        proc = run_bounded([str(BIN / "prefect"), *args], project, env, timeout=timeout)
        assert proc.returncode == 0, f"prefect {' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    prefect_cli("work-pool", "create", POOL, "--type", "process")
    prefect_cli("--no-prompt", "deploy", "--name", DEPLOYMENT)
    deployments = stack.prefect("/deployments/filter", {})
    assert [d["name"] for d in deployments] == [DEPLOYMENT]
    queued = prefect_cli("deployment", "run", f"curate/{DEPLOYMENT}")
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", queued.stdout).group(1)

    worker = run_bounded(
        [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--run-once"], project, env, timeout=420
    )
    state = stack.prefect(f"/flow_runs/{flow_run_id}")["state"]
    assert state["type"] == "COMPLETED", f"{state}\n{worker.stdout[-6000:]}\n{worker.stderr[-6000:]}"

    # The flow run signed in to MLflow too: its curate run sits beside the pipeline's.
    from mlflow.tracking import MlflowClient

    from easyanimate.config import load_settings

    settings = load_settings(project / "params.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_ADMIN[1])
    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    experiment = client.get_experiment_by_name(settings.registry.experiment)
    curate_runs = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'curate'")
    assert len(curate_runs) == 2, [r.data.tags for r in curate_runs]
