"""erp-pipelines: Nordic ERP accounting data into DuckDB, tenant by tenant."""
