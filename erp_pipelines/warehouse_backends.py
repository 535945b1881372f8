"""Where the warehouse lives: one DuckDB file (one machine), or DuckLake (many machines). No Dagster.

- `DuckDBFileBackend` (default): the file at `ERP_WAREHOUSE_PATH`. DuckDB allows one writing process
  per file, so every connection holds a cross-process file lock (`<warehouse>.lock`).
- `DuckLakeBackend`: chosen by `ERP_DUCKLAKE_CATALOG` (a DuckLake catalog, e.g.
  `postgres:dbname=lake host=db.internal user=erp`) with `ERP_DUCKLAKE_DATA_PATH` (where the Parquet
  files go: a shared folder, or `s3://bucket/prefix/`). No local lock: DuckLake's catalog
  transactions serialise commits, and a commit that conflicts with another machine's is retried
  whole (`retrying`), a bounded number of times.

The DuckDB extensions DuckLake needs come from PyPI wheels built for one DuckDB release (`duckdb`
is pinned to it) and are loaded here, by file path: nothing is downloaded at run time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import duckdb
from filelock import FileLock
from tenacity import (
    RetryError,
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from erp_pipelines.errors import ConfigError

CATALOG_VARIABLE = "ERP_DUCKLAKE_CATALOG"
DATA_PATH_VARIABLE = "ERP_DUCKLAKE_DATA_PATH"
LAKE_ALIAS = "lake"
SCHEMA_VERSION_TABLE = "warehouse_schema"  # DuckLake: the digest of the DDL last applied
CONFLICT_ATTEMPTS = 40  # 8 writers replacing windows of one table at once all commit well within this
REMOTE_SCHEMES = ("s3://", "s3a://", "gs://", "gcs://", "r2://", "http://", "https://")
NO_DOWNLOADS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}

T = TypeVar("T")
LOGGER = logging.getLogger(__name__)
_ATTACHED: dict[tuple[str, str], tuple[int, duckdb.DuckDBPyConnection]] = {}  # (catalog, data path) -> (pid, db)
_ATTACHED_LOCK = threading.Lock()


class WarehouseConflict(RuntimeError):
    """A write kept conflicting with concurrent commits to the DuckLake catalog."""


class WarehouseBackend(Protocol):
    """How the warehouse connects, locks and retries; `Warehouse` holds one."""

    def connection(self) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]: ...

    def setup_schema(self, con: duckdb.DuckDBPyConnection, create: Callable[[duckdb.DuckDBPyConnection], None],
                     version: str) -> None:
        ...

    def exclusive(self) -> contextlib.AbstractContextManager[None]: ...

    def retrying(self, write: Callable[[], T]) -> T: ...

    def describe(self) -> str: ...


class DuckDBFileBackend:
    """One DuckDB file, every access under a cross-process file lock."""

    def __init__(self, path: str | os.PathLike[str], *, lock_timeout: float = 900.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path) + ".lock", timeout=lock_timeout)

    @contextlib.contextmanager
    def connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._lock:
            con = duckdb.connect(str(self.path))
            try:
                yield con
            finally:
                con.close()

    def setup_schema(self, con: duckdb.DuckDBPyConnection, create: Callable[[duckdb.DuckDBPyConnection], None],
                     version: str) -> None:
        create(con)  # under the file lock: no other process is in the file

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return self._lock

    def retrying(self, write: Callable[[], T]) -> T:
        return write()  # the file lock serialises writers: nothing conflicts

    def describe(self) -> str:
        return str(self.path)


class DuckLakeBackend:
    """A DuckLake catalog (e.g. in PostgreSQL) and its data path, attached as `lake` and used."""

    def __init__(self, catalog: str, data_path: str, *, attempts: int = CONFLICT_ATTEMPTS) -> None:
        self.catalog = catalog.removeprefix("ducklake:")
        self.data_path = data_path
        self.attempts = attempts

    def __repr__(self) -> str:
        return f"DuckLakeBackend({self.describe()!r})"

    def describe(self) -> str:
        """The catalog without secrets: its kind, database and host, and the data path."""
        kind, _, rest = self.catalog.partition(":")
        shown = " ".join(part for part in rest.split() if part.split("=", 1)[0] in ("dbname", "host", "port"))
        return f"ducklake:{kind}:{shown} ({self.data_path})"

    @contextlib.contextmanager
    def connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A new connection (own transactions, the catalog's latest snapshot) to this process's
        in-memory DuckDB with the lake attached: loading the extensions (their signatures are
        checked) and attaching cost ~0.3 s, so they happen once per process, not per connection."""
        con = self._attached().cursor()
        try:
            con.execute(f"USE {LAKE_ALIAS}")
            yield con
        finally:
            con.close()

    def _attached(self) -> duckdb.DuckDBPyConnection:
        key = (self.catalog, self.data_path)
        with _ATTACHED_LOCK:
            pid, root = _ATTACHED.get(key, (None, None))
            if root is None or pid != os.getpid():  # a forked child attaches anew
                root = duckdb.connect(config=NO_DOWNLOADS)
                try:
                    self.attach(root)
                except BaseException:
                    root.close()
                    raise
                _ATTACHED[key] = (os.getpid(), root)
            return root

    def attach(self, con: duckdb.DuckDBPyConnection) -> None:
        """Load the extensions and attach the lake as `lake` (also dbt's, `ducklake_dbt.py`)."""
        load_extensions(con, "postgres_scanner" if self.catalog.startswith("postgres") else None,
                        "ducklake", "httpfs" if self.data_path.startswith(REMOTE_SCHEMES) else None)
        target = "ducklake:" + self.catalog
        try:
            # a new catalog is initialised by the first process to attach; one attaching at the same
            # moment finds the catalog's tables half made ("already exists") and attaches again
            self.retrying(lambda: con.execute(f"ATTACH IF NOT EXISTS {_literal(target)} AS {LAKE_ALIAS} "
                                              f"(DATA_PATH {_literal(self.data_path)})"),
                          also=_catalog_being_created)
        except duckdb.Error as error:
            raise ConfigError(
                f"the DuckLake catalog in {CATALOG_VARIABLE} ({self.describe()}) cannot be attached: "
                f"{_without_passwords(str(error), self.catalog)}",
                fix=f"check that the catalog database is reachable with the credentials in {CATALOG_VARIABLE} "
                    f"(or PGPASSWORD / ~/.pgpass) and that {DATA_PATH_VARIABLE} is writable") from None

    def setup_schema(self, con: duckdb.DuckDBPyConnection, create: Callable[[duckdb.DuckDBPyConnection], None],
                     version: str) -> None:
        """`create` in one transaction, unless the lake already has this `version` of the schema:
        every process (each Dagster step) starts with this, and re-creating the views each time
        would add a snapshot and conflict with the other processes starting."""
        if _schema_version(con) == version:
            return

        def in_transaction() -> None:
            con.execute("BEGIN TRANSACTION")
            try:
                create(con)
                con.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA_VERSION_TABLE} (version VARCHAR NOT NULL, "
                            "applied_at TIMESTAMP NOT NULL)")
                con.execute(f"DELETE FROM {SCHEMA_VERSION_TABLE}")
                con.execute(f"INSERT INTO {SCHEMA_VERSION_TABLE} VALUES (?, now()::TIMESTAMP)", [version])
                con.execute("COMMIT")
            except BaseException:
                rollback(con)
                raise

        self.retrying(in_transaction)

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # no lock across machines: the catalog serialises commits

    def retrying(self, write: Callable[[], T], *, also: Callable[[BaseException], bool] | None = None) -> T:
        """`write()`, run again while it fails on a transaction conflict (or what `also` accepts;
        bounded, with jittered backoff)."""
        retryable = is_conflict if also is None else (lambda error: is_conflict(error) or also(error))
        retrying = Retrying(retry=retry_if_exception(retryable), stop=stop_after_attempt(self.attempts),
                            wait=wait_random_exponential(multiplier=0.02, max=1.0), reraise=False,
                            before_sleep=before_sleep_log(LOGGER, logging.INFO))
        try:
            return retrying(write)
        except RetryError as gave_up:
            raise WarehouseConflict(
                f"a write to the DuckLake warehouse ({self.describe()}) conflicted with concurrent commits "
                f"{self.attempts} times in a row; run it again (fewer writers at once, or one tenant window "
                f"per run, make conflicts rarer)") from gave_up.last_attempt.exception()


