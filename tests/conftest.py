import os

import pytest

from erp_pipelines.registry import ERPS

PREFIXES = ("ERP_", *(spec.env_prefix for spec in ERPS.values()))
SETTINGS = {s.env for spec in ERPS.values() for s in spec.connector_class.settings}


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch):
    """No test inherits ERP settings from the shell (and so never reaches a real ERP host)."""
    for name in list(os.environ):
        if name.startswith(PREFIXES) or name in SETTINGS:
            monkeypatch.delenv(name, raising=False)
