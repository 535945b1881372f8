"""A served simulator of one registered ERP, its connector and a warehouse, for the contract suite."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from erp_pipelines.config import connector_from_environment
from erp_pipelines.model import Balance, Client, add_months, months_between
from erp_pipelines.registry import ERPS
from erp_pipelines.sandbox.ledger import TruthLedger, generate_ledger
from erp_pipelines.sandbox.simulator import Simulator
from erp_pipelines.tokens import KEY_VARIABLE, PATH_VARIABLE, TokenStore
from erp_pipelines.warehouse import Warehouse

LAST_MONTH = dt.date(2026, 2, 1)  # a window across a year end, so profit and loss restarts in it


@dataclasses.dataclass
class Served:
    erp: str
    simulator: Simulator
    ledger: TruthLedger
    environment: dict[str, str]
    months: list[dt.date]
    warehouse: Warehouse
    page_size: int | None

    @property
    def stats(self):
        return self.simulator.stats

    @property
    def secret_variables(self) -> set[str]:
        return {s.env for s in ERPS[self.erp].connector_class.settings if s.secret}

    def connector(self, environment: dict[str, str] | None = None, **options: Any):
        return connector_from_environment(self.erp, environment or self.environment, page_size=self.page_size,
                                          **options)


@contextlib.contextmanager
def serve_erp(erp: str, tmp_path: Path, *, tenants: int = 4, months: int = 3,
              page_size: int | None = None) -> Iterator[Served]:
    """The ERP's simulator with `tenants` valid tenants (and the fixtures the client rules reject)
    whose ledger ends in `LAST_MONTH`, served; the window is its last `months` months."""
    window = months_between(add_months(LAST_MONTH, -(months - 1)), LAST_MONTH)
    ledger = generate_ledger(tenants, first_month=dt.date(2025, 6, 1), last_month=LAST_MONTH)
    simulator = ERPS[erp].simulator_class(ledger)
    with simulator.serve() as url:
        environment = {
            **simulator.environment(url),
            PATH_VARIABLE: str(tmp_path / "tokens.enc"),
            KEY_VARIABLE: TokenStore.generate_key(),
        }
        simulator.prepare_credentials(environment, TokenStore(environment[PATH_VARIABLE], key=environment[KEY_VARIABLE]))
        simulator.reset_stats()  # the suite counts the run's requests only
        yield Served(erp, simulator, ledger, environment, window, Warehouse(tmp_path / "warehouse.duckdb"), page_size)


def balances_of(extract) -> list[Balance]:
    return sorted(extract.balances, key=lambda b: (b.period, b.account_number))


def expected_of(served: Served, client: Client) -> list[Balance]:
    tenant = next(t for t in served.ledger.valid_tenants if t.org_number == client.org_number)
    return sorted(tenant.expected_balances(served.months), key=lambda b: (b.period, b.account_number))
