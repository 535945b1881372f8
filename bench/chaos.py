"""`make chaos`: the 1,000-tenant fault-injection run (`bench/chaos_runner.py`), printing the figures.

    .venv/bin/python -m bench.chaos [--tenants 1000] [--seed 2026] [--erp NAME ...] [--keep]

Runs every ERP with an API in the registry, one after another (or only those given with --erp),
each with its own report. Every healthy tenant must land exactly once and equal the truth ledger;
every failing tenant must fail alone with an error naming it and the fix; retries stay bounded.
Exits 1 if any check fails for any ERP. With --keep, each run's warehouse is kept in
bench/_work/chaos/<erp>.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.chaos_runner import ChaosOptions, run_chaos
from erp_pipelines.registry import api_erps

WORK = Path(__file__).resolve().parent / "_work" / "chaos"


def main(argv: list[str] | None = None) -> int:
    names = [spec.name for spec in api_erps()]
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--months", type=int, default=2, help="months of balances per tenant (default 2)")
    parser.add_argument("--erp", choices=names, action="append",
                        help=f"run only this ERP (repeatable; default: all of {', '.join(names)})")
    parser.add_argument("--keep", action="store_true", help=f"keep each warehouse in {WORK}/<erp>")
    args = parser.parse_args(argv)

    options = ChaosOptions(tenants=args.tenants, seed=args.seed, months=args.months)
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)

    failed = []
    for erp in args.erp or names:
        if args.keep:
            shutil.rmtree(WORK / erp, ignore_errors=True)
            report = run_chaos(WORK / erp, options, erp, progress=progress)
        else:
            with tempfile.TemporaryDirectory(prefix=f"erp-chaos-{erp}-") as work:
                report = run_chaos(work, options, erp, progress=progress)
        print()
        print(report.summary())
        print()
        if not report.clean:
            failed.append(erp)
    if failed:
        print(f"chaos: FAIL for {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
