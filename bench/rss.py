"""Peak RSS of the extracting process for many tenants (a phase of `bench.run`, in its own process).

    .venv/bin/python -m bench.rss --erp <name> --tenants 10000 [--latency-ms 0] [--limit 0]

Runs `pipeline.load_tenants` (accounts and balances, the daily two-month window) for every tenant of
a sandbox served from a separate process (its memory is not counted), in a fresh interpreter that
imports only the extraction path. Peak RSS is the kernel's high-water mark of the process (VmHWM)
and RSS sampled every 50 ms, whichever is higher; RSS after every written batch shows it stays flat.
The last line printed is JSON with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.server import SandboxProcess, SandboxSpec
from erp_pipelines.erps.extract import ACCOUNTS, BALANCES
from erp_pipelines.model import add_months, months_between
from erp_pipelines.pipeline import load_tenants, refresh_clients
from erp_pipelines.registry import api_erps
from erp_pipelines.warehouse import Warehouse

MB = 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rss", description=__doc__.splitlines()[0])
    parser.add_argument("--erp", choices=sorted(spec.name for spec in api_erps()), default=api_erps()[0].name)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--limit", type=int, default=0, help="requests per window (0: no limit)")
    parser.add_argument("--window-seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.erp, args.tenants, args.latency_ms, args.limit or None, args.window_seconds)))
    return 0


def measure(erp: str, tenants: int, latency_ms: float, limit: int | None, window_seconds: float) -> dict:
    this = dt.date.today().replace(day=1)
    months = months_between(add_months(this, -1), this)
    spec = SandboxSpec(erp=erp, tenants=tenants, first_month=months[0], last_month=this, limit=limit,
                       window_seconds=window_seconds, latency_ms=latency_ms)
    process = psutil.Process()
    peak = {"rss": process.memory_info().rss}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["rss"] = max(peak["rss"], process.memory_info().rss)
            done.wait(0.05)

    with SandboxProcess(spec) as sandbox, tempfile.TemporaryDirectory(prefix="bench-rss-") as work:
        warehouse = Warehouse(Path(work) / "warehouse.duckdb")
        connector = sandbox.connector()
        after_batches: list[tuple[int, float]] = []
        counts = {"loaded": 0, "failed": 0, "rows": 0, "active": 0}

        async def run() -> None:
            async with connector:
                listed, _ = await refresh_clients(connector, warehouse)
                clients = [client for client in listed if client.is_active]
                counts["active"] = len(clients)
                async for batch in load_tenants(connector, warehouse, clients, what=(ACCOUNTS, BALANCES),
                                                months=months):
                    counts["loaded"] += len(batch.loaded)
                    counts["failed"] += len(batch.failed)
                    counts["rows"] += batch.rows
                    after_batches.append((counts["loaded"] + counts["failed"], process.memory_info().rss / MB))

        before = process.memory_info().rss
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        try:
            asyncio.run(run())
        finally:
            done.set()
            sampler.join()
        seconds = time.perf_counter() - started
        requests = sandbox.stats()["total"]
    first = after_batches[0][1] if after_batches else 0.0
    return {
        "tenants": counts["loaded"],
        "active": counts["active"],  # the ledger's valid tenants (the shared number's holder included)
        "failed": counts["failed"],
        "rows": counts["rows"],
        "seconds": round(seconds, 2),
        "requests": requests,
        "rss_before_mb": round(before / MB, 1),
        "peak_rss_mb": round(max(peak["rss"], _high_water_mark()) / MB, 1),
        "rss_after_first_batch_mb": round(first, 1),
        "rss_after_last_batch_mb": round(after_batches[-1][1], 1) if after_batches else 0.0,
        "batches": len(after_batches),
    }


def _high_water_mark() -> float:
    """The process's peak RSS in bytes: VmHWM (Linux), which belongs to this program's memory map.
    `ru_maxrss` is no good here: Linux carries it over from the parent through fork and exec, so a
    child of a large benchmark process would report the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


if __name__ == "__main__":
    sys.exit(main())
