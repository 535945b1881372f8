"""Asset factory: the same assets, checks, sensor and schedule for every ERP.

- `<erp>/clients` (unpartitioned): refreshes the client registry and adds each new tenant's
  organisation number to the ERP's dynamic partitions.
- `<erp>/accounts`, `<erp>/balances` (partitioned by organisation number): one step
  (`<erp>__accounts_and_balances`, a multi_asset) extracts both for a range of tenants,
  concurrently, with one session and one tenant guard per tenant. Either asset can be selected
  alone. Each tenant that lands gets its own materialisation event on each selected asset.
- Every tenant that fails gets an `AssetObservation` on its own partition (`tenant_failure` tag)
  naming the client, the error class and the fix, so the partition page says why without the logs.
  (Dagster 1.13's `AssetMaterializationFailure` is internal and cannot be yielded from an asset body.)
- Failures are of two kinds:
  - expected business failures: the client must act (`ClientAccessError`: it withdrew or never
    granted access), or the tenant is not active (inactive, rejected, revoked, not registered).
    A run with only these succeeds: materialisations for the tenants that landed, the failure
    observations for the others, and a warning "11 of 12 tenants loaded; 1 needs API-tilgang".
    Those partitions are not marked failed (nothing to retry until the client acts); the sensor
    re-syncs them when their access changes.
  - anything else (a bug, a malformed answer, a server down after the retries, a tenant mismatch):
    the step fails after the landed tenants were recorded, with a `dg.Failure` listing every failed
    tenant and its fix, so exactly those partitions show as failed and can be retried alone.
- `<erp>/balances` carries the integrity checks (`quality.py`) and evaluates them for the tenants each
  run loads, so they run on every path (UI, CLI, schedule, sensor). When no tenant landed, no check
  result is reported (Dagster shows them not evaluated) rather than "passed" over nothing.
  `trial_balance` and `row_arithmetic` are ERROR and blocking: the numbers are wrong, the step fails
  and the reporting tables downstream are not rebuilt (`defs/reporting.py`); `continuity` and
  `unknown_accounts` are WARN.
- `<erp>/balances` of an ERP refreshed daily carries a freshness policy (warn after 25 h, fail after
  26 h: the daily schedule's promise with an hour or two to spare). Dagster 1.13 judges it on the
  asset's latest materialisation of any partition, so it shows a daily run that did not happen;
  one tenant left behind shows through its failure observation and the partition's last date.
- The reporting models downstream (`defs/reporting.py`) are not part of the extraction runs (a
  tenant range yields no single asset output, so Dagster would skip them in-run); their automation
  conditions request them after balances were updated.
"""


import asyncio
import dataclasses
import datetime as dt
import re
import warnings
from collections import Counter
from collections.abc import Generator, Iterator
from zoneinfo import ZoneInfo

import dagster as dg

from erp_pipelines import quality
from erp_pipelines.clients import not_loadable_reason
from erp_pipelines.config import ErpConfig
from erp_pipelines.defs.metadata import table_metadata
from erp_pipelines.erps.extract import ACCOUNTS, BALANCES
from erp_pipelines.errors import ClientAccessError, ConfigError, ErpError, redact
from erp_pipelines.model import ClientStatus, TenantExtract, add_months, months_between
from erp_pipelines.pipeline import (
    await_then_close,
    iterate_sync,
    iterate_then_close,
    load_tenants,
    refresh_clients,
)

OSLO = ZoneInfo("Europe/Oslo")
WAREHOUSE = "warehouse"
TENANT_FAILURE_TAG = "erp/tenant_failure"  # on the failure observations: "expected" or "unexpected"
# the daily schedule runs at 06:00; a tenant not refreshed within a day and an hour or two is stale
BALANCES_FRESHNESS = dg.FreshnessPolicy.time_window(fail_window=dt.timedelta(hours=26),
                                                    warn_window=dt.timedelta(hours=25))

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
    def extract_op(self) -> str:
        """The one step that writes accounts and balances (its config: `BalanceWindow`)."""
        return extract_op_name(self.erp)


