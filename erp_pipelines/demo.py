"""`make demo` and `make dev`: the whole product against the sandbox ERPs, on this machine.

- `python -m erp_pipelines.demo run`: starts the sandbox ERPs on localhost, materialises every
  source's clients, accounts and balances into DuckDB through Dagster, runs the integrity checks
  and prints a summary.
- `python -m erp_pipelines.demo dev`: starts the sandbox ERPs and `dg dev` pointed at them; SIGINT
  or SIGTERM stops all of it, however it was started (also as a background job, where SIGINT is
  ignored by default).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "data" / "demo"
DEMO_TENANTS = 12
DEMO_SEED = 2026  # each ERP's simulator gets its own ledger (seed + its place in the registry)
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}  # the summary tells the story
INSTANCE_CONFIG = Path(__file__).with_name("dagster_instance.yaml")  # becomes $DAGSTER_HOME/dagster.yaml
DEV_SHUTDOWN_SECONDS = 90  # for `dg dev` to stop its webserver, daemon and code servers before they are killed
OFFICIAL_SAFT_EXAMPLE = ROOT / "tests" / "erps" / "saft_examples" / "ExampleFile SAF-T Financial_888888888_20180228235959.xml"


@contextlib.contextmanager
def sandbox_environment(port: int = 0) -> Iterator[dict[str, str]]:
    """Start every registered ERP simulator (each on its own port, from `port` upward when given)
    and the SAF-T drop; yield the environment that points the project at them."""
    from erp_pipelines.registry import api_erps
    from erp_pipelines.sandbox.ledger import generate_ledger
    from erp_pipelines.sandbox.saft import write_demo_drop
    from erp_pipelines.tokens import TokenStore

    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    drop_dir = DEMO_DIR / "saft-drop"
    write_demo_drop(drop_dir)
    shutil.copy(OFFICIAL_SAFT_EXAMPLE, drop_dir)  # Skatteetaten's example, with its known mismatches
    env = {"ERP_WAREHOUSE_PATH": str(DEMO_DIR / "warehouse.duckdb"), "SAFT_DROP_DIR": str(drop_dir)}
    with contextlib.ExitStack() as stack:
        served = []
        for offset, spec in enumerate(api_erps()):
            ledger = generate_ledger(DEMO_TENANTS, seed=DEMO_SEED + offset, last_month=dt.date.today().replace(day=1))
            simulator = spec.simulator_class(ledger)
            simulator.prepare_demo()
            url = stack.enter_context(simulator.serve(port=port + offset if port else 0))
            served.append((simulator, simulator.environment(url)))
            env[f"{spec.env_prefix}HISTORY_START"] = ledger.first_month.isoformat()
        for simulator_env in (simulator_env for _, simulator_env in served):
            env.update(simulator_env)
        env.update(_shared_identity_servers(served, stack, port + len(served) if port else 0))
        for simulator, _ in served:
            simulator.prepare_credentials(env, TokenStore.from_env(env["ERP_WAREHOUSE_PATH"], env))
        yield env


def _shared_identity_servers(served: list, stack: contextlib.ExitStack, port: int) -> dict[str, str]:
    """A variable several simulators set to their own URL names one identity server they share
    (VISMA_CONNECT_URL): serve one front for it that hands each request to its client id's simulator."""
    from erp_pipelines.sandbox.common import identity_front, serve

    values: dict[str, set[str]] = {}
    for _, simulator_env in served:
        for name, value in simulator_env.items():
            values.setdefault(name, set()).add(value)
    shared = {}
    for name in sorted(name for name, seen in values.items() if len(seen) > 1 and name.endswith("_URL")):
        owners = {value: simulator.app for simulator, simulator_env in served if name in simulator_env
                  for key, value in simulator_env.items() if key.endswith("_CLIENT_ID")}
        shared[name] = stack.enter_context(serve(identity_front(owners), port=port))
    return shared


