"""Every ERP the project knows: one line each.

An `ErpSpec` names the ERP's connector (its settings, published rate limit and contract live on
the connector class) and its simulator (API paths, demo data, admin and fault hooks: a
`sandbox.simulator.Simulator`). The demo, `python -m erp_pipelines.sandbox`, the chaos runner,
the benchmark, the test fixtures, the contract suite and `.env.example` all read this registry.

Adding an ERP means its connector module in `erps/`, its simulator module in `sandbox/`, its
tests, its `specs/<erp>/` folder and one line here.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from erp_pipelines.erps.base import Connector
    from erp_pipelines.sandbox.simulator import Simulator


@dataclasses.dataclass(frozen=True)
class ErpSpec:
    name: str
    connector_path: str  # "module:Class"
    simulator_path: str | None = None  # "module:Class"; None for sources without an API (files)

    @functools.cached_property
    def connector_class(self) -> type[Connector]:
        return _load(self.connector_path)

    @functools.cached_property
    def simulator_class(self) -> type[Simulator] | None:
        return _load(self.simulator_path) if self.simulator_path else None

    @property
    def env_prefix(self) -> str:
        return f"{self.name.upper()}_"


def _load(path: str):
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


ERPS: dict[str, ErpSpec] = {
    spec.name: spec
    for spec in (
        ErpSpec("tripletex", "erp_pipelines.erps.tripletex:TripletexConnector", "erp_pipelines.sandbox.tripletex:TripletexSandbox"),
        ErpSpec("fiken", "erp_pipelines.erps.fiken:FikenConnector", "erp_pipelines.sandbox.fiken:FikenSandbox"),
        ErpSpec("poweroffice", "erp_pipelines.erps.poweroffice:PowerOfficeConnector", "erp_pipelines.sandbox.poweroffice:PowerOfficeSandbox"),
        ErpSpec("vismanet", "erp_pipelines.erps.vismanet:VismaNetConnector", "erp_pipelines.sandbox.vismanet:VismaNetSandbox"),
        ErpSpec("eaccounting", "erp_pipelines.erps.eaccounting:EAccountingConnector", "erp_pipelines.sandbox.eaccounting:EAccountingSandbox"),
        ErpSpec("xledger", "erp_pipelines.erps.xledger:XledgerConnector", "erp_pipelines.sandbox.xledger:XledgerSandbox"),
        ErpSpec("businessnxt", "erp_pipelines.erps.businessnxt:BusinessNxtConnector", "erp_pipelines.sandbox.businessnxt:BusinessNxtSandbox"),
        ErpSpec("saft", "erp_pipelines.erps.saft:SaftConnector"),
    )
}


def api_erps() -> list[ErpSpec]:
    """The ERPs with an API (and so a simulator): the ones the contract suite and the bench run."""
    return [spec for spec in ERPS.values() if spec.simulator_path]
