"""Every ERP the project knows: one line each (name, connector class, sandbox class).

Adding an ERP means a connector module in `erps/`, a sandbox module in `sandbox/`, a test module
in `tests/erps/` and one line here.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

from erp_pipelines.erps.base import Connector


@dataclasses.dataclass(frozen=True)
class ErpPlugin:
    name: str
    connector_path: str  # "module:Class"
    sandbox_path: str | None = None

    @functools.cached_property
    def connector_class(self) -> type[Connector]:
        return _load(self.connector_path)

    @functools.cached_property
    def sandbox_class(self) -> type | None:
        return _load(self.sandbox_path) if self.sandbox_path else None


def _load(path: str):
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


ERPS: dict[str, ErpPlugin] = {
    plugin.name: plugin
    for plugin in (
        ErpPlugin("tripletex", "erp_pipelines.erps.tripletex:TripletexConnector", "erp_pipelines.sandbox.tripletex:TripletexSandbox"),
        ErpPlugin("saft", "erp_pipelines.erps.saft:SaftConnector"),
    )
}
