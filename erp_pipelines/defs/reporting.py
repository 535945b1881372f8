"""The reporting layer: the dbt project `reporting/` (dbt-core + dbt-duckdb) as Dagster assets.

- Models, all ERPs together: `trial_balance` (saldobalanse per tenant, month and account),
  `income_statement` and `balance_sheet` (per tenant and month by NS 4102 class and account
  class), `tenant_status` (one row per client), in the schema `reporting` of the warehouse file, so
  `SELECT * FROM reporting.trial_balance` works in any DuckDB session. Asset keys `reporting/<model>`.
- The statements are tables, rebuilt after balances land unless a blocking check of an upstream
  asset failed (a trial balance that does not sum to zero): nothing downstream builds on broken
  data, and the tables keep the last good build meanwhile. `tenant_status` is a view, always
  current: a failed tenant shows there at once. Materialising runs the dbt tests (asset checks).
- Lineage: each dbt source names the per-ERP asset(s) writing it (`meta.erp_asset` in
  `models/schema.yml`); `ReportingTranslator` makes the models depend on `<erp>/balances`,
  `<erp>/accounts` and `<erp>/clients` of every enabled ERP (`tenant_status` on all three:
  extraction runs record each client's last success and error in `clients`).
- Locking: DuckDB allows one writing process per file and dbt writes from its own process. The
  step holds the warehouse's file lock (`Warehouse.exclusive`) for the whole dbt invocation (a few
  seconds): extraction writes queue behind it as they queue behind each other, and dbt never
  meets a lock error. dbt gets the warehouse path from the resource (`--vars`), absolute, since
  it runs in the project folder.
- dbt is a fair fit: a build takes about five seconds (mostly dbt's start-up), once per refresh,
  not per tenant. No dbt packages, so nothing is fetched (no `dbt deps`).
- The manifest is generated with `dbt parse` when definitions load and it is missing or older
  than a file of the project (a few seconds, once, offline, under a file lock so concurrent loads
  parse once). `reporting/target/` is git-ignored; each build's own folder there is removed
  once it succeeds (a failed one keeps its dbt log and run results).
"""

import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import (
    DagsterDbtTranslator,
    DagsterDbtTranslatorSettings,
    DbtCliResource,
    DbtProject,
    dbt_assets,
)
from filelock import FileLock

from erp_pipelines.defs.resources import WarehouseResource

PROJECT_DIR = Path(__file__).resolve().parents[2] / "reporting"
DBT = "dbt"  # the resource key
GROUP = "reporting"
MODEL_KEY_PREFIX: tuple[str, ...] = (GROUP,)
SOURCE_ASSET_META = "erp_asset"  # on a dbt source: the per-ERP asset(s) writing it
PROJECT_FILES = ("dbt_project.yml", "profiles.yml", "models", "macros")


def dbt_executable() -> str:
    """The dbt of this environment (`.venv/bin` is not always on PATH, e.g. `make test`)."""
    beside = Path(sys.executable).parent / "dbt"
    return str(beside) if beside.exists() else (shutil.which("dbt") or "dbt")


def reporting_project() -> DbtProject:
    """The dbt project, with a manifest matching its files (parsed now when missing or stale)."""
    project = DbtProject(project_dir=PROJECT_DIR)
    manifest = project.manifest_path
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(manifest.parent / "manifest.lock"), timeout=300):
        if not manifest.exists() or manifest.stat().st_mtime < _newest_project_file():
            DbtCliResource(project_dir=project, dbt_executable=dbt_executable()).cli(
                ["parse", "--quiet"], target_path=project.target_path).wait()
    return project


def _newest_project_file() -> float:
    paths = [PROJECT_DIR / name for name in PROJECT_FILES]
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return max(f.stat().st_mtime for f in files)


