"""`make bench`: every API ERP at its rate limit, then extraction throughput and peers.

    .venv/bin/python -m bench.run [--quick] [--sections compliance,throughput,dagster] [--erps NAME,...]
                                  [--modes fixed,...] [--tenants 1000] [--latency-ms 50] [--limit 200]

Every simulator runs in a child process (`bench/server.py`) and every connector is built from the
simulator's environment (`config.connector_from_environment`), so any ERP in the registry joins by
its registry line; what the bench knows of particular ERPs is in `bench/erp_profiles.py`.

1. Rate-limit compliance: for every API ERP (`registry.api_erps()`) × every window mode the
   simulator counts its limit by (`sandbox.common.WINDOW_MODES`: fixed, sliding, token bucket), one
   run of `refresh_clients` + `pipeline.load_tenants` (accounts and the daily two-month window)
   against the ERP's own limit as the server enforces it (`erp_profiles.server_limit`) with
   COMPLIANCE_LATENCY ms added to every request, over enough tenants for COMPLIANCE_SECONDS of
   traffic at the limit (sized by counting one tenant's requests on the simulator in process).
   Figures: requests, utilisation (requests the server admitted per second of the run's active
   span, first request to last response, ÷ the limit per second), 429s and their share, 429s for
   too many requests in flight (where the server caps them), the server's peak in flight, balance
   rows landed and whether they equal the truth ledger. One table, ERP × mode.
2. Throughput, for the throughput ERP (the first with `bench/<erp>_peers.py`; at LIMIT requests per
   1 s fixed window per credential, LATENCY ms added): `pipeline.load_tenants` for TENANTS tenants, accounts and the
   daily window; tenants/s, rows/s, requests per tenant-month, utilisation, 429s; the warehouse
   checked against the truth ledger;
3. a 12-month full sync for a fifth of the tenants: requests per tenant-month;
4. the Dagster overhead: the same tenants as one in-process Dagster run over the partition range
   (`<erp>/accounts` and `<erp>/balances` in one step, as the schedule runs them) against the same
   extraction called directly (one pass, both, the same requests), on an in-memory, a
   SQLite and a PostgreSQL instance (deploy/dagster.yaml on a private cluster, also with
   `synchronous_commit = off`); `--sections dagster` runs this phase alone;
5. peers on PEER tenants: a naive sequential extractor and dlt's `rest_api` source (defaults, and
   `parallelized=True`), each result compared row for row with ours;
6. DuckDB load: `Warehouse.replace_balances` of 1M rows (canonical records in, one transaction);
   the same on both warehouse backends, the DuckDB file and DuckLake, one writer and 8 at once
   (`bench/warehouse_bench.py`, also runnable alone);
7. peak RSS for 10,000 tenants in a separate process (`bench/rss.py`; no latency and a limit that
   never binds, to finish in minutes: memory depends on tenants and batch size, not on the pace).

The figures are printed and written to the "## Rate-limit compliance (all API ERPs)" and
"## Throughput" sections of bench/results.md (other sections are kept). `run_benchmark` is also what
the smoke test in `make test` runs, tiny.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import pool, warehouse_bench
from bench.erp_profiles import THROUGHPUT_ERP, ServerLimit, peers_module, server_limit
from bench.server import SandboxProcess, SandboxSpec
from erp_pipelines.config import connector_from_environment
from erp_pipelines.erps.extract import ACCOUNTS, BALANCES
from erp_pipelines.erps.kit.throttle import RateLimit, Throttle
from erp_pipelines.model import Balance, Client, add_months, months_between
from erp_pipelines.pipeline import load_tenants, refresh_clients
from erp_pipelines.registry import ERPS, api_erps
from erp_pipelines.sandbox.common import WINDOW_MODES, RateLimitPolicy
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.tokens import PATH_VARIABLE, TokenStore
from erp_pipelines.warehouse import Warehouse

RESULTS = Path(__file__).resolve().parent / "results.md"
SECTION = "## Throughput"
COMPLIANCE_SECTION = "## Rate-limit compliance (all API ERPs)"
ERP = THROUGHPUT_ERP
peers = peers_module(ERP)
# targets, printed next to the figures
UTILISATION_TARGET = 0.9  # of the limit
SHARE_429_TARGET = 0.01  # of the requests
IN_FLIGHT_429_TARGET = 0  # for ERPs whose server caps the requests in flight
DLT_TARGET = 3.0  # ours vs dlt rest_api at its best setting (parallelized=True)


def _template(erp: str, path: str | None) -> str:
    """A request's template as the simulator's statistics name it ("GET /v2/balanceSheet")."""
    simulator = ERPS[erp].simulator_class
    return f"GET {simulator.api_prefix}{path}" if path else ""


@dataclasses.dataclass
class BenchOptions:
    # which sections run
    compliance: bool = True
    throughput: bool = True
    # 1. rate-limit compliance
    compliance_seconds: float = 20.0  # traffic per run at the limit (sizes the tenants)
    compliance_latency_ms: float = 50.0
    compliance_erps: tuple[str, ...] | None = None  # None: every API ERP in the registry
    window_modes: tuple[str, ...] | None = None  # None: every mode of sandbox.common.WINDOW_MODES
    # 2-7. throughput ERP
    tenants: int = 1000
    latency_ms: float = 50.0
    limit: int | None = None  # requests per window per credential; None: erp_profiles.server_limit(ERP)
    window_seconds: float = 1.0
    full_sync_tenants: int = 200
    full_sync_months: int = 12
    peer_tenants: int = 200
    dagster: bool = True
    dagster_only: bool = False  # `--sections dagster`: the sandbox, the direct extraction and the Dagster runs alone
    dagster_storages: tuple[str, ...] = ("sqlite", "in_memory", "postgres", "postgres_async_commit")
    duckdb_rows: int = 1_000_000
    rss_tenants: int = 10_000
    pool_requests: int = 6400  # 8. connection pool: requests per pool and in-flight level
    seed: int = 2026

    @classmethod
    def quick(cls, **overrides: Any) -> BenchOptions:
        return cls(**{"compliance_seconds": 4.0, "tenants": 100, "full_sync_tenants": 20, "peer_tenants": 20,
                      "duckdb_rows": 100_000, "rss_tenants": 1000, "pool_requests": 1600, **overrides})

    def throughput_limit(self) -> int:
        return self.limit if self.limit is not None else server_limit(ERP).limit


@dataclasses.dataclass
class Run:
    """One extraction: wall time, the sandbox's request counts, what landed."""

    seconds: float
    tenants: int
    failed: int
    rows: int
    requests: dict[str, Any]
    before_steps: float = 0.0  # Dagster: seconds from the call to the first step (run creation)

    @property
    def admitted(self) -> int:
        return self.requests["total"] - self.requests["too_many_requests"]

    def calls(self, template: str) -> int:
        """Admitted requests (not 429) to one endpoint."""
        log = self.requests.get("log")
        if log is not None and len(log) == self.requests["total"]:
            return sum(1 for r in log if r["template"] == template and r["status"] != 429)
        return self.requests["by_template"].get(template, 0)  # the log was cut: 429s included


# ---------------------------------------------------------------------------------------- the run


