"""deploy/: the code location image (deploy/Dockerfile) and the values for Dagster's Helm chart
(deploy/helm/values.yaml), checked without a Docker engine or a cluster.

- The Dockerfile's instructions (parsed here) copy files that exist and that its .dockerignore lets
  through, install from uv.lock with the Makefile's uv, and its CMD is a real command: this test
  starts it and lists the code location's jobs through it.
- The Helm values use only keys of the chart's schema (a subset written from the chart's
  values.schema.json models, for the keys these values set), and carry deploy/dagster.yaml's
  queue limits, pools, run monitoring, run retries and tick retention, which Dagster's own config
  validation accepts. (deploy/dagster.yaml itself is loaded in tests/postgres/test_postgres_instance.py.)
- Every environment variable the deployment names is one the code (or Dagster) reads, and every
  variable the deployment needs is named."""

import contextlib
import fnmatch
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import dagster as dg
import jsonschema
import pytest
import yaml
from dagster._core.definitions.run_request import InstigatorType
from postgres_support import free_port

from erp_pipelines.registry import ERPS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
VALUES = DEPLOY / "helm" / "values.yaml"
BIN = Path(sys.executable).parent


# --- the Dockerfile -----------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


def env_assignments(arguments: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in shlex.split(arguments))


def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(relative).parts
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
               or fnmatch.fnmatch(Path(prefix).name, pattern.removeprefix("**/")) for prefix in prefixes):
            ignored = not negated
    return ignored


@pytest.fixture(scope="module")
def dockerfile():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    ignore = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.strip().startswith("#")]
    return instructions, ignore


