"""Sensors and schedules. Both request runs through `runs.tenant_range_run_requests`, so thousands
of tenants go as a few chunked runs rather than a run each.

Both cover every connection of the ERP (`connections.py`) and cut runs per connection: each run's
tenants belong to one connection and the run carries the tag `erp/connection=<erp>/<slug>`, which
the instance's `tag_concurrency_limits` limit per value, so one connection's backfill never takes
the run slots another connection's daily refresh needs."""


import asyncio
import datetime as dt
import hashlib
import json

import dagster as dg

from erp_pipelines.connections import CONNECTION_TAG, DEFAULT
from erp_pipelines.defs.assets import OSLO, WAREHOUSE, ErpAssets
from erp_pipelines.defs.runs import tenant_range_run_requests
from erp_pipelines.model import ClientStatus
from erp_pipelines.pipeline import await_then_close, refresh_clients


def build_client_access_sensor(erp_assets: ErpAssets, *, chunk_size: int) -> dg.SensorDefinition:
    """Polls the ERP's client list (for file sources: the drop folder).

    - A newly granted client becomes a partition; every active tenant whose balances were never
      materialised (new, registered by `<erp>/clients`, just activated, or purged) gets a full
      sync requested. Inactive tenants get no runs.
    - A client that disappeared is recorded as revoked (history kept); a returning one is re-synced.
    - Sources with content fingerprints (SAF-T files) get a re-import when a tenant's content changes.

    Run keys are derived from what is requested, so an unchanged state never requests the same
    runs twice (a tenant whose first sync failed is retried when something else changes, or by hand).
    """
    erp = erp_assets.erp
    connector_class = erp_assets.connector_class

    @dg.sensor(
        name=f"{erp}_client_access_sensor",
        minimum_interval_seconds=connector_class.sensor_interval_seconds,
        target=dg.AssetSelection.assets(*erp_assets.extract_keys),
        required_resource_keys={erp, WAREHOUSE},
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"New, withdrawn or changed client access in {erp}: registers partitions, requests full syncs.",
    )
    def client_access_sensor(context: dg.SensorEvaluationContext, **resources) -> dg.SensorResult:
        warehouse = _resource(context, resources, WAREHOUSE).get()
        connector = _resource(context, resources, erp).connectors()
        ensure_pool_slots(context, f"{erp}_api", len(connector))

        async def poll():
            listed, change = await refresh_clients(connector, warehouse)
            return listed, change, await connector.tenant_fingerprints()

        listed, change, fingerprints = asyncio.run(await_then_close(connector, poll()))
        existing = list(context.instance.get_dynamic_partitions(erp_assets.partitions.name))
        known = set(existing)
        added = [org for org in change.registered if org not in known]  # inactive ones too (no runs)
        active = set(change.active)  # inactive clients get no runs
        synced = context.instance.get_materialized_partitions(erp_assets.balances_key) if existing else set()
        # a purged tenant ("Slett kontoer"), or one whose number moved to another client, was
        # materialised before but not for the client now holding the number: sync it in full
        synced -= warehouse.enabled_never_extracted(erp)
        by_org = _fingerprints_by_org(listed, fingerprints)
        previous = json.loads(context.cursor) if context.cursor else {}
        changed = [org for org, value in by_org.items() if org in synced and previous.get(org, value) != value]
        selected = (
            [org for org in existing + added if org in active and org not in synced]
            + [org for org in change.reactivated if org in synced]
            + changed
        )
        key_material: dict = {"selected": sorted(selected), "fingerprints": by_org}
        if change.reactivated:  # reported once per reactivation: make each one a new request
            key_material["reactivated_at"] = dt.datetime.now(dt.UTC).isoformat()
        digest = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:12]
        run_requests = per_connection_run_requests(
            erp, warehouse.active_clients(erp),
            ordered_keys=existing + added,
            selected=set(selected),
            chunk_size=chunk_size,
            asset_selection=erp_assets.extract_keys,
            run_key_prefix=f"{erp}-sync-{digest}",
            run_config={"ops": {erp_assets.extract_op: {"config": {"full_sync": True}}}},
            tags={"erp": erp, "erp/trigger": "client-access"},
        )
        for slug, error in change.failed_connections.items():
            context.log.error(f"{erp}: listing the clients of connection {slug!r} failed; its tenants are kept "
                              f"as they were: {error}")
        for org in change.revoked:
            context.log.info(f"{erp}: access to tenant {org} was withdrawn; recorded as revoked")
        for org in changed:
            context.log.info(f"{erp}: content of tenant {org} changed; re-importing")
        counts = {**change.counts, "partitions_added": len(added), "tenants_changed": len(changed)}
        changed_registry = bool(added or change.new or change.revoked or change.reactivated or changed)
        return dg.SensorResult(
            run_requests=run_requests,
            dynamic_partitions_requests=[erp_assets.partitions.build_add_request(added)] if added else [],
            asset_events=[
                dg.AssetMaterialization(
                    asset_key=erp_assets.clients_key, metadata={**counts, "source": "client access sensor"}
                )
            ]
            if changed_registry
            else [],
            cursor=json.dumps(by_org, sort_keys=True) if by_org else None,
        )

    return client_access_sensor


