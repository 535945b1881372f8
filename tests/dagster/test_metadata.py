"""Dagster's standard metadata on what the assets write: the UI's column view, row-count plots,
table names, owners and kinds, and previews a reader understands."""

import dagster as dg
from tripletex_support import materialize_clients, materialize_tenants

BALANCES = dg.AssetKey(["tripletex", "balances"])
ACCOUNTS = dg.AssetKey(["tripletex", "accounts"])


def latest(t, key, partition):
    records = t.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1, ascending=False).records
    return records[0].asset_materialization.metadata


def test_balance_materialisations_carry_row_counts_and_the_column_schema(tripletex):
    materialize_clients(tripletex)
    keys = tripletex.instance.get_dynamic_partitions("tripletex_tenants")
    assert materialize_tenants(tripletex, keys[0], keys[-1]).success
    tenant = tripletex.ledger.valid_tenants[0]
    metadata = latest(tripletex, BALANCES, tenant.org_number)

    (tenant_rows,), = tripletex.warehouse.query(
        "SELECT count(*) FROM balances WHERE erp = 'tripletex' AND org_number = ?", [tenant.org_number])
    (all_rows,), = tripletex.warehouse.query("SELECT count(*) FROM balances WHERE erp = 'tripletex'")
    assert metadata["dagster/partition_row_count"].value == tenant_rows > 0
    assert metadata["dagster/row_count"].value == all_rows > tenant_rows
    assert metadata["dagster/table_name"].value == "warehouse.main.balances"
    columns = {c.name: c.type for c in metadata["dagster/column_schema"].value.columns}
    assert columns["opening"] == columns["movement"] == columns["closing"] == "DECIMAL(18,2)"
    assert set(columns) >= {"erp", "org_number", "period", "account_number", "currency"}

    # the preview names the accounts beside their numbers, with the amounts to the øre
    preview = metadata["preview"].value
    number, name = tripletex.warehouse.query(
        "SELECT b.account_number, a.name FROM balances b JOIN accounts a USING (erp, org_number, account_number) "
        "WHERE erp = 'tripletex' AND org_number = ? ORDER BY period DESC, b.account_number LIMIT 1",
        [tenant.org_number])[0]
    assert f"| {number} | {name} |" in preview
    first_month, last_month = tripletex.warehouse.query(
        "SELECT strftime(min(period), '%Y-%m'), strftime(max(period), '%Y-%m') FROM balances "
        "WHERE erp = 'tripletex' AND org_number = ?", [tenant.org_number])[0]
    assert metadata["months"].value == f"{first_month}..{last_month}"

    accounts = latest(tripletex, ACCOUNTS, tenant.org_number)
    (charted,), = tripletex.warehouse.query(
        "SELECT count(*) FROM accounts WHERE erp = 'tripletex' AND org_number = ?", [tenant.org_number])
    assert accounts["dagster/partition_row_count"].value == charted == accounts["accounts"].value
    first_account, first_name = tripletex.warehouse.query(
        "SELECT account_number, name FROM accounts WHERE erp = 'tripletex' AND org_number = ? "
        "ORDER BY account_number LIMIT 1", [tenant.org_number])[0]
    assert accounts["preview"].value.splitlines()[0].startswith("| account | name |")
    assert f"| {first_account} | {first_name} |" in accounts["preview"].value


def test_asset_definitions_name_table_owners_kinds_and_columns(tripletex):
    specs = {spec.key: spec for spec in tripletex.defs.resolve_all_asset_specs()}
    for key in (ACCOUNTS, BALANCES, dg.AssetKey(["tripletex", "clients"])):
        spec = specs[key]
        assert list(spec.owners) == ["team:data-engineering"]
        assert spec.kinds == {"duckdb", "tripletex"}
        assert spec.metadata["dagster/table_name"] == f"warehouse.main.{key.path[-1]}"
        assert spec.metadata["dagster/column_schema"].schema.columns
        assert all(column.description for column in spec.metadata["dagster/column_schema"].schema.columns)


def test_client_counts_are_numbers_that_plot_over_time(tripletex):
    result = materialize_clients(tripletex)
    metadata = result.asset_materializations_for_node("tripletex__clients")[0].metadata
    counts = {name: metadata[name].value for name in
              ("tenants_new", "tenants_active", "tenants_failing", "tenants_rejected")}
    assert counts == {"tenants_new": 7, "tenants_active": 7, "tenants_failing": 0, "tenants_rejected": 3}
    assert all(isinstance(metadata[name], dg.IntMetadataValue) for name in counts)
