"""The configuration contract: environment variables, validated when the definitions load.

- `ERP_WAREHOUSE_PATH`: the DuckDB file (default `data/warehouse.duckdb`).
- `ERP_SOURCES`: optional comma list of ERPs to enable; without it, an ERP is enabled when any of
  its variables is set. An enabled ERP must have all its required variables.
- Per ERP, the variables its connector declares (`Connector.settings`), e.g. `TRIPLETEX_BASE_URL`.
- `<ERP>_HISTORY_START`: first month of a full sync (YYYY-MM-DD; default per source, 2023-01-01 for APIs).
- `ERP_TENANTS_PER_RUN`: tenants per run of the daily schedule and the client-access sensor
  (default 500). A backfill or a CLI `--partition-range` is one run for the whole range.
- `ERP_TOKEN_STORE_PATH`: the encrypted token store (default `tokens.enc` next to the warehouse);
  `ERP_TOKEN_STORE_KEY`: its key (default: a generated key file, mode 0600). See `tokens.py`.

Errors name the variable and never echo a secret's value.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Mapping
from urllib.parse import urlparse

from erp_pipelines import tokens
from erp_pipelines.errors import ConfigError
from erp_pipelines.registry import ERPS, ErpPlugin

DEFAULT_WAREHOUSE = "data/warehouse.duckdb"
DEFAULT_TENANTS_PER_RUN = 500


@dataclasses.dataclass(frozen=True)
class ErpConfig:
    plugin: ErpPlugin
    history_start: dt.date

    @property
    def name(self) -> str:
        return self.plugin.name


@dataclasses.dataclass(frozen=True)
class ProjectConfig:
    warehouse_path: str
    erps: tuple[ErpConfig, ...]
    tenants_per_run: int
    token_store_path: str = ""


def load_config(environ: Mapping[str, str] | None = None) -> ProjectConfig:
    env = os.environ if environ is None else environ
    names = _enabled_names(env)
    erps = tuple(_erp_config(ERPS[name], env) for name in names)
    per_run = env.get("ERP_TENANTS_PER_RUN", str(DEFAULT_TENANTS_PER_RUN))
    if not per_run.isdigit() or int(per_run) < 1:
        raise ConfigError("ERP_TENANTS_PER_RUN must be a positive whole number", fix="e.g. ERP_TENANTS_PER_RUN=500")
    if env.get(tokens.KEY_VARIABLE):
        tokens.validate_key(env[tokens.KEY_VARIABLE])
    return ProjectConfig(
        env.get("ERP_WAREHOUSE_PATH") or DEFAULT_WAREHOUSE, erps, int(per_run), str(tokens.default_store_path(env))
    )


def _enabled_names(env: Mapping[str, str]) -> list[str]:
    listed = env.get("ERP_SOURCES", "").strip()
    if listed:
        names = [n.strip().lower() for n in listed.split(",") if n.strip()]
        unknown = [n for n in names if n not in ERPS]
        if unknown:
            raise ConfigError(
                f"ERP_SOURCES names unknown ERP(s): {', '.join(unknown)}",
                fix=f"use any of: {', '.join(ERPS)}",
            )
        return names
    return [
        name
        for name, plugin in ERPS.items()
        if any(env.get(s.env) for s in plugin.connector_class.settings if s.default is None)
    ]


def _erp_config(plugin: ErpPlugin, env: Mapping[str, str]) -> ErpConfig:
    for setting in plugin.connector_class.settings:
        value = (env.get(setting.env) or "").strip() or setting.default
        if setting.required and not value:
            raise ConfigError(
                f"{plugin.name} is enabled but {setting.env} is not set ({setting.description})",
                fix=f"set {setting.env} in the environment or .env (see .env.example)",
            )
        if value and setting.field.endswith("url"):
            parsed = urlparse(value)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ConfigError(
                    f"{setting.env} is not an http(s) URL",
                    fix=f"set {setting.env} to e.g. {setting.default or 'https://host/path'}",
                )
    history_var = f"{plugin.name.upper()}_HISTORY_START"
    raw = env.get(history_var) or plugin.connector_class.default_history_start
    try:
        history_start = dt.date.fromisoformat(raw).replace(day=1)
    except ValueError:
        raise ConfigError(f"{history_var} is not a date", fix="use YYYY-MM-DD, e.g. 2023-01-01") from None
    return ErpConfig(plugin, history_start)
