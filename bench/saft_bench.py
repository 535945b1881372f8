"""SAF-T import benchmark: write a large synthetic 1.30 file from the truth ledger, import it, report.

    python bench/saft_bench.py                 # 200 MB
    python bench/saft_bench.py --size-mb 1000  # 1 GB (needs ~1 GB free in --dir)
    python bench/saft_bench.py --size-mb 20 --engine xmlschema

Prints MB/s and peak RSS (sampled during the import, and the process maximum), checks the balances
against the truth ledger, and updates the "## SAF-T import" section of bench/results.md (other sections
are kept; a row with the same size and engine is replaced).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import psutil

from erp_pipelines.erps.saft import import_file
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.saft import write_saft_file

RESULTS = Path(__file__).parent / "results.md"
SECTION = "## SAF-T import"
YEAR = 2025
MB = 1_000_000


def main() -> None:
    args = _arguments()
    truth = generate_ledger(
        1, first_month=dt.date(YEAR, 1, 1), last_month=dt.date(YEAR, 12, 1), rejected_fixtures=False
    ).tenants[0]
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="saft-bench-") as folder:
        path = Path(folder) / "bench.xml"
        repeat = _repeat_for(truth, path, args.size_mb * MB)
        started = time.perf_counter()
        write_saft_file(truth, path, "1.30", YEAR, repeat=repeat)
        written = time.perf_counter() - started
        size = path.stat().st_size
        vouchers = f"{repeat} × {len(truth.vouchers)} vouchers"
        print(f"wrote {size / MB:.0f} MB ({vouchers}) in {written:.1f} s ({size / MB / written:.0f} MB/s)")
        baseline = psutil.Process().memory_info().rss
        with _peak_rss() as peak:
            started = time.perf_counter()
            result = import_file(path, validation=args.engine)
            seconds = time.perf_counter() - started
        _check(result, truth, repeat)
        row = {
            "date": dt.date.today().isoformat(),
            "size MB": f"{size / MB:.0f}",
            "engine": result.validated_with,
            "transactions": f"{result.transactions:,}",
            "lines": f"{result.lines:,}",
            "import s": f"{seconds:.1f}",
            "MB/s": f"{size / MB / seconds:.1f}",
            "RSS before MB": f"{baseline / MB:.0f}",
            "peak RSS MB": f"{peak['rss'] / MB:.0f}",
            "max RSS MB": f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB:.0f}",  # KiB
            "write MB/s": f"{size / MB / written:.0f}",
        }
        print("  ".join(f"{k}: {v}" for k, v in row.items()))
        if args.keep:
            kept = Path(args.dir or tempfile.gettempdir()) / f"saft-bench-{size // MB}MB.xml"
            os.replace(path, kept)
            print(f"kept {kept}")
    _update_results(row)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=200, help="target file size in MB (default 200)")
    parser.add_argument("--engine", default="auto", choices=("auto", "xmlschema", "libxml2", "none"))
    parser.add_argument("--dir", default=None, help="where to write the file (default: the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    return parser.parse_args()


def _repeat_for(truth, path: Path, target: int) -> int:
    """How many copies of the year's vouchers reach `target` bytes (fixed part + repeat × one year)."""
    one = write_saft_file(truth, path, "1.30", YEAR, repeat=1).stat().st_size
    two = write_saft_file(truth, path, "1.30", YEAR, repeat=2).stat().st_size
    per_copy, fixed = two - one, 2 * one - two
    return max(1, round((target - fixed) / per_copy))


@contextmanager
def _peak_rss(interval: float = 0.05):
    """Highest RSS seen while the block runs (sampled by a thread)."""
    process, peak, done = psutil.Process(), {"rss": 0}, threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["rss"] = max(peak["rss"], process.memory_info().rss)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()


def _check(result, truth, repeat: int) -> None:
    """Issues must be none, and December's closings the ledger's opening + repeat × the year's movements."""
    if result.issues:
        sys.exit(f"unexpected reconciliation issues: {result.issues[:3]}")
    closing = {b.account_number: b.closing for b in result.balances if b.period == dt.date(YEAR, 12, 1)}
    for account in truth.accounts:
        moved = sum(
            b.movement
            for m in range(1, 13)
            for b in truth.balances(dt.date(YEAR, m, 1))
            if b.account is account
        )
        opening = next(b.opening for b in truth.balances(dt.date(YEAR, 1, 1)) if b.account is account)
        if closing[str(account.number)] != Decimal(opening + repeat * moved) / 100:
            sys.exit(f"account {account.number}: closing {closing[str(account.number)]} is not the ledger's")
    print(f"checked: no reconciliation issues, {len(closing)} closings equal the ledger's")


# ---------------------------------------------------------------------------------------- results.md


def _update_results(row: dict[str, str]) -> None:
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmarks\n"
    before, section, after = _split_section(text)
    rows = [
        r
        for r in _table_rows(section)
        if (r.get("size MB"), r.get("engine")) != (row["size MB"], row["engine"])
    ]
    rows.append(row)
    rows.sort(key=lambda r: (r.get("engine", ""), int(r.get("size MB", "0") or 0)))
    RESULTS.write_text(before + _render(rows) + after, encoding="utf-8")
    print(f"updated {RESULTS}")


def _split_section(text: str) -> tuple[str, str, str]:
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        return text.rstrip("\n") + "\n\n", "", ""
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "".join(lines[:start]), "".join(lines[start:end]), "".join(lines[end:])


def _table_rows(section: str) -> list[dict[str, str]]:
    table = [line for line in section.splitlines() if line.startswith("|")]
    if len(table) < 2:
        return []
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    return [
        dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=False))
        for line in table[2:]
    ]


def _render(rows: list[dict[str, str]]) -> str:
    columns = list(rows[-1])
    lines = [
        SECTION,
        "",
        (
            "`python bench/saft_bench.py --size-mb N [--engine auto|xmlschema|libxml2|none]`: a synthetic "
            "SAF-T 1.30 file from the truth ledger (one company, the year's vouchers repeated), imported "
            "with `import_file` (envelope checks, header, validation, one streaming pass, monthly balances, "
            "reconciliation). MB/s = file size / import time. Peak RSS is sampled during the import; max RSS "
            "is the process maximum (it includes writing the file)."
        ),
        f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
        *("| " + " | ".join(row.get(c, "") for c in columns) + " |" for row in rows),
        "",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