def _schema_version(con: duckdb.DuckDBPyConnection) -> str | None:
    try:
        found = con.execute(f"SELECT max(version) FROM {SCHEMA_VERSION_TABLE}").fetchone()
    except duckdb.CatalogException:
        return None
    return found[0] if found else None


def _catalog_being_created(error: BaseException) -> bool:
    """Another process is initialising the same new catalog: its metadata tables already exist."""
    return isinstance(error, duckdb.Error) and "ducklake_metadata" in str(error) and "already exists" in str(error)


def is_conflict(error: BaseException) -> bool:
    """A commit refused because another transaction changed the same table or catalog entry first."""
    return isinstance(error, duckdb.Error) and ("conflict" in str(error).lower()
                                                or "duplicate key value" in str(error).lower())


def rollback(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back the open transaction; a failed COMMIT has already ended it."""
    with contextlib.suppress(duckdb.TransactionException):
        con.execute("ROLLBACK")


def retried_on_conflict(method: Callable[..., T]) -> Callable[..., T]:
    """A `Warehouse` write method, run again whole when its commit conflicts (DuckLake)."""

    @functools.wraps(method)
    def write(self: Any, *args: Any, **kwargs: Any) -> T:
        return self.backend.retrying(functools.partial(method, self, *args, **kwargs))

    return write


def backend_from_env(path: str | os.PathLike[str], environ: Mapping[str, str], *,
                     lock_timeout: float = 900.0) -> WarehouseBackend:
    """DuckLake when `ERP_DUCKLAKE_CATALOG` is set (then `ERP_DUCKLAKE_DATA_PATH` is required),
    else the DuckDB file at `path`."""
    settings = ducklake_settings(environ)
    return DuckLakeBackend(*settings) if settings else DuckDBFileBackend(path, lock_timeout=lock_timeout)


def ducklake_settings(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """(catalog, data path) when `ERP_DUCKLAKE_CATALOG` is set, else None; a catalog without a
    data path (or the reverse) is a configuration error."""
    catalog = (environ.get(CATALOG_VARIABLE) or "").strip()
    data_path = (environ.get(DATA_PATH_VARIABLE) or "").strip()
    if data_path and not catalog:
        raise ConfigError(f"{DATA_PATH_VARIABLE} is set but {CATALOG_VARIABLE} is not",
                          fix=f"set {CATALOG_VARIABLE} too (e.g. postgres:dbname=lake host=db user=erp), "
                              f"or unset {DATA_PATH_VARIABLE} to use the DuckDB file")
    if not catalog:
        return None
    if not data_path:
        raise ConfigError(f"{CATALOG_VARIABLE} is set but {DATA_PATH_VARIABLE} is not",
                          fix=f"set {DATA_PATH_VARIABLE} to the DuckLake data folder every writer reaches "
                              "(a shared filesystem path or s3://bucket/prefix/)")
    return catalog, data_path


def extension_file(name: str) -> Path:
    """`<site-packages>/duckdb_extension_<name>/extensions/v<duckdb>/<name>.duckdb_extension`."""
    package = f"duckdb_extension_{name}"
    spec = importlib.util.find_spec(package)
    wheel = f"duckdb-extension-{name.replace('_', '-')}=={duckdb.__version__}"
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the DuckDB extension {name} is not installed (the DuckLake warehouse, "
                          f"{CATALOG_VARIABLE}, needs it)", fix=f"install the project's dependencies: {wheel}")
    found = Path(next(iter(spec.submodule_search_locations))) / "extensions" / f"v{duckdb.__version__}" / (
        f"{name}.duckdb_extension")
    if not found.exists():
        raise ConfigError(f"the DuckDB extension {name} installed is not built for DuckDB {duckdb.__version__} "
                          f"({found} is missing)", fix=f"install {wheel} (uv sync)")
    return found


def load_extensions(con: duckdb.DuckDBPyConnection, *names: str | None) -> None:
    """LOAD each named extension from its wheel (None entries skipped): the one place they load."""
    for name in filter(None, names):
        path = extension_file(name)
        try:
            con.execute(f"LOAD {_literal(str(path))}")
        except duckdb.Error as error:
            raise ConfigError(f"the DuckDB extension {name} ({path}) does not load: {error}",
                              fix=f"reinstall duckdb=={duckdb.__version__} and its extension wheels (uv sync)") from None


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _without_passwords(message: str, catalog: str) -> str:
    for secret in re.findall(r"password\s*=\s*(\S+)", catalog):
        message = message.replace(secret, "[redacted]")
    return re.sub(r"password\s*=\s*\S+", "password=[redacted]", message)
