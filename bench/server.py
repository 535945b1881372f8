"""Any registered ERP simulator served from a child process, so its CPU time and memory are not the
extractor's.

    spec = SandboxSpec(erp=NAME, tenants=20, first_month=..., last_month=..., limit=4,
                       window_seconds=1, max_in_flight=1, mode="sliding", latency_ms=50)
    with SandboxProcess(spec) as sandbox:
        sandbox.url                      # the API base, e.g. http://127.0.0.1:PORT/api/v2
        sandbox.environment              # the connector's variables (+ a temporary token store)
        connector = sandbox.connector()  # `config.connector_from_environment(erp, environment)`
        sandbox.reset_stats(); ...; sandbox.stats(log=True)

The child builds the same deterministic truth ledger (`generate_ledger` with the same arguments)
the parent can rebuild to check results, then `ERPS[erp].simulator_class(ledger, rate_limit=...)`
with LIMIT requests per WINDOW_SECONDS counted the `mode` way (and at most MAX_IN_FLIGHT at once)
per credential, adds LATENCY ms to every API request and prints one JSON line: the URL, the admin
URL and `simulator.environment(url)`. Controls go through the simulator's admin routes
(`/_sandbox/...`), which are neither rate limited nor counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import gc
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Self

import httpx


@dataclasses.dataclass(frozen=True)
class SandboxSpec:
    erp: str  # a name in `registry.ERPS` with a simulator
    tenants: int
    first_month: dt.date
    last_month: dt.date
    limit: int | None = 200  # requests per window per credential; None: no limit
    window_seconds: float = 1.0
    max_in_flight: int | None = None  # concurrent requests per credential; None: no cap
    mode: str = "fixed"  # how the window counts: `sandbox.common.WINDOW_MODES`
    latency_ms: float = 50.0
    seed: int = 2026

    def rate_limit(self) -> dict[str, Any]:
        """The simulator's `RateLimitPolicy`, as JSON (also what the admin route takes)."""
        return rate_limit_json(self.limit, self.window_seconds, self.max_in_flight, self.mode)


def rate_limit_json(limit: int | None, window_seconds: float, max_in_flight: int | None = None,
                    mode: str = "fixed") -> dict[str, Any]:
    """A `sandbox.common.RateLimitPolicy` as JSON (`RateLimitPolicy.from_json`, the admin route)."""
    return {"limit": limit, "window_seconds": window_seconds, "max_in_flight": max_in_flight, "mode": mode}


def _serve(spec: SandboxSpec, token_store: dict[str, str]) -> None:  # runs in the child process
    from erp_pipelines.registry import ERPS
    from erp_pipelines.sandbox.common import RateLimitPolicy
    from erp_pipelines.sandbox.ledger import generate_ledger
    from erp_pipelines.tokens import PATH_VARIABLE, TokenStore

    ledger = generate_ledger(spec.tenants, seed=spec.seed, first_month=spec.first_month, last_month=spec.last_month)
    simulator = ERPS[spec.erp].simulator_class(ledger, rate_limit=RateLimitPolicy.from_json(spec.rate_limit()))
    simulator.faults.latency_ms = spec.latency_ms
    # The simulator holds the whole truth ledger in its heap and caches what it renders from it;
    # full collections scanning that paused it 50-170 ms every few seconds, longer as the run went
    # on (measured), stalls an ERP's servers do not have. The heap built so far is frozen and full
    # collections are left rare; young garbage is collected as usual.
    gc.freeze()
    gc.set_threshold(*gc.get_threshold()[:2], 1000)
    with simulator.serve() as url:
        root = url.removesuffix(simulator.api_prefix)
        environment = {**simulator.environment(url), **token_store}
        simulator.prepare_credentials(environment, TokenStore.from_env(token_store[PATH_VARIABLE], token_store))
        print(json.dumps({"url": url, "admin": root + "/_sandbox", "environment": environment}), flush=True)
        sys.stdin.read()  # until the parent closes our stdin (or goes away)


