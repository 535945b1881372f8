"""What only the DuckLake backend has: its configuration and errors, the extensions loaded from
their wheels, and the bounded retry of conflicting commits. The promises both backends keep are
tested on each (`warehouse_backend`: tests/test_warehouse.py, test_crash_safety.py,
test_concurrency.py, test_reporting.py)."""

import datetime as dt
import multiprocessing
from decimal import Decimal

import dagster as dg
import duckdb
import pytest
from postgres_support import ducklake_env
from sandbox_env import tripletex_env
from secret_scan import SecretScan

from erp_pipelines.config import load_config
from erp_pipelines.defs.build import build_definitions
from erp_pipelines.errors import ConfigError
from erp_pipelines.model import Balance
from erp_pipelines.sandbox.common import serve
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.tripletex import TripletexSandbox
from erp_pipelines.warehouse import Warehouse
from erp_pipelines.warehouse_backends import (
    CATALOG_VARIABLE,
    DATA_PATH_VARIABLE,
    DuckDBFileBackend,
    DuckLakeBackend,
    WarehouseConflict,
    extension_file,
)

JAN = dt.date(2026, 1, 1)


@pytest.fixture
def lake(postgres_cluster, tmp_path, monkeypatch):
    env = ducklake_env(postgres_cluster, tmp_path / "lake-data")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def balances(org: str, count: int) -> dict[str, list[Balance]]:
    return {org: [Balance(JAN, str(1000 + n), Decimal("1.00"), Decimal(n), Decimal("1.00") + n) for n in range(count)]}


def test_the_environment_chooses_the_backend(lake, tmp_path):
    assert isinstance(Warehouse(tmp_path / "w.duckdb").backend, DuckLakeBackend)
    assert isinstance(Warehouse(tmp_path / "w.duckdb", backend=DuckDBFileBackend(tmp_path / "w.duckdb")).backend,
                      DuckDBFileBackend)


def test_the_rows_are_parquet_files_under_the_data_path_and_the_catalog_is_shared(lake, tmp_path):
    warehouse = Warehouse(tmp_path / "w.duckdb")
    warehouse.replace_balances("x", balances("A", 500), [JAN])  # above the inlining limit: a Parquet file
    files = warehouse.query("SELECT data_file FROM ducklake_list_files('lake', 'balances')")
    assert files and all(path.startswith(lake[DATA_PATH_VARIABLE]) and path.endswith(".parquet") for (path,) in files)
    assert not (tmp_path / "w.duckdb").exists()  # no DuckDB file, no lock file
    assert not (tmp_path / "w.duckdb.lock").exists()
    # another process on another machine sees the same rows (a fresh connection to the catalog)
    other = duckdb.connect()
    DuckLakeBackend(lake[CATALOG_VARIABLE], lake[DATA_PATH_VARIABLE]).attach(other)
    assert other.execute("SELECT count(*), sum(closing) FROM lake.balances").fetchone() == (
        500, sum(Decimal("1.00") + n for n in range(500)))


def test_the_extensions_load_from_their_wheels_and_nothing_is_downloaded(lake, tmp_path):
    warehouse = Warehouse(tmp_path / "w.duckdb")
    loaded = dict(warehouse.query("SELECT extension_name, install_path FROM duckdb_extensions() WHERE loaded "
                                  "AND extension_name IN ('ducklake', 'postgres_scanner')"))
    assert set(loaded) == {"ducklake", "postgres_scanner"}
    for name in loaded:
        path = extension_file(name)
        assert path.parts[-2:] == (f"v{duckdb.__version__}", f"{name}.duckdb_extension")
        assert path.parent.parent.parent.name == f"duckdb_extension_{name}"
    assert warehouse.query("SELECT current_setting('autoinstall_known_extensions'), "
                           "current_setting('autoload_known_extensions')") == [(False, False)]


def test_an_unreachable_catalog_names_the_variable_and_hides_the_password(postgres_cluster, tmp_path, monkeypatch):
    secret = "s3cret-Password-42"
    monkeypatch.setenv(CATALOG_VARIABLE, f"postgres:dbname=lake host=127.0.0.1 port=1 user=erp password={secret}")
    monkeypatch.setenv(DATA_PATH_VARIABLE, str(tmp_path / "lake-data"))
    warehouse = Warehouse(tmp_path / "w.duckdb")
    assert secret not in repr(warehouse)
    with pytest.raises(ConfigError) as raised:
        warehouse.ensure_schema()
    assert CATALOG_VARIABLE in str(raised.value) and "PGPASSWORD" in str(raised.value)
    assert secret not in str(raised.value) and secret not in repr(raised.value.__cause__)


@pytest.mark.parametrize(("present", "missing"), [(CATALOG_VARIABLE, DATA_PATH_VARIABLE),
                                                  (DATA_PATH_VARIABLE, CATALOG_VARIABLE)])
def test_one_variable_without_the_other_is_refused_when_the_definitions_load(present, missing):
    with pytest.raises(ConfigError, match=f"{present} is set but {missing} is not"):
        load_config({present: "postgres:dbname=lake" if present == CATALOG_VARIABLE else "/mnt/lake/"})