def dagster_home() -> Path:
    home = Path(os.environ.get("DAGSTER_HOME") or ROOT / ".dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(INSTANCE_CONFIG, home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def run_demo() -> int:
    import dagster as dg

    from erp_pipelines.defs.assets import extract_op_name
    from erp_pipelines.defs.build import build_definitions
    from erp_pipelines.defs.runs import RANGE_END, RANGE_START
    from erp_pipelines.warehouse import Warehouse

    if DEMO_DIR.exists():
        shutil.rmtree(DEMO_DIR)
    home = dagster_home()
    with sandbox_environment() as env:
        os.environ.update(env)
        defs = build_definitions(env)
        job = defs.resolve_implicit_global_asset_job_def()
        with dg.DagsterInstance.get() as instance:
            sources = [key.path[0] for key in defs.resolve_asset_graph().get_all_asset_keys() if key.path[-1] == "clients"]
            for erp in sorted(sources):
                print(f"\n== {erp}: clients")
                job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey([erp, "clients"])],
                                       run_config=QUIET)
                tenants = instance.get_dynamic_partitions(f"{erp}_tenants")
                if not tenants:
                    continue
                print(f"== {erp}: accounts and balances for {len(tenants)} tenants in one run (full sync)")
                result = job.execute_in_process(
                    instance=instance,
                    asset_selection=[dg.AssetKey([erp, "accounts"]), dg.AssetKey([erp, "balances"])],
                    tags={RANGE_START: tenants[0], RANGE_END: tenants[-1]},
                    run_config={**QUIET, "ops": {extract_op_name(erp): {"config": {"full_sync": True}}}},
                    raise_on_error=False,
                )
                if not result.success:
                    print(f"   {erp}: some tenants failed or a blocking check failed (listed below); the others landed")
            print("\n== reporting: the dbt models over every ERP")
            reporting_keys = dg.AssetSelection.groups("reporting").resolve(defs.resolve_asset_graph())
            reporting = job.execute_in_process(instance=instance, asset_selection=list(reporting_keys),
                                               run_config=QUIET, raise_on_error=False)
            if not reporting.success:
                print("   reporting: a dbt test failed (see the summary)")
            print_summary(Warehouse(env["ERP_WAREHOUSE_PATH"]), instance, home)
    return 0


def print_summary(warehouse, instance, home: Path) -> None:
    from erp_pipelines import quality

    print("\n" + "=" * 78 + "\nerp-pipelines demo: summary\n" + "=" * 78)
    print("Tenants by status:")
    for erp, status, count in warehouse.query(
        "SELECT erp, status, count(*) FROM clients GROUP BY ALL ORDER BY erp, status"
    ):
        print(f"  {erp:<10} {status:<14} {count}")
    for erp, name, org, reason in warehouse.query(
        "SELECT erp, name, org_number, coalesce(status_reason, last_error) FROM clients "
        "WHERE status IN ('rejected', 'no_api_access') ORDER BY erp, status, name"
    ):
        print(f"  - {erp} {name} ({org or 'no orgnr'}): {reason}")
    print("\nRows landed:")
    for erp, tenants, accounts in warehouse.query(
        "SELECT erp, count(DISTINCT org_number), count(*) FROM accounts GROUP BY erp ORDER BY erp"
    ):
        print(f"  {erp:<10} accounts: {accounts:>6} rows for {tenants} tenants")
    for erp, tenants, rows, first, last in warehouse.query(
        "SELECT erp, count(DISTINCT org_number), count(*), min(period), max(period) FROM balances GROUP BY erp ORDER BY erp"
    ):
        print(f"  {erp:<10} balances: {rows:>6} rows for {tenants} tenants, {first:%Y-%m}..{last:%Y-%m}")
    erps = [row[0] for row in warehouse.query("SELECT DISTINCT erp FROM balances ORDER BY 1")]
    print("\nIntegrity checks (violations):")
    for erp in erps:
        results = {name: quality.run_check(warehouse, erp, name) for name in quality.CHECKS}
        print(f"  {erp:<10} " + ", ".join(f"{name}={count}" for name, (count, _) in results.items()))
        for name, (count, sample) in results.items():
            if count:
                tenants = sorted({str(row[0]) for row in sample})
                print(f"    {name}: tenant(s) {', '.join(tenants)} (see quality.py; nothing is hidden)")
    print("\nReporting models (schema reporting, dbt):")
    for name in ("trial_balance", "income_statement", "balance_sheet", "tenant_status"):
        try:
            (rows,), = warehouse.query(f"SELECT count(*) FROM reporting.{name}")
            print(f"  reporting.{name:<17} {rows:>6} rows")
        except Exception as exc:  # noqa: BLE001 - the summary says what is missing and goes on
            print(f"  reporting.{name:<17} not built ({type(exc).__name__})")
    issues = warehouse.query("SELECT erp, org_number, count(*) FROM reconciliation GROUP BY ALL ORDER BY 1, 2")
    if issues:
        print("\nReconciliation findings (SAF-T totals vs transactions):")
        for erp, org, count in issues:
            print(f"  {erp:<10} {org}: {count} (see table reconciliation)")
    print(f"\nDuckDB warehouse: {warehouse.path}")
    print(f"  .venv/bin/python -c \"import duckdb; duckdb.connect('{warehouse.path}', read_only=True)"
          f".sql('SELECT * FROM all_balances LIMIT 20').show()\"")
    print(f"Dagster instance: {home}")
    print("Open the UI: make dev  (then http://127.0.0.1:3000 — lineage, partitions per organisation number,")
    print("             the client-access sensor and the daily schedule)")


