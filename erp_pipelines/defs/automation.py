"""Sensors and schedules. Both request runs through `runs.tenant_range_run_requests`, so thousands
of tenants go as a few chunked runs rather than a run each."""


import asyncio
import datetime as dt

import dagster as dg

from erp_pipelines.defs.assets import OSLO, WAREHOUSE, ErpAssets, _closing
from erp_pipelines.defs.runs import tenant_range_run_requests
from erp_pipelines.pipeline import refresh_clients


def build_client_access_sensor(erp_assets: ErpAssets, *, chunk_size: int, interval_seconds: int = 300) -> dg.SensorDefinition:
    """Polls the ERP's client list. A newly granted client becomes a partition and gets a full
    sync requested; a client that disappeared is recorded as revoked (its history is kept)."""
    erp = erp_assets.erp

    @dg.sensor(
        name=f"{erp}_client_access_sensor",
        minimum_interval_seconds=interval_seconds,
        target=dg.AssetSelection.assets(*erp_assets.extract_keys),
        required_resource_keys={erp, WAREHOUSE},
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"New or withdrawn client access in {erp}: registers partitions, requests first full syncs.",
    )
    def client_access_sensor(context: dg.SensorEvaluationContext, **resources) -> dg.SensorResult:
        warehouse = _resource(context, resources, WAREHOUSE).get()
        connector = _resource(context, resources, erp).connector()
        listed, change = asyncio.run(_closing(connector, refresh_clients(connector, warehouse)))
        existing = list(context.instance.get_dynamic_partitions(erp_assets.partitions.name))
        known = set(existing)
        added = [org for org in change.active if org not in known]
        first_sync = added + [org for org in change.reactivated if org in known]
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        run_requests = tenant_range_run_requests(
            ordered_keys=existing + added,
            selected=first_sync,
            chunk_size=chunk_size,
            asset_selection=erp_assets.extract_keys,
            run_key_prefix=f"{erp}-first-sync-{stamp}",
            run_config={"ops": {erp_assets.balances_op: {"config": {"full_sync": True}}}},
            tags={"erp": erp, "erp/trigger": "client-access"},
        )
        changed = bool(added or change.new or change.revoked or change.reactivated)
        for org in change.revoked:
            context.log.info(f"{erp}: access to tenant {org} was withdrawn; recorded as revoked")
        return dg.SensorResult(
            run_requests=run_requests,
            dynamic_partitions_requests=[erp_assets.partitions.build_add_request(added)] if added else [],
            asset_events=[
                dg.AssetMaterialization(
                    asset_key=erp_assets.clients_key,
                    metadata={**change.counts, "partitions_added": len(added), "source": "client access sensor"},
                )
            ]
            if changed
            else [],
        )

    return client_access_sensor


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
        active = warehouse.active_clients(erp, ordered)
        if not active:
            return dg.SkipReason(f"no active {erp} tenants yet: materialise {erp}/clients first")
        day = context.scheduled_execution_time.astimezone(OSLO).date()
        return tenant_range_run_requests(
            ordered_keys=ordered,
            selected=active,
            chunk_size=chunk_size,
            asset_selection=erp_assets.extract_keys,
            run_key_prefix=f"{erp}-daily-{day.isoformat()}",
            tags={"erp": erp, "erp/trigger": "daily"},
        )

    return daily_balances


def _resource(context, passed: dict, key: str):
    """Dagster hands sensor resources in as keyword arguments and schedule resources on the context."""
    return passed[key] if key in passed else getattr(context.resources, key)
