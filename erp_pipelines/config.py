"""The configuration contract: environment variables, validated when the definitions load.

- `ERP_WAREHOUSE_PATH`: the DuckDB file (default `data/warehouse.duckdb`).
- `ERP_DUCKLAKE_CATALOG`: optional; the warehouse is then DuckLake with this catalog (e.g.
  `postgres:dbname=lake host=db user=erp`, password in PGPASSWORD or ~/.pgpass) and
  `ERP_DUCKLAKE_DATA_PATH` (required with it: a shared folder or `s3://bucket/prefix/`) instead of
  the file, for writers on many machines (`warehouse_backends.py`).
- `ERP_SOURCES`: optional comma list of ERPs to enable; without it, an ERP is enabled when any of
  its variables is set. An enabled ERP must have all its required variables.
- Per ERP, the variables its connector declares (`Connector.settings`), e.g. `<ERP>_BASE_URL`.
- `<ERP>_HISTORY_START`: first month of a full sync (YYYY-MM-DD; default per source, 2023-01-01 for APIs).
- `ERP_AUTO_ACTIVATE`: whether a new valid client starts active (default true) or waits, inactive,
  until `erp-pipelines clients activate`.
- `ERP_TENANTS_PER_RUN`: tenants per run of the daily schedule and the client-access sensor
  (default 500). A backfill or a CLI `--partition-range` is one run for the whole range.
- `ERP_ASSET_OWNERS`: comma list of the assets' owners in the Dagster UI, each an e-mail address or
  `team:<name>` (default `team:data-engineering`).
- `ERP_TOKEN_STORE_PATH`: the encrypted token store (default `tokens.enc` next to the warehouse);
  `ERP_TOKEN_STORE_KEY`: its key (default: a generated key file, mode 0600). See `tokens.py`.
- `ERP_RUN_RETENTION_DAYS`: Dagster runs (and their events) older than this are deleted nightly,
  keeping every partition's latest materialisation (default 90; 0 keeps every run). See `defs/retention.py`.

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
from erp_pipelines.model import AUTO_ACTIVATE_VARIABLE, auto_activate
from erp_pipelines.registry import ERPS, ErpSpec
from erp_pipelines.warehouse_backends import ducklake_settings

DEFAULT_WAREHOUSE = "data/warehouse.duckdb"
DEFAULT_TENANTS_PER_RUN = 500
DEFAULT_OWNERS = ("team:data-engineering",)


@dataclasses.dataclass(frozen=True)
class ErpConfig:
    spec: ErpSpec
    history_start: dt.date
    owners: tuple[str, ...] = DEFAULT_OWNERS

    @property
    def name(self) -> str:
        return self.spec.name


@dataclasses.dataclass(frozen=True)
class ProjectConfig:
    warehouse_path: str
    erps: tuple[ErpConfig, ...]
    tenants_per_run: int
    token_store_path: str = ""


def load_config(environ: Mapping[str, str] | None = None) -> ProjectConfig:
    env = os.environ if environ is None else environ
    names = enabled_names(env)
    owners = asset_owners(env)
    erps = tuple(dataclasses.replace(_erp_config(ERPS[name], env), owners=owners) for name in names)
    per_run = env.get("ERP_TENANTS_PER_RUN", str(DEFAULT_TENANTS_PER_RUN))
    if not per_run.isdigit() or int(per_run) < 1:
        raise ConfigError("ERP_TENANTS_PER_RUN must be a positive whole number", fix="e.g. ERP_TENANTS_PER_RUN=500")
    if env.get(tokens.KEY_VARIABLE):
        tokens.validate_key(env[tokens.KEY_VARIABLE])
    try:
        auto_activate(env)
    except ValueError as exc:
        raise ConfigError(str(exc), fix=f"set {AUTO_ACTIVATE_VARIABLE}=true or false") from None
    warehouse = warehouse_path(env)
    ducklake_settings(env)  # both DuckLake variables or neither
    return ProjectConfig(warehouse, erps, int(per_run), str(tokens.default_store_path(warehouse, env)))


def asset_owners(environ: Mapping[str, str]) -> tuple[str, ...]:
    """`ERP_ASSET_OWNERS`: e-mail addresses or `team:<name>`, as Dagster requires."""
    raw = environ.get("ERP_ASSET_OWNERS", "").strip()
    owners = tuple(o.strip() for o in raw.split(",") if o.strip()) if raw else DEFAULT_OWNERS
    wrong = [o for o in owners if not (o.startswith("team:") and len(o) > 5) and "@" not in o]
    if wrong:
        raise ConfigError(f"ERP_ASSET_OWNERS has {', '.join(wrong)}, neither an e-mail address nor team:<name>",
                          fix="e.g. ERP_ASSET_OWNERS=team:data-engineering,kari@example.no")
    return owners


def warehouse_path(environ: Mapping[str, str]) -> str:
    """`ERP_WAREHOUSE_PATH`, or the default."""
    return environ.get("ERP_WAREHOUSE_PATH") or DEFAULT_WAREHOUSE


def enabled_names(env: Mapping[str, str]) -> list[str]:
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
    from erp_pipelines.connections import stored_erps  # connections.py builds on this module

    stored = stored_erps(env)
    return [name for name, spec in ERPS.items() if has_environment_connection(spec, env) or name in stored]


def has_environment_connection(spec: ErpSpec, env: Mapping[str, str]) -> bool:
    """Whether the environment configures the ERP's `default` connection (any of its variables set)."""
    return any(env.get(s.env) for s in spec.connector_class.settings if s.default is None)