def run_benchmark(options: BenchOptions, work: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every section asked for; returns the figures (and the checks, under "checks")."""
    work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {"options": dataclasses.asdict(options), "machine": _machine()}
    checks: dict[str, bool] = {}
    figures["checks"] = checks
    if options.compliance:
        figures["compliance"] = _compliance(options, work, checks, say)
    if options.throughput:
        _throughput_sections(options, work, figures, checks, say)
    elif options.dagster_only:
        _dagster_section(options, work, figures, checks, say)
    return figures


# ---------------------------------------------------------------------------------------- 1. compliance


def _compliance(options: BenchOptions, work: Path, checks: dict[str, bool],
                say: Callable[[str], None]) -> list[dict[str, Any]]:
    """One run per API ERP per window mode, at the ERP's own limit; one row of figures each."""
    this = dt.date.today().replace(day=1)
    months = months_between(add_months(this, -1), this)
    first_month = add_months(this, -11)
    erps = [spec.name for spec in api_erps() if options.compliance_erps is None or spec.name in options.compliance_erps]
    modes = [mode for mode in WINDOW_MODES if options.window_modes is None or mode in options.window_modes]
    rows = []
    for erp in erps:
        try:
            rows += _compliance_erp(erp, modes, months, first_month, options, work, checks, say)
        except Exception as exc:  # noqa: BLE001 - one ERP's broken simulator must not hide the others' figures
            checks[f"compliance {erp}: ran"] = False
            rows.append({"erp": erp, "error": f"{type(exc).__name__}: {exc}"})
            say(f"compliance {erp}: FAILED: {type(exc).__name__}: {exc}")
    return rows


def _compliance_erp(erp: str, modes: list[str], months: list[dt.date], first_month: dt.date, options: BenchOptions,
                    work: Path, checks: dict[str, bool], say: Callable[[str], None]) -> list[dict[str, Any]]:
    limit = server_limit(erp)
    per_tenant = _requests_per_tenant(erp, months, first_month, options.seed, work)
    tenants = max(2, math.ceil(limit.per_second * options.compliance_seconds / per_tenant))
    say(f"compliance {erp}: {limit.describe()} on the server, {per_tenant:.1f} requests per tenant: "
        f"{tenants} tenants")
    spec = SandboxSpec(erp=erp, tenants=tenants, first_month=first_month, last_month=months[-1],
                       limit=limit.limit, window_seconds=limit.window_seconds, max_in_flight=limit.max_in_flight,
                       mode=modes[0], latency_ms=options.compliance_latency_ms, seed=options.seed)
    ledger = generate_ledger(tenants, seed=options.seed, first_month=first_month, last_month=months[-1])
    ERPS[erp].simulator_class.shape_ledger(ledger)  # as the simulator in the child process does
    rows = []
    with SandboxProcess(spec) as sandbox:  # one simulator per ERP; each mode a fresh limiter
        for mode in modes:
            sandbox.set_rate_limit(limit.limit, limit.window_seconds, limit.max_in_flight, mode)
            row = _compliance_run(sandbox, mode, limit, ledger, months, work)
            checks[f"compliance {erp} ({mode}): every tenant equals the truth ledger"] = row["equals_truth"]
            rows.append(row)
            say(f"compliance {erp} ({mode}): {_describe(row)}")
    return rows


CALIBRATION_TENANTS = 3


def _requests_per_tenant(erp: str, months: list[dt.date], first_month: dt.date, seed: int, work: Path) -> float:
    """The requests one tenant costs the connector (accounts, balances of `months`, the guard),
    counted on the simulator in process with no limit and no latency: it sizes a compliance run."""
    ledger = generate_ledger(CALIBRATION_TENANTS, seed=seed, first_month=first_month, last_month=months[-1],
                             rejected_fixtures=False)
    simulator = ERPS[erp].simulator_class(ledger, rate_limit=RateLimitPolicy())
    environment = {**simulator.environment("http://calibration.invalid" + simulator.api_prefix),
                   **SandboxProcess.token_store(work / f"calibration-{erp}-tokens.enc")}
    simulator.prepare_credentials(environment, TokenStore.from_env(environment[PATH_VARIABLE], environment))
    connector = connector_from_environment(erp, environment, transport=httpx.ASGITransport(app=simulator.app),
                                           throttle=Throttle(RateLimit(requests_per_second=10_000.0)))
    warehouse = Warehouse(work / f"calibration-{erp}.duckdb")

    async def run() -> int:
        async with connector:
            listed, _ = await refresh_clients(connector, warehouse)
            clients = [client for client in listed if client.is_active]
            simulator.reset_stats()
            async for _ in load_tenants(connector, warehouse, clients, what=(ACCOUNTS, BALANCES), months=months):
                pass
        return len(clients)

    tenants = asyncio.run(run())
    return simulator.stats.total / max(1, tenants)


def _compliance_run(sandbox: SandboxProcess, mode: str, limit: ServerLimit, ledger, months: list[dt.date],
                    work: Path) -> dict[str, Any]:
    """List the clients and load every tenant with a new connector (its own throttle and token
    store, as a first run in a new process would), every request counted by the server, whose
    limiter was just set to `mode` (a fresh count per credential)."""
    erp = sandbox.erp
    connector_class = ERPS[erp].connector_class
    path = work / f"compliance-{erp}-{mode}.duckdb"
    path.unlink(missing_ok=True)
    warehouse = Warehouse(path)
    warehouse.prepare()
    counts = {"loaded": 0, "failed": 0, "rows": 0}
    environment = sandbox.copy_of_token_store(work / f"compliance-{erp}-{mode}.enc")
    connector = sandbox.connector(environment, throttle=Throttle(connector_class.rate_limit))
    clients: list[Client] = []

    async def run() -> None:
        async with connector:
            listed, _ = await refresh_clients(connector, warehouse)
            clients.extend(client for client in listed if client.is_active)
            async for batch in load_tenants(connector, warehouse, clients, what=(ACCOUNTS, BALANCES), months=months):
                counts["loaded"] += len(batch.loaded)
                counts["failed"] += len(batch.failed)
                counts["rows"] += batch.rows

    server = psutil.Process(sandbox.pid)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    sandbox.reset_stats()
    server_cpu, client_cpu = _cpu_seconds(server), time.process_time()
    started = time.perf_counter()
    asyncio.run(run())
    seconds = time.perf_counter() - started
    server_cpu, client_cpu = _cpu_seconds(server) - server_cpu, time.process_time() - client_cpu
    stats = sandbox.stats(log=True)
    total, refused = stats["total"], stats["too_many_requests"]
    span = _active_span(stats) or seconds
    in_flight = _in_flight_429s(stats, limit)
    balance_rows = warehouse.query(
        f"SELECT count(*) FROM balances WHERE erp = ? AND period BETWEEN ? AND ? AND {peers.NOT_ALL_ZERO}",
        [erp, months[0], months[-1]])[0][0]
    row = {
        "erp": erp,
        "display_name": connector_class.display_name,
        "mode": mode,
        "server_limit": limit.describe(),
        "limit_per_s": limit.per_second,
        "max_in_flight": limit.max_in_flight,
        "client_limit": _client_limit(connector_class.rate_limit),
        "tenants": len(clients),
        "loaded": counts["loaded"],
        "failed": counts["failed"],
        "seconds": round(seconds, 2),
        "active_seconds": round(span, 2),
        "requests": total,
        "admitted_per_s": round((total - refused) / span, 2),
        "utilisation": round((total - refused) / span / limit.per_second, 3),
        "requests_429": refused,
        "share_429": round(refused / max(1, total), 4),
        "in_flight_429": in_flight,
        "peak_in_flight": stats["peak_in_flight"],
        "rows": counts["rows"],
        "balance_rows": balance_rows,
        "client_cpu_s": round(client_cpu, 1),
        "server_cpu_s": round(server_cpu, 1),
        "load_1min_at_start": load,
        "equals_truth": counts["failed"] == 0 and bool(clients) and _equals_truth(warehouse, ledger, erp, clients,
                                                                                   months),
    }
    row["targets_missed"] = _missed(row)
    return row


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _active_span(stats: dict[str, Any]) -> float | None:
    """Seconds from the first request's arrival to the last response, from the server's log."""
    log = stats.get("log") or []
    if not log or len(log) != stats["total"]:
        return None
    return max(r["started"] + r["duration_ms"] / 1000 for r in log) - min(r["started"] for r in log)


IN_FLIGHT_REASON = "too many in flight"  # sandbox.common.RateLimiter's `RateDecision.reason`


def _in_flight_429s(stats: dict[str, Any], limit: ServerLimit) -> int | None:
    """429s the server gave because the credential already had `max_in_flight` requests in flight
    (None where the server caps nothing, or the log was cut).

    Exact when the request log carries the limiter's reason (`rate_limit_reason`, asked of
    sandbox/common.py). Until then inferred from the log: a 429 counts when, as it arrived, at
    least `max_in_flight` admitted requests of the same credential were under way. That is an
    upper bound: a 429 for an exhausted window while the credential had a request in flight counts
    too (the limiter checks the window first)."""
    if not limit.max_in_flight:
        return None
    log = stats.get("log") or []
    if len(log) != stats["total"]:
        return None
    if log and "rate_limit_reason" in log[0]:
        return sum(1 for r in log if r["status"] == 429 and r["rate_limit_reason"] == IN_FLIGHT_REASON)
    admitted: dict[Any, list[tuple[float, float]]] = defaultdict(list)
    for r in log:
        if r["status"] != 429:
            admitted[r["credential"]].append((r["started"], r["started"] + r["duration_ms"] / 1000))
    count = 0
    for r in log:
        if r["status"] == 429:
            arrived, left = r["started"], r["started"] + r["duration_ms"] / 1000
            under_way = sum(1 for start, end in admitted[r["credential"]] if start <= left and end >= arrived)
            count += under_way >= limit.max_in_flight
    return count


def _client_limit(rate_limit: RateLimit) -> str:
    """The connector's own published limit (`rate_limit`), in words."""
    rate = f"{rate_limit.requests_per_second:g}/s" if rate_limit.requests_per_second else "from the headers"
    cap = f", {rate_limit.max_in_flight} in flight" if rate_limit.max_in_flight else ""
    return rate + cap


def _missed(row: dict[str, Any]) -> list[str]:
    missed = []
    if row["utilisation"] < UTILISATION_TARGET:
        missed.append("utilisation")
    if row["share_429"] > SHARE_429_TARGET:
        missed.append("429 share")
    if row["max_in_flight"] and (row["in_flight_429"] is None or row["in_flight_429"] > IN_FLIGHT_429_TARGET):
        missed.append("in-flight 429s")
    if not row["equals_truth"]:
        missed.append("rows")
    return missed


# ---------------------------------------------------------------------------------------- 2-7. throughput


def _throughput_sections(options: BenchOptions, work: Path, figures: dict[str, Any], checks: dict[str, bool],
                         say: Callable[[str], None]) -> None:
    this = dt.date.today().replace(day=1)
    daily = months_between(add_months(this, -1), this)
    full = months_between(add_months(this, 1 - options.full_sync_months), this)
    limit = options.throughput_limit()
    spec = SandboxSpec(erp=ERP, tenants=options.tenants, first_month=full[0], last_month=this, limit=limit,
                       window_seconds=options.window_seconds, latency_ms=options.latency_ms, seed=options.seed)
    say(f"{ERP} sandbox: {options.tenants} tenants, {limit} requests/{options.window_seconds:g} s, "
        f"{options.latency_ms:g} ms latency")
    ledger = generate_ledger(options.tenants, seed=options.seed, first_month=full[0], last_month=this)
    allowed = limit / options.window_seconds
    figures["throughput_limit"] = limit

    with SandboxProcess(spec) as sandbox:
        clients = _register(sandbox, work / "registry.duckdb")
        say(f"{len(clients)} active tenants listed")

        # 2. throughput, daily window
        warehouse = _fresh(work / "direct.duckdb", sandbox)
        run = _ours(sandbox, warehouse, clients, daily, (ACCOUNTS, BALANCES))
        checks["throughput: every tenant equals the truth ledger"] = run.failed == 0 and _equals_truth(
            warehouse, ledger, ERP, clients, daily)
        figures["throughput"] = _throughput(run, allowed, len(daily))
        say(f"throughput: {_describe(figures['throughput'])}")

        # 3. full sync
        subset = clients[: options.full_sync_tenants]
        warehouse = _fresh(work / "full.duckdb", sandbox)
        run = _ours(sandbox, warehouse, subset, full, (ACCOUNTS, BALANCES))
        checks["full sync: every tenant equals the truth ledger"] = run.failed == 0 and _equals_truth(
            warehouse, ledger, ERP, subset, full)
        figures["full_sync"] = _throughput(run, allowed, len(full))
        say(f"full sync ({len(full)} months): {_describe(figures['full_sync'])}")

        # 4. Dagster overhead
        if options.dagster:
            figures["dagster"] = _dagster_overhead(sandbox, work, clients, daily, allowed, checks, say,
                                                   options.dagster_storages)
            say(f"dagster: {_describe(figures['dagster'])}")

        # 5. peers
        if peers is not None:
            figures["peers"] = _peers(sandbox, work, clients[: options.peer_tenants], daily, checks, say)

    # 6. DuckDB load
    figures["duckdb"] = _duckdb_load(work / "load.duckdb", options.duckdb_rows, daily)
    say(f"duckdb: {_describe(figures['duckdb'])}")
    figures["warehouse"] = warehouse_bench.measure(work / "warehouse", options.duckdb_rows, daily)  # both backends
    checks.update(warehouse_bench.checks(figures["warehouse"]))
    say("warehouse: " + warehouse_bench.render_row(figures["warehouse"]))

    # 7. peak RSS
    figures["rss"] = _rss(options.rss_tenants)
    checks["rss: every tenant loaded"] = (figures["rss"]["tenants"] == figures["rss"]["active"] >= options.rss_tenants
                                          and not figures["rss"]["failed"])
    say(f"rss: {_describe(figures['rss'])}")

    # 8. connection pool
    figures["pool"] = pool.measure(requests=options.pool_requests)
    say("connection pool: " + "; ".join(_describe(row) for row in figures["pool"]["rows"]))


def _register(sandbox: SandboxProcess, path: Path) -> list[Client]:
    """The active clients, listed once through the connector (untimed)."""
    warehouse = Warehouse(path)
    connector = _connector(sandbox)

    async def listing() -> list[Client]:
        async with connector:
            listed, _ = await refresh_clients(connector, warehouse)
        return [client for client in listed if client.is_active]

    return asyncio.run(listing())


def _fresh(path: Path, sandbox: SandboxProcess) -> Warehouse:
    """A new warehouse with the client registry recorded, as a run finds it."""
    path.unlink(missing_ok=True)
    warehouse = Warehouse(path)
    connector = _connector(sandbox)

    async def listing() -> None:
        async with connector:
            await refresh_clients(connector, warehouse)

    asyncio.run(listing())
    return warehouse


def _connector(sandbox: SandboxProcess):
    return sandbox.connector()


def _ours(sandbox: SandboxProcess, warehouse: Warehouse, clients: list[Client], months: list[dt.date],
          what: tuple[str, ...]) -> Run:
    """`pipeline.load_tenants` with a new connector (its session minted inside the timing)."""
    counts = {"loaded": 0, "failed": 0, "rows": 0}
    connector = _connector(sandbox)

    async def extract() -> None:
        async with connector:
            async for batch in load_tenants(connector, warehouse, clients, what=what, months=months):
                counts["loaded"] += len(batch.loaded)
                counts["failed"] += len(batch.failed)
                counts["rows"] += batch.rows

    warehouse.prepare()  # loads pyarrow's pandas once per process (~1 s): start-up, not extraction
    sandbox.reset_stats()
    started = time.perf_counter()
    asyncio.run(extract())
    seconds = time.perf_counter() - started
    return Run(seconds, counts["loaded"], counts["failed"], counts["rows"], sandbox.stats(log=True))


def _throughput(run: Run, allowed: float, months: int) -> dict[str, Any]:
    tenant_months = max(1, run.tenants * months)
    paths = ERPS[ERP].simulator_class.paths
    return {
        "tenants": run.tenants,
        "seconds": round(run.seconds, 2),
        "tenants_per_s": round(run.tenants / run.seconds, 1),
        "rows": run.rows,
        "rows_per_s": round(run.rows / run.seconds),
        "requests": run.requests["total"],
        "requests_429": run.requests["too_many_requests"],
        "by_template": run.requests["by_template"],
        "admitted_per_s": round(run.admitted / run.seconds, 1),
        "utilisation": round(run.admitted / run.seconds / allowed, 3),
        "balance_calls_per_tenant_month": round(run.calls(_template(ERP, paths.balances)) / tenant_months, 3),
        "calls_per_tenant_month": round(run.admitted / tenant_months, 3),
        "peak_in_flight": run.requests["peak_in_flight"],
        "guard_calls_per_tenant": round(run.calls(_template(ERP, paths.identity)) / max(1, run.tenants), 2),
    }


def _equals_truth(warehouse: Warehouse, ledger, erp: str, clients: list[Client], months: list[dt.date]) -> bool:
    """Every balance of the tenants equals the truth ledger's (rows zero in all three amounts aside)."""
    by_org = {tenant.org_number: tenant for tenant in ledger.valid_tenants}
    expected = sorted(
        (client.org_number, b.period, b.account_number, b.opening, b.movement, b.closing)
        for client in clients
        for b in by_org[client.org_number].expected_balances(months)
        if b.opening or b.movement or b.closing
    )
    landed = warehouse.query(
        "SELECT org_number, period, account_number, opening, movement, closing FROM balances "
        f"WHERE erp = ? AND period BETWEEN ? AND ? AND {peers.NOT_ALL_ZERO} ORDER BY ALL", [erp, months[0], months[-1]])
    return landed == expected


# ---------------------------------------------------------------------------------------- Dagster


def _dagster_section(options: BenchOptions, work: Path, figures: dict[str, Any], checks: dict[str, bool],
                     say: Callable[[str], None]) -> None:
    """`--sections dagster`: phase 4 alone, on the throughput phase's sandbox and tenants."""
    this = dt.date.today().replace(day=1)
    daily = months_between(add_months(this, -1), this)
    limit = options.throughput_limit()
    spec = SandboxSpec(erp=ERP, tenants=options.tenants, first_month=daily[0], last_month=this, limit=limit,
                       window_seconds=options.window_seconds, latency_ms=options.latency_ms, seed=options.seed)
    figures["throughput_limit"] = limit
    with SandboxProcess(spec) as sandbox:
        clients = _register(sandbox, work / "registry.duckdb")
        say(f"{len(clients)} active tenants listed")
        figures["dagster"] = _dagster_overhead(sandbox, work, clients, daily, limit / options.window_seconds, checks,
                                               say, options.dagster_storages)


def _dagster_overhead(sandbox: SandboxProcess, work: Path, clients: list[Client], months: list[dt.date],
                      allowed: float, checks: dict[str, bool], say: Callable[[str], None],
                      storages: tuple[str, ...] = ("sqlite", "in_memory", "postgres", "postgres_async_commit"),
                      ) -> dict[str, Any]:
    """One in-process run over the whole tenant range vs the same extraction called directly.

    With a SQLite instance (Dagster's default storage, what `dagster asset materialize` uses with a
    DAGSTER_HOME), with an in-memory instance, which leaves out the event storage and so shows
    Dagster's own execution overhead, and with deploy/dagster.yaml on PostgreSQL (the production
    instance; a private cluster with PostgreSQL's default durability, `tests/postgres_support.py`), and
    the same with `synchronous_commit = off` for Dagster's database: the best this storage does."""
    # the same work directly: accounts and balances in one pass (the assets' one step)
    warehouse = _fresh(work / "direct.duckdb", sandbox)
    both = _ours(sandbox, warehouse, clients, months, (ACCOUNTS, BALANCES))
    direct = both.seconds
    out: dict[str, Any] = {
        "tenants": len(clients),
        "direct_seconds": round(direct, 2),
        "direct_requests": both.requests["total"],
    }
    say(f"dagster: the same extraction called directly took {direct:.1f} s")
    for storage in storages:
        run, materialized, ok = _dagster_run(sandbox, work / f"dagster-{storage}", clients, storage)
        checks[f"dagster ({storage}): one run materialised every tenant of both assets"] = (
            ok and materialized == 2 * len(clients))
        out[storage] = {
            "seconds": round(run.seconds, 2),
            "before_first_step_seconds": round(run.before_steps, 2),
            "overhead": round(run.seconds / direct - 1, 3),
            "requests": run.requests["total"],
            "materializations": materialized,
            "events": run.rows,  # every event the run stored (Dagster's and ours)
            "ms_per_event_over_direct": round((run.seconds - direct) * 1000 / max(1, run.rows), 2),
            "event_types": run.requests["event_types"],
            "utilisation": round(run.admitted / run.seconds / allowed, 3),
            "calls_per_tenant_month": round(run.admitted / max(1, len(clients) * len(months)), 3),
        }
        say(f"dagster ({storage}): {_describe(out[storage])}")
    if any(storage.startswith("postgres") for storage in storages):
        out["postgres_connections"] = _postgres_connection_probe(work / "dagster-postgres-probe")
        say(f"dagster (postgres connections): {_describe(out['postgres_connections'])}")
    return out


def _postgres_connection_probe(home: Path, events: int = 200) -> dict[str, Any]:
    """What a stored event costs on deploy/dagster.yaml's PostgreSQL storage, and how much of it is
    connecting: dagster-postgres opens a new connection for every write outside the webserver
    (SQLAlchemy's NullPool); `optimize_for_webserver` (what the webserver calls) holds one instead."""
    import dagster as dg
    import psycopg2

    home.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"events": events}
    with _postgres_instance(home) as instance:
        database = os.environ["DAGSTER_PG_DB"]

        def sessions() -> int:
            connection = psycopg2.connect(host=os.environ["DAGSTER_PG_HOST"], port=os.environ["DAGSTER_PG_PORT"],
                                          user=os.environ["DAGSTER_PG_USER"], password=os.environ["DAGSTER_PG_PASSWORD"],
                                          dbname=database)
            with contextlib.closing(connection), connection.cursor() as cursor:
                cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", [database])
                return cursor.fetchone()[0]

        for label in ("new_connection", "held_connection"):
            if label == "held_connection":
                instance.event_log_storage.optimize_for_webserver(statement_timeout=0, pool_recycle=3600, max_overflow=2)
            before, started = sessions(), time.perf_counter()
            for number in range(events):
                instance.report_runless_asset_event(dg.AssetMaterialization(dg.AssetKey(["probe"]), partition=str(number)))
            seconds = time.perf_counter() - started
            out[f"{label}_ms_per_event"] = round(seconds * 1000 / events, 1)
            out[f"{label}_connections_per_event"] = round((sessions() - before - 1) / events, 2)
    return out


