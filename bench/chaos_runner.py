"""The chaos runner: many tenants through the real pipeline against a simulator that misbehaves.

Shared by `tests/chaos` (a small size, in `make test`) and `bench/chaos.py` (`make chaos`, 1,000
tenants). It knows no ERP: `run_chaos(..., erp)` takes a registry name, and the ERP's simulator
(`registry.ERPS[erp].simulator_class`, a `sandbox.simulator.Simulator`) supplies the paths, the
tenants' scopes, the admin hooks (revoke, deny access, swap identity, expire tokens, a list that
shifts while paged), its facts (the fixes a revoked or denied tenant's error names, a field every
balance row needs) and its chaos rate limit. The connector is built from the simulator's
`environment(url)` (`config.connector_kwargs`). A new ERP gets the whole suite from its registry line.

A run:

1. builds a truth ledger and the ERP's simulator, served on 127.0.0.1 (real HTTP, real sockets);
2. deals the tenants out to fault kinds (seeded, reproducible): some get transient faults they must
   survive (latency, 5xx, 429 with and without Retry-After or reset headers, dropped connections,
   timeouts, malformed JSON, a page that changes while it is paged), some get faults they must fail
   on, alone (access revoked or API access withdrawn mid-run, an ERP that is down, malformed JSON
   every time, a required field missing, another company's identity from the start or switched on
   after the tenant guard); for everyone, all access tokens expire a third of the way in and a new
   client appears while the client list is being paged;
3. seeds the warehouse with "previous" balances for every tenant, so a failed tenant can be shown
   to keep them;
4. runs `refresh_clients` and `load_tenants` (the path the Dagster assets take) once;
5. checks the warehouse against the ledger and every outcome against what its kind demands, and
   counts requests, retries, 429s and minted tokens on both sides of the wire.

What "a page that changes while it is paged" must do (decided here, implemented by the connector
kit's `paging.read_all`): paging over a list that shifts repeats or skips a row. The connector
compares the ERP's version of the whole list on every page (e.g. a `versionDigest`) and the
row keys; on a change it reads the list again from the start (at most 3 reads, then the tenant fails
with "retry later"). The re-read list is what lands: a client created mid-listing is included, a
repeated row never lands, a shifted-out row is never lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import operator
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from erp_pipelines.config import connector_kwargs
from erp_pipelines.erps.extract import ACCOUNTS, BALANCES
from erp_pipelines.erps.kit import RetryPolicy
from erp_pipelines.errors import BadResponse, ClientAccessError, TenantMismatch, UpstreamError
from erp_pipelines.model import Balance, ClientStatus, add_months, months_between
from erp_pipelines.pipeline import load_tenants, refresh_clients
from erp_pipelines.registry import ERPS, ErpSpec, api_erps
from erp_pipelines.sandbox.common import RequestStats, path_matches, serve
from erp_pipelines.sandbox.ledger import TruthLedger, TruthTenant, generate_ledger
from erp_pipelines.sandbox.simulator import Simulator
from erp_pipelines.tokens import TokenStore
from erp_pipelines.warehouse import Warehouse

PREVIOUS_RUN = "previous-run"  # run_id of the seeded balances a failed tenant must keep
CHAOS_RUN = "chaos-run"


# ---------------------------------------------------------------------------------------- fault kinds


@dataclasses.dataclass(frozen=True)
class FaultKind:
    name: str
    share: float  # of the tenants (at least one tenant each)
    survives: bool  # True: the tenant must land exactly; False: it must fail, alone
    description: str
    error: type | None = None  # the error a failing kind must raise
    fix: str | Callable[[Any], str] = ""  # a fragment the error's fix must contain, or the simulator's

    def fix_for(self, simulator: Simulator | type[Simulator]) -> str:
        return self.fix if isinstance(self.fix, str) else self.fix(simulator)


KINDS: tuple[FaultKind, ...] = (
    # transient: retried or re-read, and the tenant lands exactly
    FaultKind("latency", 0.03, True, "every request 150 ms slow"),
    FaultKind("server_error", 0.03, True, "two 503s"),
    FaultKind("rate_limited", 0.005, True, "a 429 without any header"),
    FaultKind("rate_limited_retry_after", 0.005, True, "a 429 with Retry-After: 0.5"),
    FaultKind("rate_limited_reset", 0.005, True, "a 429 with the ERP's reset header: 1"),
    FaultKind("dropped_connection", 0.03, True, "a connection closed mid-response"),
    FaultKind("timeout", 0.01, True, "a request that never answers (client timeout)"),
    FaultKind("malformed_once", 0.03, True, "a truncated JSON body"),
    FaultKind("paging_accounts", 0.02, True, "an account created while the chart is paged"),
    FaultKind("paging_balances", 0.02, True, "a balance row inserted while a month is paged"),
    # permanent: the tenant fails alone, its error names it and the fix, nothing of it is stored
    FaultKind("revoked_mid_run", 0.01, False, "access revoked after the tenant guard",
              ClientAccessError, operator.attrgetter("revoke_fix")),
    FaultKind("api_access_withdrawn", 0.01, False, "API access denied while balances are read",
              ClientAccessError, operator.attrgetter("deny_access_fix")),
    FaultKind("erp_down", 0.005, False, "503 on every request once its extraction starts", UpstreamError,
              "retry the partition later"),
    FaultKind("malformed_always", 0.005, False, "truncated JSON on every balance request",
              BadResponse, "retry the partition later"),
    FaultKind("missing_field", 0.01, False, "a required field missing from every balance row",
              BadResponse, "update the connector"),
    FaultKind("wrong_company", 0.01, False, "answers as another client from the start",
              TenantMismatch, "organisation number"),
    FaultKind("switched_company", 0.01, False, "answers as another client once the guard has passed",
              TenantMismatch, "organisation number"),
)
KIND = {k.name: k for k in KINDS}
RETRY_AFTER_SECONDS = 0.5
RESET_SECONDS = 1
SLOW_MS = 150


def kinds_for(simulator: Simulator) -> tuple[FaultKind, ...]:
    """The kinds this simulator can stage. A 429 announcing its pause in a reset header needs an
    ERP whose API has rate-limit headers; for the others that kind is skipped (a plain 429 is
    `rate_limited` already). `wrong_company` needs a client list separate from the identity."""
    has_reset_header = simulator.harness.profile.rate_limit_headers is not None
    skipped = set() if has_reset_header else {"rate_limited_reset"}
    if not simulator.paths.paged_client_list:
        # the listing asks each credential who it is: another company's identity from the start is
        # what the client rules see (a duplicate number, refused there), not a tenant mismatch
        skipped.add("wrong_company")
    return tuple(k for k in KINDS if k.name not in skipped)


def deal(tenants: list[TruthTenant], seed: int, scope_of: Callable[[TruthTenant], str],
         kinds: tuple[FaultKind, ...] = KINDS) -> dict[str, str]:
    """Tenant scope → fault kind ("clean" for the rest). Each kind gets at least one tenant."""
    order = list(tenants)
    random.Random(seed).shuffle(order)
    assigned: dict[str, str] = {}
    position = 0
    for kind in kinds:
        for _ in range(max(1, round(len(order) * kind.share))):
            if position < len(order):
                assigned[scope_of(order[position])] = kind.name
                position += 1
    for tenant in order[position:]:
        assigned[scope_of(tenant)] = "clean"
    return assigned


# ---------------------------------------------------------------------------------------- triggers


@dataclasses.dataclass
class Trigger:
    """Run `action` (once) when the `after + 1`-th API request matching tenant and path arrives,
    before the simulator handles it: "mid-run" at a reproducible point."""

    action: Callable[[], Any]
    tenant: str | None = None
    path_prefix: str | None = None  # relative to the API prefix
    after: int = 0
    seen: int = 0
    fired: bool = False


class TriggerMiddleware:
    def __init__(self, app: Any, profile: Any, triggers: list[Trigger]) -> None:
        self.app, self.profile, self.triggers = app, profile, triggers
        self._lock = threading.Lock()

    async def __call__(self, scope, receive, send) -> None:
        if self.profile.prepare_request is not None:  # a tenant named in the body (GraphQL)
            receive = await self.profile.prepare_request(scope, receive)
        if self.profile.is_api_request(scope):
            tenant = self.profile.tenant_of(scope)
            with self._lock:
                for trigger in self.triggers:
                    if trigger.fired or (trigger.tenant is not None and trigger.tenant != str(tenant)):
                        continue
                    if trigger.path_prefix and not path_matches(scope["path"], self.profile.api_prefix,
                                                                trigger.path_prefix):
                        continue
                    trigger.seen += 1
                    if trigger.seen > trigger.after:
                        trigger.fired = True
                        trigger.action()
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------- report


@dataclasses.dataclass
class ChaosReport:
    erp: str
    kinds: tuple[FaultKind, ...] = KINDS  # the kinds dealt out (`kinds_for` the simulator)
    tenants: int = 0  # valid tenants listed (incl. the client created mid-listing)
    tenants_ok: int = 0
    tenants_failed: int = 0
    tenants_rejected: int = 0  # by the client rules (invalid/duplicate organisation numbers)
    expected_failures: int = 0
    rows_expected: int = 0
    rows_landed: int = 0
    rows_lost: int = 0
    rows_duplicated: int = 0
    rows_wrong: int = 0  # landed with other values than the truth, or for a key the truth lacks
    accounts_duplicated: int = 0
    accounts_wrong: int = 0
    failed_tenants_touched: int = 0  # failed tenants whose previous rows were not kept exactly
    requests: int = 0  # as the simulator counted them
    retries: int = 0  # as the client counted them
    http_429s_received: int = 0  # by the client
    http_429s_sent: int = 0  # by the simulator (injected + its rate limiter)
    http_429s_from_limit: int = 0
    tokens_minted: int | None = None  # as the simulator issued them; None: it names no token request
    token_bound: int = 0
    requests_per_tenant_clean: int = 0  # the most any fault-free tenant needed
    requests_per_tenant_max: int = 0
    requests_per_tenant_bound: int = 0
    over_bound: list[str] = dataclasses.field(default_factory=list)
    pause_violations: list[str] = dataclasses.field(default_factory=list)
    faults_fired: dict[str, int] = dataclasses.field(default_factory=dict)
    outcomes: dict[str, Counter] = dataclasses.field(default_factory=lambda: defaultdict(Counter))
    unexpected: list[str] = dataclasses.field(default_factory=list)
    sample_errors: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not (self.unexpected or self.rows_lost or self.rows_duplicated or self.rows_wrong
                    or self.accounts_duplicated or self.accounts_wrong or self.failed_tenants_touched
                    or self.over_bound or self.pause_violations)

    def summary(self) -> str:
        injected = self.http_429s_sent - self.http_429s_from_limit
        tokens = ("not counted (the simulator names no token request)" if self.tokens_minted is None
                  else f"{self.tokens_minted} (bound {self.token_bound})")
        lines = [
            f"chaos run: {self.erp}, {self.tenants} tenants, {self.seconds:.1f} s",
            (f"  tenants ok / failed:   {self.tenants_ok} / {self.tenants_failed} (expected failures: "
             f"{self.expected_failures}; rejected by the client rules: {self.tenants_rejected})"),
            f"  rows lost:             {self.rows_lost}  (of {self.rows_expected} expected, {self.rows_landed} landed)",
            f"  rows duplicated:       {self.rows_duplicated}",
            (f"  rows wrong:            {self.rows_wrong}; accounts duplicated/wrong: {self.accounts_duplicated}/"
             f"{self.accounts_wrong}; failed tenants' previous rows touched: {self.failed_tenants_touched}"),
            f"  retries:               {self.retries}",
            (f"  429s received:         {self.http_429s_received} (simulator sent {self.http_429s_sent}: "
             f"{injected} injected, {self.http_429s_from_limit} from its rate limit)"),
            (f"  requests:              {self.requests}; per tenant: clean ≤ {self.requests_per_tenant_clean}, "
             f"max {self.requests_per_tenant_max}, bound {self.requests_per_tenant_bound}"),
            f"  tokens minted:         {tokens}",
            "  faults fired:          " + ", ".join(f"{k}={v}" for k, v in sorted(self.faults_fired.items())),
        ]
        skipped = [k.name for k in KINDS if k not in self.kinds]
        if skipped:
            lines.append(f"  kinds not staged:      {', '.join(skipped)} (no rate-limit headers in this ERP's API)")
        for kind in self.kinds:
            outcome = self.outcomes.get(kind.name)
            if outcome:
                lines.append(f"    {kind.name:<26} {dict(outcome)}")
        for kind, message in sorted(self.sample_errors.items()):
            lines.append(f"  e.g. {kind}: {message[:240]}")
        if self.unexpected or self.over_bound or self.pause_violations:
            lines.append("  PROBLEMS:")
            lines += [f"    - {p}" for p in (self.unexpected + self.over_bound + self.pause_violations)[:40]]
        lines.append("  verdict:               " + ("PASS" if self.clean else "FAIL"))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class ChaosOptions:
    tenants: int = 24
    seed: int = 2026
    months: int = 2  # the daily window: the previous and the current month
    page_size: int = 16  # small pages, so lists span pages and paging faults bite
    max_attempts: int = 5
    client_timeout: float = 3.0
    hang_seconds: float = 6.0  # an injected timeout hangs longer than the client waits
    tenant_concurrency: int = 32
    batch_tenants: int = 200
    today: dt.date | None = None


def run_chaos(work_dir: str | Path, options: ChaosOptions | None = None, erp: str | None = None,
              *, progress: Callable[[str], None] | None = None) -> ChaosReport:
    """One chaos run of the registered ERP `erp` (default: the first API ERP) in `work_dir`."""
    options = options or ChaosOptions()
    say = progress or (lambda _message: None)
    spec = ERPS[erp] if erp else api_erps()[0]
    if spec.simulator_class is None:
        raise ValueError(f"{erp} has no simulator (no API); the chaos run needs one")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    this_month = (options.today or dt.date.today()).replace(day=1)
    months = months_between(add_months(this_month, -(options.months - 1)), this_month)
    ledger = generate_ledger(options.tenants, seed=options.seed, first_month=months[0], last_month=months[-1],
                             client_id_base=80_000)
    simulator = spec.simulator_class(ledger, fault_seed=options.seed)
    simulator.harness.stats = RequestStats(log_size=max(20_000, options.tenants * 60))
    if simulator.chaos_rate_limit is not None:
        simulator.set_rate_limit(simulator.chaos_rate_limit)
    kinds = kinds_for(simulator)
    assigned = deal(ledger.valid_tenants, options.seed, simulator.scope_of, kinds)
    triggers: list[Trigger] = []  # armed once the simulator is served and the credentials are given
    app = TriggerMiddleware(simulator.app, simulator.harness.profile, triggers)

    warehouse = Warehouse(work_dir / "warehouse.duckdb")
    _seed_previous(warehouse, erp, ledger.valid_tenants, months)
    store = TokenStore(work_dir / "tokens.enc", key=TokenStore.generate_key())
    say(f"{erp}: {len(ledger.valid_tenants)} tenants, {len(months)} months, "
        f"{sum(1 for k in assigned.values() if k != 'clean')} with faults")

    with serve(app, path=simulator.api_prefix) as url:
        environment = simulator.environment(url)
        simulator.prepare_credentials(environment, store)  # e.g. OAuth consents, before any fault
        simulator.reset_stats()
        triggers.extend(_arm(simulator, ledger, assigned, options))
        started = time.perf_counter()
        failures, connector_stats = asyncio.run(
            _extract(spec, environment, store, warehouse, months, options, say)
        )
    seconds = time.perf_counter() - started
    report = _verify(simulator, ledger, assigned, kinds, warehouse, months, failures, options)
    report.seconds = seconds
    report.retries = connector_stats.retries
    report.http_429s_received = connector_stats.rate_limited
    report.faults_fired = _fired(simulator, triggers)
    # one token to start, one after the mass expiry, one per revoked tenant (its 401 re-mints once)
    report.token_bound = 2 + sum(1 for k in assigned.values() if k == "revoked_mid_run")
    report.tokens_minted = _tokens_minted(simulator)
    if report.tokens_minted is not None and report.tokens_minted > report.token_bound:
        report.unexpected.append(f"{report.tokens_minted} tokens minted, more than the bound {report.token_bound}")
    if report.http_429s_received != report.http_429s_sent:
        report.unexpected.append(
            f"the simulator sent {report.http_429s_sent} 429s but the client counted {report.http_429s_received}")
    return report


async def _extract(spec: ErpSpec, environment: dict[str, str], store: TokenStore, warehouse: Warehouse,
                   months: list[dt.date], options: ChaosOptions, say: Callable[[str], None]):
    connector = spec.connector_class(
        **connector_kwargs(spec, environment),
        page_size=options.page_size,
        timeout=options.client_timeout,
        retry=RetryPolicy(max_attempts=options.max_attempts),
        token_store=store,
    )
    failures: dict[str, Exception] = {}  # by organisation number
    try:
        _, change = await refresh_clients(connector, warehouse)
        active = list(warehouse.active_clients(spec.name, change.active).values())
        say(f"listed {len(change.active)} active tenants ({len(change.rejected)} rejected); extracting")
        done = 0
        async for batch in load_tenants(
            connector, warehouse, active, what=(ACCOUNTS, BALANCES), months=months, run_id=CHAOS_RUN,
            batch_tenants=options.batch_tenants, tenant_concurrency=options.tenant_concurrency,
        ):
            for extract in batch.failed:
                failures[extract.client.org_number] = extract.error
            done += len(batch.loaded) + len(batch.failed)
            say(f"  {done}/{len(active)} tenants done ({len(failures)} failed)")
    finally:
        await connector.aclose()
    return failures, connector.api.stats


def _arm(simulator: Simulator, ledger: TruthLedger, assigned: dict[str, str], options: ChaosOptions) -> list[Trigger]:
    """Install every tenant's faults; return the mid-run triggers."""
    faults, paths = simulator.faults, simulator.paths
    by_scope = {simulator.scope_of(t): t for t in ledger.valid_tenants}
    clean = [scope for scope, kind in assigned.items() if kind == "clean"]
    triggers: list[Trigger] = []
    for scope, kind in assigned.items():
        tenant = by_scope[scope]
        if kind == "latency":
            faults.latency(SLOW_MS, tenant=scope)
        elif kind == "server_error":
            faults.server_error(503, times=2, tenant=scope)
        elif kind == "rate_limited":
            faults.too_many_requests(1, tenant=scope, path_prefix=paths.identity)
        elif kind == "rate_limited_retry_after":
            faults.too_many_requests(1, retry_after=RETRY_AFTER_SECONDS, tenant=scope, path_prefix=paths.identity)
        elif kind == "rate_limited_reset":
            faults.too_many_requests(1, reset_seconds=RESET_SECONDS, tenant=scope, path_prefix=paths.identity)
        elif kind == "dropped_connection":
            faults.drop_connection(1, tenant=scope, path_prefix=paths.balances)
        elif kind == "timeout":
            faults.timeout(options.hang_seconds, 1, tenant=scope, path_prefix=paths.accounts)
        elif kind == "malformed_once":
            faults.malformed_json(1, tenant=scope, path_prefix=paths.balances)
        elif kind in ("paging_accounts", "paging_balances"):
            path = paths.accounts if kind == "paging_accounts" else paths.balances
            simulator.mutate_during_paging(path, "insert", position=0, after_requests=1, tenant=tenant.erp_client_id)
        elif kind == "revoked_mid_run":
            triggers.append(Trigger(lambda t=tenant: simulator.revoke(t), tenant=scope, path_prefix=paths.accounts))
        elif kind == "api_access_withdrawn":
            triggers.append(Trigger(lambda t=tenant: simulator.deny_access(t), tenant=scope,
                                    path_prefix=paths.balances))
        elif kind == "erp_down":  # from its first chart request on (a listing that fails is another story)
            triggers.append(Trigger(lambda s=scope: faults.server_error(503, times=None, tenant=s), tenant=scope,
                                    path_prefix=paths.accounts))
        elif kind == "malformed_always":
            faults.malformed_json(None, tenant=scope, path_prefix=paths.balances)
        elif kind == "missing_field":
            faults.drop_field(simulator.required_balance_field, None, tenant=scope, path_prefix=paths.balances)
        elif kind in ("wrong_company", "switched_company"):
            others = clean or [s for s in assigned if s != scope]
            other = by_scope[others[tenant.erp_client_id % len(others)]]
            if kind == "wrong_company":
                simulator.swap_identity(tenant, other)
            else:  # after the guard of fetch_balances: only a guard after the read can see it
                triggers.append(Trigger(lambda t=tenant, o=other: simulator.swap_identity(t, o), tenant=scope,
                                        path_prefix=paths.balances))
    # for everyone: a new client while the client list is paged, and every token dying mid-run
    if paths.paged_client_list:
        simulator.mutate_during_paging(paths.clients, "insert", position=0, after_requests=1)
    expire_at = max(20, len(assigned) * 3)
    triggers.append(Trigger(simulator.expire_tokens, after=expire_at))
    return triggers


