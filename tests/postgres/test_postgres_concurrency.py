"""Eight concurrent runs over overlapping tenant ranges, each in its own process on the multiprocess
executor, against the deploy/dagster.yaml instance on PostgreSQL: every run succeeds and the
warehouse holds the truth, nothing lost and nothing twice (`concurrency_support.eight_overlapping_runs`)."""

import dagster as dg
import pytest
from concurrency_support import eight_overlapping_runs
from conftest import deploy_home


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eight_concurrent_runs_over_overlapping_tenants_on_postgres(tmp_path, postgres_env, monkeypatch):
    # the storages under concurrent writers are what is tested: the pools' one-step-per-ERP limit
    # would only queue the 16 steps one after another (minutes, on 2 cores)
    home = deploy_home(tmp_path, pool_limit=8)
    run_ids = eight_overlapping_runs(tmp_path, monkeypatch, home, extra_env=postgres_env, timeout=600)
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert {instance.get_run_by_id(run_id).status for run_id in run_ids} == {dg.DagsterRunStatus.SUCCESS}
        # every tenant's balances partition was materialised by several runs; the event log has them all
        assert instance.get_materialized_partitions(dg.AssetKey(["tripletex", "balances"])) == \
            set(instance.get_dynamic_partitions("tripletex_tenants"))