def _dagster_run(sandbox: SandboxProcess, home: Path, clients: list[Client], storage: str) -> tuple[Run, int, bool]:
    """One timed in-process run of accounts and balances over every tenant (the default window: the
    previous and the current month), after the registry and the partitions are in place as
    `<erp>/clients` leaves them (untimed)."""
    import dagster as dg

    from erp_pipelines.defs.build import build_definitions
    from erp_pipelines.defs.runs import RANGE_END, RANGE_START

    home.mkdir(parents=True, exist_ok=True)
    env = {**sandbox.env(str(home / "warehouse.duckdb")), "ERP_TENANTS_PER_RUN": str(max(1, len(clients))),
           "DAGSTER_HOME": str(home)}
    if storage == "postgres_range_planned":  # one planned event per asset for the range (Dagster's switch)
        env["DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS"] = "true"
    _fresh(home / "warehouse.duckdb", sandbox)
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    instance_cm = (dg.DagsterInstance.ephemeral() if storage == "in_memory"
                   else _postgres_instance(home, synchronous_commit=storage != "postgres_async_commit")
                   if storage.startswith("postgres")
                   else dg.DagsterInstance.local_temp(str(home), overrides={"telemetry": {"enabled": False}}))
    with _environment(env), instance_cm as instance:
        defs = build_definitions(env)
        job = defs.resolve_implicit_global_asset_job_def()
        instance.add_dynamic_partitions(f"{ERP}_tenants", [client.org_number for client in clients])
        keys = instance.get_dynamic_partitions(f"{ERP}_tenants")
        sandbox.reset_stats()
        wall = time.time()
        started = time.perf_counter()
        result = job.execute_in_process(
            instance=instance,
            asset_selection=[dg.AssetKey([ERP, "accounts"]), dg.AssetKey([ERP, "balances"])],
            tags={RANGE_START: keys[0], RANGE_END: keys[-1]},
            run_config=quiet,
            raise_on_error=False,
        )
        seconds = time.perf_counter() - started
        requests = sandbox.stats()
        materialized = sum(1 for event in result.all_events if event.event_type_value == "ASSET_MATERIALIZATION")
        events = instance.all_logs(result.run_id)
        steps = [entry.timestamp for entry in events
                 if entry.dagster_event and entry.dagster_event.event_type_value == "STEP_START"]
    ok = result.success and keys == [client.org_number for client in clients]
    before_steps = (min(steps) - wall) if steps else seconds
    run = Run(seconds, len(keys), 0, len(events), requests, before_steps)
    run.requests["event_types"] = dict(Counter(entry.dagster_event.event_type_value if entry.dagster_event else "log"
                                               for entry in events))
    return run, materialized, ok


