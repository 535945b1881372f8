"""A sandbox served from a child process, so its CPU time and memory are not the extractor's.

    with SandboxProcess(tenants=1000, first_month=..., last_month=..., limit=200, window_seconds=1,
                        latency_ms=50) as sandbox:
        sandbox.url            # http://127.0.0.1:PORT/v2
        sandbox.reset_stats(); ...; sandbox.stats()

The child builds the same deterministic truth ledger (`generate_ledger` with the same arguments)
the parent can rebuild to check results. Controls go through the sandbox's admin routes
(`/_sandbox/...`), which are neither rate limited nor counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any, Self

import httpx


@dataclasses.dataclass(frozen=True)
class SandboxSpec:
    tenants: int
    first_month: dt.date
    last_month: dt.date
    limit: int | None = 200
    window_seconds: float = 1.0
    latency_ms: float = 50.0
    seed: int = 2026


def _serve(spec: SandboxSpec) -> None:  # runs in the child process
    from erp_pipelines.sandbox.common import RateLimitPolicy
    from erp_pipelines.sandbox.ledger import generate_ledger
    from erp_pipelines.sandbox.tripletex import TripletexSandbox

    ledger = generate_ledger(spec.tenants, seed=spec.seed, first_month=spec.first_month, last_month=spec.last_month)
    sandbox = TripletexSandbox(ledger, rate_limit=RateLimitPolicy(limit=spec.limit, window_seconds=spec.window_seconds))
    sandbox.faults.latency_ms = spec.latency_ms
    with sandbox.serve() as url:
        print(json.dumps({"url": url, "consumer_token": sandbox.consumer_token,
                          "employee_token": sandbox.accountant_employee_token}), flush=True)
        sys.stdin.read()  # until the parent closes our stdin (or goes away)


class SandboxProcess:
    """Context manager: a Tripletex sandbox in a child process (`python -m bench.server SPEC`)."""

    def __init__(self, spec: SandboxSpec, *, startup_timeout: float = 120.0) -> None:
        self.spec = spec
        self.startup_timeout = startup_timeout
        self.url = self.consumer_token = self.employee_token = ""
        self._process: subprocess.Popen | None = None
        self._admin: httpx.Client | None = None

    def __enter__(self) -> Self:
        argument = json.dumps({**dataclasses.asdict(self.spec), "first_month": self.spec.first_month.isoformat(),
                               "last_month": self.spec.last_month.isoformat()})
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.server", argument], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            cwd=root, env=env, text=True,
        )
        ready = select.select([self._process.stdout], [], [], self.startup_timeout)[0]
        line = self._process.stdout.readline() if ready else ""
        if not line:
            self.__exit__(None, None, None)
            raise RuntimeError("the sandbox process did not start")
        info = json.loads(line)
        self.url, self.consumer_token, self.employee_token = info["url"], info["consumer_token"], info["employee_token"]
        self._admin = httpx.Client(base_url=self.url.removesuffix("/v2") + "/_sandbox", timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._admin is not None:
            self._admin.close()
        if self._process is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.terminate()
                self._process.wait(timeout=5)
            self._process.stdout.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    # -- admin
    def stats(self, *, log: bool = False) -> dict[str, Any]:
        """Request counts; with `log`, also the sandbox's request log (its last 20,000 requests)."""
        return self._admin.get("/stats", params={"log": 20_000} if log else None).raise_for_status().json()

    def reset_stats(self) -> None:
        self._admin.post("/stats/reset").raise_for_status()

    def set_latency(self, ms: float) -> None:
        self._admin.post("/faults", json={"latency_ms": ms}).raise_for_status()

    def set_rate_limit(self, limit: int | None, window_seconds: float = 1.0) -> None:
        self._admin.put("/rate-limit", json={"limit": limit, "window_seconds": window_seconds}).raise_for_status()

    def env(self, warehouse: str) -> dict[str, str]:
        """The environment `erp_pipelines.definitions` reads, pointing at this sandbox."""
        return {
            "ERP_WAREHOUSE_PATH": warehouse,
            "ERP_SOURCES": "tripletex",
            "TRIPLETEX_BASE_URL": self.url,
            "TRIPLETEX_CONSUMER_TOKEN": self.consumer_token,
            "TRIPLETEX_EMPLOYEE_TOKEN": self.employee_token,
        }


if __name__ == "__main__":
    given = json.loads(sys.argv[1])
    given["first_month"], given["last_month"] = (dt.date.fromisoformat(given[k]) for k in ("first_month", "last_month"))
    _serve(SandboxSpec(**given))
