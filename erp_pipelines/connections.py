"""Connections: many credential sets per ERP. Plain Python, no Dagster.

A connection is one credential set of one ERP (a firm's accountant key, a vendor's subscription
with its client keys, ...): a name, its slug (`Byrå AS` → `byra-as`) and the connector's settings
by variable name (`<ERP>_...`).

- `default`: the environment's variables, as before (nothing changes for one connection).
- Stored connections: `erp-pipelines connections add <erp> --name N` reads the settings from
  standard input (dotenv lines), never from arguments, into the encrypted token store (entry
  `connection:<erp>:<slug>`). Each stored connection keeps its cached tokens under its own prefix
  (`connection-tokens:<erp>:<slug>/`), deleted with it by `remove`.
- Each connection gets its own connector, so its own rate-limit budget (`Throttle.shared` is per
  credential), and its own runs (tag `erp/connection=<erp>/<slug>`).

Nothing here prints or raises a setting's value: messages name variables only.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping
from typing import Any

import dotenv
from slugify import slugify

from erp_pipelines import tokens
from erp_pipelines.config import (
    connector_kwargs,
    has_environment_connection,
    validate_settings,
    warehouse_path,
)
from erp_pipelines.errors import ConfigError, register_secret
from erp_pipelines.model import DEFAULT_CONNECTION
from erp_pipelines.registry import ERPS, ErpSpec

DEFAULT = DEFAULT_CONNECTION
ENVIRONMENT, STORE = "environment", "store"
ENTRY_PREFIX = "connection:"
TOKENS_PREFIX = "connection-tokens:"
CONNECTION_TAG = "erp/connection"  # on every sensor and schedule run: `<erp>/<slug>`


@dataclasses.dataclass(frozen=True)
class Connection:
    erp: str
    name: str
    slug: str
    source: str  # ENVIRONMENT (the `default` connection) or STORE
    settings: Mapping[str, str] = dataclasses.field(repr=False, compare=False)  # variable -> value; secrets too

    @property
    def tag(self) -> str:
        """The run tag value `erp/connection`: `<erp>/<slug>`."""
        return f"{self.erp}/{self.slug}"

    @property
    def variables(self) -> list[str]:
        return sorted(self.settings)

    def connector(self, store: tokens.TokenStore | None = None, **options: Any):
        """A new connector for this connection (its own credential, hence its own throttle)."""
        spec = ERPS[self.erp]
        if spec.connector_class.uses_token_store and store is not None and "token_store" not in options:
            options["token_store"] = store if self.source == ENVIRONMENT else store.scoped(tokens_prefix(self.erp, self.slug))
        return spec.connector_class(**connector_kwargs(spec, self.settings), **options)


def slug_of(name: str) -> str:
    return slugify(name or "")


def entry_name(erp: str, slug: str) -> str:
    return f"{ENTRY_PREFIX}{erp}:{slug}"


def tokens_prefix(erp: str, slug: str) -> str:
    return f"{TOKENS_PREFIX}{erp}:{slug}/"


def store_from_env(environ: Mapping[str, str] | None = None) -> tokens.TokenStore:
    env = os.environ if environ is None else environ
    return tokens.TokenStore.from_env(warehouse_path(env), env)


def _known(erp: str) -> ErpSpec:
    if erp not in ERPS:
        raise ConfigError(f"unknown ERP {erp!r}", fix=f"use any of: {', '.join(ERPS)}")
    return ERPS[erp]


# ---------------------------------------------------------------------------------------- reading


def environment_connection(erp: str, environ: Mapping[str, str]) -> Connection | None:
    """The `default` connection: the ERP's variables in the environment (validated), or None."""
    spec = _known(erp)
    if not has_environment_connection(spec, environ):
        return None
    validate_settings(spec, environ)
    values = {s.env: (environ.get(s.env) or "").strip() for s in spec.connector_class.settings}
    return Connection(erp, DEFAULT, DEFAULT, ENVIRONMENT, {k: v for k, v in values.items() if v})


def stored_connections(store: tokens.TokenStore, erp: str | None = None) -> list[Connection]:
    """The connections in the token store (of one ERP, or all), by ERP and name."""
    found = []
    for entry in store.names(ENTRY_PREFIX + (f"{erp}:" if erp else "")):
        value = store.get(entry)
        if not value or value.get("erp") not in ERPS:
            continue
        spec = ERPS[value["erp"]]
        register_secret(*(value["settings"].get(s.env) for s in spec.connector_class.settings if s.secret))
        found.append(Connection(value["erp"], value["name"], value["slug"], STORE, dict(value["settings"])))
    return sorted(found, key=lambda c: (c.erp, c.slug))