@contextlib.contextmanager
def _postgres_instance(home: Path, *, synchronous_commit: bool = True) -> Iterator[Any]:
    """deploy/dagster.yaml on a fresh database in a private PostgreSQL cluster that keeps
    PostgreSQL's default durability (fsync, synchronous commits), unlike the tests' cluster. Without
    `synchronous_commit`, the database is set to `synchronous_commit = off`: a commit does not wait
    for its WAL flush (a crash can lose the last fraction of a second of events, never corrupts)."""
    import dagster as dg
    import psycopg2
    import yaml

    from tests.postgres_support import private_cluster

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "dagster.yaml").read_text())
    (home / "dagster.yaml").write_text(yaml.safe_dump({**config, "telemetry": {"enabled": False}}))
    with private_cluster(durable=True) as cluster:
        env = {"DAGSTER_PG_HOST": cluster.host, "DAGSTER_PG_PORT": str(cluster.port), "DAGSTER_PG_USER": cluster.user,
               "DAGSTER_PG_PASSWORD": cluster.password, "DAGSTER_PG_DB": cluster.create_database("dagster")}
        if not synchronous_commit:
            connection = psycopg2.connect(host=cluster.host, port=cluster.port, user=cluster.user,
                                          password=cluster.password, dbname="postgres")
            connection.autocommit = True
            with contextlib.closing(connection), connection.cursor() as cursor:
                cursor.execute(f"ALTER DATABASE {env['DAGSTER_PG_DB']} SET synchronous_commit = off")
        with _environment(env), dg.DagsterInstance.from_config(str(home)) as instance:
            yield instance


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---------------------------------------------------------------------------------------- peers


