"""SAF-T Financial (Norway, schema 1.20 and 1.30): the plain-Python import layer.

- `records`: header, account and reconciliation-issue records; `SaftFileRejected`.
- `schemas`: version detection and XSD validation (xmlschema, streamed).
- `safety`: refusing hostile or broken XML before a parser sees it.
- `parser`: one streaming pass over a file.
- `balances`: monthly balances and reconciliation.
- `codelists`: standard-account and grouping-code lookups.

The connector and the public entry points live in `erp_pipelines.erps.saft`.
"""
