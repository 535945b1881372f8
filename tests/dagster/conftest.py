from types import SimpleNamespace

import dagster as dg
import httpx
import pytest
from sandbox_env import tripletex_env
from tripletex_support import HISTORY_START, THIS_MONTH

from erp_pipelines.defs.build import build_definitions
from erp_pipelines.sandbox.common import serve
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.tripletex import TripletexSandbox
from erp_pipelines.warehouse import Warehouse


@pytest.fixture
def tripletex(tmp_path, monkeypatch):
    """A served Tripletex sandbox (6 valid tenants + 4 to reject), the environment pointing at it,
    the definitions, a Dagster instance and the warehouse."""
    ledger = generate_ledger(6, first_month=HISTORY_START, last_month=THIS_MONTH)
    sandbox = TripletexSandbox(ledger)
    with serve(sandbox.app, path="/v2") as url, dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        env = tripletex_env(sandbox, url, tmp_path, TRIPLETEX_HISTORY_START=HISTORY_START.isoformat(),
                            ERP_TENANTS_PER_RUN="3")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        defs = build_definitions(env)
        admin = httpx.Client(base_url=url.removesuffix("/v2") + "/_sandbox/tripletex", timeout=10)
        yield SimpleNamespace(
            ledger=ledger, sandbox=sandbox, url=url, env=env, defs=defs, instance=instance, admin=admin,
            warehouse=Warehouse(env["ERP_WAREHOUSE_PATH"]), job=defs.resolve_implicit_global_asset_job_def(),
        )
        admin.close()
