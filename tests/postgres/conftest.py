"""A Dagster home per test that uses deploy/dagster.yaml against a fresh database in the private
PostgreSQL cluster (`postgres_cluster`, tests/conftest.py; the cluster code is tests/postgres_support.py)."""

from pathlib import Path

import pytest
import yaml
from postgres_support import ROOT, free_port  # noqa: F401  (imported by the tests here)

DEPLOY_CONFIG = ROOT / "deploy" / "dagster.yaml"


@pytest.fixture
def postgres_env(postgres_cluster, request):
    """The DAGSTER_PG_* variables for a fresh database in the private cluster."""
    name = postgres_cluster.create_database("dagster")
    return {
        "DAGSTER_PG_HOST": postgres_cluster.host,
        "DAGSTER_PG_PORT": str(postgres_cluster.port),
        "DAGSTER_PG_USER": postgres_cluster.user,
        "DAGSTER_PG_PASSWORD": postgres_cluster.password,
        "DAGSTER_PG_DB": name,
    }


def deploy_home(tmp_path: Path, *, pool_limit: int | None = None, **run_monitoring: int) -> Path:
    """A DAGSTER_HOME whose dagster.yaml is deploy/dagster.yaml, with run monitoring's intervals
    shortened and the pools' step limit raised for a test when given."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = yaml.safe_load(DEPLOY_CONFIG.read_text())
    config["run_monitoring"].update(run_monitoring)
    if pool_limit is not None:
        config["concurrency"]["pools"]["default_limit"] = pool_limit
    config["nux"] = {"enabled": False}
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return home
