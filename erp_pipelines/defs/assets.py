"""Asset factory: the same assets, checks, sensor and schedule for every ERP.

- `<erp>/clients` (unpartitioned): refreshes the client registry and adds each new tenant's
  organisation number to the ERP's dynamic partitions.
- `<erp>/accounts`, `<erp>/balances` (partitioned by organisation number): a run covers a range of
  tenants, extracted concurrently. Each tenant that lands gets its own materialisation event; the
  run then fails if any tenant failed, so the UI shows exactly the failed tenants as failed and
  they can be retried alone.
- `<erp>/balances` carries the integrity checks (`quality.py`) and evaluates them for the tenants each
  run loads, so they run on every path (UI, CLI, schedule, sensor).
"""


import asyncio
import dataclasses
import datetime as dt
import warnings
from collections.abc import Generator, Iterator
from zoneinfo import ZoneInfo

import dagster as dg

from erp_pipelines import quality
from erp_pipelines.clients import not_loadable_reason
from erp_pipelines.config import ErpConfig
from erp_pipelines.erps.extract import ACCOUNTS, BALANCES
from erp_pipelines.errors import ConfigError
from erp_pipelines.model import TenantExtract, add_months, months_between
from erp_pipelines.pipeline import (
    await_then_close,
    iterate_sync,
    iterate_then_close,
    load_tenants,
    refresh_clients,
)

OSLO = ZoneInfo("Europe/Oslo")
warnings.filterwarnings("ignore", category=dg.BetaWarning, message=".*backfill_policy.*")  # used on purpose
WAREHOUSE = "warehouse"

class BalanceWindow(dg.Config):
    """Which months `<erp>/balances` extracts. Default: the previous and the current month (Oslo
    time); for file sources (SAF-T), every month the files cover."""

    full_sync: bool = False
    """All history, from `<ERP>_HISTORY_START` to the current month."""
    months_back: int | None = None
    """Months before the current one (default 1; ignored with full_sync or from_month)."""
    from_month: str | None = None
    """First month, YYYY-MM (a backfill after year-end adjustments: e.g. 2025-01)."""
    to_month: str | None = None
    """Last month, YYYY-MM (default: the current month)."""

    def months(self, history_start: dt.date, *, full_by_default: bool = False, today: dt.date | None = None) -> list[dt.date]:
        current = (today or dt.datetime.now(OSLO).date()).replace(day=1)
        last = _month(self.to_month, "to_month") if self.to_month else current
        if self.full_sync or (full_by_default and not self.from_month and self.months_back is None):
            first = history_start
        elif self.from_month:
            first = _month(self.from_month, "from_month")
        else:
            first = add_months(current, -max(0, 1 if self.months_back is None else self.months_back))
        if first > last:
            raise ConfigError(f"the balance window {first:%Y-%m}..{last:%Y-%m} is empty", fix="check from_month/to_month")
        return months_between(first, last)

def _month(value: str, name: str) -> dt.date:
    try:
        return dt.date.fromisoformat(f"{value[:7]}-01")
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a month", fix="use YYYY-MM") from None

@dataclasses.dataclass
class ErpAssets:
    """Everything built for one ERP."""

    erp: str
    connector_class: type
    partitions: dg.DynamicPartitionsDefinition
    clients_key: dg.AssetKey
    accounts_key: dg.AssetKey
    balances_key: dg.AssetKey
    assets: list[dg.AssetsDefinition]

    @property
    def extract_keys(self) -> list[dg.AssetKey]:
        return [self.accounts_key, self.balances_key]

    @property
    def balances_op(self) -> str:
        return "__".join(self.balances_key.path)

