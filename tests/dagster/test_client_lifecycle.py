"""Client management through Dagster, against the served Tripletex sandbox: the client jobs, the
schedule and the sensor honouring inactive clients, a not-active partition's failure message and
`erp-pipelines clients sync ERP ORGNR --full`."""

import datetime as dt
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
from tripletex_support import (
    HISTORY_START,
    THIS_MONTH,
    landed_balances,
    materialize_clients,
    materialize_tenants,
    truth_balances,
)

from erp_pipelines import clients
from erp_pipelines.cli import main
from erp_pipelines.defs.assets import tenant_failure_messages
from erp_pipelines.defs.clients import LAUNCHED_BY, run_full_sync
from erp_pipelines.defs.runs import RANGE_END, RANGE_START
from erp_pipelines.model import ClientStatus


def run_sensor(t):
    sensor = t.defs.resolve_sensor_def("tripletex_client_access_sensor")
    return sensor(dg.build_sensor_context(instance=t.instance, definitions=t.defs, resources=t.defs.resources))


def run_schedule(t):
    schedule = t.defs.resolve_schedule_def("tripletex_daily_balances")
    context = dg.build_schedule_context(instance=t.instance, resources=t.defs.resources,
                                       scheduled_execution_time=dt.datetime(2026, 11, 21, 6, tzinfo=ZoneInfo("Europe/Oslo")))
    return schedule.evaluate_tick(context).run_requests


def covered(t, requests):
    """The tenants a list of range run requests covers, in partition order."""
    keys = t.instance.get_dynamic_partitions("tripletex_tenants")
    tenants = []
    for request in requests:
        first, last = keys.index(request.tags[RANGE_START]), keys.index(request.tags[RANGE_END])
        tenants += keys[first:last + 1]
    return tenants


def run_client_job(t, name, config, *, launched_by="kari"):
    return t.defs.resolve_job_def(name).execute_in_process(
        instance=t.instance, run_config={"ops": {next(iter(NODES[name])): {"config": config}}},
        tags={LAUNCHED_BY: launched_by}, raise_on_error=False,
    )


NODES = {"clients_activate": ["activate_clients"], "clients_deactivate": ["deactivate_clients"],
         "clients_purge": ["purge_tenant"]}


def shared_pair(ledger):
    holder = next(t for t in ledger.tenants if t.name == "Dobbel Registrert AS")
    copy = next(t for t in ledger.tenants if t.name == "Dobbel Registrert Kopi AS")
    return holder, copy


def test_same_first_listing_lower_id_holds_and_the_activate_job_moves_the_number(tripletex):
    holder, copy = shared_pair(tripletex.ledger)
    assert holder.erp_client_id < copy.erp_client_id
    assert materialize_clients(tripletex).success
    by_id = {c.erp_client_id: c for c in tripletex.warehouse.clients("tripletex")}
    assert by_id[str(holder.erp_client_id)].status == ClientStatus.ACTIVE
    assert by_id[str(copy.erp_client_id)].status == ClientStatus.REJECTED
    assert f"held by tripletex client {holder.erp_client_id} (Dobbel Registrert AS)" in \
        by_id[str(copy.erp_client_id)].status_reason
    assert holder.org_number in tripletex.instance.get_dynamic_partitions("tripletex_tenants")

    result = run_client_job(tripletex, "clients_activate", {"erp": "tripletex", "org_number": copy.org_number,
                                                            "client_id": str(copy.erp_client_id)})
    assert result.success
    assert result.dagster_run.tags[LAUNCHED_BY] == "kari"
    by_id = {c.erp_client_id: c for c in tripletex.warehouse.clients("tripletex")}
    assert by_id[str(copy.erp_client_id)].status == ClientStatus.ACTIVE
    assert by_id[str(holder.erp_client_id)].status == ClientStatus.INACTIVE
    assert {(a["action"], a["actor"]) for a in tripletex.warehouse.audit("tripletex")} == {
        ("activate", "kari"), ("deactivate", "kari")}
    assert materialize_clients(tripletex).success  # a refresh keeps the user's choice
    assert {c.erp_client_id: c.status for c in tripletex.warehouse.clients("tripletex")}[str(copy.erp_client_id)] \
        == ClientStatus.ACTIVE


def test_a_refused_client_job_fails_naming_the_client_and_the_fix(tripletex):
    materialize_clients(tripletex)
    bad = next(t for t in tripletex.ledger.tenants if t.name == "Feil Kontrollsiffer AS")
    result = run_client_job(tripletex, "clients_activate", {"erp": "tripletex", "org_number": bad.org_number})
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.user_failure_data.description
    assert "Feil Kontrollsiffer AS" in message and "mod-11" in message and "Fix:" in message
    result = run_client_job(tripletex, "clients_purge", {"erp": "tripletex", "org_number": bad.org_number})
    assert not result.success  # confirm is required