def extract_op_name(erp: str) -> str:
    return f"{erp}__accounts_and_balances"

def build_erp_assets(erp_config: ErpConfig) -> ErpAssets:
    with warnings.catch_warnings():  # `backfill_policy` is beta and used on purpose: silence that one, here only
        warnings.filterwarnings("ignore", category=dg.BetaWarning, message=".*backfill_policy.*")
        return _build_erp_assets(erp_config)

def _build_erp_assets(erp_config: ErpConfig) -> ErpAssets:
    erp = erp_config.name
    connector_class = erp_config.spec.connector_class
    partitions = dg.DynamicPartitionsDefinition(name=f"{erp}_tenants")
    clients_key, accounts_key, balances_key = (dg.AssetKey([erp, name]) for name in ("clients", "accounts", "balances"))
    common = {"group_name": erp, "kinds": {"duckdb", erp}, "owners": erp_config.owners, "pool": f"{erp}_api",
              "required_resource_keys": {erp, WAREHOUSE}}
    # accounts and balances: partitioned by tenant, one run per selected range (what `dagster asset
    # materialize --partition-range` requires); the schedule and the sensor cut their ranges into runs
    # of ERP_TENANTS_PER_RUN themselves
    spec_common = {"group_name": erp, "kinds": common["kinds"], "owners": common["owners"], "deps": [clients_key],
                   "partitions_def": partitions}

    @dg.asset(
        key=clients_key,
        description=f"The tenants the {connector_class.display_name} credential reaches, with their status "
        "(active / inactive / no API access / rejected / revoked) and the reason. New organisation numbers become "
        "partitions of the accounts and balances. Table `clients`; `erp-pipelines clients list` shows it.",
        metadata=table_metadata("clients"),
        **common,
    )
    def clients(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        warehouse = getattr(context.resources, WAREHOUSE).get()
        connector = getattr(context.resources, erp).connectors()  # one per connection
        listed, change = asyncio.run(await_then_close(connector, refresh_clients(connector, warehouse)))
        for slug, error in change.failed_connections.items():
            context.log.error(f"{erp} connection {slug!r}: listing failed; its tenants are kept as they were: {error}")
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
        for row in change.refused_files or []:  # file sources: every refused or ignored file, with the reason
            context.log.warning(f"{row['message']} [{row['reason']}] Fix: {row['fix']}")
        return dg.MaterializeResult(
            metadata={
                **change.counts,
                "tenants_failing": warehouse.failing_clients(erp),
                "partitions_added": len(added),
                "clients": dg.MetadataValue.md(_clients_table(listed)),
                **({"refused_files": dg.MetadataValue.md(_rows_table(
                    [(r["file_name"], r["reason"], r["message"], r["fix"]) for r in change.refused_files[:50]],
                    ("file", "reason", "message", "fix")))} if change.refused_files else {}),
            }
        )

    selectable = ((ACCOUNTS, accounts_key), (BALANCES, balances_key))

    def load(context: dg.AssetExecutionContext, months: list[dt.date]) -> Generator[dg.AssetMaterialization | dg.AssetObservation, None, LoadOutcome]:
        """Extract the run's tenants once for every selected asset (one session, one tenant guard per
        tenant) and report each landed tenant on each asset's partition."""
        warehouse = getattr(context.resources, WAREHOUSE).get()
        keys = {what: key for what, key in selectable if key in context.selected_asset_keys}
        wanted = list(context.partition_keys)
        active = warehouse.active_clients(erp, wanted)
        outcome = LoadOutcome(erp, wanted)
        not_active = [org for org in wanted if org not in active]
        if not_active:
            registered = warehouse.clients(erp)
            for org in not_active:  # inactive, rejected, revoked or never listed: say which, and the fix
                failure = TenantFailure.not_loadable(erp, org, [c for c in registered if c.org_number == org])
                outcome.failures[org] = failure
                yield from (failure.observation(key) for key in keys.values())
        connector = getattr(context.resources, erp).connectors()  # each tenant through its connection
        batches = iterate_then_close(
            connector,
            load_tenants(
                connector, warehouse, [active[o] for o in wanted if o in active],
                what=tuple(keys), months=months, run_id=context.run.run_id,
            ),
        )
        for batch in iterate_sync(batches):
            outcome.rows += batch.rows
            landed = [extract.client.org_number for extract in batch.loaded]
            for what, key in keys.items():
                total, per_tenant = warehouse.row_counts(what, erp, landed) if landed else (0, {})
                names = warehouse.account_names(erp, landed) if landed and what == BALANCES else {}
                for extract in batch.loaded:
                    yield dg.AssetMaterialization(
                        asset_key=key, partition=extract.client.org_number,
                        metadata={**_tenant_metadata(extract, what, months, names),
                                  **table_metadata(what, row_count=total,
                                                   partition_row_count=per_tenant[extract.client.org_number])},
                    )
            outcome.loaded += landed
            for extract in batch.failed:
                failure = TenantFailure.of_error(extract.client, extract.error)
                outcome.failures[extract.client.org_number] = failure
                yield from (failure.observation(key) for key in keys.values())
                if not failure.expected:
                    context.log.error(failure.message)
        window = f", months {months[0]:%Y-%m}..{months[-1]:%Y-%m}" if months and BALANCES in keys else ""
        context.log.info(
            f"{erp} {' and '.join(keys)}: {outcome.summary()} ({outcome.rows} rows){window}; "
            f"http: {connector_stats(connector)}"
        )
        return outcome

    # One step writes both assets: one session and one tenant guard per tenant instead of two. A
    # multi_asset with `can_subset`: either asset can run alone, and a run may leave the checks
    # without a result (no tenant landed).
    @dg.multi_asset(
        name=extract_op_name(erp),
        specs=[
            dg.AssetSpec(
                accounts_key,
                description=f"Chart of accounts per tenant from {connector_class.display_name}: number, name, the "
                "ERP's own type and the standard account it maps to. Table `accounts`; a run replaces each landed "
                "tenant's chart.",
                metadata=table_metadata("accounts"), skippable=True, **spec_common,
            ),
            dg.AssetSpec(
                balances_key,
                description=f"Monthly account balances per tenant from {connector_class.display_name}: opening, "
                "movement, closing in NOK, debit positive, DECIMAL(18,2); profit and loss restarts at the client's "
                "fiscal-year start. Table `balances`; a run replaces each landed tenant's months in its window. "
                "Its checks verify the tenants each run loads.",
                metadata=table_metadata("balances"), skippable=True,  # each landed tenant is materialised on its own
                freshness_policy=BALANCES_FRESHNESS if connector_class.scheduled_refresh else None,
                **spec_common,
            ),
        ],
        check_specs=[dg.AssetCheckSpec(name, asset=balances_key, description=check.description,
                                       blocking=check.severity == quality.ERROR)
                     for name, check in quality.CHECKS.items()],
        can_subset=True,
        pool=common["pool"],
        required_resource_keys=common["required_resource_keys"],
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),  # one run per selected range (see the module doc)
    )
    def accounts_and_balances(context: dg.AssetExecutionContext, config: BalanceWindow) -> Iterator:
        months = config.months(erp_config.history_start, full_by_default=connector_class.full_sync_by_default)
        outcome = yield from load(context, months)
        outcome.report(context)  # unexpected failures fail the step below, after the checks
        selected = {key.name for key in context.selected_asset_check_keys}
        if outcome.loaded and selected:  # nothing landed: no result, rather than "passed" over no tenants
            warehouse = getattr(context.resources, WAREHOUSE).get()
            names = {c.org_number: c.name for c in warehouse.clients(erp)
                     if c.org_number in outcome.loaded and c.status != ClientStatus.REJECTED}
            for name in (n for n in quality.CHECKS if n in selected):
                yield check_result(name, quality.violations(warehouse, erp, name, tenants=outcome.loaded),
                                   tenants_checked=len(outcome.loaded), names=names)
        outcome.raise_for_unexpected()

    return ErpAssets(erp, connector_class, partitions, clients_key, accounts_key, balances_key, [clients, accounts_and_balances])


