import datetime as dt
from types import SimpleNamespace

import dagster as dg
import httpx
import pytest

from erp_pipelines.defs.build import build_definitions
from erp_pipelines.defs.runs import RANGE_END, RANGE_START
from erp_pipelines.model import months_between
from erp_pipelines.sandbox.common import serve
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.tripletex import TripletexSandbox
from erp_pipelines.warehouse import Warehouse

THIS_MONTH = dt.date.today().replace(day=1)
HISTORY_START = dt.date(2025, 7, 1)


@pytest.fixture
def tripletex(tmp_path, monkeypatch):
    """A served Tripletex sandbox (6 valid tenants + 4 to reject), the environment pointing at it,
    the definitions, a Dagster instance and the warehouse."""
    ledger = generate_ledger(6, first_month=HISTORY_START, last_month=THIS_MONTH)
    sandbox = TripletexSandbox(ledger)
    with serve(sandbox.app, path="/v2") as url, dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        env = {
            "ERP_WAREHOUSE_PATH": str(tmp_path / "warehouse.duckdb"),
            "TRIPLETEX_BASE_URL": url,
            "TRIPLETEX_CONSUMER_TOKEN": sandbox.consumer_token,
            "TRIPLETEX_EMPLOYEE_TOKEN": sandbox.accountant_employee_token,
            "TRIPLETEX_HISTORY_START": HISTORY_START.isoformat(),
            "ERP_TENANTS_PER_RUN": "3",
            "ERP_SOURCES": "tripletex",
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        defs = build_definitions(env)
        admin = httpx.Client(base_url=url.removesuffix("/v2") + "/_sandbox/tripletex", timeout=10)
        yield SimpleNamespace(
            ledger=ledger, sandbox=sandbox, url=url, env=env, defs=defs, instance=instance, admin=admin,
            warehouse=Warehouse(env["ERP_WAREHOUSE_PATH"]), job=defs.resolve_implicit_global_asset_job_def(),
        )
        admin.close()


def materialize_clients(t):
    return t.job.execute_in_process(instance=t.instance, asset_selection=[dg.AssetKey(["tripletex", "clients"])])


def materialize_tenants(t, first, last, *, full_sync=True, raise_on_error=False, **window):
    config = {"full_sync": full_sync, **window}
    return t.job.execute_in_process(
        instance=t.instance,
        asset_selection=[dg.AssetKey(["tripletex", "accounts"]), dg.AssetKey(["tripletex", "balances"])],
        tags={RANGE_START: first, RANGE_END: last},
        run_config={"ops": {"tripletex__balances": {"config": config}}},
        raise_on_error=raise_on_error,
    )


def landed_balances(warehouse, org_number):
    return warehouse.query(
        "SELECT period, account_number, opening, movement, closing FROM balances "
        "WHERE erp = 'tripletex' AND org_number = ? ORDER BY period, account_number",
        [org_number],
    )


def truth_balances(tenant, first=HISTORY_START, last=THIS_MONTH):
    rows = tenant.expected_balances(months_between(first, last))
    return sorted((b.period, b.account_number, b.opening, b.movement, b.closing) for b in rows)
