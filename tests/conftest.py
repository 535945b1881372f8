import os

import pytest
from dagster._core.storage.defs_state.base import set_defs_state_storage

from erp_pipelines.registry import ERPS

PREFIXES = ("ERP_", *(spec.env_prefix for spec in ERPS.values()))
SETTINGS = {s.env for spec in ERPS.values() for s in spec.connector_class.settings}


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch):
    """No test inherits ERP settings from the shell (and so never reaches a real ERP host)."""
    for name in list(os.environ):
        if name.startswith(PREFIXES) or name in SETTINGS:
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _no_dagster_state_storage_from_other_tests():
    """Each test starts without a current Dagster defs-state storage, and leaves none behind: an
    instance entered twice (`with instance:` inside Dagster and in a fixture) leaves its storage
    current after it closed, and once that instance is collected, loading definitions fails with
    "Attempted to resolve undefined DagsterInstance weakref" in whichever test comes next."""
    with set_defs_state_storage(None):
        yield


@pytest.fixture(scope="session")
def postgres_cluster():
    """A running private PostgreSQL cluster (tests/postgres_support.py), shared by the session."""
    from postgres_support import PostgresUnavailable, private_cluster

    try:
        with private_cluster() as cluster:
            yield cluster
    except PostgresUnavailable as error:
        pytest.fail(str(error))


@pytest.fixture(params=["duckdb", "ducklake"])
def warehouse_backend(request, monkeypatch, tmp_path):
    """The warehouse backend a test runs against. "ducklake" sets ERP_DUCKLAKE_CATALOG (a fresh
    catalog database in the private PostgreSQL cluster, its password in PGPASSWORD) and
    ERP_DUCKLAKE_DATA_PATH, so every `Warehouse`, in this process and in the ones it starts, is on it."""
    if request.param == "ducklake":
        from postgres_support import ducklake_env

        for name, value in ducklake_env(request.getfixturevalue("postgres_cluster"), tmp_path / "lake-data").items():
            monkeypatch.setenv(name, value)
    return request.param