@dataclasses.dataclass(frozen=True)
class TenantFailure:
    """Why one tenant did not land: its client's name, the error class, the message and the fix."""

    org_number: str
    client_name: str
    error: str  # the error class (`ClientAccessError`, `UpstreamError`, ...), or `ClientNotActive`
    message: str
    fix: str | None
    expected: bool  # a business failure: the client (or the user) must act; nothing is broken
    reason: str  # for the summary: "needs API-tilgang", "inactive", "failed (UpstreamError)"
    connection: str = "default"  # the connection serving the tenant ("-" when none does)

    @classmethod
    def of_error(cls, client, error: BaseException) -> "TenantFailure":
        name = type(error).__name__
        fix = redact(error.fix) if isinstance(error, ErpError) and error.fix else None
        if isinstance(error, ClientAccessError):
            return cls(client.org_number, client.name, name, redact(str(error)), fix, True, _needs(fix), client.connection)
        return cls(client.org_number, client.name, name, redact(str(error)), fix, False, f"failed ({name})",
                   client.connection)

    @classmethod
    def not_loadable(cls, erp: str, org_number: str, registered: list) -> "TenantFailure":
        """Inactive, rejected, revoked or never listed (`not_loadable_reason` says which, and the fix)."""
        message = not_loadable_reason(erp, org_number, registered)
        fix = message.split(" Fix: ", 1)[1] if " Fix: " in message else None
        client = min(registered, key=lambda c: c.status == ClientStatus.REJECTED, default=None)
        status = str(client.status) if client else "not registered"
        return cls(org_number, client.name if client else org_number, "ClientNotActive", message, fix, True, status,
                   client.connection if client else "-")

    def observation(self, asset_key: dg.AssetKey) -> dg.AssetObservation:
        """The event on this tenant's partition that the partition page shows."""
        return dg.AssetObservation(
            asset_key=asset_key,
            partition=self.org_number,
            description=self.message,
            metadata={"tenant": self.client_name, "org_number": self.org_number, "error": self.error,
                      "fix": self.fix or "-", "message": self.message, "outcome": self.reason,
                      "connection": self.connection},
            tags={TENANT_FAILURE_TAG: "expected" if self.expected else "unexpected"},
        )