def _conflicting_write(backend: DuckLakeBackend, calls: list[int], conflicts: int) -> str:
    """Inserts in a transaction while another connection deletes from the same table and commits
    first: DuckLake refuses this commit (a real conflict), `conflicts` times, then commits."""
    calls.append(1)
    with backend.connection() as mine, backend.connection() as other:
        mine.execute("BEGIN TRANSACTION")
        mine.execute("INSERT INTO balances SELECT * REPLACE ('B' AS org_number) FROM balances LIMIT 1")
        if len(calls) <= conflicts:
            other.execute("DELETE FROM balances WHERE org_number = 'A' AND account_number = ?", [str(999 + len(calls))])
        mine.execute("COMMIT")
    return "committed"


def test_a_conflicting_commit_is_retried_whole_and_then_lands(lake, tmp_path):
    warehouse = Warehouse(tmp_path / "w.duckdb")
    warehouse.replace_balances("x", balances("A", 20), [JAN])
    backend = DuckLakeBackend(lake[CATALOG_VARIABLE], lake[DATA_PATH_VARIABLE], attempts=5)
    calls: list[int] = []
    assert backend.retrying(lambda: _conflicting_write(backend, calls, conflicts=2)) == "committed"
    assert len(calls) == 3
    assert warehouse.query("SELECT count(*) FROM balances WHERE org_number = 'B'") == [(1,)]  # once, not three times
    assert warehouse.query("SELECT count(*) FROM balances WHERE org_number = 'A'") == [(18,)]


def test_a_write_that_keeps_conflicting_gives_up_with_a_clear_error(lake, tmp_path):
    warehouse = Warehouse(tmp_path / "w.duckdb")
    warehouse.replace_balances("x", balances("A", 20), [JAN])
    backend = DuckLakeBackend(lake[CATALOG_VARIABLE], lake[DATA_PATH_VARIABLE], attempts=3)
    calls: list[int] = []
    with pytest.raises(WarehouseConflict, match="conflicted with concurrent commits 3 times") as raised:
        backend.retrying(lambda: _conflicting_write(backend, calls, conflicts=99))
    assert len(calls) == 3
    assert "Transaction conflict" in str(raised.value.__cause__)
    assert lake["PGPASSWORD"] not in str(raised.value)
    assert warehouse.query("SELECT count(*) FROM balances WHERE org_number = 'B'") == [(0,)]  # nothing landed


def test_a_password_in_the_catalog_string_reaches_no_definition_run_event_or_data_file(
        postgres_cluster, tmp_path, monkeypatch, capfd):
    """The Dagster resource holds no catalog: the warehouse reads ERP_DUCKLAKE_CATALOG when the run
    starts, so even a password written into it stays out of the UI, the run config and the events."""
    catalog = "postgres:" + postgres_cluster.libpq(postgres_cluster.create_database("lake"))  # password inside
    ledger = generate_ledger(2, first_month=JAN, last_month=JAN)
    sandbox = TripletexSandbox(ledger)
    (tmp_path / "home").mkdir()
    with serve(sandbox.app, path="/v2") as url, dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        env = tripletex_env(sandbox, url, tmp_path, ERP_DUCKLAKE_CATALOG=catalog,
                            ERP_DUCKLAKE_DATA_PATH=f"{tmp_path / 'lake-data'}/")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        defs = build_definitions(env)
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey(["tripletex", "clients"])])
        assert result.success
        landed = Warehouse(env["ERP_WAREHOUSE_PATH"]).query("SELECT count(*) FROM clients WHERE erp = 'tripletex'")
        assert landed[0][0] >= len(ledger.valid_tenants)
        scan = SecretScan({"catalog password": postgres_cluster.password})
        scan.dagster_definitions(defs)
        scan.dagster_instance(instance)
        scan.files(tmp_path)
        captured = capfd.readouterr()
        scan.text("stdout", captured.out)
        scan.text("stderr", captured.err)
    assert scan.findings == [], scan.report()


def _attach_and_count(catalog: str, data_path: str, start) -> None:
    start.wait(timeout=120)
    with DuckLakeBackend(catalog, data_path).connection() as con:
        con.execute("SELECT count(*) FROM ducklake_snapshots('lake')").fetchone()


def test_processes_attaching_a_new_catalog_at_once_all_attach(postgres_cluster, tmp_path, monkeypatch):
    """The first start of several workers on an empty catalog: one initialises it, the others wait."""
    env = ducklake_env(postgres_cluster, tmp_path / "lake-data")
    monkeypatch.setenv("PGPASSWORD", env["PGPASSWORD"])  # inherited by the spawned processes
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(6)
    processes = [context.Process(target=_attach_and_count,
                                 args=(env[CATALOG_VARIABLE], env[DATA_PATH_VARIABLE], start)) for _ in range(6)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(180)
    assert [process.exitcode for process in processes] == [0] * 6
