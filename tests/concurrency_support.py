"""One Dagster run of tripletex/accounts + tripletex/balances over a tenant range, with the
multiprocess executor (each asset step in its own process), against the instance in
$DAGSTER_HOME. `eight_overlapping_runs` starts eight of these at once (`test_concurrency.py` on
SQLite, `tests/postgres/` on PostgreSQL) and checks what they leave:

    python tests/concurrency_support.py <first tenant> <last tenant>

Prints one JSON line: {"run_id": ..., "success": ...}.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from erp_pipelines.defs.build import build_definitions
from erp_pipelines.defs.runs import RANGE_END, RANGE_START
from erp_pipelines.model import add_months, months_between
from erp_pipelines.sandbox.common import serve
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.tripletex import TripletexSandbox
from erp_pipelines.warehouse import Warehouse

SUPPORT = Path(__file__).resolve()
THIS_MONTH = dt.date.today().replace(day=1)
FIRST = add_months(THIS_MONTH, -2)
RANGES = [(0, 3), (1, 4), (2, -1), (0, -1), (3, -1), (0, 2), (1, 3), (2, 4)]  # eight runs, every tenant in several
LOCK_SYMPTOMS = ("Could not set lock", "Conflicting lock", "database is locked", "IO Error")

JOB = "tripletex_extract_multiprocess"
PRELOAD = ["dagster", "erp_pipelines.defs.build", "erp_pipelines.pipeline", "duckdb", "pyarrow", "httpx"]


def extraction_job() -> dg.JobDefinition:
    """The definitions' assets and resources, as a job on the multiprocess executor."""
    defs = build_definitions(os.environ)
    job = dg.define_asset_job(
        JOB,
        selection=[dg.AssetKey(["tripletex", "accounts"]), dg.AssetKey(["tripletex", "balances"])],
        executor_def=dg.multiprocess_executor,
    )
    return dg.Definitions(assets=defs.assets, asset_checks=defs.asset_checks, resources=defs.resources,
                          jobs=[job]).resolve_job_def(JOB)


def main(first: str, last: str) -> None:
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(
            dg.reconstructable(extraction_job),
            instance=instance,
            tags={RANGE_START: first, RANGE_END: last},
            run_config={
                "ops": {"tripletex__accounts_and_balances": {"config": {"full_sync": True}}},
                # steps fork from a server that imported the project once, instead of importing it each
                "execution": {"config": {"start_method": {"forkserver": {"preload_modules": PRELOAD}}}},
            },
            raise_on_error=False,
        )
        print(json.dumps({"run_id": result.run_id, "success": result.success}), flush=True)


def eight_overlapping_runs(tmp_path: Path, monkeypatch, home: Path, extra_env: dict[str, str] | None = None,
                           timeout: float = 200) -> list[str]:
    """Register 6 Tripletex tenants, run `RANGES` as eight concurrent processes against the instance
    in `home`, and check: every run succeeded with no lock error, each asset step in its own process,
    and the warehouse holds the truth ledger, nothing lost and nothing twice. Returns the run ids."""
    from sandbox_env import tripletex_env  # tests/ is on the path when pytest imports this

    ledger = generate_ledger(6, first_month=FIRST, last_month=THIS_MONTH)
    sandbox = TripletexSandbox(ledger)
    with serve(sandbox.app, path="/v2") as url:
        env = {**tripletex_env(sandbox, url, tmp_path, TRIPLETEX_HISTORY_START=FIRST.isoformat()),
               **(extra_env or {}), "DAGSTER_HOME": str(home)}
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
        try:
            outputs = [run.communicate(timeout=timeout) for run in runs]
        finally:
            for run in runs:
                if run.poll() is None:
                    run.kill()
                    run.wait()

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
            for symptom in LOCK_SYMPTOMS:
                assert symptom not in text, text[-3000:]
            assert result["success"] and record.status == dg.DagsterRunStatus.SUCCESS, text[-3000:]
            # the multiprocess executor ran each step in its own process
            steps = [e.dagster_event.pid for e in events if e.dagster_event and e.dagster_event.is_step_start]
            assert steps and len(set(steps)) == len(steps) and os.getpid() not in steps

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
    return [r["run_id"] for r in results]


if __name__ == "__main__":
    main(*sys.argv[1:3])