def _needs(fix: str | None) -> str:
    """"needs API-tilgang" where the ERP's fix names what to tick or grant, else "needs access"."""
    found = re.search(r"\btick ([\w-]+)", fix or "") or re.search(r"\b([\w-]+tilgang)\b", fix or "")
    return f"needs {found.group(1)}" if found else "needs access"


def tenant_failure_messages(events) -> list[str]:
    """The failure messages of the tenant-failure observations among a run's events."""
    return [
        e.asset_observation_data.asset_observation.description
        for e in events
        if e.is_asset_observation and TENANT_FAILURE_TAG in (e.asset_observation_data.asset_observation.tags or {})
    ]


@dataclasses.dataclass
class LoadOutcome:
    """Which of a run's tenants landed and which failed (org number → failure)."""

    erp: str
    wanted: list[str]
    loaded: list[str] = dataclasses.field(default_factory=list)
    failures: dict[str, TenantFailure] = dataclasses.field(default_factory=dict)
    rows: int = 0

    def summary(self) -> str:
        """"11 of 12 tenants loaded; 1 needs API-tilgang"."""
        text = f"{len(self.loaded)} of {len(self.wanted)} {self.erp} tenants loaded"
        reasons = Counter(f.reason for f in self.failures.values())
        return text + ("; " + ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) if reasons else "")

    def report(self, context: dg.AssetExecutionContext) -> None:
        """Say what the run's failures mean; the business ones as a warning, not as an error."""
        if not self.failures:
            return
        expected = [f for f in self.failures.values() if f.expected]
        if expected:
            lines = "\n".join(f"- {f.message}" for f in expected[:25])
            context.log.warning(f"{self.summary()}\n{lines}")

    def raise_for_unexpected(self) -> None:
        """Fail the step if a tenant failed for an unexpected reason, after the loaded tenants were
        recorded, so only the failed ones show as failed. The description lists every failure."""
        if all(f.expected for f in self.failures.values()):
            return
        failures = sorted(self.failures.values(), key=lambda f: f.expected)  # the unexpected first
        shown = "\n".join(f"- {f.message}" for f in failures[:25])
        more = f"\n... and {len(failures) - 25} more" if len(failures) > 25 else ""
        raise dg.Failure(
            description=f"{self.summary()}:\n{shown}{more}",
            metadata={"failed_tenants": dg.MetadataValue.json(sorted(self.failures)), "tenants_loaded": len(self.loaded)},
            allow_retries=False,
        )