def _erp_config(spec: ErpSpec, env: Mapping[str, str]) -> ErpConfig:
    from erp_pipelines.connections import stored_erps

    if has_environment_connection(spec, env) or spec.name not in stored_erps(env):
        validate_settings(spec, env)  # the environment's `default` connection (stored ones: when added)
    history_var = f"{spec.name.upper()}_HISTORY_START"
    raw = env.get(history_var) or spec.connector_class.default_history_start
    try:
        history_start = dt.date.fromisoformat(raw).replace(day=1)
    except ValueError:
        raise ConfigError(f"{history_var} is not a date", fix="use YYYY-MM-DD, e.g. 2023-01-01") from None
    return ErpConfig(spec, history_start)


def validate_settings(spec: ErpSpec, values: Mapping[str, str], *, where: str = "in the environment or .env "
                      "(see .env.example)", what: str | None = None) -> None:
    """The connector's settings in `values` (by variable name): every required one present, URLs
    well formed. Errors name the variable (never its value) and where to set it."""
    for setting in spec.connector_class.settings:
        value = (values.get(setting.env) or "").strip() or setting.default
        if setting.required and not value:
            raise ConfigError(
                f"{what or spec.name + ' is enabled'} but {setting.env} is not set ({setting.description})",
                fix=f"set {setting.env} {where}",
            )
        if value and setting.field.endswith("url"):
            _check_url(setting, value)


def _check_url(setting, value: str) -> None:
    """An http(s) URL with a host, no whitespace, and the ERP's expected path where it has one
    (`Setting.url_path`). The error names the variable, what is wrong with the value and the fix."""
    example = setting.default or f"https://host{setting.url_path or '/'}"
    fix = f"set {setting.env} to the full URL, e.g. {example}"
    if any(c.isspace() for c in value):
        raise ConfigError(f"{setting.env} contains whitespace", fix=f"remove the spaces: {fix}")
    try:
        parsed = urlparse(value)
        parsed.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ConfigError(f"{setting.env} is not an http(s) URL: it does not parse", fix=fix) from None
    if parsed.scheme not in ("http", "https"):
        problem = f"its scheme is {parsed.scheme}, not http or https" if parsed.netloc else "it does not start with https://"
        raise ConfigError(f"{setting.env} is not an http(s) URL: {problem}", fix=fix)
    if not parsed.hostname:
        raise ConfigError(f"{setting.env} is not an http(s) URL with a host: it names no host", fix=fix)
    if setting.url_path and not parsed.path.rstrip("/").endswith(setting.url_path):
        path = f"its path is {parsed.path.rstrip('/')}" if parsed.path.rstrip("/") else "it has no path"
        raise ConfigError(
            f"{setting.env} must end in {setting.url_path} (the API's path), but {path}",
            fix=f"append {setting.url_path}: {fix}",
        )


