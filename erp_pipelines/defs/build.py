"""Build the Definitions from the environment (see `config.py`)."""

from collections.abc import Mapping

import dagster as dg

from erp_pipelines.config import load_config
from erp_pipelines.defs.assets import WAREHOUSE, build_erp_assets
from erp_pipelines.defs.automation import build_client_access_sensor, build_daily_balance_schedule
from erp_pipelines.defs.clients import CLIENT_JOBS, build_full_sync_job
from erp_pipelines.defs.reporting import DBT, build_reporting_models
from erp_pipelines.defs.resources import WarehouseResource, erp_resource_from_env
from erp_pipelines.defs.retention import build_run_retention, retention_days
from erp_pipelines.errors import ConfigError


def build_definitions(environ: Mapping[str, str] | None = None) -> dg.Definitions:
    config = load_config(environ)
    if not config.erps:
        raise ConfigError(
            "no ERP is configured",
            fix="set the credentials of at least one ERP (its <ERP>_... variables, or SAFT_DROP_DIR); "
            "see .env.example",
        )
    assets, sensors, schedules, jobs, built_erps = [], [], [], list(CLIENT_JOBS), []
    resources: dict = {WAREHOUSE: WarehouseResource(path=config.warehouse_path)}
    for erp_config in config.erps:
        built = build_erp_assets(erp_config)
        built_erps.append(built)
        assets += built.assets
        sensors.append(build_client_access_sensor(built, chunk_size=config.tenants_per_run))
        jobs.append(build_full_sync_job(built))
        if erp_config.spec.connector_class.scheduled_refresh:
            schedules.append(build_daily_balance_schedule(built, chunk_size=config.tenants_per_run))
        resources[erp_config.name] = erp_resource_from_env(
            erp_config.spec, environ, token_store_path=config.token_store_path
        )
    reporting_models, resources[DBT] = build_reporting_models([built.erp for built in built_erps],
                                                              owners=config.erps[0].owners)
    assets.append(reporting_models)
    retention_job, retention_schedule = build_run_retention(retention_days(environ))
    jobs.append(retention_job)
    schedules.append(retention_schedule)
    sensors.append(dg.AutomationConditionSensorDefinition(
        "reporting_automation_sensor", target=dg.AssetSelection.groups("reporting"),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Rebuilds the reporting models after balances land (the tables: not after a failed blocking check).",
    ))
    return dg.Definitions(
        assets=assets,
        sensors=sensors,
        schedules=schedules,
        jobs=jobs,
        resources=resources,
        executor=dg.in_process_executor,
    )