def _fingerprints_by_org(listed, fingerprints: dict[str, str] | None) -> dict[str, str]:
    if not fingerprints:
        return {}
    return {
        c.org_number: fingerprints[c.erp_client_id]
        for c in listed
        if c.erp_client_id in fingerprints and c.status != ClientStatus.REJECTED
    }


def build_daily_balance_schedule(erp_assets: ErpAssets, *, chunk_size: int, cron: str = "0 6 * * *") -> dg.ScheduleDefinition:
    """Every morning (Europe/Oslo): accounts and balances (previous and current month) of every
    active tenant, in runs of up to `chunk_size` tenants."""
    erp = erp_assets.erp

    @dg.schedule(
        name=f"{erp}_daily_balances",
        cron_schedule=cron,
        execution_timezone="Europe/Oslo",
        target=dg.AssetSelection.assets(*erp_assets.extract_keys),
        required_resource_keys={WAREHOUSE},
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Daily refresh of {erp} balances for all active tenants.",
    )
    def daily_balances(context: dg.ScheduleEvaluationContext, **resources):
        warehouse = _resource(context, resources, WAREHOUSE).get()
        ordered = list(context.instance.get_dynamic_partitions(erp_assets.partitions.name))
        active = warehouse.active_clients(erp, ordered)  # inactive, rejected and revoked tenants get no runs
        if not active:
            return dg.SkipReason(f"no active {erp} tenants: materialise {erp}/clients, or activate one "
                                 f"(erp-pipelines clients activate {erp} ORGNR)")
        day = context.scheduled_execution_time.astimezone(OSLO).date()
        return per_connection_run_requests(
            erp, active,
            ordered_keys=ordered,
            selected=set(active),
            chunk_size=chunk_size,
            asset_selection=erp_assets.extract_keys,
            run_key_prefix=f"{erp}-daily-{day.isoformat()}",
            tags={"erp": erp, "erp/trigger": "daily"},
        )

    return daily_balances


def ensure_pool_slots(context, pool: str, connections: int) -> None:
    """With several connections, the ERP's pool (`<erp>_api`, fixed per asset) gets a slot per
    connection, so one connection's running step never holds back another connection's run (each
    connection is limited to one run by the `erp/connection` run tag limit). Never lowers a limit."""
    if connections < 2:
        return
    storage = context.instance.event_log_storage
    info = storage.get_concurrency_info(pool)
    current = info.slot_count if pool in storage.get_concurrency_keys() else (
        context.instance.global_op_concurrency_default_limit or 0)
    if current and current < connections:
        storage.set_concurrency_slots(pool, connections)
        context.log.info(f"pool {pool}: {current} -> {connections} slots, one per connection")


def per_connection_run_requests(erp: str, holders: dict, *, selected: set[str], tags: dict[str, str],
                                **options) -> list[dg.RunRequest]:
    """`tenant_range_run_requests` per connection: each run's tenants belong to one connection
    (`holders`: organisation number → the enabled client holding it), tagged `erp/connection`."""
    by_connection: dict[str, set[str]] = {}
    for org in selected:
        holder = holders.get(org)
        by_connection.setdefault(holder.connection if holder is not None else DEFAULT, set()).add(org)
    return [
        request
        for slug, orgs in sorted(by_connection.items())
        for request in tenant_range_run_requests(selected=orgs, tags={**tags, CONNECTION_TAG: f"{erp}/{slug}"},
                                                 **options)
    ]


def _resource(context, passed: dict, key: str):
    """Dagster hands sensor resources in as keyword arguments and schedule resources on the context."""
    return passed[key] if key in passed else getattr(context.resources, key)