def models_condition(*, guarded: bool) -> dg.AutomationCondition:
    """Rebuild (and so re-test) after the balances, accounts or clients of any ERP were updated, or
    when never built; `guarded` (the tables): not while a blocking check upstream has failed."""
    condition = (
        (dg.AutomationCondition.newly_missing() | dg.AutomationCondition.any_deps_updated()).since_last_handled()
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.in_progress()
    )
    if not guarded:
        return condition.with_label("warehouse updated or view missing")
    blocked = dg.AutomationCondition.any_deps_match(
        dg.AutomationCondition.any_checks_match(dg.AutomationCondition.check_failed(), blocking_only=True))
    return (condition & ~blocked).with_label("warehouse updated or table missing, no blocking check failed upstream")


class ReportingTranslator(DagsterDbtTranslator):
    """dbt nodes as Dagster assets of the group `reporting`, downstream of every enabled ERP."""

    def __init__(self, erps: Sequence[str], owners: Sequence[str] = ()) -> None:
        super().__init__(settings=DagsterDbtTranslatorSettings(enable_asset_checks=True))
        self.erps = tuple(erps)
        self.owners = list(owners)

    def get_owners(self, dbt_resource_props: Mapping[str, Any]) -> Sequence[str] | None:
        return self.owners or super().get_owners(dbt_resource_props)

    def get_asset_key(self, dbt_resource_props: Mapping[str, Any]) -> dg.AssetKey:
        key = super().get_asset_key(dbt_resource_props)
        return key.with_prefix(list(MODEL_KEY_PREFIX)) if dbt_resource_props["resource_type"] == "model" else key

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        return GROUP

    def get_automation_condition(self, dbt_resource_props: Mapping[str, Any]) -> dg.AutomationCondition | None:
        if dbt_resource_props["resource_type"] != "model":
            return None
        return models_condition(guarded=dbt_resource_props["config"].get("materialized") != "view")

    def get_asset_spec(self, manifest: Mapping[str, Any], unique_id: str, project: DbtProject | None) -> dg.AssetSpec:
        spec = super().get_asset_spec(manifest, unique_id, project)
        if not unique_id.startswith("model."):
            return spec
        # a warehouse source stands for the same asset of every ERP: `<erp>/balances`, ...
        per_erp: dict[dg.AssetKey, list[dg.AssetKey]] = {}
        for upstream in self.get_resource_props(manifest, unique_id)["depends_on"]["nodes"]:
            if upstream.startswith("source."):
                source = manifest["sources"][upstream]
                assets = (source.get("config", {}).get("meta") or source.get("meta") or {}).get(SOURCE_ASSET_META)
                if not assets:
                    raise ValueError(f"dbt source {source['name']} has no meta.{SOURCE_ASSET_META} (see models/schema.yml)")
                names = [assets] if isinstance(assets, str) else assets
                per_erp[super().get_asset_spec(manifest, upstream, project).key] = [
                    dg.AssetKey([erp, name]) for erp in self.erps for name in names]
        deps = [dep for dep in spec.deps if dep.asset_key not in per_erp]
        keys = list(dict.fromkeys(key for keys in per_erp.values() for key in keys))
        return spec.replace_attributes(deps=[*deps, *(dg.AssetDep(key) for key in keys)])


def build_reporting_models(erps: Sequence[str], owners: Sequence[str] = ()) -> tuple[dg.AssetsDefinition, DbtCliResource]:
    """The dbt models as one subsettable multi-asset, and the dbt resource it needs (key `dbt`)."""
    project = reporting_project()

    @dbt_assets(manifest=project.manifest_path, project=project, name="reporting_models",
                dagster_dbt_translator=ReportingTranslator(erps, owners))
    def reporting_models(context: dg.AssetExecutionContext, dbt: DbtCliResource, warehouse: WarehouseResource):
        store = warehouse.get()
        store.ensure_schema()  # the source tables exist even on a new file
        with store.exclusive():
            variables = json.dumps({"warehouse_path": str(store.path.resolve())})
            invocation = dbt.cli(["build", "--vars", variables], context=context)
            yield from invocation.stream()
        shutil.rmtree(invocation.target_path, ignore_errors=True)  # a failed build keeps its logs and artifacts

    return reporting_models, DbtCliResource(project_dir=project, dbt_executable=dbt_executable())