def test_the_dockerfile_copies_existing_files_and_installs_from_the_lock_file(dockerfile):
    instructions, ignore = dockerfile
    copied = []
    for keyword, arguments in instructions:
        if keyword == "COPY":
            *sources, _ = shlex.split(arguments)
            copied += sources
    assert {"uv.lock", "pyproject.toml", "erp_pipelines"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert not dockerignored(source, ignore), f"COPY {source}: excluded by Dockerfile.dockerignore"
    # what the code reads beside its package at run time (`Path(__file__)...parents[n] / "dir"`) is copied
    beside = set()
    for module in (ROOT / "erp_pipelines").rglob("*.py"):
        for depth, name in re.findall(r"parents\[(\d+)\] / \"(\w+)\"", module.read_text()):
            target = module.resolve().parents[int(depth)] / name
            if target.parent == ROOT:
                beside.add(name)
    assert {"reporting", "specs"} <= beside
    assert beside <= set(copied), f"the image lacks {beside - set(copied)} (read at run time)"
    assert dockerignored("reporting/target/manifest.json", ignore)
    assert dockerignored("erp_pipelines/__pycache__/cli.cpython-311.pyc", ignore)
    assert not dockerignored("erp_pipelines/defs/retention.py", ignore)

    runs = " ".join(arguments for keyword, arguments in instructions if keyword == "RUN")
    makefile_uv = re.search(r"uv==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert f"uv=={makefile_uv}" in runs, "the image's uv differs from the Makefile's"
    assert "uv sync --frozen --no-dev" in runs  # uv.lock as it is, like `make install`
    python = re.search(r"python:(3\.\d+)", dict(instructions)["FROM"]).group(1)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum, below = re.match(r">=3\.(\d+),<3\.(\d+)", requires).groups()
    assert int(minimum) <= int(python.split(".")[1]) < int(below), f"python {python} outside {requires}"


def image_command(instructions) -> list[str]:
    (cmd,) = [arguments for keyword, arguments in instructions if keyword == "CMD"]
    return json.loads(cmd)  # the exec form: no shell between the container and dagster


def test_the_image_serves_the_code_location_with_the_module_of_pyproject_and_workspace(dockerfile):
    command = image_command(dockerfile[0])
    assert command[:3] == ["dagster", "code-server", "start"]
    module = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["dagster"]["module_name"]
    workspace = yaml.safe_load((ROOT / "workspace.yaml").read_text())
    assert workspace["load_from"][0]["python_module"]["module_name"] == module
    assert command[command.index("-m") + 1] == module
    # the chart runs `dagster code-server start -h 0.0.0.0 -p <port> <codeServerArgs>`: the same command
    (deployment,) = yaml.safe_load(VALUES.read_text())["dagster-user-deployments"]["deployments"]
    assert command == ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", str(deployment["port"]),
                       *deployment["codeServerArgs"]]
    assert str(deployment["port"]) in dict(dockerfile[0])["EXPOSE"].split()


@pytest.mark.timeout(600)
def test_the_images_command_serves_the_definitions(dockerfile, tmp_path):
    """The CMD, run here (on 127.0.0.1 and a free port), serves the definitions: `dagster job list`
    over gRPC names the project's jobs."""
    command = image_command(dockerfile[0])
    port = free_port()
    command[command.index("-h") + 1], command[command.index("-p") + 1] = "127.0.0.1", str(port)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("ERP_", "DAGSTER_"))},
           "DAGSTER_HOME": str(tmp_path), "ERP_SOURCES": "saft", "SAFT_DROP_DIR": str(tmp_path),
           "ERP_WAREHOUSE_PATH": str(tmp_path / "warehouse.duckdb"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    log = tmp_path / "code-server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline, listed = time.monotonic() + 480, None
        while time.monotonic() < deadline and server.poll() is None:
            listed = subprocess.run([str(BIN / "dagster"), "job", "list", "--grpc-port", str(port),
                                     "--grpc-host", "127.0.0.1"], check=False, env=env, capture_output=True, text=True)
            if listed.returncode == 0:
                break
            time.sleep(2)
        assert listed is not None and listed.returncode == 0, log.read_text(errors="replace")[-3000:]
        assert "Job: dagster_run_retention" in listed.stdout
        assert "Job: clients_activate" in listed.stdout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


# --- the Helm values ----------------------------------------------------------------------------

def closed(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "additionalProperties": False, "required": list(required)}


INT, BOOL, STR = {"type": "integer"}, {"type": "boolean"}, {"type": "string"}
ENV_LIST = {"type": "array", "items": closed({"name": STR, "value": STR, "valueFrom": {"type": "object"}}, ("name",))}
TAG_LIMIT = closed({"key": STR, "value": {"anyOf": [STR, closed({"applyLimitPerUniqueValue": BOOL})]}, "limit": INT},
                   ("key", "limit"))
TICKS = closed({"purgeAfterDays": {"anyOf": [INT, closed({k: INT for k in ("skipped", "success", "failure", "started")},
                                                         ("skipped", "success", "failure", "started"))]}},
               ("purgeAfterDays",))
# The keys these values set, as the chart's schema (helm/dagster/values.schema.json, from the models in
# helm/dagster/schema) defines them; closed where the chart forbids unknown keys.
CHART_SUBSET = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "global": {"type": "object", "properties": {"postgresqlSecretName": STR}},
        "generatePostgresqlPasswordSecret": BOOL,
        "telemetry": closed({"enabled": BOOL}),
        "postgresql": closed({k: STR for k in ("postgresqlHost", "postgresqlUsername", "postgresqlPassword",
                                               "postgresqlDatabase", "postgresqlScheme")}
                             | {"enabled": BOOL, "service": closed({"port": INT})}),
        "dagster-user-deployments": closed({
            "enabled": BOOL, "enableSubchart": BOOL,
            "deployments": {"type": "array", "minItems": 1, "items": closed({
                "name": STR, "port": INT,
                "image": closed({"repository": STR, "tag": {"type": ["string", "number"]}, "pullPolicy": STR}),
                "codeServerArgs": {"type": "array", "items": STR},
                "includeConfigInLaunchedRuns": closed({"enabled": BOOL}),
                "env": ENV_LIST, "envSecrets": {"type": "array", "items": closed({"name": STR}, ("name",))},
                "volumeMounts": {"type": "array"}, "volumes": {"type": "array"},
                "podSecurityContext": {"type": "object"}, "resources": {"type": "object"},
            }, ("name", "image", "port"))},
        }),
        "runLauncher": closed({"type": {"enum": ["K8sRunLauncher"]}, "config": closed({"k8sRunLauncher": closed({
            "imagePullPolicy": STR, "loadInclusterConfig": BOOL, "envConfigMaps": {"type": "array"},
            "envSecrets": {"type": "array"}, "envVars": {"type": "array", "items": STR},
            "volumeMounts": {"type": "array"}, "volumes": {"type": "array"}, "failPodOnRunFailure": BOOL,
            "resources": {"type": "object"},
        })})}, ("type", "config")),
        "dagsterDaemon": closed({
            "enabled": BOOL,
            "runCoordinator": closed({"enabled": BOOL, "type": {"enum": ["QueuedRunCoordinator"]},
                                      "config": closed({"queuedRunCoordinator": closed({})})}),
            "runMonitoring": {"type": "object"},
            "runRetries": closed({"enabled": BOOL, "maxRetries": INT, "retryOnAssetOrOpFailure": BOOL}, ("enabled",)),
        }),
        "concurrency": closed({
            "enabled": BOOL,
            "pools": closed({"defaultLimit": INT, "granularity": {"enum": ["run", "op"]}}),
            "runs": closed({"maxConcurrentRuns": INT, "tagConcurrencyLimits": {"type": "array", "items": TAG_LIMIT}}),
        }),
        "retention": closed({"enabled": BOOL, "schedule": TICKS, "sensor": TICKS, "autoMaterialize": TICKS},
                            ("enabled", "sensor", "schedule")),
    },
}
# the chart's runMonitoring keys and the dagster.yaml settings it renders them as
RUN_MONITORING = {"enabled": "enabled", "startTimeoutSeconds": "start_timeout_seconds",
                  "cancelTimeoutSeconds": "cancel_timeout_seconds", "pollIntervalSeconds": "poll_interval_seconds",
                  "freeSlotsAfterRunEndSeconds": "free_slots_after_run_end_seconds",
                  "maxResumeRunAttempts": "max_resume_run_attempts"}


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load(VALUES.read_text())


