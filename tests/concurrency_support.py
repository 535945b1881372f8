"""One Dagster run of tripletex/accounts + tripletex/balances over a tenant range, with the
multiprocess executor (each asset step in its own process), against the instance in
$DAGSTER_HOME. `test_concurrency.py` starts eight of these at once:

    python tests/concurrency_support.py <first tenant> <last tenant>

Prints one JSON line: {"run_id": ..., "success": ...}.
"""

from __future__ import annotations

import json
import os
import sys

import dagster as dg

from erp_pipelines.defs.build import build_definitions
from erp_pipelines.defs.runs import RANGE_END, RANGE_START

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
                "ops": {"tripletex__balances": {"config": {"full_sync": True}}},
                # steps fork from a server that imported the project once, instead of importing it each
                "execution": {"config": {"start_method": {"forkserver": {"preload_modules": PRELOAD}}}},
            },
            raise_on_error=False,
        )
        print(json.dumps({"run_id": result.run_id, "success": result.success}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
