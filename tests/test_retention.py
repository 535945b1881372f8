"""Run retention (`defs/retention.py`) on a SQLite instance: old finished runs and their events go;
every partition's latest materialisation and observation, and every run in progress, stay.
The same scenario on PostgreSQL: tests/postgres/test_postgres_retention.py."""

import sqlite3

import dagster as dg
import pytest
from retention_support import check_retention, days_ago, make_history, run_retention

from erp_pipelines.defs.build import build_definitions
from erp_pipelines.defs.retention import JOB_NAME, build_run_retention, retention_days
from erp_pipelines.errors import ConfigError


@pytest.fixture
def instance(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance


def age_sqlite(instance: dg.DagsterInstance):
    runs_db = instance.root_directory + "/history/runs.db"

    def age(run_ids: list[str], days: int) -> None:
        when = days_ago(days).replace(tzinfo=None)
        with sqlite3.connect(runs_db) as connection:
            connection.executemany("UPDATE runs SET create_timestamp = ?, update_timestamp = ? WHERE run_id = ?",
                                   [(when, when, run_id) for run_id in run_ids])
    return age


def test_old_runs_go_and_every_partitions_latest_materialisation_stays(instance):
    runs = make_history(instance, age_sqlite(instance))
    check_retention(instance, runs)


def test_retention_zero_deletes_nothing_and_the_schedule_skips(instance):
    runs = make_history(instance, age_sqlite(instance))
    report = run_retention(instance, days=0)
    assert report["runs_deleted"] == 0
    assert instance.get_run_by_id(runs.superseded) is not None

    _, schedule = build_run_retention(0)
    with dg.build_schedule_context(instance=instance) as context:
        assert isinstance(schedule.evaluate_tick(context).skip_message, str)
    _, schedule = build_run_retention(30)
    with dg.build_schedule_context(instance=instance) as context:
        (request,) = schedule.evaluate_tick(context).run_requests
    assert request.run_config["ops"]["delete_old_runs"]["config"]["older_than_days"] == 30


def test_the_retention_days_come_from_the_environment_with_a_clear_error():
    assert retention_days({}) == 90
    assert retention_days({"ERP_RUN_RETENTION_DAYS": "0"}) == 0
    assert retention_days({"ERP_RUN_RETENTION_DAYS": " 30 "}) == 30
    for wrong in ("-1", "ninety", "1.5"):
        with pytest.raises(ConfigError, match="ERP_RUN_RETENTION_DAYS must be a whole number") as error:
            retention_days({"ERP_RUN_RETENTION_DAYS": wrong})
        assert "ERP_RUN_RETENTION_DAYS=90" in str(error.value)


def test_the_definitions_carry_the_retention_job_and_its_daily_schedule(tmp_path):
    defs = build_definitions({"ERP_SOURCES": "saft", "SAFT_DROP_DIR": str(tmp_path),
                              "ERP_WAREHOUSE_PATH": str(tmp_path / "w.duckdb"), "ERP_RUN_RETENTION_DAYS": "45"})
    job = defs.resolve_job_def(JOB_NAME)
    assert job.run_config_schema.config_type is not None
    schedule = defs.resolve_schedule_def(f"{JOB_NAME}_daily")
    assert schedule.job_name == JOB_NAME
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    with pytest.raises(ConfigError, match="ERP_RUN_RETENTION_DAYS"):
        build_definitions({"ERP_SOURCES": "saft", "SAFT_DROP_DIR": str(tmp_path), "ERP_RUN_RETENTION_DAYS": "x"})