def check_result(name: str, found: quality.Violations, *, tenants_checked: int, names: dict[str, str]) -> dg.AssetCheckResult:
    """A check's result naming the tenant, the period and the amount furthest off, and its first rows."""
    metadata: dict = {"violations": found.count, "tenants_checked": tenants_checked,
                      "tenants_failing": len(found.tenants)}
    worst = found.worst
    if worst is not None:
        org, period = worst[0], worst[1]
        metadata.update({
            "worst_tenant": f"{names.get(org, org)} (orgnr {org})",
            "worst_period": f"{period:%Y-%m}",
            "off_by_nok": dg.MetadataValue.text(str(found.check.off_by(worst))),
        })
        rows = [(names.get(row[0], ""), row[0], f"{row[1]:%Y-%m}", *row[2:]) for row in found.rows[:20]]
        metadata["first_rows"] = dg.MetadataValue.md(
            _rows_table(rows, ("tenant", *found.check.columns)) + (f"\n\n… {found.count - 20} more" if found.count > 20 else ""))
    severity = dg.AssetCheckSeverity.ERROR if found.check.severity == quality.ERROR else dg.AssetCheckSeverity.WARN
    return dg.AssetCheckResult(check_name=name, passed=found.count == 0, severity=severity, metadata=metadata)


def connector_stats(connector) -> dict:
    if isinstance(connector, dict):  # `Connectors`: per connection when there are several
        stats = {slug: connector_stats(each) for slug, each in connector.items()}
        return next(iter(stats.values())) if len(stats) == 1 else stats
    api = getattr(connector, "api", None)
    return api.stats.as_metadata() if api is not None else {}

def _tenant_metadata(extract: TenantExtract, what: str, months: list[dt.date],
                     names: dict[tuple[str, str], str]) -> dict:
    client = extract.client
    metadata: dict = {"tenant": client.name, "erp_client_id": client.erp_client_id, "connection": client.connection}
    if what == ACCOUNTS:
        metadata["accounts"] = len(extract.accounts)
        if extract.accounts:
            metadata["preview"] = dg.MetadataValue.md(_rows_table(
                [(a.account_number, a.name, a.account_class or "", a.account_type or "", a.standard_account or "")
                 for a in extract.accounts[:8]],
                ("account", "name", "class", "type", "standard account")))
        return metadata
    periods = sorted({b.period for b in extract.balances}) or months  # what the data covers, not the window asked
    metadata.update(
        {
            "balance_rows": len(extract.balances),
            "months": f"{periods[0]:%Y-%m}..{periods[-1]:%Y-%m}" if periods else "none",
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
        org = client.org_number
        metadata["preview"] = dg.MetadataValue.md(_rows_table(
            [(f"{b.period:%Y-%m}", b.account_number, names.get((org, b.account_number), ""), b.opening, b.movement,
              b.closing) for b in last],
            ("period", "account", "name", "opening", "movement", "closing"),
        ))
    return metadata

def _clients_table(listed) -> str:
    rows = [(c.org_number or "-", c.name, c.erp_client_id, c.connection, str(c.status), c.status_reason or "")
            for c in listed[:200]]
    more = f"\n\n… {len(listed) - 200} more" if len(listed) > 200 else ""
    return _rows_table(rows, ("orgnr", "name", "client id", "connection", "status", "reason")) + more

def _rows_table(rows, header) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
