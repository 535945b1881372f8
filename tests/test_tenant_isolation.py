"""Tenant isolation: the ERP answering for the wrong company is refused, stores nothing for that
tenant, and leaves every other tenant as it should be (through Dagster, against the served sandbox)."""

import datetime as dt
import json
from types import SimpleNamespace

import dagster as dg
import httpx
import pytest
from dagster._core.storage.partition_status_cache import get_and_update_asset_status_cache_value
from sandbox_env import tripletex_env

from bench.chaos_runner import Trigger, TriggerMiddleware
from erp_pipelines.defs.build import build_definitions
from erp_pipelines.defs.runs import RANGE_END, RANGE_START
from erp_pipelines.model import add_months, months_between
from erp_pipelines.sandbox.common import serve
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.tripletex import TripletexSandbox
from erp_pipelines.warehouse import Warehouse

THIS_MONTH = dt.date.today().replace(day=1)
FIRST = add_months(THIS_MONTH, -2)
BALANCES = dg.AssetKey(["tripletex", "balances"])
ACCOUNTS = dg.AssetKey(["tripletex", "accounts"])


@pytest.fixture
def world(tmp_path, monkeypatch):
    ledger = generate_ledger(5, first_month=FIRST, last_month=THIS_MONTH)
    sandbox = TripletexSandbox(ledger)
    triggers: list[Trigger] = []
    app = TriggerMiddleware(sandbox.app, sandbox.harness.profile, triggers)
    (tmp_path / "dagster").mkdir()
    with serve(app, path="/v2") as url, dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        env = tripletex_env(sandbox, url, tmp_path, TRIPLETEX_HISTORY_START=FIRST.isoformat())
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        defs = build_definitions(env)
        job = defs.resolve_implicit_global_asset_job_def()
        assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey(["tripletex", "clients"])]).success
        admin = httpx.Client(base_url=url.removesuffix("/v2") + "/_sandbox/tripletex", timeout=10)
        yield SimpleNamespace(ledger=ledger, sandbox=sandbox, defs=defs, job=job, instance=instance, admin=admin,
                              triggers=triggers, warehouse=Warehouse(env["ERP_WAREHOUSE_PATH"]),
                              keys=instance.get_dynamic_partitions("tripletex_tenants"))
        admin.close()


def run_all(w):
    return w.job.execute_in_process(
        instance=w.instance, asset_selection=[ACCOUNTS, BALANCES],
        tags={RANGE_START: w.keys[0], RANGE_END: w.keys[-1]},
        run_config={"ops": {"tripletex__accounts_and_balances": {"config": {"full_sync": True}}}},
        raise_on_error=False,
    )


def stored(w, org):
    balances = w.warehouse.query(
        "SELECT period, account_number, opening, movement, closing, run_id FROM balances "
        "WHERE org_number = ? ORDER BY ALL", [org])
    accounts = w.warehouse.query("SELECT account_number, name, run_id FROM accounts WHERE org_number = ? ORDER BY ALL",
                                 [org])
    return balances, accounts


def truth(tenant):
    return sorted((b.period, b.account_number, b.opening, b.movement, b.closing)
                  for b in tenant.expected_balances(months_between(FIRST, THIS_MONTH)))


def failure_message(result, step="tripletex__accounts_and_balances"):
    event = next(e for e in result.all_events if e.is_step_failure and e.step_key == step)
    return event.step_failure_data.user_failure_data.description


def failed_partitions(w, key):
    value = get_and_update_asset_status_cache_value(w.instance, key, w.defs.resolve_assets_def(key).partitions_def)
    return set(json.loads(value.serialized_failed_partition_subset)["subset"])


def test_a_tenant_answered_for_by_another_company_is_refused_and_stores_nothing(world):
    victim, other = world.ledger.valid_tenants[1], world.ledger.valid_tenants[3]
    world.admin.put(f"/clients/{victim.erp_client_id}/impersonate", json={"as": other.erp_client_id}).raise_for_status()

    result = run_all(world)
    assert not result.success
    message = failure_message(result)
    assert f"{victim.name} (orgnr {victim.org_number}" in message
    assert f"answered for company {other.erp_client_id} (orgnr {other.org_number})" in message
    assert "Fix: check the client's organisation number" in message
    assert stored(world, victim.org_number) == ([], [])  # nothing at all, not the other company's rows
    assert failed_partitions(world, BALANCES) == failed_partitions(world, ACCOUNTS) == {victim.org_number}
    for tenant in world.ledger.valid_tenants:  # everyone else, the impersonated company included, is right
        if tenant is not victim:
            assert [row[:5] for row in stored(world, tenant.org_number)[0]] == truth(tenant)
    error = world.warehouse.query("SELECT last_error FROM clients WHERE org_number = ?", [victim.org_number])[0][0]
    assert "instead of this tenant" in error


def test_an_identity_switch_after_the_guard_refuses_the_data_read_and_keeps_the_previous_rows(world):
    """whoAmI says the right company, then the ERP starts answering for another one while the
    balances are read: the guard after the read catches it; the previous rows stay."""
    assert run_all(world).success
    victim, other = world.ledger.valid_tenants[2], world.ledger.valid_tenants[0]
    before = stored(world, victim.org_number)
    world.triggers.append(Trigger(lambda: world.sandbox.impersonate(victim.erp_client_id, other.erp_client_id),
                                  tenant=str(victim.erp_client_id), path_prefix="/balanceSheet"))

    result = run_all(world)
    assert world.triggers[0].fired
    assert not result.success
    message = failure_message(result)
    assert f"{victim.name} (orgnr {victim.org_number}" in message and "instead of this tenant" in message
    after = stored(world, victim.org_number)
    assert after[0] == before[0]  # balances untouched: the same rows, from the same (first) run
    # (its chart was read before the switch, so it legitimately landed again, unchanged)
    assert [row[:2] for row in after[1]] == [row[:2] for row in before[1]]
    assert [row[:5] for row in before[0]] == truth(victim)
    assert failed_partitions(world, BALANCES) == {victim.org_number}
    for tenant in world.ledger.valid_tenants:
        if tenant is not victim:
            assert [row[:5] for row in stored(world, tenant.org_number)[0]] == truth(tenant)