def test_the_helm_values_use_only_the_charts_keys(values):
    jsonschema.validate(values, CHART_SUBSET)
    assert set(values["dagsterDaemon"]["runMonitoring"]) <= set(RUN_MONITORING)
    bad = {**values, "dagsterDaemon": {**values["dagsterDaemon"], "runCoordinator": {
        **values["dagsterDaemon"]["runCoordinator"], "tagConcurrencyLimit": []}}}
    with pytest.raises(jsonschema.ValidationError):  # a misspelt key does not pass
        jsonschema.validate(bad, CHART_SUBSET)


def instance_settings_from_values(values: dict) -> dict:
    """The dagster.yaml settings the chart renders from these values (its configmap-instance template)."""
    daemon, concurrency, retention = values["dagsterDaemon"], values["concurrency"], values["retention"]

    def ticks(section):
        days = section["purgeAfterDays"]
        return {"purge_after_days": days if isinstance(days, int) else dict(days)}

    retries = daemon["runRetries"]
    return {
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator"},
        "concurrency": {
            "pools": {"default_limit": concurrency["pools"]["defaultLimit"],
                      "granularity": concurrency["pools"]["granularity"]},
            "runs": {"max_concurrent_runs": concurrency["runs"]["maxConcurrentRuns"],
                     "tag_concurrency_limits": concurrency["runs"]["tagConcurrencyLimits"]},
        },
        "run_monitoring": {RUN_MONITORING[k]: v for k, v in daemon["runMonitoring"].items()},
        "run_retries": {"enabled": retries["enabled"], "max_retries": retries["maxRetries"],
                        "retry_on_asset_or_op_failure": retries["retryOnAssetOrOpFailure"]},
        "retention": {"schedule": ticks(retention["schedule"]), "sensor": ticks(retention["sensor"]),
                      "auto_materialize": ticks(retention["autoMaterialize"])},
    }


