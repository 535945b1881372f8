"""Every API ERP through Dagster, from its registry line alone: its clients register partitions,
its accounts and balances land to the øre with their checks passing, and it has its client-access
sensor and its place in the daily schedule."""


import dagster as dg
import pytest
from contract_support import serve_erp

from erp_pipelines import quality
from erp_pipelines.defs.build import build_definitions
from erp_pipelines.defs.runs import RANGE_END, RANGE_START
from erp_pipelines.registry import api_erps


@pytest.mark.parametrize("erp", [spec.name for spec in api_erps()])
def test_an_erp_lands_through_dagster_with_its_sensor_and_schedule(erp, tmp_path, monkeypatch):
    with serve_erp(erp, tmp_path, tenants=3, months=2) as served, dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        env = {**served.environment, "ERP_WAREHOUSE_PATH": str(served.warehouse.path), "ERP_SOURCES": erp,
               f"{erp.upper()}_HISTORY_START": served.months[0].isoformat()}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        defs = build_definitions(env)
        assert defs.resolve_sensor_def(f"{erp}_client_access_sensor")
        assert defs.resolve_schedule_def(f"{erp}_daily_balances")
        job = defs.resolve_implicit_global_asset_job_def()
        assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey([erp, "clients"])]).success
        tenants = instance.get_dynamic_partitions(f"{erp}_tenants")
        assert sorted(tenants) == sorted(t.org_number for t in served.ledger.valid_tenants)
        result = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey([erp, "accounts"]), dg.AssetKey([erp, "balances"])],
            tags={RANGE_START: tenants[0], RANGE_END: tenants[-1]},
            run_config={"ops": {f"{erp}__accounts_and_balances": {"config": {"from_month": f"{served.months[0]:%Y-%m}",
                                                                 "to_month": f"{served.months[-1]:%Y-%m}"}}}},
        )
        assert result.success
        assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()} == dict.fromkeys(quality.CHECKS, True)
        for tenant in served.ledger.valid_tenants:
            landed = served.warehouse.query(
                "SELECT period, account_number, opening, movement, closing FROM balances "
                "WHERE erp = ? AND org_number = ? ORDER BY ALL", [erp, tenant.org_number])
            truth = sorted((b.period, b.account_number, b.opening, b.movement, b.closing)
                           for b in tenant.expected_balances(served.months))
            assert landed == truth, tenant.name
