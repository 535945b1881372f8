"""The environment that points the project at a served sandbox, shared by the tests."""

from pathlib import Path


def tripletex_env(sandbox, url: str, tmp_path: Path, **overrides: str) -> dict[str, str]:
    """Variables for a Tripletex sandbox served at `url`, with a warehouse under `tmp_path`."""
    return {
        "ERP_WAREHOUSE_PATH": str(tmp_path / "warehouse.duckdb"),
        "ERP_SOURCES": "tripletex",
        "TRIPLETEX_BASE_URL": url,
        "TRIPLETEX_CONSUMER_TOKEN": sandbox.consumer_token,
        "TRIPLETEX_EMPLOYEE_TOKEN": sandbox.accountant_employee_token,
        **overrides,
    }


def dagster_home(tmp_path: Path) -> Path:
    """An on-disk Dagster instance directory for subprocess runs."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return home