def build_erp_assets(erp_config: ErpConfig) -> ErpAssets:
    erp = erp_config.name
    connector_class = erp_config.spec.connector_class
    partitions = dg.DynamicPartitionsDefinition(name=f"{erp}_tenants")
    clients_key, accounts_key, balances_key = (dg.AssetKey([erp, name]) for name in ("clients", "accounts", "balances"))
    common = {"group_name": erp, "kinds": {"duckdb", "python"}, "pool": f"{erp}_api",
              "required_resource_keys": {erp, WAREHOUSE}}
    partitioned = {
        "partitions_def": partitions,
        "deps": [clients_key],
        # one run per selected range: what `dagster asset materialize --partition-range` requires;
        # the schedule and the sensor cut their ranges into runs of ERP_TENANTS_PER_RUN themselves
        "backfill_policy": dg.BackfillPolicy.single_run(),
        "output_required": False,
    }

    @dg.asset(
        key=clients_key,
        description=f"The tenants the {connector_class.display_name} credential reaches, with their status "
        "(active / inactive / no API access / rejected / revoked). Adds new organisation numbers to the partitions.",
        **common,
    )
    def clients(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        warehouse = getattr(context.resources, WAREHOUSE).get()
        connector = getattr(context.resources, erp).connector()
        listed, change = asyncio.run(await_then_close(connector, refresh_clients(connector, warehouse)))
        existing = set(context.instance.get_dynamic_partitions(partitions.name))
        added = [org for org in change.registered if org not in existing]  # inactive ones too: activation needs no refresh
        if added:
            context.instance.add_dynamic_partitions(partitions.name, added)
        for client in change.rejected:
            context.log.warning(f"rejected {client.label}: {client.status_reason}")
        for org in change.revoked:
            context.log.warning(f"access withdrawn: tenant {org} is no longer listed; its history is kept")
        for org in change.inactive:
            context.log.info(f"tenant {org} is inactive (no runs); activate: erp-pipelines clients activate {erp} {org}")
        return dg.MaterializeResult(
            metadata={
                **change.counts,
                "partitions_added": len(added),
                "clients": dg.MetadataValue.md(_clients_table(listed)),
            }
        )

    def load(context: dg.AssetExecutionContext, what: str, months: list[dt.date]) -> Generator[dg.AssetMaterialization, None, LoadOutcome]:
        warehouse = getattr(context.resources, WAREHOUSE).get()
        wanted = list(context.partition_keys)
        active = warehouse.active_clients(erp, wanted)
        outcome = LoadOutcome(erp, wanted)
        not_active = [org for org in wanted if org not in active]
        if not_active:
            registered = warehouse.clients(erp)
            for org in not_active:  # inactive, rejected, revoked or never listed: say which, and the fix
                outcome.failures[org] = not_loadable_reason(erp, org, [c for c in registered if c.org_number == org])
                context.log.error(outcome.failures[org])
        connector = getattr(context.resources, erp).connector()
        batches = iterate_then_close(
            connector,
            load_tenants(
                connector, warehouse, [active[o] for o in wanted if o in active],
                what=(what,), months=months, run_id=context.run_id,
            ),
        )
        for batch in iterate_sync(batches):
            outcome.rows += batch.rows
            for extract in batch.loaded:
                outcome.loaded.append(extract.client.org_number)
                yield dg.AssetMaterialization(
                    asset_key=context.asset_key, partition=extract.client.org_number,
                    metadata=_tenant_metadata(extract, what, months),
                )
            for extract in batch.failed:
                outcome.failures[extract.client.org_number] = str(extract.error)
                context.log.error(str(extract.error))
        window = f", months {months[0]:%Y-%m}..{months[-1]:%Y-%m}" if months else ""
        context.log.info(
            f"{erp} {what}: {len(outcome.loaded)} tenants loaded ({outcome.rows} rows), "
            f"{len(outcome.failures)} failed{window}; http: {connector_stats(connector)}"
        )
        return outcome

    @dg.asset(
        key=accounts_key,
        description=f"Chart of accounts per tenant from {connector_class.display_name}.",
        **common,
        **partitioned,
    )
    def accounts(context: dg.AssetExecutionContext) -> Iterator[dg.AssetMaterialization]:
        outcome = yield from load(context, ACCOUNTS, [])
        outcome.raise_for_failures()

    @dg.asset(
        key=balances_key,
        description=f"Monthly account balances per tenant from {connector_class.display_name}: opening, "
        "movement, closing in NOK, debit positive, DECIMAL(18,2). Its checks verify the tenants each run loads.",
        check_specs=[dg.AssetCheckSpec(name, asset=balances_key, description=quality.CHECKS[name][0])
                     for name in quality.CHECKS],
        **common,
        **partitioned,
    )
    def balances(context: dg.AssetExecutionContext, config: BalanceWindow) -> Iterator:
        months = config.months(erp_config.history_start, full_by_default=connector_class.full_sync_by_default)
        outcome = yield from load(context, BALANCES, months)
        warehouse = getattr(context.resources, WAREHOUSE).get()
        for name in quality.CHECKS:
            count, sample = quality.run_check(warehouse, erp, name, tenants=outcome.loaded)
            yield dg.AssetCheckResult(
                check_name=name,
                passed=count == 0,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={"violations": count, "tenants_checked": len(outcome.loaded),
                          "sample": dg.MetadataValue.md(_rows_table(sample) if sample else "none")},
            )
        outcome.raise_for_failures()

    return ErpAssets(erp, connector_class, partitions, clients_key, accounts_key, balances_key, [clients, accounts, balances])


@dataclasses.dataclass
class LoadOutcome:
    """Which of a run's tenants landed and which failed (org number → message)."""

    erp: str
    wanted: list[str]
    loaded: list[str] = dataclasses.field(default_factory=list)
    failures: dict[str, str] = dataclasses.field(default_factory=dict)
    rows: int = 0

    def raise_for_failures(self) -> None:
        """Fail the step after the loaded tenants were recorded, so only the failed ones show as failed."""
        if not self.failures:
            return
        shown = "\n".join(f"- {message}" for message in list(self.failures.values())[:25])
        more = f"\n... and {len(self.failures) - 25} more" if len(self.failures) > 25 else ""
        raise dg.Failure(
            description=f"{len(self.failures)} of {len(self.wanted)} {self.erp} tenants failed "
            f"({len(self.loaded)} loaded):\n{shown}{more}",
            metadata={"failed_tenants": dg.MetadataValue.json(sorted(self.failures)), "tenants_loaded": len(self.loaded)},
            allow_retries=False,
        )

def connector_stats(connector) -> dict:
    api = getattr(connector, "api", None)
    return api.stats.as_metadata() if api is not None else {}

def _tenant_metadata(extract: TenantExtract, what: str, months: list[dt.date]) -> dict:
    client = extract.client
    metadata: dict = {"tenant": client.name, "erp_client_id": client.erp_client_id}
    if what == ACCOUNTS:
        metadata["accounts"] = len(extract.accounts)
        return metadata
    metadata.update(
        {
            "balance_rows": len(extract.balances),
            "months": f"{months[0]:%Y-%m}..{months[-1]:%Y-%m}",
            "accounts_with_balance": len({b.account_number for b in extract.balances}),
        }
    )
    if extract.findings is not None:
        metadata["reconciliation_findings"] = len(extract.findings)
        if extract.findings:
            metadata["reconciliation"] = dg.MetadataValue.md(_rows_table(
                [(f["check_name"], f.get("account_number") or "", f.get("period") or "", f.get("expected"),
                  f.get("actual"), f["message"]) for f in extract.findings[:20]],
                ("check", "account", "period", "expected", "actual", "message")))
    last_period = max((b.period for b in extract.balances), default=None)
    last = [b for b in extract.balances if b.period == last_period][:8]
    if last:
        metadata["preview"] = dg.MetadataValue.md(
            _rows_table([(b.period.isoformat(), b.account_number, b.opening, b.movement, b.closing) for b in last],
                        ("period", "account", "opening", "movement", "closing"))
        )
    return metadata

def _clients_table(listed) -> str:
    rows = [(c.org_number or "-", c.name, c.erp_client_id, str(c.status), c.status_reason or "") for c in listed[:200]]
    more = f"\n\n… {len(listed) - 200} more" if len(listed) > 200 else ""
    return _rows_table(rows, ("orgnr", "name", "client id", "status", "reason")) + more

def _rows_table(rows, header=None) -> str:
    header = header or tuple(f"col{i}" for i in range(len(rows[0]) if rows else 0))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
