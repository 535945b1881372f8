"""Eight concurrent Dagster runs over overlapping tenants, each on the multiprocess executor, all
writing one warehouse (the DuckDB file, or DuckLake: `warehouse_backend`) and one on-disk Dagster
instance: no lock errors, no lost or duplicated rows."""

import pytest
from concurrency_support import eight_overlapping_runs
from sandbox_env import dagster_home


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eight_concurrent_multiprocess_runs_over_overlapping_tenants(tmp_path, monkeypatch, warehouse_backend):
    assert len(eight_overlapping_runs(tmp_path, monkeypatch, dagster_home(tmp_path))) == 8
