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