def _peers(sandbox: SandboxProcess, work: Path, clients: list[Client], months: list[dt.date],
           checks: dict[str, bool], say: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"tenants": len(clients)}
    warehouse = _fresh(work / "peer-ours.duckdb", sandbox)
    ours = _ours(sandbox, warehouse, clients, months, (ACCOUNTS, BALANCES))
    ours_rows = peers.warehouse_rows(warehouse)
    out["ours"] = _peer_figures(ours.seconds, ours.requests, len(clients))
    say(f"peers, ours: {_describe(out['ours'])}")

    naive_warehouse = _fresh(work / "peer-naive.duckdb", sandbox)
    sandbox.reset_stats()
    started = time.perf_counter()
    peers.naive_extract(*peers.credentials(sandbox.environment), clients, months, naive_warehouse)
    out["naive"] = _peer_figures(time.perf_counter() - started, sandbox.stats(), len(clients))
    checks["naive: identical rows to ours"] = peers.warehouse_rows(naive_warehouse) == ours_rows
    say(f"peers, naive: {_describe(out['naive'])}")

    for name, parallelized in (("dlt", False), ("dlt_parallelized", True)):
        path = work / f"peer-{name}.duckdb"
        sandbox.reset_stats()
        started = time.perf_counter()
        peers.dlt_extract(*peers.credentials(sandbox.environment), clients, months, path,
                          parallelized=parallelized)
        out[name] = _peer_figures(time.perf_counter() - started, sandbox.stats(), len(clients))
        checks[f"{name}: identical rows to ours"] = peers.dlt_rows(path) == ours_rows
        say(f"peers, {name}: {_describe(out[name])}")
    for name in ("naive", "dlt", "dlt_parallelized"):
        out[f"ours_vs_{name}"] = round(out[name]["seconds"] / out["ours"]["seconds"], 1)
    return out


def _peer_figures(seconds: float, requests: dict[str, Any], tenants: int) -> dict[str, Any]:
    return {
        "seconds": round(seconds, 2),
        "tenants_per_s": round(tenants / seconds, 1),
        "requests": requests["total"],
        "requests_429": requests["too_many_requests"],
        "requests_per_s": round(requests["total"] / seconds, 1),
    }


# ---------------------------------------------------------------------------------------- DuckDB, RSS


