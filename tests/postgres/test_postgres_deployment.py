"""The deployment on PostgreSQL: `dagster-daemon run` and `dagster-webserver` as separate processes
(each in its own process group) on the deploy/dagster.yaml instance.

- The Tripletex client-access sensor's first tick requests the tenants' full syncs; the runs wait in
  the queue, the daemon launches them, they complete, and the rows land. The webserver reads the
  same runs from PostgreSQL.
- A run launched through the webserver loses its run worker to `kill -9`: the run is marked failed,
  and the automatic retry (run_retries) completes it."""

import contextlib
import datetime as dt
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import httpx
import psutil
import pytest
from conftest import deploy_home, free_port
from dagster_graphql import DagsterGraphQLClient
from process_support import process_group
from sandbox_env import tripletex_env

from erp_pipelines.defs.runs import RANGE_END, RANGE_START
from erp_pipelines.model import add_months, months_between
from erp_pipelines.registry import ERPS
from erp_pipelines.sandbox.common import serve
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.tripletex import TripletexSandbox
from erp_pipelines.warehouse import Warehouse

BIN = Path(sys.executable).parent
THIS_MONTH = dt.date.today().replace(day=1)
FIRST = add_months(THIS_MONTH, -1)
TIMEOUT = 480  # seconds: loading definitions and running on a busy 2-core machine
ENV_PREFIXES = ("ERP_", "DAGSTER_", *(spec.env_prefix for spec in ERPS.values()))
SETTINGS = {s.env for spec in ERPS.values() for s in spec.connector_class.settings}


def process_environment(env: dict[str, str]) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIXES) and k not in SETTINGS}
    return {**inherited, **env, "PYTHONUNBUFFERED": "1"}


def wait_for(condition, what: str, logs: list[Path]):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    tails = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in logs)
    pytest.fail(f"timed out waiting for {what}\n{tails}")


def client_access_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return list(instance.get_runs(filters=dg.RunsFilter(tags={"erp/trigger": "client-access"})))


def landed(warehouse: Warehouse, tenant) -> list[tuple]:
    return warehouse.query("SELECT period, account_number, opening, movement, closing FROM balances "
                           "WHERE erp = 'tripletex' AND org_number = ? ORDER BY ALL", [tenant.org_number])


def truth(tenant) -> list[tuple]:
    return sorted((b.period, b.account_number, b.opening, b.movement, b.closing)
                  for b in tenant.expected_balances(months_between(FIRST, THIS_MONTH)) if not b.is_zero)


