"""Failures and checks as the Dagster UI shows them, against the served Tripletex sandbox: a failure
event on the failed tenant's partition, a partial success that reads as such, the checks' severities,
what their metadata names, and a blocking check holding back the reporting asset."""

import datetime as dt
import logging

import dagster as dg
from secret_scan import SecretScan
from tripletex_support import materialize_clients, materialize_tenants

from erp_pipelines.cli import main
from erp_pipelines.defs.assets import TENANT_FAILURE_TAG

REPORTING_TRIAL_BALANCE = dg.AssetKey(["reporting", "trial_balance"])  # a dbt model (defs/reporting.py)
BALANCES = dg.AssetKey(["tripletex", "balances"])
ACCOUNTS = dg.AssetKey(["tripletex", "accounts"])


def failure_observations(t, key, partition):
    records = t.instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=10).records
    return [r.asset_observation for r in records if TENANT_FAILURE_TAG in (r.asset_observation.tags or {})]


def materialized_partitions(t, key, run_id):
    records = t.instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=100).records
    return {r.asset_materialization.partition for r in records if r.run_id == run_id}


def secrets_of(t):
    return {"consumer token": t.env["TRIPLETEX_CONSUMER_TOKEN"], "employee token": t.env["TRIPLETEX_EMPLOYEE_TOKEN"]}


def test_a_tenant_without_api_tilgang_gets_a_failure_event_and_the_run_succeeds_for_the_others(tripletex):
    materialize_clients(tripletex)
    keys = tripletex.instance.get_dynamic_partitions("tripletex_tenants")
    blocked = tripletex.ledger.valid_tenants[2]
    tripletex.admin.put(f"/clients/{blocked.erp_client_id}/api-access", json={"enabled": False}).raise_for_status()

    result = materialize_tenants(tripletex, keys[0], keys[-1])

    assert result.success and not any(e.is_step_failure for e in result.all_events)
    landed = set(keys) - {blocked.org_number}
    for key in (ACCOUNTS, BALANCES):
        assert materialized_partitions(tripletex, key, result.run_id) == landed
        (event,) = failure_observations(tripletex, key, blocked.org_number)
        assert event.tags[TENANT_FAILURE_TAG] == "expected"
        metadata = {name: value.value for name, value in event.metadata.items()}
        assert metadata["tenant"] == blocked.name and metadata["org_number"] == blocked.org_number
        assert metadata["error"] == "ClientAccessError"
        assert "Regnskapsførers tilgang and tick API-tilgang" in metadata["fix"]
        assert metadata["outcome"] == "needs API-tilgang"
        assert f"{blocked.name} (orgnr {blocked.org_number}" in event.description
        scan = SecretScan(secrets_of(tripletex))
        scan.text("failure event", repr(event))
        assert scan.findings == []
    for org in landed:
        assert failure_observations(tripletex, BALANCES, org) == []

    logs = tripletex.instance.all_logs(result.run_id)
    summary = f"{len(landed)} of {len(keys)} tripletex tenants loaded; 1 needs API-tilgang"
    warnings = [e.user_message for e in logs if e.level == logging.WARNING and e.step_key == "tripletex__accounts_and_balances"]
    assert any(w.startswith(summary) and blocked.name in w for w in warnings)
    assert not [e for e in logs if e.level >= logging.ERROR and blocked.org_number in e.user_message]
    # the checks speak for the tenants that landed
    evaluations = result.get_asset_check_evaluations()
    assert {e.check_name for e in evaluations} == {"trial_balance", "continuity", "row_arithmetic", "unknown_accounts"}
    assert all(e.passed and e.metadata["tenants_checked"].value == len(landed) for e in evaluations)
    scan = SecretScan(secrets_of(tripletex))
    scan.dagster_instance(tripletex.instance)
    assert scan.findings == []


def test_an_unexpected_failure_fails_the_step_naming_the_tenant_and_the_fix(tripletex):
    materialize_clients(tripletex)
    keys = tripletex.instance.get_dynamic_partitions("tripletex_tenants")
    broken = tripletex.ledger.valid_tenants[1]
    tripletex.sandbox.faults.drop_field("values.*.balanceOut", times=None, path_prefix="/balanceSheet",
                                        tenant=str(broken.erp_client_id))

    result = materialize_tenants(tripletex, keys[0], keys[-1])

    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure and e.step_key == "tripletex__accounts_and_balances")
    description = failure.step_failure_data.user_failure_data.description
    assert description.startswith(f"{len(keys) - 1} of {len(keys)} tripletex tenants loaded; 1 failed (BadResponse)")
    assert f"{broken.name} (orgnr {broken.org_number}" in description and "balanceOut" in description
    (event,) = failure_observations(tripletex, BALANCES, broken.org_number)
    assert event.tags[TENANT_FAILURE_TAG] == "unexpected"
    assert event.metadata["error"].value == "BadResponse" and event.metadata["tenant"].value == broken.name
    assert materialized_partitions(tripletex, BALANCES, result.run_id) == set(keys) - {broken.org_number}
    # one step writes both assets: the broken tenant's chart is not landed either, the others' are
    assert materialized_partitions(tripletex, ACCOUNTS, result.run_id) == set(keys) - {broken.org_number}