def test_the_helm_values_carry_the_settings_of_deploy_dagster_yaml(values, tmp_path):
    """Both instances, built by Dagster from their settings (SQLite storage here), queue, limit,
    monitor, retry and purge alike. The chart does not render max_runtime_seconds: under the
    K8sRunLauncher, run monitoring checks the run's pod instead."""
    deploy = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    shared = ("run_coordinator", "concurrency", "run_monitoring", "run_retries", "retention")
    instances = {}
    for name, settings in {"deploy": {k: deploy[k] for k in shared}, "helm": instance_settings_from_values(values)}.items():
        home = tmp_path / name
        home.mkdir()
        (home / "dagster.yaml").write_text(yaml.safe_dump({"telemetry": {"enabled": False}, **settings}))
        instances[name] = dg.DagsterInstance.from_config(str(home))  # Dagster's own config validation
    try:
        deploy_instance, helm_instance = instances["deploy"], instances["helm"]
        assert type(helm_instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert helm_instance.get_concurrency_config() == deploy_instance.get_concurrency_config()
        assert helm_instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 8
        for setting in ("start_timeout_seconds", "cancel_timeout_seconds", "poll_interval_seconds",
                        "free_slots_after_run_end_seconds"):
            assert helm_instance.run_monitoring_settings[setting] == deploy_instance.run_monitoring_settings[setting]
        assert helm_instance.run_monitoring_enabled and deploy_instance.run_monitoring_enabled
        assert (helm_instance.run_retries_max_retries, helm_instance.run_retries_retry_on_asset_or_op_failure) == \
            (deploy_instance.run_retries_max_retries, deploy_instance.run_retries_retry_on_asset_or_op_failure) == (2, False)
        for instigator in InstigatorType:  # schedule, sensor, auto-materialize: the same tick history kept
            assert helm_instance.get_tick_retention_settings(instigator) == \
                deploy_instance.get_tick_retention_settings(instigator)
        assert helm_instance.get_tick_retention_settings(InstigatorType.SENSOR) != \
            dg.DagsterInstance.ephemeral().get_tick_retention_settings(InstigatorType.SENSOR)  # not the defaults
    finally:
        for instance in instances.values():
            instance.dispose()


# --- environment variables ----------------------------------------------------------------------

def variables_the_code_reads() -> set[str]:
    """ERP_* names in the package's source, every registered connector's settings and
    <ERP>_HISTORY_START, the DAGSTER_PG_* of deploy/dagster.yaml, and Dagster's DAGSTER_HOME."""
    source = "\n".join(path.read_text() for path in (ROOT / "erp_pipelines").rglob("*.py"))
    names = set(re.findall(r"[\"'](ERP_[A-Z0-9_]+)[\"']", source))
    for spec in ERPS.values():
        names |= {setting.env for setting in spec.connector_class.settings}
        names.add(f"{spec.env_prefix}HISTORY_START")
    names |= set(re.findall(r"\{env: (DAGSTER_[A-Z_]+)\}", (DEPLOY / "dagster.yaml").read_text()))
    return names | {"DAGSTER_HOME"}


def variables_the_deployment_needs() -> set[str]:
    """The DuckLake warehouse, the token store and its key. (The ERPs' variables come as a whole
    secret, `envSecrets`, keyed as in .env.example: ERP names stay out of deploy/.)"""
    return {"ERP_DUCKLAKE_CATALOG", "ERP_DUCKLAKE_DATA_PATH", "ERP_TOKEN_STORE_KEY", "ERP_TOKEN_STORE_PATH"}


def test_the_deployment_names_only_variables_the_code_reads_and_all_it_needs(values, dockerfile):
    code = variables_the_code_reads()
    assert {"ERP_WAREHOUSE_PATH", "ERP_TOKEN_STORE_KEY", "ERP_DUCKLAKE_CATALOG", "DAGSTER_PG_PASSWORD"} <= code
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    named = [entry["name"] for entry in deployment["env"]]
    assert len(named) == len(set(named)), "a variable is named twice"
    named += values["runLauncher"]["config"]["k8sRunLauncher"]["envVars"]
    image = {name for keyword, arguments in dockerfile[0] if keyword == "ENV"
             for name in env_assignments(arguments)}
    image_tools = {"PATH", "PYTHONUNBUFFERED"} | {n for n in image if n.startswith("UV_")}
    assert not set(named) - code, f"the values name variables nothing reads: {set(named) - code}"
    assert not image - image_tools - code, f"the image sets variables nothing reads: {image - image_tools - code}"
    assert "DAGSTER_HOME" in image
    missing = variables_the_deployment_needs() - set(named)
    assert not missing, f"the deployment does not pass {sorted(missing)}"
    for entry in deployment["env"]:  # secrets come from Kubernetes secrets, never as values in the file
        if entry["name"] in ("ERP_TOKEN_STORE_KEY", "ERP_DUCKLAKE_CATALOG", "ERP_DUCKLAKE_DATA_PATH"):
            assert "value" not in entry and entry["valueFrom"]["secretKeyRef"]["key"] == entry["name"], entry
    # the ERPs' variables: one secret made from .env.example's lines (deploy/README.md), whose every
    # variable the code reads, the credentials among them
    (credentials,) = deployment["envSecrets"]
    assert credentials["name"] in VALUES.read_text() and credentials["name"] in (DEPLOY / "README.md").read_text()
    example = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE))
    secrets = {s.env for spec in ERPS.values() for s in spec.connector_class.settings if s.secret}
    assert secrets <= example and not example - code, f"not read by the code: {example - code}"
    # DAGSTER_PG_PASSWORD: the chart sets it in every pod from this secret (the file holds no password)
    assert values["generatePostgresqlPasswordSecret"] is False and values["global"]["postgresqlSecretName"]
    assert values["postgresql"]["postgresqlPassword"] == ""