@contextlib.contextmanager
def deployment(tmp_path: Path, postgres_env: dict[str, str]):
    """A served sandbox (5 tenants), the daemon and the webserver on the Postgres instance, and that
    instance in this process, once the sensor's first runs have finished."""
    ledger = generate_ledger(5, first_month=FIRST, last_month=THIS_MONTH)
    sandbox = TripletexSandbox(ledger)
    home = deploy_home(tmp_path, poll_interval_seconds=2, free_slots_after_run_end_seconds=5)
    with serve(sandbox.app, path="/v2") as url:
        env = process_environment({
            **tripletex_env(sandbox, url, tmp_path, TRIPLETEX_HISTORY_START=FIRST.isoformat(),
                            ERP_TENANTS_PER_RUN="2"),
            **postgres_env, "DAGSTER_HOME": str(home),
        })
        logs = [tmp_path / "daemon.log", tmp_path / "webserver.log"]
        port = free_port()
        with process_group([str(BIN / "dagster-daemon"), "run", "-m", "erp_pipelines.definitions"],
                           env, logs[0], grace_seconds=60) as daemon, \
                process_group([str(BIN / "dagster-webserver"), "-m", "erp_pipelines.definitions",
                               "-h", "127.0.0.1", "-p", str(port)], env, logs[1], grace_seconds=60) as webserver, \
                pytest.MonkeyPatch.context() as patch:
            assert os.getpgid(daemon.pid) != os.getpgid(webserver.pid)
            patch.setenv("DAGSTER_HOME", str(home))
            for name, value in postgres_env.items():
                patch.setenv(name, value)
            with dg.DagsterInstance.get() as instance:
                def finished_runs():
                    runs = client_access_runs(instance)
                    return runs if runs and all(run.is_finished for run in runs) else None

                runs = wait_for(finished_runs, "the sensor's runs to finish", logs)
                yield SimpleNamespace(ledger=ledger, sandbox=sandbox, instance=instance, runs=runs, port=port,
                                      daemon=daemon, logs=logs, warehouse=Warehouse(env["ERP_WAREHOUSE_PATH"]))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_daemon_launches_queued_sensor_runs_and_the_webserver_sees_them(tmp_path, postgres_env):
    with deployment(tmp_path, postgres_env) as d:
        assert len(d.runs) == 3  # 5 tenants in runs of at most 2
        for run in d.runs:
            assert run.status == dg.DagsterRunStatus.SUCCESS, run.run_id
            assert run.tags["erp"] == "tripletex"
            assert d.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_ENQUEUED), \
                "the run did not go through the queued run coordinator"
        assert d.instance.get_dynamic_partitions("tripletex_tenants") == \
            [tenant.org_number for tenant in d.ledger.valid_tenants]

        def webserver_runs():
            with contextlib.suppress(httpx.HTTPError):
                answer = httpx.post(f"http://127.0.0.1:{d.port}/graphql", timeout=30, json={
                    "query": "{ runsOrError { ... on Runs { results { runId status } } } }"})
                if answer.status_code == 200:
                    return answer.json()["data"]["runsOrError"]["results"]
            return None

        seen = {run["runId"]: run["status"] for run in wait_for(webserver_runs, "the webserver", d.logs)}
        assert all(seen.get(run.run_id) == "SUCCESS" for run in d.runs), seen
        for tenant in d.ledger.valid_tenants:
            assert landed(d.warehouse, tenant) == truth(tenant), tenant.name


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_killed_run_worker_is_marked_failed_and_the_automatic_retry_completes_it(tmp_path, postgres_env):
    with deployment(tmp_path, postgres_env) as d:
        instance = d.instance
        tenant = d.ledger.valid_tenants[1]
        d.warehouse.query("DELETE FROM balances WHERE org_number = ?", [tenant.org_number])
        d.sandbox.faults.latency_ms = 1500  # the run is still working when its worker is killed
        client = DagsterGraphQLClient("127.0.0.1", port_number=d.port)
        run_id = client.submit_job_execution(
            "__ASSET_JOB",
            asset_selection=[["tripletex", "accounts"], ["tripletex", "balances"]],
            run_config={"ops": {"tripletex__accounts_and_balances": {"config": {"full_sync": True}}}},
            tags={RANGE_START: tenant.org_number, RANGE_END: tenant.org_number, "erp": "tripletex"},
        )

        def step_started():
            starts = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
            return starts[0].dagster_event.pid if starts else None

        worker = psutil.Process(wait_for(step_started, "the run's first step", d.logs))
        assert worker in psutil.Process(d.daemon.pid).children(recursive=True)  # the daemon launched it
        worker.kill()
        worker.wait(timeout=30)
        d.sandbox.faults.latency_ms = 0

        def finished(wanted_id):
            return lambda: (run := instance.get_run_by_id(wanted_id)) and run.is_finished and run

        # Who notices: the code server (DagsterApiServer) that started the worker process polls it and
        # reports the crash. The monitoring daemon does not: DefaultRunLauncher has no worker health
        # check (`supports_check_run_worker_health` is False; the K8sRunLauncher has one), so for a
        # worker whose code server is gone too, its max_runtime_seconds is the backstop.
        failed = wait_for(finished(run_id), "the dead run worker to be detected", d.logs)
        assert failed.status == dg.DagsterRunStatus.FAILURE
        messages = [event.message for event in instance.all_logs(run_id)]
        crash = f"[DagsterApiServer] Run execution process for {run_id} was terminated by signal 9 (SIGKILL)."
        assert any(message.startswith(crash) for message in messages), "\n".join(messages[-12:])
        assert not any("Detected run worker status" in message for message in messages)  # not run monitoring
        assert not instance.run_launcher.supports_check_run_worker_health
        assert not instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_SUCCESS)

        retry_id = wait_for(lambda: instance.get_run_by_id(run_id).tags.get("dagster/auto_retry_run_id"),
                            "the automatic retry", d.logs)
        retry = wait_for(finished(retry_id), "the retry to finish", d.logs)
        assert retry.status == dg.DagsterRunStatus.SUCCESS
        assert retry.tags[RANGE_START] == tenant.org_number == retry.tags[RANGE_END]
        assert landed(d.warehouse, tenant) == truth(tenant)
