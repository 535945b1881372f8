"""Dagster resources: the warehouse, and one resource per ERP holding its credentials.

Each ERP resource class is generated from the connector's declared settings, so adding an ERP
needs no Dagster code. Secrets are always `EnvVar`s in the definitions: the UI and the run config
show the variable's name, never its value. They form the ERP's `default` connection; the other
connections (`connections.py`) are read from the encrypted token store at run time
(`ErpResource.connectors`), so their secrets never reach the definitions or a run's config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from erp_pipelines.config import has_environment_connection
from erp_pipelines.connections import DEFAULT, stored_connections
from erp_pipelines.erps.base import Connector
from erp_pipelines.errors import ConfigError
from erp_pipelines.pipeline import Connectors
from erp_pipelines.registry import ErpSpec
from erp_pipelines.tokens import KEY_VARIABLE, TokenStore, validate_key
from erp_pipelines.warehouse import Warehouse


class WarehouseResource(dg.ConfigurableResource):
    """The warehouse: the DuckDB file (`ERP_WAREHOUSE_PATH`), or DuckLake when the run's environment
    has `ERP_DUCKLAKE_CATALOG` (read when the run starts, never part of the definitions or the run
    config: the catalog string may hold a password)."""

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
    default_connection: bool = True
    """Whether the environment configures the `default` connection (else: stored ones only)."""

    def connector(self, **overrides: Any) -> Connector:
        """A new connector of the `default` connection (create one per event loop: it owns an
        async HTTP client)."""
        connector_class = self._spec().connector_class
        values = {name: getattr(self, name) for name in self.__class__.model_fields
                  if name not in ("token_store_path", "default_connection")}
        if connector_class.uses_token_store and self.token_store_path and "token_store" not in overrides:
            overrides["token_store"] = self._token_store()
        return connector_class(**{k: v for k, v in values.items() if v is not None}, **overrides)

    def connectors(self, only: str | None = None, **overrides: Any) -> Connectors:
        """A new connector per connection (`only`: that connection's slug): `default` from the
        environment when it is configured, then every stored connection, read now."""
        spec = self._spec()
        found = Connectors(spec.name)
        if self.default_connection and only in (None, DEFAULT):
            found[DEFAULT] = self.connector(**overrides)
        store = self._token_store()
        if store is not None and store.path.exists():
            for connection in stored_connections(store, spec.name):
                if only in (None, connection.slug):
                    found[connection.slug] = connection.connector(store, **overrides)
        if not found:
            raise ConfigError(f"{spec.name} has no connection{f' named {only!r}' if only else ''}",
                              erp=spec.name, fix=f"set its variables (see .env.example), or: erp-pipelines "
                              f"connections add {spec.name} --name ... (see erp-pipelines connections list)")
        return found

    def _token_store(self) -> TokenStore | None:
        if not self.token_store_path:
            return None
        raw_key = os.environ.get(KEY_VARIABLE)
        return TokenStore(self.token_store_path, key=validate_key(raw_key) if raw_key else None)

    @classmethod
    def _spec(cls) -> ErpSpec:
        raise NotImplementedError


def erp_resource_class(spec: ErpSpec) -> type[ErpResource]:
    """`<Erp>Resource` for an ERP: one string field per connector setting."""
    connector = spec.connector_class
    annotations: dict[str, Any] = {}
    namespace: dict[str, Any] = {"__module__": __name__, "__doc__": f"Credentials for {connector.display_name}."}
    for setting in connector.settings:  # all optional: an ERP may have stored connections only
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
    default = has_environment_connection(spec, env)  # else: stored connections only
    for setting in spec.connector_class.settings:
        if not default and setting.default is None:
            continue
        if not setting.required and setting.default is None and not env.get(setting.env):
            continue  # an optional setting left unset (e.g. a personal key where OAuth is used)
        if setting.secret or setting.default is None:
            values[setting.field] = dg.EnvVar(setting.env)
        else:
            values[setting.field] = (env.get(setting.env) or "").strip() or setting.default
    if token_store_path:  # the stored connections, and the tokens connectors keep
        values["token_store_path"] = token_store_path
    values["default_connection"] = default
    return resource_class(**values)
