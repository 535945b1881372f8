"""Tripletex end to end through Dagster, against the served sandbox."""

import datetime as dt
import json
from zoneinfo import ZoneInfo

import dagster as dg
from dagster._core.storage.partition_status_cache import get_and_update_asset_status_cache_value
from tripletex_support import (
    HISTORY_START,
    THIS_MONTH,
    landed_balances,
    materialize_clients,
    materialize_tenants,
    truth_balances,
)

from erp_pipelines import quality
from erp_pipelines.defs.assets import tenant_failure_messages
from erp_pipelines.defs.runs import RANGE_END, RANGE_START
from erp_pipelines.model import add_months
from erp_pipelines.sandbox.ledger import CHART

BALANCES = dg.AssetKey(["tripletex", "balances"])


def partition_status(t, key):
    value = get_and_update_asset_status_cache_value(t.instance, key, t.defs.resolve_assets_def(key).partitions_def)
    return (
        set(json.loads(value.serialized_materialized_partition_subset)["subset"]),
        set(json.loads(value.serialized_failed_partition_subset)["subset"]),
    )


def test_clients_register_partitions_and_reject_invalid_numbers(tripletex):
    result = materialize_clients(tripletex)
    assert result.success
    valid = [tn.org_number for tn in tripletex.ledger.valid_tenants]  # and the shared number's holder
    assert tripletex.instance.get_dynamic_partitions("tripletex_tenants") == valid
    rejected = dict(
        tripletex.warehouse.query("SELECT name, status_reason FROM clients WHERE status = 'rejected' ORDER BY name")
    )
    assert set(rejected) == {"Uten Orgnr Testklient", "Feil Kontrollsiffer AS", "Dobbel Registrert Kopi AS"}
    assert rejected["Uten Orgnr Testklient"] == "has no organisation number; it cannot be activated"
    assert "fails the mod-11 check digit" in rejected["Feil Kontrollsiffer AS"]
    holder = next(t for t in tripletex.ledger.tenants if t.name == "Dobbel Registrert AS")
    assert rejected["Dobbel Registrert Kopi AS"].startswith(
        f"organisation number {holder.org_number} is held by tripletex client {holder.erp_client_id} "
        "(Dobbel Registrert AS): both appeared in the same first listing")
    metadata = result.asset_materializations_for_node("tripletex__clients")[0].metadata
    assert metadata["tenants_active"].value == 7 and metadata["tenants_rejected"].value == 3


def test_balances_equal_the_truth_ledger_to_the_ore_and_rerun_is_idempotent(tripletex):
    materialize_clients(tripletex)
    keys = tripletex.instance.get_dynamic_partitions("tripletex_tenants")
    first_run = materialize_tenants(tripletex, keys[0], keys[-1])
    assert first_run.success
    evaluations = {e.check_name: e.passed for e in first_run.get_asset_check_evaluations()}
    assert evaluations == {name: True for name in quality.CHECKS}
    for tenant in tripletex.ledger.valid_tenants:
        assert landed_balances(tripletex.warehouse, tenant.org_number) == truth_balances(tenant)
    snapshot = tripletex.warehouse.query(
        "SELECT org_number, period, account_number, opening, movement, closing FROM balances ORDER BY ALL")
    accounts = tripletex.warehouse.query("SELECT count(*) FROM accounts")
    assert accounts == [(7 * len(CHART),)]

    assert materialize_tenants(tripletex, keys[0], keys[-1]).success
    assert tripletex.warehouse.query(
        "SELECT org_number, period, account_number, opening, movement, closing FROM balances ORDER BY ALL") == snapshot
    assert tripletex.warehouse.query("SELECT count(*) FROM accounts") == accounts
    for name in quality.CHECKS:
        assert quality.run_check(tripletex.warehouse, "tripletex", name) == (0, []), name


def test_default_window_is_previous_and_current_month(tripletex):
    materialize_clients(tripletex)
    first = tripletex.instance.get_dynamic_partitions("tripletex_tenants")[0]
    assert materialize_tenants(tripletex, first, first, full_sync=False).success
    periods = tripletex.warehouse.query("SELECT DISTINCT period FROM balances ORDER BY 1")
    assert periods == [(add_months(THIS_MONTH, -1),), (THIS_MONTH,)]


