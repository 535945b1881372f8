"""`make bench` at a tiny size, so it cannot rot: every section runs and yields every figure, every
API ERP in the registry lands rows equal to the truth ledger in every window mode without
overrunning its limit, and the peers' results equal ours row for row. Not a timed test: no speed or
utilisation figure is compared with a target."""

from bench.run import (
    COMPLIANCE_SECTION,
    SHARE_429_TARGET,
    BenchOptions,
    render,
    render_compliance,
    run_benchmark,
    update_results,
)
from erp_pipelines.registry import api_erps
from erp_pipelines.sandbox.common import WINDOW_MODES

TINY = BenchOptions(compliance_seconds=0.5, tenants=5, latency_ms=0, limit=1000, full_sync_tenants=3,
                    full_sync_months=3, peer_tenants=3, duckdb_rows=600, rss_tenants=5, pool_requests=64)


def test_benchmark_code_path_yields_every_figure_and_identical_peer_results(tmp_path):
    figures = run_benchmark(TINY, tmp_path / "work", say=lambda message: None)

    assert figures["checks"] and all(figures["checks"].values()), figures["checks"]

    # 1. rate-limit compliance: every API ERP × every window mode, at the ERP's own limit
    rows = figures["compliance"]
    assert {(r["erp"], r["mode"]) for r in rows} == {(spec.name, mode) for spec in api_erps() for mode in WINDOW_MODES}
    for r in rows:
        where = f"{r['erp']} ({r['mode']})"
        assert r["equals_truth"] and r["failed"] == 0 and r["loaded"] == r["tenants"] >= 2, where
        assert r["balance_rows"] > 0 and r["requests"] > 0 and r["utilisation"] > 0, where
        assert r["share_429"] <= SHARE_429_TARGET, (where, r["requests_429"], r["requests"])
        if r["max_in_flight"]:  # the server caps requests in flight: none refused for it, none over it
            assert r["in_flight_429"] == 0, where
            assert r["peak_in_flight"] <= r["max_in_flight"], where

    # 2-7. throughput, full sync, Dagster, peers, DuckDB, RSS
    for name in ("naive", "dlt", "dlt_parallelized"):
        assert figures["checks"][f"{name}: identical rows to ours"]
    throughput = figures["throughput"]
    for key in ("tenants_per_s", "rows_per_s", "utilisation", "balance_calls_per_tenant_month",
                "calls_per_tenant_month"):
        assert throughput[key] > 0, key
    active = TINY.tenants + 1  # the ledger's tenants and the holder of the number two fixtures share
    assert throughput["tenants"] == active and throughput["balance_calls_per_tenant_month"] == 1.0
    assert figures["full_sync"]["balance_calls_per_tenant_month"] == 1.0
    for storage in ("sqlite", "in_memory"):
        assert figures["dagster"][storage]["materializations"] == 2 * active
        assert figures["dagster"][storage]["seconds"] > 0
    for name in ("ours_vs_naive", "ours_vs_dlt", "ours_vs_dlt_parallelized"):
        assert figures["peers"][name] > 0
    assert figures["duckdb"]["insert_rows_per_s"] > 0 and figures["duckdb"]["replace_duckdb_rows_per_s"] > 0
    assert figures["rss"]["tenants"] == figures["rss"]["active"] >= 5 and figures["rss"]["peak_rss_mb"] > 0
    for row in figures["pool"]["rows"]:  # both pools answered every request
        assert row["httpx_cpu_us"] > 0 and row["sharded_cpu_us"] > 0 and row["sharded_per_s"] > 0

    # results.md: both sections written in place, every other section kept
    compliance, section = render_compliance(figures, "pytest"), render(figures, "pytest")
    assert compliance.startswith(COMPLIANCE_SECTION) and section.startswith("## Throughput")
    assert "FAILED" not in section and all(spec.connector_class.display_name in compliance for spec in api_erps())
    results = tmp_path / "results.md"
    results.write_text("# Benchmarks\n\n## SAF-T import\n\nkept\n\n## Throughput\n\nold figures\n\n## Later\n\nkept too\n")
    update_results(compliance, results, before="## Throughput")
    update_results(section, results)
    text = results.read_text()
    assert "old figures" not in text and text.count("## Throughput") == 1 and text.count(COMPLIANCE_SECTION) == 1
    assert text.index("## SAF-T import") < text.index(COMPLIANCE_SECTION) < text.index("## Throughput")
    assert "## SAF-T import\n\nkept" in text and "## Later\n\nkept too" in text
    update_results(compliance, results, before="## Throughput")  # again: replaced, not added
    assert results.read_text().count(COMPLIANCE_SECTION) == 1
