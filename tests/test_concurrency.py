"""Eight concurrent Dagster runs over overlapping tenants, each on the multiprocess executor, all
writing one DuckDB file and one on-disk Dagster instance: no lock errors, no lost or duplicated rows."""

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from sandbox_env import dagster_home, tripletex_env

from erp_pipelines.defs.build import build_definitions
from erp_pipelines.model import add_months, months_between
from erp_pipelines.sandbox.common import serve
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.tripletex import TripletexSandbox
from erp_pipelines.warehouse import Warehouse

SUPPORT = Path(__file__).with_name("concurrency_support.py")
THIS_MONTH = dt.date.today().replace(day=1)
FIRST = add_months(THIS_MONTH, -2)
RANGES = [(0, 3), (1, 4), (2, -1), (0, -1), (3, -1), (0, 2), (1, 3), (2, 4)]  # eight runs, every tenant in several


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eight_concurrent_multiprocess_runs_over_overlapping_tenants(tmp_path, monkeypatch):
    ledger = generate_ledger(6, first_month=FIRST, last_month=THIS_MONTH)
    sandbox = TripletexSandbox(ledger)
    home = dagster_home(tmp_path)
    with serve(sandbox.app, path="/v2") as url:
        env = tripletex_env(sandbox, url, tmp_path, DAGSTER_HOME=str(home), TRIPLETEX_HISTORY_START=FIRST.isoformat())
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with dg.DagsterInstance.get() as instance:
            job = build_definitions(env).resolve_implicit_global_asset_job_def()
            assert job.execute_in_process(instance=instance,
                                          asset_selection=[dg.AssetKey(["tripletex", "clients"])]).success
            keys = instance.get_dynamic_partitions("tripletex_tenants")
        assert len(keys) == len(ledger.valid_tenants)  # the shared number's holder included

        runs = [
            subprocess.Popen([sys.executable, str(SUPPORT), keys[a], keys[b]], env={**os.environ, **env},
                             cwd=SUPPORT.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for a, b in RANGES
        ]
        outputs = [run.communicate(timeout=200) for run in runs]

    results = []
    for run, (out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len({r["run_id"] for r in results}) == 8

    with dg.DagsterInstance.get() as instance:
        for result in results:
            record = instance.get_run_by_id(result["run_id"])
            events = instance.all_logs(result["run_id"])
            text = "\n".join(str(e.message) + str(e.dagster_event.event_specific_data if e.dagster_event else "")
                             for e in events)
            for symptom in ("Could not set lock", "Conflicting lock", "database is locked", "IO Error"):
                assert symptom not in text, text[-3000:]
            assert result["success"] and record.status == dg.DagsterRunStatus.SUCCESS, text[-3000:]
            # the multiprocess executor ran each asset step in its own process
            step_pids = {e.dagster_event.pid for e in events if e.dagster_event and e.dagster_event.is_step_start}
            assert len(step_pids) == 2 and os.getpid() not in step_pids

    warehouse = Warehouse(env["ERP_WAREHOUSE_PATH"])
    months = months_between(FIRST, THIS_MONTH)
    for tenant in ledger.valid_tenants:
        expected = sorted((b.period, b.account_number, b.opening, b.movement, b.closing)
                          for b in tenant.expected_balances(months) if not b.is_zero)
        got = warehouse.query("SELECT period, account_number, opening, movement, closing FROM balances "
                              "WHERE erp = 'tripletex' AND org_number = ? ORDER BY ALL", [tenant.org_number])
        assert got == expected, tenant.name  # nothing lost, nothing twice, the truth to the øre
        accounts = warehouse.query("SELECT account_number FROM accounts WHERE org_number = ? ORDER BY 1",
                                   [tenant.org_number])
        assert [a for (a,) in accounts] == sorted(str(a.number) for a in tenant.accounts)
    assert warehouse.query("SELECT count(*) - count(DISTINCT (org_number, period, account_number)) FROM balances") \
        == [(0,)]