def test_missing_api_tilgang_skips_only_that_tenant_with_the_fix(tripletex):
    materialize_clients(tripletex)
    keys = tripletex.instance.get_dynamic_partitions("tripletex_tenants")
    blocked = tripletex.ledger.valid_tenants[2]
    tripletex.admin.put(f"/clients/{blocked.erp_client_id}/api-access", json={"enabled": False}).raise_for_status()

    result = materialize_tenants(tripletex, keys[0], keys[-1])
    assert result.success  # a business failure: the client must act, nothing is broken
    observations = [e.asset_observation_data.asset_observation for e in result.all_events if e.is_asset_observation]
    assert {o.asset_key for o in observations} == {dg.AssetKey(["tripletex", "accounts"]), BALANCES}
    (observation,) = [o for o in observations if o.asset_key == BALANCES]
    assert observation.partition == blocked.org_number
    message = observation.description
    assert f"{blocked.name} (orgnr {blocked.org_number}" in message
    assert "Regnskap → Innstillinger → Regnskapsførers tilgang and tick API-tilgang" in message
    assert "Klienttilgang" in message

    materialized, failed = partition_status(tripletex, BALANCES)
    assert failed == set()
    assert materialized == set(keys) - {blocked.org_number}
    assert landed_balances(tripletex.warehouse, blocked.org_number) == []
    for tenant in tripletex.ledger.valid_tenants:
        if tenant is not blocked:
            assert landed_balances(tripletex.warehouse, tenant.org_number) == truth_balances(tenant)
    status = tripletex.warehouse.query("SELECT status, status_reason FROM clients WHERE org_number = ?",
                                       [blocked.org_number])
    assert status[0][0] == "no_api_access" and "API-tilgang" in status[0][1]

    # the client ticks API-tilgang; retrying that tenant alone completes it
    tripletex.admin.put(f"/clients/{blocked.erp_client_id}/api-access", json={"enabled": True}).raise_for_status()
    assert materialize_tenants(tripletex, blocked.org_number, blocked.org_number).success
    assert landed_balances(tripletex.warehouse, blocked.org_number) == truth_balances(blocked)
    assert partition_status(tripletex, BALANCES) == (set(keys), set())
    assert tripletex.warehouse.query("SELECT status FROM clients WHERE org_number = ?",
                                     [blocked.org_number]) == [("active",)]


def test_year_end_backfill_replaces_only_its_window(tripletex):
    materialize_clients(tripletex)
    key = tripletex.instance.get_dynamic_partitions("tripletex_tenants")[0]
    assert materialize_tenants(tripletex, key, key).success
    before = landed_balances(tripletex.warehouse, key)
    assert materialize_tenants(tripletex, key, key, full_sync=False, from_month="2025-09", to_month="2025-10").success
    assert landed_balances(tripletex.warehouse, key) == before
    months = {row[0] for row in before}
    assert min(months) == HISTORY_START and max(months) == THIS_MONTH


def run_sensor(t):
    sensor = t.defs.resolve_sensor_def("tripletex_client_access_sensor")
    return sensor(dg.build_sensor_context(instance=t.instance, definitions=t.defs, resources=t.defs.resources))


def execute(t, request):
    return t.job.execute_in_process(
        instance=t.instance, asset_selection=list(request.asset_selection), tags=request.tags,
        run_config=request.run_config, raise_on_error=False,
    )


def test_client_access_sensor_adds_new_client_and_records_revoked_one(tripletex):
    materialize_clients(tripletex)
    existing = tripletex.instance.get_dynamic_partitions("tripletex_tenants")
    assert materialize_tenants(tripletex, existing[0], existing[-1]).success
    revoked = tripletex.ledger.valid_tenants[1]
    tripletex.admin.post(f"/clients/{revoked.erp_client_id}/revoke").raise_for_status()
    created = tripletex.admin.post("/clients", json={"name": "Nyklient Fjordbruk AS"})
    created.raise_for_status()
    new_org = created.json()["organizationNumber"]

    result = run_sensor(tripletex)

    assert [request.partition_keys for request in result.dynamic_partitions_requests] == [[new_org]]
    assert len(result.run_requests) == 1
    request = result.run_requests[0]
    assert request.tags[RANGE_START] == request.tags[RANGE_END] == new_org
    assert request.run_config == {"ops": {"tripletex__accounts_and_balances": {"config": {"full_sync": True}}}}
    assert set(request.asset_selection) == {dg.AssetKey(["tripletex", "accounts"]), BALANCES}
    revoked_row = tripletex.warehouse.query(
        "SELECT status, revoked_at IS NOT NULL FROM clients WHERE org_number = ?", [revoked.org_number])
    assert revoked_row == [("revoked", True)]
    assert result.asset_events[0].metadata["tenants_revoked"].value == 1
    assert landed_balances(tripletex.warehouse, revoked.org_number) == truth_balances(revoked)  # history kept

    # carry out what the sensor asked for: the new tenant's first full sync lands
    tripletex.instance.add_dynamic_partitions("tripletex_tenants", [new_org])
    assert execute(tripletex, request).success
    new_tenant = tripletex.ledger.by_org_number(new_org)[0]
    assert landed_balances(tripletex.warehouse, new_org) == truth_balances(new_tenant, first=HISTORY_START)
    assert tripletex.instance.get_dynamic_partitions("tripletex_tenants") == existing + [new_org]

    # a second tick with nothing new requests nothing
    again = run_sensor(tripletex)
    assert again.run_requests == [] and again.dynamic_partitions_requests == [] and again.asset_events == []

    # access granted again: a re-sync of that tenant is requested
    tripletex.admin.post(f"/clients/{revoked.erp_client_id}/grant").raise_for_status()
    regranted = run_sensor(tripletex)
    assert [(r.tags[RANGE_START], r.tags[RANGE_END]) for r in regranted.run_requests] == [
        (revoked.org_number, revoked.org_number)]


