"""An environment that enables every registered source without serving anything: what loading the
definitions needs (`dg check defs`, the definitions snapshot). Nothing is requested at load."""

from pathlib import Path

from erp_pipelines.registry import api_erps
from erp_pipelines.sandbox.ledger import generate_ledger

UNSERVED = "http://127.0.0.1:9"  # the discard port: a request would fail, and none is made


def every_source_env(tmp_path: Path) -> dict[str, str]:
    ledger = generate_ledger(1)
    env = {"ERP_WAREHOUSE_PATH": str(tmp_path / "warehouse.duckdb"), "SAFT_DROP_DIR": str(tmp_path / "saft-drop")}
    for spec in api_erps():
        env.update(spec.simulator_class(ledger).environment(UNSERVED + spec.simulator_class.api_prefix))
    return env