def test_inactive_clients_get_no_scheduled_or_sensor_runs(tripletex):
    materialize_clients(tripletex)
    off = tripletex.ledger.valid_tenants[1]
    result = run_client_job(tripletex, "clients_deactivate", {"erp": "tripletex", "org_number": off.org_number})
    assert result.success
    keys = tripletex.instance.get_dynamic_partitions("tripletex_tenants")
    assert off.org_number in keys  # the partition and its history stay

    scheduled = covered(tripletex, run_schedule(tripletex))
    assert off.org_number not in scheduled and set(scheduled) == set(keys) - {off.org_number}
    sensed = run_sensor(tripletex)
    assert off.org_number not in covered(tripletex, sensed.run_requests)
    assert set(covered(tripletex, sensed.run_requests)) == set(keys) - {off.org_number}

    clients.deactivate(tripletex.warehouse, "tripletex", all_clients=True)
    assert run_sensor(tripletex).run_requests == []
    skipped = tripletex.defs.resolve_schedule_def("tripletex_daily_balances").evaluate_tick(
        dg.build_schedule_context(instance=tripletex.instance, resources=tripletex.defs.resources))
    assert skipped.run_requests == [] and "clients activate tripletex" in skipped.skip_message


def test_with_auto_activate_false_the_sensor_waits_for_activation_then_syncs_in_full(tripletex, monkeypatch):
    monkeypatch.setenv("ERP_AUTO_ACTIVATE", "false")
    first = run_sensor(tripletex)
    assert first.run_requests == []
    keys = tripletex.instance.get_dynamic_partitions("tripletex_tenants")
    assert keys == []  # the sensor hands partitions back as requests
    added = first.dynamic_partitions_requests[0].partition_keys
    tripletex.instance.add_dynamic_partitions("tripletex_tenants", added)
    held = {c.org_number: c.status for c in tripletex.warehouse.clients("tripletex") if c.status != "rejected"}
    assert set(held) == set(added) and set(held.values()) == {"inactive"}

    chosen = tripletex.ledger.valid_tenants[2]
    clients.activate(tripletex.warehouse, "tripletex", chosen.org_number)
    (request,) = run_sensor(tripletex).run_requests
    assert (request.tags[RANGE_START], request.tags[RANGE_END]) == (chosen.org_number, chosen.org_number)
    assert request.run_config == {"ops": {"tripletex__accounts_and_balances": {"config": {"full_sync": True}}}}


def test_a_partition_that_is_not_active_is_skipped_naming_the_client_its_status_and_the_fix(tripletex):
    materialize_clients(tripletex)
    tenant = tripletex.ledger.valid_tenants[0]
    clients.deactivate(tripletex.warehouse, "tripletex", tenant.org_number)
    result = materialize_tenants(tripletex, tenant.org_number, tenant.org_number)
    assert result.success and not result.get_asset_materialization_events()  # expected: not a failure
    (message,) = set(tenant_failure_messages(result.all_events))
    assert f"{tenant.name} (orgnr {tenant.org_number}, tripletex client {tenant.erp_client_id}) is inactive" in message
    assert f"Fix: erp-pipelines clients activate tripletex {tenant.org_number}" in message
    assert landed_balances(tripletex.warehouse, tenant.org_number) == []


def test_full_sync_of_one_tenant_through_dagster(tripletex, capsys):
    materialize_clients(tripletex)
    tenant, other = tripletex.ledger.valid_tenants[3], tripletex.ledger.valid_tenants[4]
    result = run_full_sync("tripletex", tenant.org_number, environ=tripletex.env, instance=tripletex.instance,
                           actor="kari")
    assert result.success and result.dagster_run.tags[LAUNCHED_BY] == "kari"
    assert result.dagster_run.job_name == "tripletex_full_sync"
    assert landed_balances(tripletex.warehouse, tenant.org_number) == truth_balances(tenant, HISTORY_START, THIS_MONTH)
    assert landed_balances(tripletex.warehouse, other.org_number) == []  # one tenant only

    # the command line: an ephemeral instance here (no DAGSTER_HOME), the same job
    tripletex.warehouse.purge_tenant("tripletex", tenant.org_number)
    assert main(["clients", "sync", "tripletex", tenant.org_number, "--full"]) == 1  # purged: inactive
    assert "is inactive" in capsys.readouterr().err
    clients.activate(tripletex.warehouse, "tripletex", tenant.org_number)
    assert main(["clients", "sync", "tripletex", tenant.org_number, "--full"]) == 0
    assert "full sync done" in capsys.readouterr().out
    assert landed_balances(tripletex.warehouse, tenant.org_number) == truth_balances(tenant, HISTORY_START, THIS_MONTH)


@pytest.mark.parametrize("name", ["Uten Orgnr Testklient", "Feil Kontrollsiffer AS"])
def test_full_sync_refuses_a_rejected_client_before_dagster(tripletex, name):
    materialize_clients(tripletex)
    tenant = next(t for t in tripletex.ledger.tenants if t.name == name)
    with pytest.raises(clients.ClientCommandError, match="no runs|not a registered"):
        run_full_sync("tripletex", tenant.org_number or "000000000", environ=tripletex.env, instance=tripletex.instance)