def test_a_broken_trial_balance_fails_its_blocking_check_and_holds_back_the_reporting_asset(tripletex):
    materialize_clients(tripletex)
    keys = tripletex.instance.get_dynamic_partitions("tripletex_tenants")
    broken = tripletex.ledger.valid_tenants[3]
    # the sandbox leaves out one balance row of this tenant in every month: its trial balance cannot sum to zero
    tripletex.admin.post("/paging-mutations", json={"path": "/balanceSheet", "action": "remove", "position": 0,
                                                    "after_requests": 0, "tenant": broken.erp_client_id}
                         ).raise_for_status()
    automation = dg.evaluate_automation_conditions(defs=tripletex.defs, instance=tripletex.instance)

    result = materialize_tenants(tripletex, keys[0], keys[-1])

    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure and e.step_key == "tripletex__accounts_and_balances")
    assert "blocking asset check failed" in failure.step_failure_data.error.message
    assert materialized_partitions(tripletex, BALANCES, result.run_id) == set(keys)  # landed; the check says it is wrong
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    severities = {name: (e.severity, e.passed) for name, e in evaluations.items()}
    assert severities == {
        "trial_balance": (dg.AssetCheckSeverity.ERROR, False),
        "row_arithmetic": (dg.AssetCheckSeverity.ERROR, True),
        "continuity": (dg.AssetCheckSeverity.WARN, True),
        "unknown_accounts": (dg.AssetCheckSeverity.WARN, True),
    }
    checks = {spec.name: spec.blocking for spec in tripletex.defs.resolve_assets_def(BALANCES).check_specs}
    assert checks == {"trial_balance": True, "row_arithmetic": True, "continuity": False, "unknown_accounts": False}

    # the metadata names the tenant, the month and the amount furthest off, with a readable table
    sums = tripletex.warehouse.query(
        "SELECT period, sum(opening), sum(movement), sum(closing) FROM balances WHERE org_number = ? "
        "GROUP BY period", [broken.org_number])
    worst_period, *worst_sums = max(sums, key=lambda row: max(abs(v) for v in row[1:]))
    worst_amount = max(worst_sums, key=abs)
    assert worst_amount != 0
    metadata = {name: value.value for name, value in evaluations["trial_balance"].metadata.items()}
    assert metadata["worst_tenant"] == f"{broken.name} (orgnr {broken.org_number})"
    assert metadata["worst_period"] == f"{worst_period:%Y-%m}"
    assert metadata["off_by_nok"] == str(worst_amount)
    assert metadata["tenants_failing"] == 1 and metadata["tenants_checked"] == len(keys)
    assert metadata["violations"] == sum(1 for row in sums if any(row[1:]))
    table = metadata["first_rows"].splitlines()
    assert table[0] == "| tenant | org_number | period | opening | movement | closing |"
    assert table[2].startswith(f"| {broken.name} | {broken.org_number} | ")

    # blocked: the reporting asset is not requested after the failed blocking check
    automation = dg.evaluate_automation_conditions(defs=tripletex.defs, instance=tripletex.instance,
                                                   cursor=automation.cursor)
    assert automation.get_num_requested(REPORTING_TRIAL_BALANCE) == 0
    assert tripletex.instance.get_latest_materialization_event(REPORTING_TRIAL_BALANCE) is None

    # the sandbox answers in full again: the checks pass and the reporting asset follows
    tripletex.admin.delete("/paging-mutations").raise_for_status()
    assert materialize_tenants(tripletex, keys[0], keys[-1]).success
    automation = dg.evaluate_automation_conditions(defs=tripletex.defs, instance=tripletex.instance,
                                                   cursor=automation.cursor)
    assert automation.get_num_requested(REPORTING_TRIAL_BALANCE) == 1
    assert tripletex.job.execute_in_process(instance=tripletex.instance, asset_selection=[REPORTING_TRIAL_BALANCE]).success
    rows = tripletex.warehouse.query(
        "SELECT org_number, count(DISTINCT period), bool_and(opening = 0 AND movement = 0 AND closing = 0) FROM ("
        "  SELECT org_number, period, sum(opening) AS opening, sum(movement) AS movement, sum(closing) AS closing"
        "  FROM reporting.trial_balance WHERE erp = 'tripletex' GROUP BY org_number, period) GROUP BY org_number")
    months = tripletex.warehouse.query("SELECT count(DISTINCT period) FROM balances")[0][0]
    assert sorted(rows) == sorted((org, months, True) for org in keys)


def test_balances_of_a_daily_refreshed_erp_carry_the_schedules_freshness_promise(tripletex):
    spec = next(s for s in tripletex.defs.resolve_assets_def(BALANCES).specs if s.key == BALANCES)
    assert spec.freshness_policy == dg.FreshnessPolicy.time_window(
        fail_window=dt.timedelta(hours=26), warn_window=dt.timedelta(hours=25))


def test_the_command_line_sync_of_a_tenant_without_api_tilgang_exits_with_the_fix(tripletex, capsys):
    materialize_clients(tripletex)
    blocked = tripletex.ledger.valid_tenants[0]
    tripletex.admin.put(f"/clients/{blocked.erp_client_id}/api-access", json={"enabled": False}).raise_for_status()
    assert main(["clients", "sync", "tripletex", blocked.org_number, "--full"]) == 1
    err = capsys.readouterr().err
    assert f"{blocked.name} (orgnr {blocked.org_number}" in err and "tick API-tilgang" in err
