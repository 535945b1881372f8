"""Dagster's standard table metadata for the warehouse tables the assets write: the UI's column
view (`dagster/column_schema`), row-count plots (`dagster/row_count`) and `dagster/table_name`."""

import dagster as dg

_COMMON = [
    dg.TableColumn("erp", "VARCHAR", description="The source, as named in the registry (one per ERP, and one for SAF-T files)",
                   constraints=dg.TableColumnConstraints(nullable=False)),
    dg.TableColumn("org_number", "VARCHAR", description="The tenant's Norwegian organisation number (9 digits) "
                   "or personal number; the partition key", constraints=dg.TableColumnConstraints(nullable=False)),
]
_LOADED = [
    dg.TableColumn("extracted_at", "TIMESTAMP", description="When the row was extracted (UTC)"),
    dg.TableColumn("run_id", "VARCHAR", description="The Dagster run that wrote the row"),
]

TABLE_SCHEMAS = {
    "clients": dg.TableSchema(columns=[
        *_COMMON,
        dg.TableColumn("erp_client_id", "VARCHAR", description="The ERP's own id of the client"),
        dg.TableColumn("name", "VARCHAR", description="The client's name as the ERP lists it"),
        dg.TableColumn("status", "VARCHAR", description="active, inactive, rejected, no_api_access or revoked"),
        dg.TableColumn("status_reason", "VARCHAR", description="Why a client is rejected or lacks access, and the fix"),
        dg.TableColumn("last_extracted_at", "TIMESTAMP", description="The last successful extraction"),
        dg.TableColumn("last_error", "VARCHAR", description="The last extraction error, with its fix"),
    ]),
    "accounts": dg.TableSchema(columns=[
        *_COMMON,
        dg.TableColumn("account_number", "VARCHAR", description="The account number in the client's chart",
                       constraints=dg.TableColumnConstraints(nullable=False)),
        dg.TableColumn("name", "VARCHAR", description="The account's name"),
        dg.TableColumn("account_type", "VARCHAR", description="The ERP's own account type, as the ERP gives it"),
        dg.TableColumn("standard_account", "VARCHAR", description="The SAF-T standard account (4 digits) the "
                       "ERP maps it to, where it gives one"),
        *_LOADED,
        dg.TableColumn("account_class", "VARCHAR", description="asset, liability, equity, income or expense: "
                       "from NS 4102 ranges and the ERP's type; revenue is `account_class = 'income'`"),
        dg.TableColumn("grouping_category", "VARCHAR", description="The SAF-T grouping category (e.g. RF-1167), "
                       "where the source maps one"),
        dg.TableColumn("grouping_code", "VARCHAR", description="The code within the grouping category"),
    ]),
    "balances": dg.TableSchema(columns=[
        *_COMMON,
        dg.TableColumn("period", "DATE", description="The month (its first day)",
                       constraints=dg.TableColumnConstraints(nullable=False)),
        dg.TableColumn("account_number", "VARCHAR", description="The account number in the client's chart",
                       constraints=dg.TableColumnConstraints(nullable=False)),
        dg.TableColumn("opening", "DECIMAL(18,2)", description="Balance at the start of the month, NOK, debit "
                       "positive; profit and loss restarts at the fiscal-year start"),
        dg.TableColumn("movement", "DECIMAL(18,2)", description="The month's postings, NOK, debit positive"),
        dg.TableColumn("closing", "DECIMAL(18,2)", description="opening + movement, NOK, debit positive"),
        dg.TableColumn("currency", "VARCHAR", description="Always NOK (the amounts are in the base currency)"),
        *_LOADED,
    ]),
}


def table_metadata(table: str, *, row_count: int | None = None, partition_row_count: int | None = None) -> dict:
    """`dagster/table_name` and `dagster/column_schema` for `table`; `dagster/row_count` (the whole
    table) and `dagster/partition_row_count` (one tenant's rows) when known."""
    metadata = {
        "dagster/table_name": f"warehouse.main.{table}",
        "dagster/column_schema": dg.MetadataValue.table_schema(TABLE_SCHEMAS[table]),
    }
    if row_count is not None:
        metadata["dagster/row_count"] = dg.MetadataValue.int(row_count)
    if partition_row_count is not None:
        metadata["dagster/partition_row_count"] = dg.MetadataValue.int(partition_row_count)
    return metadata
