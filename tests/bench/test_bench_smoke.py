"""`make bench` at a tiny size, so it cannot rot: every phase runs and yields every figure, and the
peers' results equal ours row for row. Not a timed test: no figure is compared with a target."""

from bench.run import BenchOptions, render, run_benchmark, update_results

TINY = BenchOptions(tenants=5, latency_ms=0, limit=1000, full_sync_tenants=3, full_sync_months=3, peer_tenants=3,
                    duckdb_rows=600, rss_tenants=5)


def test_benchmark_code_path_yields_every_figure_and_identical_peer_results(tmp_path):
    figures = run_benchmark(TINY, tmp_path / "work", say=lambda message: None)

    assert figures["checks"] and all(figures["checks"].values()), figures["checks"]
    for name in ("naive", "dlt", "dlt_parallelized"):
        assert figures["checks"][f"{name}: identical rows to ours"]
    throughput = figures["throughput"]
    for key in ("tenants_per_s", "rows_per_s", "utilisation", "balance_calls_per_tenant_month",
                "calls_per_tenant_month"):
        assert throughput[key] > 0, key
    assert throughput["tenants"] == 5 and throughput["balance_calls_per_tenant_month"] == 1.0
    assert figures["full_sync"]["balance_calls_per_tenant_month"] == 1.0
    for storage in ("sqlite", "in_memory"):
        assert figures["dagster"][storage]["materializations"] == 2 * 5
        assert figures["dagster"][storage]["seconds"] > 0
    for name in ("ours_vs_naive", "ours_vs_dlt", "ours_vs_dlt_parallelized"):
        assert figures["peers"][name] > 0
    assert figures["duckdb"]["insert_rows_per_s"] > 0 and figures["duckdb"]["replace_duckdb_rows_per_s"] > 0
    assert figures["rss"]["tenants"] == 5 and figures["rss"]["peak_rss_mb"] > 0

    section = render(figures, "pytest")
    assert section.startswith("## Throughput") and "FAILED" not in section
    results = tmp_path / "results.md"
    results.write_text("# Benchmarks\n\n## SAF-T import\n\nkept\n\n## Throughput\n\nold figures\n\n## Later\n\nkept too\n")
    update_results(section, results)
    text = results.read_text()
    assert "old figures" not in text and text.count("## Throughput") == 1
    assert "## SAF-T import\n\nkept" in text and "## Later\n\nkept too" in text
