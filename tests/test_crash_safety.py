"""Crash safety: `kill -9` in the middle of a warehouse write leaves DuckDB consistent and holding the
previous data; the cross-process lock dies with the process; the next run completes the work. The
write tests run on both backends (`warehouse_backend`): the DuckDB file and DuckLake, which has no
lock: there, other processes read the previous data while the victim hangs.

The victims run in subprocesses (tests/crash_support.py)."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import filelock
import pytest

from erp_pipelines import quality
from erp_pipelines.warehouse import Warehouse

SUPPORT = Path(__file__).with_name("crash_support.py")
sys.path.insert(0, str(SUPPORT.parent))
import crash_support


@contextlib.contextmanager
def victim(*args: str, marker: Path, timeout: float = 90.0):
    """Start the victim, wait until it reaches `marker`, yield it; it is always killed in the end."""
    process = subprocess.Popen([sys.executable, str(SUPPORT), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=SUPPORT.parent.parent)
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if process.poll() is not None:
                _, err = process.communicate()
                pytest.fail(f"the victim ended before the write (exit {process.returncode}):\n{err.decode()[-3000:]}")
            assert time.monotonic() < deadline, "the victim never reached the write"
            time.sleep(0.02)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def kill_9(process) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def lock_is_held(path: Path) -> bool:
    try:
        filelock.FileLock(str(path) + ".lock", timeout=0.2).acquire().lock.release()
    except filelock.Timeout:
        return True
    return False


def snapshot(warehouse: Warehouse) -> dict:
    return {
        "balances": warehouse.query("SELECT * FROM balances ORDER BY ALL"),
        "accounts": warehouse.query("SELECT * FROM accounts ORDER BY ALL"),
        "clients": warehouse.query("SELECT erp, org_number, erp_client_id, status FROM clients ORDER BY ALL"),
    }


def truth_rows():
    rows = []
    for tenant in crash_support.ledger().valid_tenants:
        rows += [(tenant.org_number, b.period, b.account_number, b.opening, b.movement, b.closing)
                 for b in tenant.expected_balances(crash_support.MONTHS) if not b.is_zero]
    return sorted(rows)


def landed(warehouse: Warehouse, run_id: str | None = None):
    sql = "SELECT org_number, period, account_number, opening, movement, closing FROM balances WHERE erp = 'tripletex'"
    params = []
    if run_id:
        sql += " AND run_id = ?"
        params.append(run_id)
    return sorted(warehouse.query(sql, params))


def test_the_warehouse_lock_is_an_os_lock_released_when_its_holder_is_killed(tmp_path):
    path = tmp_path / "w.duckdb"
    warehouse = Warehouse(path)
    assert isinstance(warehouse.backend._lock, filelock.UnixFileLock)  # fcntl.flock: the kernel drops it with the process
    with victim("hold-lock", str(path), str(tmp_path / "locked"), marker=tmp_path / "locked") as process:
        assert lock_is_held(path)
        kill_9(process)
    started = time.monotonic()
    assert warehouse.query("SELECT 42") == [(42,)]
    assert time.monotonic() - started < 2  # no waiting for a stale lock, no manual cleanup


def test_kill_9_before_commit_of_a_pipeline_run_keeps_the_previous_data_and_the_next_run_completes(
        tmp_path, warehouse_backend):
    path = tmp_path / "warehouse.duckdb"
    crash_support.run_pipeline(str(path), "run-1")
    warehouse = Warehouse(path)
    before = snapshot(warehouse)
    assert landed(warehouse, "run-1") == truth_rows() and before["accounts"]

    marker = tmp_path / "in-the-write"
    with victim("pipeline", str(path), "run-2", str(marker), marker=marker) as process:
        # the victim is inside the balances transaction: DELETE and INSERT done, COMMIT not yet
        if warehouse_backend == "duckdb":
            assert lock_is_held(path)
        else:  # no lock: another process reads the previous balances meanwhile
            assert snapshot(Warehouse(path))["balances"] == before["balances"]
        kill_9(process)

    assert not lock_is_held(path)
    after = snapshot(Warehouse(path))  # opening replays the WAL; the uncommitted transaction is gone
    assert after["balances"] == before["balances"]  # every row of run-1, nothing of run-2, nothing lost
    assert {row[-1] for row in after["balances"]} == {"run-1"}
    assert after["clients"] == before["clients"]
    for name in quality.CHECKS:
        assert quality.run_check(Warehouse(path), "tripletex", name)[0] == 0, name

    crash_support.run_pipeline(str(path), "run-3")  # the next run completes it
    assert landed(Warehouse(path), "run-3") == truth_rows()
    assert landed(Warehouse(path)) == truth_rows()  # and nothing twice


def test_kill_9_during_a_large_insert_leaves_the_database_consistent(tmp_path, warehouse_backend):
    path = tmp_path / "warehouse.duckdb"
    crash_support.run_pipeline(str(path), "run-1")
    before = snapshot(Warehouse(path))

    marker = tmp_path / "inserting"
    with victim("big-insert", str(path), "6000000", str(marker), marker=marker) as process:
        time.sleep(0.3)
        mid_insert = not Path(str(marker) + ".done").exists()
        kill_9(process)
    assert mid_insert, "the insert finished before the kill; make it larger"

    warehouse = Warehouse(path)
    assert warehouse.query("SELECT count(*) FROM balances WHERE org_number = 'BIG'") == [(0,)]
    assert snapshot(warehouse) == before
    warehouse.replace_balances("tripletex", {"BIG": []}, crash_support.MONTHS, run_id="after-crash")  # writable
    crash_support.run_pipeline(str(path), "run-2")
    assert landed(warehouse, "run-2") == truth_rows()