class StopRequests:
    """SIGINT, SIGTERM and SIGHUP ask `make dev` to stop. The handler only sets a flag. A handler
    that takes a lock, as `threading.Event.set` does, deadlocks when a second signal lands while the
    first one's handler holds it; `killpg(SIGTERM)` on `make dev` is such a pair, since make passes
    SIGTERM on to its children."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        # a handler, not SIG_IGN (what a background job inherits for SIGINT): `dg dev` then starts
        # with the default handlers, and a stop request reaches everything
        for signum in self.SIGNALS:
            signal.signal(signum, self._request)

    def _request(self, signum: int, frame: object) -> None:
        self.requested = True

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds` (a signal's handler runs during the sleep); True once asked to stop."""
        if not self.requested:
            time.sleep(seconds)
        return self.requested


def run_dev(port: int, ui_port: int) -> int:
    stops = StopRequests()
    stops.install()
    home = dagster_home()
    with sandbox_environment(port=port) as env:
        if stops.requested:
            return 0
        urls = ", ".join(f"{name}={value}" for name, value in env.items() if name.endswith("_BASE_URL"))
        print(f"Sandbox ERPs running ({urls}); DAGSTER_HOME={home}", flush=True)
        command = [sys.executable, "-m", "dagster_dg_cli.cli", "dev", "-m", "erp_pipelines.definitions",
                   "-p", str(ui_port)]
        # its own process group: whatever `dg dev` starts (webserver, daemon, code servers, runs) is
        # stopped as one group, and only through _stop_dev
        process = subprocess.Popen(command, env={**os.environ, **env}, cwd=ROOT, process_group=0)
        try:
            while not stops.wait(0.5):
                if process.poll() is not None:
                    return process.returncode
            return 0
        finally:  # never leave dg dev (and its daemon and webserver) running without the sandbox
            _stop_dev(process)


def _stop_dev(process: subprocess.Popen) -> None:
    """SIGINT lets `dg dev` shut down its webserver, daemon and code servers; whatever is left of
    its process group after that is terminated, then killed."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(DEV_SHUTDOWN_SECONDS)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        if not _group_alive(process.pid, seconds=10):
            break
    process.wait()


def _group_alive(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m erp_pipelines.demo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="materialise everything against the sandbox and print a summary")
    dev = sub.add_parser("dev", help="sandbox + dagster dev")
    dev.add_argument("--sandbox-port", type=int, default=8711)
    dev.add_argument("--ui-port", type=int, default=3000)
    args = parser.parse_args(argv)
    if args.command == "run":
        return run_demo()
    return run_dev(args.sandbox_port, args.ui_port)


if __name__ == "__main__":
    raise SystemExit(main())