ENV_EXAMPLE_HEADER = """\
# erp-pipelines configuration. Copy to .env for local use; `make demo` sets everything itself.
# Generated from the registry: `python -m erp_pipelines env-example > .env.example`.

# The DuckDB warehouse file.
ERP_WAREHOUSE_PATH=data/warehouse.duckdb

# Optional: the warehouse on DuckLake instead, for writers on many machines: a catalog (PostgreSQL;
# its password in PGPASSWORD or ~/.pgpass) and the data path every writer reaches (shared folder or s3://).
# ERP_DUCKLAKE_CATALOG=postgres:dbname=lake host=db.internal user=erp
# ERP_DUCKLAKE_DATA_PATH=/mnt/lake/

# Optional: enable exactly these sources (comma list). Without it, a source is enabled when its
# credentials are set. Known: {known}.
# ERP_SOURCES={known}

# New valid clients start active (true), or wait as inactive until
# `erp-pipelines clients activate ERP ORGNR` (false).
# ERP_AUTO_ACTIVATE=true

# Tenants per run of the daily schedule and the client-access sensor (a backfill or a CLI
# --partition-range is one run for the whole range).
# ERP_TENANTS_PER_RUN={per_run}

# Owners of the assets in the Dagster UI: e-mail addresses or team:<name>, comma separated.
# ERP_ASSET_OWNERS=team:data-engineering

# Encrypted store of tokens the ERPs hand out (session tokens, OAuth access and refresh tokens).
# Default: tokens.enc next to the warehouse, with a generated key file tokens.key (mode 0600).
# ERP_TOKEN_STORE_PATH=data/tokens.enc
# ERP_TOKEN_STORE_KEY=

# Days of Dagster run history kept: older finished runs and their events are deleted nightly, except
# the runs holding each partition's latest materialisation (0 keeps every run).
# ERP_RUN_RETENTION_DAYS=90
"""


def env_example() -> str:
    """`.env.example`, written from every registered connector's settings."""
    lines = [ENV_EXAMPLE_HEADER.format(known=",".join(ERPS), per_run=DEFAULT_TENANTS_PER_RUN)]
    for spec in ERPS.values():
        connector = spec.connector_class
        lines.append(f"# --- {connector.display_name} " + "-" * (88 - len(connector.display_name)))
        for setting in connector.settings:
            notes = [setting.description[:1].upper() + setting.description[1:].rstrip(".") + "."] \
                if setting.description else []
            if setting.secret:
                notes.append("Secret: never logged or stored in plain text.")
            if not setting.required:
                notes.append("Optional.")
            lines.append(f"# {' '.join(notes)}".rstrip())
            value = setting.default or ""
            lines.append(f"{setting.env}={value}" if setting.required or setting.default else f"# {setting.env}=")
        if connector.scheduled_refresh or not connector.full_sync_by_default:
            lines.append("# First month of a full sync.")
            lines.append(f"# {spec.env_prefix}HISTORY_START={connector.default_history_start}")
        lines.append("")
    return "\n".join(lines)


def connector_from_environment(erp: str, environ: Mapping[str, str] | None = None, **options):
    """The ERP's connector, configured from the environment as the definitions would be (for the
    command line: consent, doctor); the token store from `ERP_TOKEN_STORE_PATH`/`_KEY`."""
    env = os.environ if environ is None else environ
    if erp not in ERPS:
        raise ConfigError(f"unknown ERP {erp!r}", fix=f"use any of: {', '.join(ERPS)}")
    spec = ERPS[erp]
    _erp_config(spec, env)  # validates, naming the variable
    uses_store = spec.connector_class.uses_token_store
    store = tokens.TokenStore.from_env(warehouse_path(env), env) if uses_store else None
    return spec.connector_class(**connector_kwargs(spec, env), token_store=store, **options)


def connector_kwargs(spec: ErpSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """The connector's settings read from `environ` (e.g. a simulator's `environment(url)`) as its
    keyword arguments: each `Setting.env` under its `field`, defaults applied, unset ones left out."""
    values = {s.field: (environ.get(s.env) or "").strip() or s.default for s in spec.connector_class.settings}
    return {field: value for field, value in values.items() if value}