def _duckdb_load(path: Path, rows: int, months: list[dt.date]) -> dict[str, Any]:
    """`replace_balances` of `rows` canonical records (30 accounts × the months per tenant), twice:
    into an empty table, then replacing the same window (delete + insert)."""
    per_tenant = 30 * len(months)
    tenants = max(1, rows // per_tenant)
    by_tenant = {
        f"{800_000_000 + i}": [
            Balance(month, str(1000 + 10 * j), Decimal(f"{i}.{j:02d}"), Decimal("-125.50"),
                    Decimal(f"{i}.{j:02d}") - Decimal("125.50"))
            for month in months for j in range(30)
        ]
        for i in range(tenants)
    }
    count = tenants * per_tenant
    path.unlink(missing_ok=True)
    warehouse = Warehouse(path)
    warehouse.prepare()
    out: dict[str, Any] = {"rows": count}
    for label in ("insert", "replace"):
        started = time.perf_counter()
        result = warehouse.replace_balances(ERP, by_tenant, months)
        seconds = time.perf_counter() - started
        out[f"{label}_rows_per_s"] = round(count / seconds)
        out[f"{label}_duckdb_rows_per_s"] = round(count / result.seconds)
    return out


RSS_LIMIT = 1_000_000  # requests per second: never binds, but the rate-limit headers tell the throttle the pace


def _rss(tenants: int) -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    completed = subprocess.run(
        [sys.executable, "-m", "bench.rss", "--erp", ERP, "--tenants", str(tenants), "--limit", str(RSS_LIMIT)],
        cwd=root, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))},
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- report


def _machine() -> dict[str, Any]:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "load_1min_at_start": load}


def _describe(figures: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in figures.items() if not isinstance(v, dict))


def render(figures: dict[str, Any], command: str) -> str:
    """The "## Throughput" section of bench/results.md."""
    o, m = figures["options"], figures["machine"]
    t, f = figures["throughput"], figures["full_sync"]
    p, d, r = figures.get("peers"), figures["duckdb"], figures["rss"]
    g = figures.get("dagster")
    connector_class = ERPS[ERP].connector_class
    name, limit = connector_class.display_name, figures["throughput_limit"]
    balances_path = ERPS[ERP].simulator_class.paths.balances
    lines = [
        SECTION,
        "",
        (f"`{command}` on {dt.date.today().isoformat()}: {m['cpus']} CPUs, Python {m['python']}, "
        f"load average {m['load_1min_at_start']:.1f} at the start (other work shares the machine)."),
        (f"{name} simulator in a child process: {limit} requests per {o['window_seconds']:g} s fixed window per "
        f"credential, {o['latency_ms']:g} ms added latency per API request ({name}'s limit as published: "
        f"{connector_class.rate_limit.source}). Our throttle (`erps/kit/throttle.py`, one per credential): "
        f"{_client_limit(connector_class.rate_limit)}, paced evenly at {Throttle.HEADROOM:g} of the rate, "
        f"in flight by Little's law up to {Throttle.IN_FLIGHT_CEILING}; the server saw at most "
        f"{t['peak_in_flight']} in flight. {SIMULATOR_GC_NOTE}"),
        "",
        f"| figure | {name} | target |",
        "|---|---|---|",
        f"| tenants/s ({t['tenants']} tenants, accounts + 2 months) | {t['tenants_per_s']} | |",
        f"| rows/s (accounts + balances written) | {t['rows_per_s']:,} | |",
        (f"| rate-limit utilisation (admitted req/s ÷ allowed) | {t['utilisation']} "
        f"({t['admitted_per_s']} of {limit / o['window_seconds']:g} req/s, {t['requests_429']} 429s) "
        f"| ≥ {UTILISATION_TARGET:g} |"),
        (f"| requests per tenant-month, balances (`{balances_path}` calls) | {t['balance_calls_per_tenant_month']} "
        f"(2 months), {f['balance_calls_per_tenant_month']} ({o['full_sync_months']} months) | ≤ 1.1 |"),
        (f"| requests per tenant-month, all calls (guards, chart, session) | {t['calls_per_tenant_month']} "
        f"(2 months), {f['calls_per_tenant_month']} ({o['full_sync_months']} months) | ≤ 1.1 |"),
    ]
    if g:
        lines.append(
            f"| Dagster overhead, one in-process run of {g['tenants']} tenants vs the same extraction called "
            f"directly ({g['direct_seconds']} s) | SQLite instance: {g['sqlite']['overhead'] * 100:+.0f} % "
            f"({g['sqlite']['seconds']} s); in-memory instance: {g['in_memory']['overhead'] * 100:+.0f} % "
            f"({g['in_memory']['seconds']} s)" + (f"; PostgreSQL instance (deploy/dagster.yaml): "
            f"{g['postgres']['overhead'] * 100:+.0f} % ({g['postgres']['seconds']} s)" if "postgres" in g else "")
            + " | ≤ 10 % |")
    if p:
        lines += [
            (f"| speed vs dlt rest_api at its best setting, `parallelized=True` ({p['tenants']} tenants, same "
             f"sandbox, identical rows) | {p['ours_vs_dlt_parallelized']}× | ≥ {DLT_TARGET:g}× |"),
            f"| speed vs dlt rest_api at its defaults | {p['ours_vs_dlt']}× | |",
            f"| speed vs naive sequential httpx | {p['ours_vs_naive']}× | |",
        ]
    lines += [
        (f"| DuckDB load, `replace_balances` of {d['rows']:,} rows | {d['insert_rows_per_s']:,} rows/s "
        f"(replacing: {d['replace_rows_per_s']:,}; DuckDB part alone: {d['insert_duckdb_rows_per_s']:,}) | ≥ 500k |"),
        *([warehouse_bench.render_row(figures["warehouse"])] if "warehouse" in figures else []),
        (f"| peak RSS, {r['tenants']:,} tenants in one process | {r['peak_rss_mb']:.0f} MB (after the first batch "
        f"{r['rss_after_first_batch_mb']:.0f} MB, after the last {r['rss_after_last_batch_mb']:.0f} MB) | < 500 MB |"),
    ]
    checks = {name: ok for name, ok in figures["checks"].items() if not name.startswith("compliance ")}
    if p:
        lines += [
            "",
            "Side by side on the same sandbox and tenants (accounts + balances for 2 months):",
            "",
            "| extractor | seconds | tenants/s | requests | req/s | 429s | rows identical to ours |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, label in (("ours", "ours (`pipeline.load_tenants`)"), ("naive", "naive sequential httpx"),
                            ("dlt", "dlt rest_api (defaults)"), ("dlt_parallelized", "dlt rest_api, parallelized=True")):
            row = p[name]
            same = "—" if name == "ours" else ("yes" if checks.get(f"{name}: identical rows to ours") else "**no**")
            lines.append(f"| {label} | {row['seconds']} | {row['tenants_per_s']} | {row['requests']} | "
                         f"{row['requests_per_s']} | {row['requests_429']} | {same} |")
    lines += ["", "Requests by endpoint, throughput phase: " + ", ".join(
        f"{k.split(' ', 1)[1]} {v}" for k, v in sorted(t["by_template"].items())) + "."]
    if g:
        sqlite, memory, n = g["sqlite"], g["in_memory"], g["tenants"]
        per_event = (memory["seconds"] - g["direct_seconds"]) / max(1, 4 * n) * 1000
        direct_per_tenant = g["direct_seconds"] / max(1, n) * 1000
        lines += ["", (
            f"Dagster runs: {sqlite['requests']} requests ({sqlite['calls_per_tenant_month']} per tenant-month: one "
            f"step writes both assets, one session and one guard per tenant, against {g['direct_requests']} for the "
            f"same pass called directly). Dagster stores 4 events per tenant: a planned and a materialisation event for each "
            f"of the two assets (SQLite storage cannot store one planned event for a partition range, so it stores "
            f"{2 * n} of them before the first step starts: {sqlite['before_first_step_seconds']} s with SQLite, "
            f"{memory['before_first_step_seconds']} s in memory). The materialisation events are written by the run's "
            f"thread while the extraction goes on in its own thread; with SQLite they take longer than the "
            f"extraction itself (a commit costs ~11 ms on this machine's disk), so the run waits for them. The "
            f"in-memory instance shows Dagster's own share: ({memory['seconds']} − {g['direct_seconds']}) s "
            f"over {4 * n} events is {per_event:.1f} ms per event, {4 * per_event:.0f} ms per tenant against "
            f"{direct_per_tenant:.0f} ms of extraction per tenant at this rate limit. PostgreSQL stores the same "
            f"events (one planned event per partition unless DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS is "
            f"set), each write on a new connection: see \"{DAGSTER_SECTION[3:]}\".")]
    lines += ["", "Checks: " + "; ".join(f"{name}: {'passed' if ok else '**FAILED**'}" for name, ok in checks.items()) + ".",
              "", NOTES, ""]
    return "\n".join(lines)


