"""The contract every ERP connector implements. Plain Python: no Dagster imports.

A connector turns one credential into canonical records (`erp_pipelines.model`):

- `list_clients()`: every tenant the credential reaches, unvalidated (the client rules in
  `model.classify_clients` are applied by the caller, identically for every ERP);
- `fetch_accounts(client)`: the chart of accounts;
- `fetch_balances(client, months)`: per account per month (first-of-month dates): opening,
  movement and closing as `Decimal` NOK, debit positive.

Before returning a tenant's records a connector confirms the ERP answered for that tenant
(`verify_tenant`), so a misrouted response is refused instead of stored under the wrong company.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
from typing import Any, ClassVar

from erp_pipelines.model import Account, Balance, Client


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configuration value of an ERP, read from the environment variable `env`."""

    field: str
    env: str
    secret: bool = False
    required: bool = True
    default: str | None = None
    description: str = ""


@dataclasses.dataclass(frozen=True)
class RateLimit:
    """An ERP's published limit per credential. `None` means "follow the response headers"."""

    requests_per_second: float | None = None
    max_in_flight: int = 8
    source: str = ""


class Connector(abc.ABC):
    """Base class of every connector. Subclasses set the class attributes and the three methods."""

    erp: ClassVar[str]
    display_name: ClassVar[str]
    settings: ClassVar[tuple[Setting, ...]]
    rate_limit: ClassVar[RateLimit]
    scheduled_refresh: ClassVar[bool] = True  # False for sources that only change when files arrive

    def __init__(self, **config: Any) -> None:
        self.config = config

    @abc.abstractmethod
    async def list_clients(self) -> list[Client]: ...

    @abc.abstractmethod
    async def fetch_accounts(self, client: Client) -> list[Account]: ...

    @abc.abstractmethod
    async def fetch_balances(self, client: Client, months: list[dt.date]) -> list[Balance]: ...

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Safe to call twice."""

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
