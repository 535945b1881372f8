"""Look for secrets everywhere a run leaves traces: the shared scan behind the secret-leak tests.

`SecretScan(secrets)` takes named secret values (tokens, keys) and searches text, files, a DuckDB
warehouse and a Dagster instance (runs, run config, tags, every event of every run, and every file
of the instance's storage: sqlite databases, compute logs) for each of them in the forms a leak
would take: as is, URL-encoded, JSON-escaped and base64-encoded (alone or as the password of an
HTTP Basic header). Findings name the place and the secret, never the value.

    scan = SecretScan({"consumer token": "...", "session token": "..."})
    scan.text("stderr", captured)
    scan.files(instance_root)
    scan.duckdb(warehouse_path)
    scan.dagster_instance(instance)
    assert scan.findings == []
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

MIN_SECRET_LENGTH = 8  # shorter values would match by accident


@dataclasses.dataclass(frozen=True)
class Finding:
    where: str
    secret: str  # the secret's name
    form: str  # plain | url | json | base64 | basic-auth

    def __str__(self) -> str:
        return f"{self.secret} ({self.form}) in {self.where}"


class SecretScan:
    def __init__(self, secrets: Mapping[str, str], *, basic_auth_usernames: Iterable[str] = ("0", "")) -> None:
        short = [name for name, value in secrets.items() if len(value or "") < MIN_SECRET_LENGTH]
        if short:
            raise ValueError(f"secrets too short to scan for reliably: {short}")
        self.secrets = dict(secrets)
        self.findings: list[Finding] = []
        self.places = 0  # how many texts/files/cells were looked at
        self._needles: list[tuple[str, str, bytes]] = []
        for name, value in self.secrets.items():
            forms = {
                "plain": value,
                "url": quote(value, safe=""),
                "url+": quote_plus(value),
                "json": json.dumps(value)[1:-1],
                "base64": base64.b64encode(value.encode()).decode(),
            }
            for user in basic_auth_usernames:
                forms[f"basic-auth({user or 'empty'})"] = base64.b64encode(f"{user}:{value}".encode()).decode()
            seen: set[str] = set()
            for form, text in forms.items():
                if text not in seen:
                    seen.add(text)
                    self._needles.append((name, form, text.encode("utf-8")))

    # ------------------------------------------------------------------------------ sources

    def text(self, where: str, text: str | bytes | None) -> list[Finding]:
        if text is None:
            return []
        data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
        self.places += 1
        found = [Finding(where, name, form) for name, form, needle in self._needles if needle in data]
        self.findings += found
        return found

    def files(self, root: str | os.PathLike[str], *, label: str | None = None) -> list[Finding]:
        """Every file under `root` (or `root` itself), as raw bytes."""
        root = Path(root)
        found: list[Finding] = []
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            try:
                data = path.read_bytes()
            except OSError:
                continue
            found += self.text(f"{label or 'file'} {path}", data)
        return found

    def duckdb(self, path: str | os.PathLike[str]) -> list[Finding]:
        """Every column of every table and view of a DuckDB file, cast to text, plus the raw file."""
        import duckdb

        found: list[Finding] = []
        con = duckdb.connect(str(path), read_only=True)
        try:
            tables = con.execute(
                "SELECT table_schema, table_name FROM information_schema.tables ORDER BY 1, 2").fetchall()
            for schema, table in tables:
                rows = con.execute(f'SELECT * FROM "{schema}"."{table}"').fetchall()
                text = "\n".join("\t".join("" if v is None else str(v) for v in row) for row in rows)
                found += self.text(f"duckdb {Path(path).name} table {schema}.{table} ({len(rows)} rows)", text)
        finally:
            con.close()
        found += self.files(path, label="duckdb file")
        wal = Path(str(path) + ".wal")
        if wal.exists():
            found += self.files(wal, label="duckdb wal")
        return found

    def dagster_instance(self, instance: Any) -> list[Finding]:
        """Every run (config, tags, op selection), every event of every run (serialised, with the
        metadata the UI shows), the asset catalogue, and every file of the instance's storage."""
        from dagster._serdes import serialize_value

        found: list[Finding] = []
        for run in instance.get_runs():
            found += self.text(f"run {run.run_id} config", json.dumps(run.run_config, default=str))
            found += self.text(f"run {run.run_id} tags", json.dumps(dict(run.tags), default=str))
            found += self.text(f"run {run.run_id} record", serialize_value(run))
            for event in instance.all_logs(run.run_id):
                found += self.text(f"run {run.run_id} event {event.dagster_event_type or 'log'}",
                                   serialize_value(event))
        for key in instance.get_asset_keys():
            found += self.text(f"asset {key.to_user_string()}", serialize_value(key))
        root = getattr(instance, "root_directory", None)
        if root:
            found += self.files(root, label="dagster storage")
        return found

    def dagster_definitions(self, defs: Any) -> list[Finding]:
        """What the UI shows of a code location: the repository snapshot (asset, job and resource
        definitions, resource config as the UI renders it, schedules, sensors)."""
        from dagster._core.remote_representation.external_data import RepositorySnap
        from dagster._serdes import serialize_value

        snapshot = serialize_value(RepositorySnap.from_def(defs.get_repository_def()))
        return self.text("definitions snapshot (what the UI shows)", snapshot)

    # ------------------------------------------------------------------------------ result

    def report(self) -> str:
        if not self.findings:
            return f"no secret found in {self.places} places"
        return "secrets found:\n" + "\n".join(f"- {finding}" for finding in self.findings)
