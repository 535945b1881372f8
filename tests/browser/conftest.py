"""The Dagster UI against the served Tripletex sandbox, driven by Playwright and Debian's Chromium.

Session setup: materialise the clients, accounts, balances (one tenant without API-tilgang) and the
reporting assets into an on-disk Dagster instance, then start `dagster-webserver` on a free port in
its own process group. Teardown kills that group and checks that no process of it remains."""

import contextlib
import datetime as dt
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import httpx
import pytest
from process_support import process_group
from sandbox_env import dagster_home, tripletex_env

from erp_pipelines.defs.build import build_definitions
from erp_pipelines.defs.runs import RANGE_END, RANGE_START
from erp_pipelines.registry import ERPS
from erp_pipelines.sandbox.common import serve
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.tripletex import TripletexSandbox
from erp_pipelines.warehouse import Warehouse

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CHROMIUM = Path("/usr/bin/chromium")
# without the background-networking flags Chromium dials out, and a closed network refuses it
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
HISTORY_START = dt.date(2025, 7, 1)
BALANCES = dg.AssetKey(["tripletex", "balances"])
STARTUP_TIMEOUT = 240  # seconds: loading the definitions on a busy 2-core machine
ENV_PREFIXES = ("ERP_", "DAGSTER_", *(spec.env_prefix for spec in ERPS.values()))
SETTINGS = {s.env for spec in ERPS.values() for s in spec.connector_class.settings}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def materialise(defs: dg.Definitions, instance: dg.DagsterInstance, blocked_tenant, admin: httpx.Client) -> None:
    """Clients, then accounts and balances of every tenant (the blocked one fails), then the reporting group."""
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey(["tripletex", "clients"])]).success
    keys = instance.get_dynamic_partitions("tripletex_tenants")
    admin.put(f"/clients/{blocked_tenant.erp_client_id}/api-access", json={"enabled": False}).raise_for_status()
    extracted = job.execute_in_process(
        instance=instance,
        asset_selection=[dg.AssetKey(["tripletex", "accounts"]), BALANCES],
        tags={RANGE_START: keys[0], RANGE_END: keys[-1]},
        run_config={"ops": {"tripletex__accounts_and_balances": {"config": {"full_sync": True}}}},
    )
    assert extracted.success
    reporting = [s.key for s in defs.resolve_all_asset_specs() if s.group_name == "reporting"]
    assert job.execute_in_process(instance=instance, asset_selection=reporting).success


def failure_metadata(instance: dg.DagsterInstance, org_number: str) -> dict:
    """What the failure observation on the tenant's balances partition recorded."""
    records = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=BALANCES, asset_partitions=[org_number]), limit=1).records
    (record,) = records
    return {name: value.value for name, value in record.asset_observation.metadata.items()}


def landed_balances(warehouse: Warehouse) -> dict[str, dict]:
    """Per organisation number: the balance rows and the months the warehouse holds."""
    rows = warehouse.query("SELECT org_number, count(*), min(period), max(period) FROM balances GROUP BY org_number")
    return {org: {"rows": count, "months": f"{first:%Y-%m}..{last:%Y-%m}"} for org, count, first, last in rows}


def webserver_environment(env: dict[str, str], home: Path) -> dict[str, str]:
    """This shell's environment without its ERP and Dagster settings, plus the sandbox's."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIXES) and k not in SETTINGS}
    return {**inherited, **env, "DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def webserver(env: dict[str, str], log_path: Path):
    """`dagster-webserver` on a free port, in a new process group; yields its URL. On exit the whole
    group is terminated and no process of it may remain."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "dagster-webserver"), "-m", "erp_pipelines.definitions",
               "-h", "127.0.0.1", "-p", str(port)]
    url = f"http://127.0.0.1:{port}"
    with process_group(command, env, log_path, grace_seconds=30, clean_sigterm=True) as process:
        wait_until_serving(process, url, log_path)
        yield url


def wait_until_serving(process: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dagster-webserver exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/server_info", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"dagster-webserver did not answer within {STARTUP_TIMEOUT} s:\n{log_path.read_text()[-4000:]}")


# module scope: Playwright's sync API keeps an event loop running in this thread while it is open,
# and every later test that calls asyncio.run (most of them) would fail; so it ends with this module
@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory):
    """The sandbox, materialised state and a running webserver: what the UI tests look at."""
    tmp_path = tmp_path_factory.mktemp("dagster_ui")
    ledger = generate_ledger(6, first_month=HISTORY_START)
    sandbox = TripletexSandbox(ledger)
    home = dagster_home(tmp_path)
    with (home / "dagster.yaml").open("a") as config:
        config.write("nux:\n  enabled: false\n")  # no "Join the Dagster community" dialog over the pages
    with serve(sandbox.app, path="/v2") as url, \
            httpx.Client(base_url=url.removesuffix("/v2") + "/_sandbox/tripletex", timeout=10) as admin:
        env = tripletex_env(sandbox, url, tmp_path, TRIPLETEX_HISTORY_START=HISTORY_START.isoformat(),
                            ERP_TENANTS_PER_RUN="3")
        defs = build_definitions(env)
        blocked = ledger.valid_tenants[2]
        with pytest.MonkeyPatch.context() as patch, dg.DagsterInstance.from_config(str(home)) as instance:
            for name, value in env.items():  # the resources read their secrets from the environment
                patch.setenv(name, value)
            materialise(defs, instance, blocked, admin)
            failure = failure_metadata(instance, blocked.org_number)
        with webserver(webserver_environment(env, home), tmp_path / "webserver.log") as ui_url:
            yield SimpleNamespace(url=ui_url, defs=defs, blocked=blocked, failure=failure,
                                  loaded=[t for t in ledger.valid_tenants if t is not blocked],
                                  landed=landed_balances(Warehouse(env["ERP_WAREHOUSE_PATH"])))


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory, dagster_ui):
    """Debian's Chromium (never a downloaded browser build), headless, with a fresh profile. Started
    after `dagster_ui`: Playwright's sync API runs an event loop, and the materialisations call asyncio.run."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium. "
                    "Run `make system-deps` (as root: apt-get install -y chromium).")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1600, "height": 1000},
        )
        context.set_default_timeout(60_000)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser_context):
    page = browser_context.new_page()
    yield page
    page.close()


@pytest.fixture(scope="session")
def docs_dir():
    DOCS.mkdir(exist_ok=True)
    return DOCS
