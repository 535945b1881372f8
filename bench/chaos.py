"""`make chaos`: the 1,000-tenant fault-injection run (`erp_pipelines.chaos`), printing the figures.

    .venv/bin/python -m bench.chaos [--tenants 1000] [--seed 2026] [--erp tripletex] [--keep]

Every healthy tenant must land exactly once and equal the truth ledger; every failing tenant must
fail alone with an error naming it and the fix; retries stay bounded. Exits 1 if any check fails.
The warehouse of the run is kept in bench/_work/chaos with --keep.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from erp_pipelines.chaos import TARGETS, ChaosOptions, run_chaos

WORK = Path(__file__).resolve().parent / "_work" / "chaos"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--months", type=int, default=2, help="months of balances per tenant (default 2)")
    parser.add_argument("--erp", choices=sorted(TARGETS), default="tripletex")
    parser.add_argument("--keep", action="store_true", help=f"keep the warehouse in {WORK}")
    args = parser.parse_args(argv)

    options = ChaosOptions(tenants=args.tenants, seed=args.seed, months=args.months)
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)

    if args.keep:
        shutil.rmtree(WORK, ignore_errors=True)
        report = run_chaos(WORK, options, TARGETS[args.erp], progress=progress)
    else:
        with tempfile.TemporaryDirectory(prefix="erp-chaos-") as work:
            report = run_chaos(work, options, TARGETS[args.erp], progress=progress)
    print()
    print(report.summary())
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