def _seed_previous(warehouse: Warehouse, erp: str, tenants: list[TruthTenant], months: list[dt.date]) -> None:
    """Every tenant already has balances from an earlier run (marked PREVIOUS_RUN)."""
    warehouse.replace_balances(erp, {t.org_number: t.expected_balances(months) for t in tenants}, months,
                               run_id=PREVIOUS_RUN)


def _fired(simulator: Simulator, triggers: list[Trigger]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for rule in simulator.faults.rules:
        counts[rule.kind] += rule.fired
    counts["mid_run_actions"] = sum(t.fired for t in triggers)
    return dict(counts)


def _tokens_minted(simulator: Simulator) -> int | None:
    """The access tokens (sessions) the simulator issued: its answered token requests, or None
    when it names no token request (`ApiPaths.token`: static tokens, or minted outside its API)."""
    if simulator.paths.token is None:
        return None
    path = simulator.api_prefix + simulator.paths.token
    return sum(1 for r in simulator.stats.requests() if r.path.startswith(path) and 200 <= (r.status or 0) < 300)


# ---------------------------------------------------------------------------------------- checks


def _verify(simulator: Simulator, ledger: TruthLedger, assigned: dict[str, str], kinds: tuple[FaultKind, ...],
            warehouse: Warehouse, months: list[dt.date], failures: dict[str, Exception],
            options: ChaosOptions) -> ChaosReport:
    erp = simulator.erp
    report = ChaosReport(erp=erp, kinds=kinds)
    clients = warehouse.query("SELECT org_number, status FROM clients WHERE erp = ?", [erp])
    report.tenants_rejected = sum(1 for _, status in clients if status == ClientStatus.REJECTED)
    # a number shared by clients is held by one (the client rules): the status that counts is the holder's
    statuses = {org: status for org, status in clients if status != ClientStatus.REJECTED}
    statuses.update({org: status for org, status in clients if org not in statuses})
    valid = list(ledger.valid_tenants)  # includes the client created while the list was paged
    report.tenants = len(valid)
    landed = _landed_balances(warehouse, erp)
    accounts = _landed_accounts(warehouse, erp)
    report.rows_duplicated = warehouse.query(
        "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM balances WHERE erp = ? "
        "GROUP BY org_number, period, account_number)", [erp])[0][0]
    report.accounts_duplicated = warehouse.query(
        "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM accounts WHERE erp = ? "
        "GROUP BY org_number, account_number)", [erp])[0][0]
    phantom = simulator.paths.phantom_account
    for tenant in valid:
        kind = KIND.get(assigned.get(simulator.scope_of(tenant), "clean"))
        label = f"{tenant.name} (orgnr {tenant.org_number}"
        error = failures.get(tenant.org_number)
        truth = {(b.period, b.account_number): b for b in tenant.expected_balances(months)}
        rows = landed.get(tenant.org_number, {})
        name = kind.name if kind else "clean"
        if statuses.get(tenant.org_number) != ClientStatus.OK and error is None:
            report.unexpected.append(f"{label}): not extracted (status {statuses.get(tenant.org_number)})")
            report.outcomes[name]["not extracted"] += 1
            continue
        if error is None:
            report.tenants_ok += 1
            report.outcomes[name]["landed"] += 1
            if kind is not None and not kind.survives:
                report.unexpected.append(f"{label}): expected to fail ({kind.name}) but landed")
            report.rows_expected += len(truth)
            this_run = {key: row for key, row in rows.items() if row[1] == CHAOS_RUN}
            report.rows_landed += len(this_run)
            report.rows_lost += sum(1 for key in truth if key not in this_run)
            report.rows_wrong += sum(1 for key, row in rows.items()
                                     if key not in truth or row[0] != _values(truth[key]) or row[1] != CHAOS_RUN)
            expected_accounts = {str(a.number): a.name for a in tenant.accounts}
            if name == "paging_accounts" and phantom:
                expected_accounts.setdefault(phantom, None)
            got = accounts.get(tenant.org_number, {})
            report.accounts_wrong += len(set(got) ^ set(expected_accounts)) + sum(
                1 for number, title in got.items()
                if expected_accounts.get(number) is not None and expected_accounts[number] != title)
            continue
        report.tenants_failed += 1
        report.outcomes[name][type(error).__name__] += 1
        message = str(error)
        if kind is None or kind.survives:
            report.unexpected.append(f"{label}): expected to land ({name}) but failed: {message[:300]}")
        else:
            report.expected_failures += 1
            report.sample_errors.setdefault(kind.name, message)
            fix = kind.fix_for(simulator)
            if not isinstance(error, kind.error):
                report.unexpected.append(f"{label}): {kind.name} raised {type(error).__name__}, "
                                         f"expected {kind.error.__name__}: {message[:200]}")
            if label not in message or "Fix:" not in message or fix not in message.partition("Fix:")[2]:
                report.unexpected.append(f"{label}): {kind.name}: the error does not name the tenant and the "
                                         f"fix ({fix!r}): {message[:300]}")
        # a failed tenant keeps exactly its previous rows
        previous = {key: (_values(b), PREVIOUS_RUN) for key, b in truth.items()}
        if rows != previous:
            report.failed_tenants_touched += 1
            report.unexpected.append(f"{label}): failed, but its stored balances changed")
        if tenant.org_number in accounts:
            report.unexpected.append(f"{label}): failed, but a chart of accounts was stored for it")
    _check_requests(simulator, valid, assigned, options, report)
    return report


def _values(balance: Balance) -> tuple[Decimal, Decimal, Decimal]:
    return balance.opening, balance.movement, balance.closing


def _landed_balances(warehouse: Warehouse, erp: str) -> dict[str, dict]:
    out: dict[str, dict] = defaultdict(dict)
    for org, period, account, opening, movement, closing, run_id in warehouse.query(
        "SELECT org_number, period, account_number, opening, movement, closing, run_id FROM balances WHERE erp = ?",
        [erp],
    ):
        out[org][(period, account)] = ((opening, movement, closing), run_id)
    return out


def _landed_accounts(warehouse: Warehouse, erp: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for org, number, name in warehouse.query(
        "SELECT org_number, account_number, name FROM accounts WHERE erp = ?", [erp]
    ):
        out[org][number] = name
    return out


def _check_requests(simulator: Simulator, valid: list[TruthTenant], assigned: dict[str, str],
                    options: ChaosOptions, report: ChaosReport) -> None:
    """No retry storms: per tenant, requests stay within a bound derived from a fault-free tenant;
    announced pauses (Retry-After, the reset header) are waited out before the next request."""
    stats, scope_of = simulator.stats, simulator.scope_of
    snapshot = stats.snapshot()
    report.requests = snapshot["total"]
    report.http_429s_sent = snapshot["too_many_requests"]
    report.http_429s_from_limit = snapshot["faults"].get("rate_limited", 0)
    per_tenant = snapshot["by_tenant"]
    limited: Counter[str] = Counter(r.tenant for r in stats.requests(status=429) if r.fault == "rate_limited")
    clean = [per_tenant.get(scope_of(t), 0) - limited[scope_of(t)]
             for t in valid if assigned.get(scope_of(t)) == "clean"]
    report.requests_per_tenant_clean = max(clean, default=0)
    # The bound: what a fault-free tenant needs, plus every attempt the retry policy allows for the
    # requests a fault can hit at once (the months are read concurrently), plus one retry after a
    # 401 (the token re-mint), plus the 429s the ERP's own limit sent this tenant. A retry storm
    # (retries multiplying, or not stopping) cannot stay under it.
    extra = options.max_attempts * options.months + 1
    report.requests_per_tenant_bound = report.requests_per_tenant_clean + extra
    report.requests_per_tenant_max = max((per_tenant.get(scope_of(t), 0) for t in valid), default=0)
    for tenant in valid:
        scope = scope_of(tenant)
        count, bound = per_tenant.get(scope, 0), report.requests_per_tenant_bound + limited[scope]
        if count > bound:
            trail = " ".join(
                f"{r.path.removeprefix(simulator.api_prefix)}:{r.status or '-'}{'/' + r.fault if r.fault else ''}"
                for r in sorted(stats.requests(tenant=scope), key=lambda r: r.started)
            )
            report.over_bound.append(
                f"{tenant.name}: {count} requests > bound {bound} ({assigned.get(scope)}): {trail}")
    # announced pauses are honoured: after the injected 429, that tenant's next request waits
    announced = {"rate_limited_retry_after": RETRY_AFTER_SECONDS, "rate_limited_reset": float(RESET_SECONDS)}
    for tenant in valid:
        scope = scope_of(tenant)
        pause = announced.get(assigned.get(scope, ""))
        if pause is None:
            continue
        records = sorted(stats.requests(tenant=scope), key=lambda r: r.started)
        for i, record in enumerate(records):
            if record.status == 429 and i + 1 < len(records):
                answered = record.started + record.duration_ms / 1000
                gap = records[i + 1].started - answered
                if gap < pause * 0.95:
                    report.pause_violations.append(
                        f"{tenant.name}: next request {gap:.3f} s after a 429 announcing {pause} s")