NOTES = """What the figures mean:

- *Requests per tenant-month*: the requests the sandbox admitted in the phase (session, chart of
  accounts, balances, the tenant guard; 429s not counted), divided by tenants × months. A
  tenant-month of balances costs one balances call (1.0 with a page of 1000 and field selection: no
  tenant has more than one page). The rest is per-tenant overhead that does not grow with the
  months: the chart of accounts and the tenant guard (one identity call after the last read). With
  two months that overhead is half the calls (2 of the 4 per tenant); over a 12-month sync it
  shrinks towards 1.
- *Utilisation*: requests the sandbox admitted (not 429) per second of the phase's wall time,
  divided by the allowed rate; the phase includes minting the session, the ramp-up, the tail of the
  last tenants and the last warehouse write.
- *Dagster overhead*: the in-process run (one step for both assets, per-tenant materialisation
  events), with each instance storage, against `load_tenants` called directly for accounts and
  balances in one pass: the same requests, so the difference is Dagster's. Its events cost CPU
  even in memory, and a Python process has one interpreter lock for the extraction and the events
  alike, so the overhead is about events × cost per event, a fixed cost per tenant: its share falls
  as the ERP's allowed rate falls (the extraction takes longer) and grows as it rises.
- *Peers*: dlt makes no tenant-guard calls; it pages with `fullResultSize` as the total (exact in
  the sandbox, documented as inexact by the vendor). Its amounts are JSON floats cast to
  DECIMAL(18,2) (dlt keeps some of them as DOUBLE despite the column hints), and rows that are zero
  in opening, movement and closing are left out of every comparison."""


DAGSTER_SECTION = "## Dagster overhead by instance storage"
STORAGE_LABELS = {"in_memory": "in memory (`DagsterInstance.ephemeral`)", "sqlite": "SQLite (`DAGSTER_HOME` default)",
                  "postgres": "PostgreSQL (deploy/dagster.yaml; fsync and synchronous commits on)",
                  "postgres_async_commit": "PostgreSQL, `synchronous_commit = off` for Dagster's database",
                  "postgres_range_planned": "PostgreSQL, `DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS=true`"}


def render_dagster(figures: dict[str, Any], command: str) -> str:
    """The "## Dagster overhead by instance storage" section: phase 4's breakdown per storage."""
    g, m, o = figures["dagster"], figures["machine"], figures["options"]
    lines = [
        DAGSTER_SECTION,
        "",
        (f"`{command}` on {dt.date.today().isoformat()}: {m['cpus']} CPUs, load average "
         f"{m['load_1min_at_start']:.1f} at the start. One in-process run of {g['tenants']} tenants (the daily "
         f"window, {ERPS[ERP].connector_class.display_name} simulator at {figures['throughput_limit']} requests per "
         f"{o['window_seconds']:g} s, {o['latency_ms']:g} ms latency) against the same extraction called directly: "
         f"{g['direct_seconds']} s, {g['direct_requests']} requests. Target: ≤ 10 % over it."),
        "",
        "| instance storage | run s | overhead | before the first step s | events stored | ms per event over direct | requests |",
        "|---|---|---|---|---|---|---|",
    ]
    for storage, label in STORAGE_LABELS.items():
        if storage in g:
            row = g[storage]
            lines.append(f"| {label} | {row['seconds']} | {row['overhead'] * 100:+.1f} % | "
                         f"{row['before_first_step_seconds']} | {row['events']} | {row['ms_per_event_over_direct']} | "
                         f"{row['requests']} |")
    probe = g.get("postgres_connections")
    if probe:
        lines += ["", (
            f"Where PostgreSQL's time goes ({probe['events']} materialisation events stored one by one): "
            f"{probe['new_connection_ms_per_event']} ms per event as a run worker writes them, opening "
            f"{probe['new_connection_connections_per_event']} new connections per event (dagster-postgres keeps no "
            f"connection outside the webserver); {probe['held_connection_ms_per_event']} ms per event on a held "
            f"connection ({probe['held_connection_connections_per_event']} new).")]
    checks = {name: ok for name, ok in figures["checks"].items() if name.startswith("dagster")}
    lines += ["", "Checks: " + "; ".join(f"{name}: {'passed' if ok else '**FAILED**'}" for name, ok in checks.items())
              + ".", "", DAGSTER_NOTES, ""]
    return "\n".join(lines)


DAGSTER_NOTES = """*Events stored*: every event of the run in the instance's event log (run and step events, and
per tenant a materialisation per asset, plus planned-materialisation events). *ms per event over
direct*: (run − direct extraction) ÷ events, the cost the run adds per event it stores.

The ≤ 10 % target allows a tenth of the extraction's time per tenant for the tenant's 4 events
(2 planned, 2 materialisations: a planned event per partition unless
`DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS` is set). The in-memory instance is the floor
Dagster's own event handling leaves; a storage adds its writes on top. What would close the rest: fewer events per tenant (one planned
event per asset for the whole range halves them, at the price of failed partitions), connection
reuse in the run worker on PostgreSQL (the probe above), `synchronous_commit = off` for Dagster's
database, and a machine whose cores are not shared; the share also falls as the ERP's allowed rate
falls (the extraction takes longer per tenant)."""


SIMULATOR_GC_NOTE = ("The simulator's process keeps full garbage collections rare (`bench/server.py`): scanning its "
                     "truth ledger paused it 50-170 ms every few seconds, a stall an ERP's servers do not have.")