def stored_erps(environ: Mapping[str, str] | None = None) -> set[str]:
    """ERPs with at least one stored connection (none when the store does not exist yet)."""
    store = store_from_env(environ)
    if not store.path.exists():
        return set()
    return {c.erp for c in stored_connections(store)}


def connections_of(erp: str, environ: Mapping[str, str] | None = None,
                   store: tokens.TokenStore | None = None) -> list[Connection]:
    """Every connection of an ERP: `default` (the environment) first, then the stored ones."""
    env = os.environ if environ is None else environ
    store = store or store_from_env(env)
    default = environment_connection(erp, env)
    stored = stored_connections(store, erp) if store.path.exists() else []
    return ([default] if default else []) + stored


def connection_named(erp: str, name: str, environ: Mapping[str, str] | None = None,
                     store: tokens.TokenStore | None = None) -> Connection:
    """The ERP's connection called `name` (or its slug; `default` is the environment's)."""
    env = os.environ if environ is None else environ
    found = connections_of(erp, env, store)
    slug = slug_of(name)
    for connection in found:
        if connection.slug == slug:
            return connection
    names = ", ".join(c.name for c in found)
    raise ConfigError(f"{erp} has no connection named {name!r}",
                      fix=f"use one of: {names}" if names else
                      f"set {erp}'s variables (see .env.example) or erp-pipelines connections add {erp} --name ...")


# ---------------------------------------------------------------------------------------- managing


def add_connection(store: tokens.TokenStore, erp: str, name: str, stdin_text: str,
                   values: Mapping[str, str] | None = None) -> Connection:
    """Store a new connection. `stdin_text`: dotenv lines with the connector's variables (secrets
    only ever come this way); `values`: non-secret settings given as `--set VAR=value`. Unset
    non-secret settings take their defaults; required ones must be present; URLs are checked."""
    spec = _known(erp)
    slug = slug_of(name)
    if not slug:
        raise ConfigError(f"the connection name {name!r} has no letters or digits", fix='use e.g. --name "Byrå AS"')
    if slug == DEFAULT:
        raise ConfigError("the name default is the environment's connection",
                          fix="choose another name; the environment's variables are the default connection")
    if store.get(entry_name(erp, slug)) is not None:
        raise ConfigError(f"{erp} already has a connection named {name!r} ({slug})",
                          fix=f'remove it first: erp-pipelines connections remove {erp} --name "{name}"')
    settings = {s.env: s for s in spec.connector_class.settings}
    given = {k.strip(): (v or "").strip() for k, v in dotenv.dotenv_values(stream=io.StringIO(stdin_text)).items()}
    for variable in [*given, *(values or {})]:
        if variable not in settings:
            raise ConfigError(f"{variable} is not a {erp} setting",
                              fix=f"use the {erp} variables: {', '.join(settings)}")
    register_secret(*(v for k, v in given.items() if settings[k].secret))
    for variable in values or {}:
        if settings[variable].secret:
            raise ConfigError(f"{variable} is a secret and cannot be given as an argument",
                              fix=f"give it on standard input: printf '{variable}=...\\n' | erp-pipelines "
                              f'connections add {erp} --name "{name}"')
    chosen = {**given, **{k: v.strip() for k, v in (values or {}).items()}}
    for setting in settings.values():
        if not chosen.get(setting.env) and setting.default and not setting.secret:
            chosen[setting.env] = setting.default
    chosen = {k: v for k, v in chosen.items() if v}
    validate_settings(spec, chosen, what=f"the {erp} connection {name!r} is being added",
                      where="on standard input (VAR=value lines)")
    store.put(entry_name(erp, slug), {"erp": erp, "name": name, "slug": slug, "settings": chosen})
    return Connection(erp, name, slug, STORE, chosen)


def remove_connection(store: tokens.TokenStore, erp: str, name: str) -> Connection:
    """Delete a stored connection and its cached tokens. Its tenants show as revoked at the next
    client refresh (their history is kept)."""
    _known(erp)
    slug = slug_of(name)
    value = store.get(entry_name(erp, slug)) if slug else None
    if value is None:
        names = [c.name for c in stored_connections(store, erp)] if store.path.exists() else []
        fix = (f"stored {erp} connections: {', '.join(names)}" if names else f"{erp} has no stored connection") + \
            ("; the default connection is the environment's variables: unset them to remove it"
             if slug == DEFAULT else "")
        raise ConfigError(f"{erp} has no stored connection named {name!r}", fix=fix)
    store.delete(entry_name(erp, slug))
    store.delete_prefix(tokens_prefix(erp, slug))
    return Connection(erp, value["name"], slug, STORE, value["settings"])
