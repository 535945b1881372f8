"""What every ERP simulator offers, so that the demo, the sandbox CLI, the chaos runner, the
benchmark and the contract suite drive any ERP the same way, from its registry line alone.

A simulator subclasses `Simulator`, builds its Starlette app over a `SandboxHarness` (faults, rate
limits, statistics: `common.py`) and implements the few ERP-specific hooks below: where its API
lives, the environment that points its connector at it, and the admin actions the tests need
(a tenant losing access, a token expiring, another company's identity, a list that shifts).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, ClassVar

from erp_pipelines.sandbox.common import RateLimitPolicy, SandboxHarness, serve
from erp_pipelines.sandbox.ledger import TruthLedger, TruthTenant
from erp_pipelines.tokens import TokenStore


@dataclasses.dataclass(frozen=True)
class ApiPaths:
    """Request paths (below the API prefix) that fault rules and statistics are scoped to."""

    clients: str  # the credential's client list (or the request that names one client)
    accounts: str  # a tenant's chart of accounts
    balances: str  # a tenant's balances
    identity: str | None = None  # the tenant guard's own request, when it is a separate one
    phantom_account: str | None = None  # the account a mid-paging insert into the chart adds
    paged_client_list: bool = True  # False: clients come one per credential (no list to page)
    token: str | None = None  # the request that mints an access token (a session), if below the prefix


class Simulator(abc.ABC):
    """One simulated ERP over a truth ledger. `app` serves the API at `api_prefix` and the admin
    routes at /_sandbox."""

    erp: ClassVar[str]
    api_prefix: ClassVar[str]
    paths: ClassVar[ApiPaths]
    default_rate_limit: ClassVar[RateLimitPolicy]
    chaos_rate_limit: ClassVar[RateLimitPolicy | None] = None  # the chaos run's own limit, if it wants one
    contract_rate_limit: ClassVar[RateLimitPolicy]  # the limit as the real ERP enforces it (contract suite)
    bench_rate_limit: ClassVar[RateLimitPolicy | None] = None  # `make bench`'s limit where none is published
    revoke_fix: ClassVar[str]
    """A fragment of the connector's fix for a tenant after `revoke` (e.g. the access to re-grant)."""
    deny_access_fix: ClassVar[str]
    """A fragment of the connector's fix for a tenant after `deny_access`."""
    required_balance_field: ClassVar[str]
    """A field every balance row needs, as a dotted JSON path of the balances response (the form
    `FaultPlan.drop_field` takes, e.g. "values.*.balanceOut"): without it the tenant must fail."""
    ledger: TruthLedger
    harness: SandboxHarness
    app: Any

    @abc.abstractmethod
    def __init__(self, ledger: TruthLedger, *, rate_limit: RateLimitPolicy | None = None,
                 fault_seed: int = 0) -> None: ...

    # ------------------------------------------------------------------ wiring

    @abc.abstractmethod
    def environment(self, url: str) -> dict[str, str]:
        """The connector's variables pointing at this simulator served at `url` (the API base)."""

    @abc.abstractmethod
    def credential_lines(self) -> list[str]:
        """What `python -m erp_pipelines.sandbox serve` prints about the credentials it accepts."""

    def wrong_credential(self, environment: dict[str, str]) -> tuple[dict[str, str], str]:
        """`environment` with the integration's own credential replaced by one the simulator
        refuses, and the variable an `AuthError` must name."""
        raise NotImplementedError

    def serve(self, **kwargs: Any) -> AbstractContextManager[str]:
        """Run as a real HTTP server on 127.0.0.1; yields the API base URL."""
        return serve(self.app, path=self.api_prefix, **kwargs)

    @classmethod
    def shape_ledger(cls, ledger: TruthLedger) -> None:
        """Facts this ERP adds to the shared truth (e.g. a tenant with a non-calendar fiscal year).
        The simulator applies them to its ledger; whoever rebuilds the ledger elsewhere to check
        results (the bench's parent process) applies them too."""

    def prepare_demo(self) -> None:
        """Shape the demo's data (e.g. one client that has not granted API access)."""

    def prepare_credentials(self, environment: dict[str, str], store: TokenStore) -> None:
        """Give the connector what `environment` cannot hold, before it runs against this simulator
        served at `environment`'s URLs: e.g. the OAuth consents an authorisation-code ERP keeps in
        the token `store`, given through the real consent flow. May update `environment`."""

    # ------------------------------------------------------------------ tenants

    @abc.abstractmethod
    def scope_of(self, tenant: TruthTenant) -> str:
        """The tenant as fault rules and statistics name it."""

    @abc.abstractmethod
    def deny_access(self, tenant: TruthTenant) -> None:
        """The client withdraws our access while staying listed (the onboarding step undone)."""

    @abc.abstractmethod
    def revoke(self, tenant: TruthTenant) -> None:
        """The client no longer reaches us at all (access withdrawn by the firm or the client)."""

    @abc.abstractmethod
    def swap_identity(self, tenant: TruthTenant, as_tenant: TruthTenant) -> None:
        """From now on the tenant's requests are answered with another company's data and identity."""

    @abc.abstractmethod
    def expire_tokens(self) -> int:
        """Every access token issued so far stops working; returns how many."""

    @abc.abstractmethod
    def mutate_during_paging(self, path: str, action: str = "insert", *, position: int = 0,
                             after_requests: int = 1, tenant: int | None = None) -> Any:
        """Make the list at `path` change (a row inserted or removed) after `after_requests` pages."""

    # ------------------------------------------------------------------ shared machinery

    @property
    def stats(self):
        return self.harness.stats

    @property
    def faults(self):
        return self.harness.faults

    @property
    def rate_limiter(self):
        return self.harness.rate_limiter

    def reset_stats(self) -> None:
        self.harness.reset_stats()

    def clear_faults(self) -> None:
        self.harness.clear_faults()

    def set_rate_limit(self, policy: RateLimitPolicy) -> None:
        self.harness.set_rate_limit(policy)

    def tenants(self) -> Iterator[TruthTenant]:
        return iter(self.ledger.valid_tenants)
