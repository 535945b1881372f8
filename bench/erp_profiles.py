"""What the benchmark knows about particular ERPs: in this one place, so `bench/run.py` stays generic.

Everything else the bench needs comes from the registry (`registry.api_erps()`): the connector
class (its published `rate_limit`), the simulator class (`contract_rate_limit`: the limit as the
real ERP enforces it; `api_prefix`, `paths`: the endpoints to count) and the simulator's
`environment(url)`. A new ERP joins the bench by its registry line alone.

"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util

from erp_pipelines.registry import ERPS, api_erps


@dataclasses.dataclass(frozen=True)
class ServerLimit:
    """The limit a simulator enforces in the bench, per credential."""

    limit: int
    window_seconds: float = 1.0
    max_in_flight: int | None = None

    @property
    def per_second(self) -> float:
        return self.limit / self.window_seconds

    def describe(self) -> str:
        cap = f", {self.max_in_flight} in flight" if self.max_in_flight else ""
        return f"{self.limit}/{self.window_seconds:g} s{cap}"


def peers_module(erp: str):
    """`bench/<erp>_peers.py`: peers (a naive extractor, dlt's rest_api) written against that ERP's
    API, or None. The throughput, Dagster, peers and RSS sections run for the first ERP that has one."""
    name = f"bench.{erp}_peers"
    return importlib.import_module(name) if importlib.util.find_spec(name) else None


THROUGHPUT_ERP = next((spec.name for spec in api_erps() if peers_module(spec.name)), api_erps()[0].name)


def server_limit(erp: str) -> ServerLimit:
    """The ERP's own limit as its simulator enforces it: the simulator's `bench_rate_limit` (the
    bench's choice where the ERP publishes no number), else its `contract_rate_limit`."""
    simulator = ERPS[erp].simulator_class
    policy = simulator.bench_rate_limit or simulator.contract_rate_limit
    if policy.limit is None:
        raise ValueError(f"{erp}: give its simulator a bench_rate_limit with a request limit")
    return ServerLimit(policy.limit, policy.window_seconds, policy.max_in_flight)