def render_compliance(figures: dict[str, Any], command: str) -> str:
    """The "## Rate-limit compliance (all API ERPs)" section of bench/results.md: one table, ERP × mode."""
    o, m, rows = figures["options"], figures["machine"], figures["compliance"]
    lines = [
        COMPLIANCE_SECTION,
        "",
        (f"`{command}` on {dt.date.today().isoformat()}: {m['cpus']} CPUs, Python {m['python']}, "
         f"load average {m['load_1min_at_start']:.1f} at the start (other work shares the machine)."),
        (f"Every API ERP in the registry × every window mode of the simulator's limiter, one run each: "
         f"`refresh_clients` + `load_tenants` (accounts and the daily two-month window) with a new connector "
         f"(`connector_from_environment`, its own throttle and token store) against the ERP's simulator in a "
         f"child process, enforcing the ERP's own limit per credential with {o['compliance_latency_ms']:g} ms "
         f"added to every request, over enough tenants for ~{o['compliance_seconds']:g} s of traffic at the "
         f"limit. {SIMULATOR_GC_NOTE}"),
        "",
        (f"| ERP | window | server limit | our throttle | tenants | requests | active s | admitted req/s "
         f"| utilisation (≥ {UTILISATION_TARGET:g}) | 429s (≤ {SHARE_429_TARGET:.0%}) "
         f"| in-flight 429s ({IN_FLIGHT_429_TARGET} where capped) | peak in flight | balance rows "
         f"| = truth | CPU s, ours / simulator | targets |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['erp']} | | | | | | | | | | | | | **no** | | **did not run**: {r['error']} |")
            continue
        in_flight = "—" if not r["max_in_flight"] else ("n/a" if r["in_flight_429"] is None else r["in_flight_429"])
        missed = r["targets_missed"]
        refused = f"{r['requests_429']} ({r['share_429']:.1%})"
        load = "" if r["load_1min_at_start"] is None else f" (load {r['load_1min_at_start']:.1f})"
        lines.append(
            f"| {r['display_name']} | {r['mode']} | {r['server_limit']} | {r['client_limit']} | {r['tenants']} "
            f"| {r['requests']} | {r['active_seconds']} | {r['admitted_per_s']} "
            f"| {_mark(r['utilisation'], 'utilisation' in missed)} "
            f"| {_mark(refused, '429 share' in missed)} "
            f"| {_mark(in_flight, 'in-flight 429s' in missed)} | {r['peak_in_flight']} | {r['balance_rows']:,} "
            f"| {'yes' if r['equals_truth'] else '**no**'} | {r['client_cpu_s']} / {r['server_cpu_s']}{load} "
            f"| {'met' if not missed else '**missed**: ' + ', '.join(missed)} |")
    lines += ["", COMPLIANCE_NOTES, ""]
    return "\n".join(lines)


def _mark(value: Any, missed: bool) -> str:
    return f"**{value}**" if missed else str(value)


COMPLIANCE_NOTES = """What the columns mean:

- *Server limit*: the ERP's own limit as its simulator enforces it per credential (the
  simulator's `contract_rate_limit`, or its `bench_rate_limit` where the ERP publishes no number), counted per *window* mode: `fixed` (a window
  starting with its first request), `sliding` (any span of the window's length), `token_bucket`
  (credits refilled evenly). *Our throttle*: the connector's published `rate_limit` (or the
  rate-limit headers where none is published).
- *Requests*: every request the run sent (listing the clients, tokens or sessions, accounts,
  balances, the tenant guard), 429s included. *Active s*: the server's clock from the first
  request's arrival to the last response. *Utilisation*: requests admitted (not 429) per active
  second ÷ the limit per second.
- *In-flight 429s*: 429s the server gave because the credential already had its cap of requests
  in flight (only where the server caps them). Until the simulator's request log records the
  limiter's reason, they are inferred from the log: a 429 that arrived while the cap's worth of
  admitted requests of the same credential were under way (an upper bound). *Peak in flight*: the
  most requests the server had under way at once, 429s included.
  Where an ERP's limit is per company (the server keeps one budget per tenant), the run still
  drives every tenant through one client throttle, so *utilisation* is against one company's
  budget; a token bucket whose reset header says 1 s lets that throttle pace at the bucket's size
  per second, which the per-tenant budgets then admit: utilisation above 1 without a 429.
- *Balance rows*: balance rows landed for the window (rows zero in opening, movement and closing
  aside); *= truth*: every tenant's balances equal the truth ledger's and no tenant failed.
- *CPU s*: processor seconds the run took in our process (extraction and warehouse writes) and in
  the simulator's, and the 1-minute load average as the run started. Both share the machine's cores with each other and with whatever else runs on
  it: where the two together approach cores × active seconds, the pace is the machine's, not the
  throttle's."""


def update_results(section: str, path: Path = RESULTS, *, before: str | None = None) -> None:
    """Replace the section of `path` headed by `section`'s first line, keeping every other section;
    a new section goes before the heading `before` if there is one, else at the end."""
    heading = section.splitlines()[0].strip()
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        at = next((i for i, line in enumerate(lines) if before and line.strip() == before), None)
        if at is None:
            text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
        else:
            text = "".join(lines[:at]) + section.rstrip("\n") + "\n\n" + "".join(lines[at:])
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        text = "".join(lines[:start]) + section.rstrip("\n") + "\n" + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (4 s of traffic per compliance run, 100 tenants, ...), for a first look")
    parser.add_argument("--sections", default="compliance,throughput",
                        help="comma list of compliance, throughput, dagster (default compliance,throughput, "
                             "which includes dagster; dagster alone: the Dagster overhead phase only)")
    parser.add_argument("--erps", help="compliance: comma list of API ERPs (default every one in the registry)")
    parser.add_argument("--modes", help=f"compliance: comma list of window modes (default {','.join(WINDOW_MODES)})")
    parser.add_argument("--compliance-seconds", type=float, help="compliance: traffic per run at the limit (default 20)")
    parser.add_argument("--tenants", type=int, help="tenants in the throughput and Dagster phases (default 1000)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="latency the sandbox adds (default 50)")
    parser.add_argument("--limit", type=int, help=f"throughput: requests per 1 s window (default "
                        f"{server_limit(ERP).limit}, bench/erp_profiles.py)")
    parser.add_argument("--dagster-storages", help="Dagster phase: comma list of instance storages (default "
                        "sqlite,in_memory,postgres,postgres_async_commit; also postgres_range_planned)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results.md alone")
    args = parser.parse_args(argv)
    sections = {name.strip() for name in args.sections.split(",") if name.strip()}
    unknown = sections - {"compliance", "throughput", "dagster"}
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    make = BenchOptions.quick if args.quick else BenchOptions
    options = make(latency_ms=args.latency_ms, limit=args.limit, compliance="compliance" in sections,
                   throughput="throughput" in sections, dagster_only="dagster" in sections - {"throughput"})
    if args.erps:
        options.compliance_erps = tuple(name.strip() for name in args.erps.split(",") if name.strip())
        known = {spec.name for spec in api_erps()}
        if set(options.compliance_erps) - known:
            parser.error(f"--erps: not an API ERP in the registry: {', '.join(set(options.compliance_erps) - known)}")
    if args.modes:
        options.window_modes = tuple(name.strip() for name in args.modes.split(",") if name.strip())
        if set(options.window_modes) - set(WINDOW_MODES):
            parser.error(f"--modes: the simulators know {', '.join(WINDOW_MODES)}")
    if args.compliance_seconds:
        options.compliance_seconds = args.compliance_seconds
    if args.dagster_storages:
        options.dagster_storages = tuple(name.strip() for name in args.dagster_storages.split(",") if name.strip())
        if set(options.dagster_storages) - set(STORAGE_LABELS):
            parser.error(f"--dagster-storages: one of {', '.join(STORAGE_LABELS)}")
    if args.tenants:
        options.tenants = args.tenants
        options.full_sync_tenants = min(options.full_sync_tenants, args.tenants)
        options.peer_tenants = min(options.peer_tenants, args.tenants)
    started = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)

    with tempfile.TemporaryDirectory(prefix="erp-bench-") as work:
        figures = run_benchmark(options, Path(work), say)
    command = "make bench" if argv is None and len(sys.argv) == 1 else "python -m bench.run " + " ".join(
        sys.argv[1:] if argv is None else argv)
    written = []
    if options.compliance:
        written.append((render_compliance(figures, command), SECTION))
    if options.throughput:
        written.append((render(figures, command), None))
        written.append((pool.render(figures["pool"], command), None))
    if options.throughput or options.dagster_only:
        written.append((render_dagster(figures, command), None))
    for section, before in written:
        print()
        print(section)
        if not args.no_write:
            update_results(section, before=before)
    if written and not args.no_write:
        say(f"updated {RESULTS}")
    failed = [name for name, ok in figures["checks"].items() if not ok]
    if failed:
        print("FAILED checks: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