class SandboxProcess:
    """Context manager: one ERP simulator in a child process (`python -m bench.server SPEC`)."""

    def __init__(self, spec: SandboxSpec, *, startup_timeout: float = 120.0) -> None:
        self.spec = spec
        self.startup_timeout = startup_timeout
        self.url = ""
        self.environment: dict[str, str] = {}
        self._process: subprocess.Popen | None = None
        self._admin: httpx.Client | None = None
        self._tokens: tempfile.TemporaryDirectory | None = None

    @property
    def erp(self) -> str:
        return self.spec.erp

    def __enter__(self) -> Self:
        argument = json.dumps({**dataclasses.asdict(self.spec), "first_month": self.spec.first_month.isoformat(),
                               "last_month": self.spec.last_month.isoformat()})
        self._tokens = tempfile.TemporaryDirectory(prefix=f"bench-tokens-{self.spec.erp}-")
        token_store = self.token_store(Path(self._tokens.name) / "tokens.enc")
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.server", argument, json.dumps(token_store)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            cwd=root, env=env, text=True,
        )
        ready = select.select([self._process.stdout], [], [], self.startup_timeout)[0]
        line = self._process.stdout.readline() if ready else ""
        if not line:
            self.__exit__(None, None, None)
            raise RuntimeError(f"the {self.spec.erp} sandbox process did not start")
        info = json.loads(line)
        self.url = info["url"]
        self.environment = info["environment"]  # with the token store the child prepared (e.g. OAuth consents)
        self._admin = httpx.Client(base_url=info["admin"], timeout=30)
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
        if self._tokens is not None:
            self._tokens.cleanup()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    # -- the connector
    @staticmethod
    def token_store(path: Path) -> dict[str, str]:
        """The variables of a new encrypted token store at `path`."""
        from erp_pipelines.tokens import KEY_VARIABLE, PATH_VARIABLE, TokenStore

        return {PATH_VARIABLE: str(path), KEY_VARIABLE: TokenStore.generate_key()}

    def copy_of_token_store(self, path: Path) -> dict[str, str]:
        """The variables of a copy at `path` of the token store the simulator prepared: what a new
        process finds after onboarding (consents stored, no session cached)."""
        from erp_pipelines.tokens import PATH_VARIABLE

        prepared = Path(self.environment[PATH_VARIABLE])
        path.unlink(missing_ok=True)
        if prepared.exists():
            shutil.copyfile(prepared, path)
            path.chmod(0o600)
        return {**self.environment, PATH_VARIABLE: str(path)}

    def connector(self, environment: dict[str, str] | None = None, **options: Any):
        """The ERP's connector from `environment` (default: this sandbox's), as the command line
        builds it (`config.connector_from_environment`); `options`: transport, throttle, retry, ..."""
        from erp_pipelines.config import connector_from_environment

        return connector_from_environment(self.spec.erp, environment or self.environment, **options)

    def env(self, warehouse: str) -> dict[str, str]:
        """The environment `erp_pipelines.definitions` reads, pointing at this sandbox."""
        return {"ERP_WAREHOUSE_PATH": warehouse, "ERP_SOURCES": self.spec.erp, **self.environment}

    # -- admin
    def stats(self, *, log: bool = False) -> dict[str, Any]:
        """Request counts; with `log`, also the simulator's request log (its last 20,000 requests)."""
        return self._admin.get("/stats", params={"log": 20_000} if log else None).raise_for_status().json()

    def reset_stats(self) -> None:
        self._admin.post("/stats/reset").raise_for_status()

    def set_latency(self, ms: float) -> None:
        self._admin.post("/faults", json={"latency_ms": ms}).raise_for_status()

    def set_rate_limit(self, limit: int | None, window_seconds: float = 1.0, max_in_flight: int | None = None,
                       mode: str = "fixed") -> None:
        policy = rate_limit_json(limit, window_seconds, max_in_flight, mode)
        self._admin.put("/rate-limit", json=policy).raise_for_status()


if __name__ == "__main__":
    given = json.loads(sys.argv[1])
    given["first_month"], given["last_month"] = (dt.date.fromisoformat(given[k]) for k in ("first_month", "last_month"))
    _serve(SandboxSpec(**given), json.loads(sys.argv[2]))
