import os

import pytest


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch):
    """No test inherits ERP settings from the shell (and so never reaches a real ERP host)."""
    for name in list(os.environ):
        if name.startswith(("TRIPLETEX_", "SAFT_", "ERP_")):
            monkeypatch.delenv(name, raising=False)
