"""Helpers shared by the Dagster tests."""

import datetime as dt

import dagster as dg

from erp_pipelines.defs.runs import RANGE_END, RANGE_START
from erp_pipelines.model import months_between

THIS_MONTH = dt.date.today().replace(day=1)
HISTORY_START = dt.date(2025, 7, 1)


def materialize_clients(t):
    return t.job.execute_in_process(instance=t.instance, asset_selection=[dg.AssetKey(["tripletex", "clients"])])


def materialize_tenants(t, first, last, *, full_sync=True, raise_on_error=False, **window):
    config = {"full_sync": full_sync, **window}
    return t.job.execute_in_process(
        instance=t.instance,
        asset_selection=[dg.AssetKey(["tripletex", "accounts"]), dg.AssetKey(["tripletex", "balances"])],
        tags={RANGE_START: first, RANGE_END: last},
        run_config={"ops": {"tripletex__accounts_and_balances": {"config": config}}},
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
