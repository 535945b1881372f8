"""The dbt-duckdb plugin of the reporting project's `lake` target (reporting/profiles.yml): loads
the DuckDB extensions from their wheels and attaches the DuckLake catalog of `ERP_DUCKLAKE_CATALOG`
as `lake`, read from the environment at run time, so the catalog string (and any password in it)
never enters the dbt profile, dbt's logs or Dagster's run config."""

from __future__ import annotations

import os

from dbt.adapters.duckdb.plugins import BasePlugin
from duckdb import DuckDBPyConnection

from erp_pipelines.errors import ConfigError
from erp_pipelines.warehouse_backends import (
    CATALOG_VARIABLE,
    DATA_PATH_VARIABLE,
    DuckLakeBackend,
    ducklake_settings,
)


class Plugin(BasePlugin):
    def configure_connection(self, conn: DuckDBPyConnection) -> None:
        settings = ducklake_settings(os.environ)
        if settings is None:
            raise ConfigError(f"the dbt target `lake` needs {CATALOG_VARIABLE} and {DATA_PATH_VARIABLE}",
                              fix="set both, or use the target `warehouse` (the DuckDB file)")
        DuckLakeBackend(*settings).attach(conn)