def test_sensor_requests_first_full_sync_for_registered_but_never_synced_tenants(tripletex):
    materialize_clients(tripletex)  # partitions exist, nothing synced yet
    keys = tripletex.instance.get_dynamic_partitions("tripletex_tenants")
    first = run_sensor(tripletex)
    ranges = [(r.tags[RANGE_START], r.tags[RANGE_END]) for r in first.run_requests]
    assert ranges == [(keys[0], keys[2]), (keys[3], keys[5]), (keys[6], keys[6])]  # ERP_TENANTS_PER_RUN=3
    # the same state gives the same run keys, so the daemon never launches them twice
    assert [r.run_key for r in run_sensor(tripletex).run_requests] == [r.run_key for r in first.run_requests]
    for request in first.run_requests:
        assert execute(tripletex, request).success
    assert run_sensor(tripletex).run_requests == []
    for tenant in tripletex.ledger.valid_tenants:
        assert landed_balances(tripletex.warehouse, tenant.org_number) == truth_balances(tenant)


def test_daily_schedule_covers_active_tenants_in_few_chunked_runs(tripletex):
    materialize_clients(tripletex)
    keys = tripletex.instance.get_dynamic_partitions("tripletex_tenants")
    revoked = tripletex.ledger.valid_tenants[4]
    tripletex.admin.post(f"/clients/{revoked.erp_client_id}/revoke").raise_for_status()
    materialize_clients(tripletex)

    schedule = tripletex.defs.resolve_schedule_def("tripletex_daily_balances")
    assert schedule.execution_timezone == "Europe/Oslo"
    context = dg.build_schedule_context(instance=tripletex.instance, resources=tripletex.defs.resources,
                                       scheduled_execution_time=dt.datetime(2026, 11, 21, 6, tzinfo=ZoneInfo("Europe/Oslo")))
    requests = schedule.evaluate_tick(context).run_requests
    ranges = [(r.tags[RANGE_START], r.tags[RANGE_END]) for r in requests]
    # ERP_TENANTS_PER_RUN=3: tenants 0-2, then 3 (4 is revoked), then 5 and the shared number's holder
    assert ranges == [(keys[0], keys[2]), (keys[3], keys[3]), (keys[5], keys[6])]
    for request in requests:
        run = tripletex.job.execute_in_process(
            instance=tripletex.instance, asset_selection=list(request.asset_selection), tags=request.tags)
        assert run.success
    landed = {row[0] for row in tripletex.warehouse.query("SELECT DISTINCT org_number FROM balances")}
    assert landed == set(keys) - {revoked.org_number}


def test_revoked_tenant_partition_is_skipped_with_a_clear_reason(tripletex):
    materialize_clients(tripletex)
    tenant = tripletex.ledger.valid_tenants[0]
    tripletex.admin.post(f"/clients/{tenant.erp_client_id}/revoke").raise_for_status()
    materialize_clients(tripletex)
    result = materialize_tenants(tripletex, tenant.org_number, tenant.org_number)
    assert result.success and not result.get_asset_materialization_events()
    assert not result.get_asset_check_evaluations()  # nothing landed: no check "passed" over no tenants
    (message,) = set(tenant_failure_messages(result.all_events))  # the same on accounts and balances
    assert f"{tenant.name} (orgnr {tenant.org_number}, tripletex client {tenant.erp_client_id}) is revoked" in message
    assert "Fix: the client must grant the integration access again" in message
