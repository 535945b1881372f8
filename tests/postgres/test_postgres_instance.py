"""deploy/dagster.yaml passes Dagster's own config validation, and its instance keeps runs, the event
log and schedule state in the private PostgreSQL cluster."""

import shutil

import dagster as dg
import psycopg2
from conftest import DEPLOY_CONFIG
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage


def test_deploy_config_loads_with_postgres_storages_queue_and_monitoring(tmp_path, postgres_env, monkeypatch):
    for name, value in postgres_env.items():
        monkeypatch.setenv(name, value)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY_CONFIG, home / "dagster.yaml")

    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
        assert {"key": "erp", "value": {"applyLimitPerUniqueValue": True}, "limit": 4} in limits
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_max_runtime_seconds > 0
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0
        assert instance.run_retries_enabled and instance.run_retries_max_retries > 0
        assert instance.get_settings("retention")["sensor"]["purge_after_days"]["skipped"] > 0

        # a run written through the instance lands in the database named by DAGSTER_PG_DB
        run = instance.create_run_for_job(dg.GraphDefinition(name="noop", node_defs=[]).to_job())
    connection = psycopg2.connect(host=postgres_env["DAGSTER_PG_HOST"], port=postgres_env["DAGSTER_PG_PORT"],
                                  user=postgres_env["DAGSTER_PG_USER"], password=postgres_env["DAGSTER_PG_PASSWORD"],
                                  dbname=postgres_env["DAGSTER_PG_DB"])
    with connection, connection.cursor() as cursor:
        cursor.execute("SELECT pipeline_name FROM runs WHERE run_id = %s", [run.run_id])
        assert cursor.fetchall() == [("noop",)]
    connection.close()
