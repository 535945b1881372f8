"""Dagster resources: the warehouse, and one resource per ERP holding its credentials.

Each ERP resource class is generated from the connector's declared settings, so adding an ERP
needs no Dagster code. Secrets are always `EnvVar`s in the definitions: the UI and the run config
show the variable's name, never its value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from erp_pipelines.erps.base import Connector
from erp_pipelines.registry import ErpSpec
from erp_pipelines.tokens import KEY_VARIABLE, TokenStore, validate_key
from erp_pipelines.warehouse import Warehouse


class WarehouseResource(dg.ConfigurableResource):
    """The DuckDB warehouse file (`ERP_WAREHOUSE_PATH`)."""

    path: str
    _warehouse: Warehouse | None = PrivateAttr(default=None)

    def get(self) -> Warehouse:
        if self._warehouse is None:
            self._warehouse = Warehouse(self.path)
        return self._warehouse


class ErpResource(dg.ConfigurableResource):
    """Base of the generated per-ERP resources (`<Erp>Resource`)."""

    token_store_path: str | None = None
    """The encrypted token store (`ERP_TOKEN_STORE_PATH`); its key comes from `ERP_TOKEN_STORE_KEY`
    at run time (or the key file beside it), never from the run config."""

    def connector(self, **overrides: Any) -> Connector:
        """A new connector (create one per event loop: it owns an async HTTP client)."""
        connector_class = self._spec().connector_class
        values = {name: getattr(self, name) for name in self.__class__.model_fields if name != "token_store_path"}
        if connector_class.uses_token_store and self.token_store_path and "token_store" not in overrides:
            raw_key = os.environ.get(KEY_VARIABLE)
            overrides["token_store"] = TokenStore(self.token_store_path, key=validate_key(raw_key) if raw_key else None)
        return connector_class(**{k: v for k, v in values.items() if v is not None}, **overrides)

    @classmethod
    def _spec(cls) -> ErpSpec:
        raise NotImplementedError


def erp_resource_class(spec: ErpSpec) -> type[ErpResource]:
    """`<Erp>Resource` for an ERP: one string field per connector setting."""
    connector = spec.connector_class
    annotations: dict[str, Any] = {}
    namespace: dict[str, Any] = {"__module__": __name__, "__doc__": f"Credentials for {connector.display_name}."}
    for setting in connector.settings:
        if setting.required and setting.default is None:
            annotations[setting.field] = str
        else:
            annotations[setting.field] = str | None
            namespace[setting.field] = setting.default
    namespace["__annotations__"] = annotations
    namespace["_spec"] = classmethod(lambda cls: spec)
    name = "".join(part.capitalize() for part in spec.name.split("_")) + "Resource"
    return type(name, (ErpResource,), namespace)


def erp_resource_from_env(
    spec: ErpSpec, environ: Mapping[str, str] | None = None, *, token_store_path: str | None = None
) -> ErpResource:
    """The resource with every setting bound to its environment variable: secrets as `EnvVar`s
    (resolved at run time, shown by name), other settings by value from `environ` (the mapping the
    definitions were validated against)."""
    env = os.environ if environ is None else environ
    resource_class = erp_resource_class(spec)
    values: dict[str, Any] = {}
    for setting in spec.connector_class.settings:
        if not setting.required and setting.default is None and not env.get(setting.env):
            continue  # an optional setting left unset (e.g. a personal key where OAuth is used)
        if setting.secret or setting.default is None:
            values[setting.field] = dg.EnvVar(setting.env)
        else:
            values[setting.field] = (env.get(setting.env) or "").strip() or setting.default
    if spec.connector_class.uses_token_store and token_store_path:
        values["token_store_path"] = token_store_path
    return resource_class(**values)
