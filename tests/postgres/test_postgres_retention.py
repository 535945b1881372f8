"""Run retention (`defs/retention.py`) on the deploy/dagster.yaml instance in PostgreSQL: the same
history and expectations as tests/test_retention.py on SQLite."""

import contextlib

import dagster as dg
import psycopg2
from conftest import deploy_home
from retention_support import check_retention, days_ago, make_history


def test_old_runs_go_and_every_partitions_latest_materialisation_stays_on_postgres(tmp_path, postgres_env,
                                                                                    monkeypatch):
    for name, value in postgres_env.items():
        monkeypatch.setenv(name, value)
    connection = psycopg2.connect(host=postgres_env["DAGSTER_PG_HOST"], port=postgres_env["DAGSTER_PG_PORT"],
                                  user=postgres_env["DAGSTER_PG_USER"], password=postgres_env["DAGSTER_PG_PASSWORD"],
                                  dbname=postgres_env["DAGSTER_PG_DB"])

    def age(run_ids: list[str], days: int) -> None:
        with connection, connection.cursor() as cursor:
            cursor.execute("UPDATE runs SET create_timestamp = %s, update_timestamp = %s WHERE run_id = ANY(%s)",
                           [days_ago(days).replace(tzinfo=None)] * 2 + [run_ids])
            assert cursor.rowcount == len(run_ids)

    with contextlib.closing(connection), dg.DagsterInstance.from_config(str(deploy_home(tmp_path))) as instance:
        runs = make_history(instance, age)
        check_retention(instance, runs)
