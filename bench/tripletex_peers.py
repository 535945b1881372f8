"""The extractors our pipeline is measured against, on the same sandbox and the same tenants.

- `naive_extract`: the baseline. Plain synchronous httpx, one request at a time, the same calls per
  tenant as ours (whoAmI guard, /ledger/account, one /balanceSheet per month), a fixed one-second
  sleep on 429, the rows written with the same warehouse code.
- `dlt_extract`: dlt's `rest_api` source, the peer a data engineer would pick. The session token
  is minted once; a `tenants` resource carries each client's Basic auth (username = client id,
  password = the session token) into the dependent resources `accounts` and one `balances_<month>`
  per month (all written to the `balances` table), offset paging on `from`/`count` (1000) with
  `fullResultSize` as the total, `data_selector: values`, amounts as DECIMAL(18,2) column hints,
  written to DuckDB by `pipeline.run`. dlt makes no tenant-guard call.

`warehouse_rows` / `dlt_rows` read both results in one shape, so they can be compared row for row.
"""

from __future__ import annotations

import base64
import datetime as dt
import time
from collections.abc import Callable, Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import httpx

from erp_pipelines.model import Account, Balance, Client, add_months, kroner
from erp_pipelines.warehouse import Warehouse

ERP = "tripletex"  # the API both peers are written against
ACCOUNT_FIELDS = "number,name,type,saftCode,groupingCode,isInactive"
BALANCE_FIELDS = "account(number,name),balanceIn,balanceChange,balanceOut"
PAGE = 1000
NOT_ALL_ZERO = "(opening <> 0 OR movement <> 0 OR closing <> 0)"


def credentials(environment: dict[str, str]) -> tuple[str, str, str]:
    """(base URL, consumer token, employee token) from the connector's variables (a simulator's
    `environment(url)`)."""
    return (environment["TRIPLETEX_BASE_URL"], environment["TRIPLETEX_CONSUMER_TOKEN"],
            environment["TRIPLETEX_EMPLOYEE_TOKEN"])


def mint_session(http: httpx.Client, consumer_token: str, employee_token: str) -> str:
    expires = dt.date.today() + dt.timedelta(days=2)
    response = http.post("token/session/:create", json={
        "consumerToken": consumer_token, "employeeToken": employee_token, "expirationDate": expires.isoformat(),
    })
    response.raise_for_status()
    return response.json()["value"]["token"]


def balance_params(month: dt.date) -> dict[str, str]:
    return {
        "dateFrom": month.isoformat(),
        "dateTo": add_months(month, 1).isoformat(),
        "includeActiveAccountsWithoutMovements": "true",
        "fields": BALANCE_FIELDS,
    }


# ---------------------------------------------------------------------------------------- naive


def naive_extract(
    base_url: str, consumer_token: str, employee_token: str, clients: Iterable[Client], months: list[dt.date],
    warehouse: Warehouse, *, batch_tenants: int = 200,
) -> int:
    """One request at a time. Returns the rows written."""
    rows = 0
    with httpx.Client(base_url=base_url.rstrip("/") + "/", timeout=60) as http:
        token = mint_session(http, consumer_token, employee_token)

        def get_all(path: str, params: dict[str, str], username: str) -> list[dict[str, Any]]:
            values: list[dict[str, Any]] = []
            while True:
                response = http.get(path, params={**params, "from": len(values), "count": PAGE},
                                    auth=(username, token))
                if response.status_code == 429:
                    time.sleep(1.0)
                    continue
                response.raise_for_status()
                page = response.json()["values"]
                values += page
                if len(page) < PAGE:
                    return values

        accounts: dict[str, list[Account]] = {}
        balances: dict[str, list[Balance]] = {}
        for client in clients:
            who = http.get("token/session/>whoAmI", params={"fields": "companyId,company(organizationNumber)"},
                           auth=(client.erp_client_id, token))
            who.raise_for_status()
            if who.json()["value"]["company"]["organizationNumber"] != client.org_number:
                raise RuntimeError(f"{client.label}: Tripletex answered for another company")
            accounts[client.org_number] = [
                Account(str(a["number"]), a["name"], a.get("type"), a.get("saftCode") or a.get("groupingCode"))
                for a in get_all("ledger/account", {"fields": ACCOUNT_FIELDS}, client.erp_client_id)
            ]
            tenant_balances = []
            for month in months:
                for row in get_all("balanceSheet", balance_params(month), client.erp_client_id):
                    opening, movement, closing = (kroner(row[k]) for k in ("balanceIn", "balanceChange", "balanceOut"))
                    if opening or movement or closing:
                        tenant_balances.append(Balance(month, str(row["account"]["number"]), opening, movement, closing))
            balances[client.org_number] = tenant_balances
            if len(accounts) >= batch_tenants:
                rows += _write(warehouse, accounts, balances, months)
                accounts, balances = {}, {}
        if accounts:
            rows += _write(warehouse, accounts, balances, months)
    return rows


def _write(warehouse: Warehouse, accounts, balances, months) -> int:
    return (warehouse.replace_accounts(ERP, accounts).rows
            + warehouse.replace_balances(ERP, balances, months).rows)


# ---------------------------------------------------------------------------------------- dlt


def dlt_extract(
    base_url: str, consumer_token: str, employee_token: str, clients: Iterable[Client], months: list[dt.date],
    path: Path, *, parallelized: bool = False,
) -> Any:
    """dlt `rest_api` into the DuckDB file `path`. Returns dlt's load info."""
    import dlt
    from dlt.sources.rest_api import rest_api_resources

    with httpx.Client(base_url=base_url.rstrip("/") + "/", timeout=60) as http:
        token = mint_session(http, consumer_token, employee_token)  # minted once, outside dlt
    tenants = [
        {
            "client_id": client.erp_client_id,
            "org_number": client.org_number,
            "authorization": "Basic " + base64.b64encode(f"{client.erp_client_id}:{token}".encode()).decode(),
        }
        for client in clients
    ]

    @dlt.resource(name="tenants", selected=False)
    def tenant_rows():
        yield tenants

    money = {"data_type": "decimal", "precision": 18, "scale": 2}
    auth = {"Authorization": "{resources.tenants.authorization}"}
    config: dict[str, Any] = {
        "client": {
            "base_url": base_url.rstrip("/") + "/",
            "paginator": {"type": "offset", "limit": PAGE, "offset_param": "from", "limit_param": "count",
                          "total_path": "fullResultSize"},
        },
        "resource_defaults": {"endpoint": {"data_selector": "values"}, "parallelized": parallelized},
        "resources": [
            tenant_rows,
            {"name": "accounts", "include_from_parent": ["org_number"],
             "endpoint": {"path": "ledger/account", "params": {"fields": ACCOUNT_FIELDS}, "headers": auth}},
            *(
                {
                    "name": f"balances_{month:%Y_%m}",
                    "table_name": "balances",
                    "include_from_parent": ["org_number"],
                    "endpoint": {"path": "balanceSheet", "params": balance_params(month), "headers": auth},
                    "processing_steps": [{"map": _with_period(month)}],
                    "columns": {"balanceIn": money, "balanceChange": money, "balanceOut": money},
                }
                for month in months
            ),
        ],
    }
    pipeline = dlt.pipeline(
        pipeline_name=f"bench_tripletex_{path.stem}",
        destination=dlt.destinations.duckdb(str(path)),
        dataset_name="tripletex",
        pipelines_dir=str(path.parent / f"{path.stem}-pipelines"),
        progress=None,
    )
    return pipeline.run(rest_api_resources(config))


def _with_period(month: dt.date) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def add(row: dict[str, Any]) -> dict[str, Any]:
        row["period"] = month
        return row

    return add


# ---------------------------------------------------------------------------------------- comparison


def warehouse_rows(warehouse: Warehouse) -> tuple[list[tuple], list[tuple]]:
    """(accounts, balances) of our warehouse, sorted, in the comparison shape (balances that are
    zero in opening, movement and closing left out: whether such rows are kept differs by extractor)."""
    accounts = warehouse.query(
        "SELECT org_number, account_number, name, account_type FROM accounts WHERE erp = ? ORDER BY ALL", [ERP])
    balances = warehouse.query(
        "SELECT org_number, period, account_number, opening, movement, closing FROM balances "
        f"WHERE erp = ? AND {NOT_ALL_ZERO} ORDER BY ALL", [ERP])
    return accounts, balances


def dlt_rows(path: Path) -> tuple[list[tuple], list[tuple]]:
    """dlt's tables in the same shape (all-zero balance rows left out, as in `warehouse_rows`)."""
    with duckdb.connect(str(path), read_only=True) as con:
        accounts = con.execute(
            "SELECT _tenants_org_number, CAST(number AS VARCHAR), name, type FROM tripletex.accounts ORDER BY ALL"
        ).fetchall()
        balances = con.execute(
            "SELECT _tenants_org_number, period, CAST(account__number AS VARCHAR), "
            "CAST(balance_in AS DECIMAL(18,2)), CAST(balance_change AS DECIMAL(18,2)), "
            "CAST(balance_out AS DECIMAL(18,2)) FROM tripletex.balances "
            "WHERE balance_in <> 0 OR balance_change <> 0 OR balance_out <> 0 ORDER BY ALL"
        ).fetchall()
    return accounts, [(o, p, a, Decimal(i), Decimal(c), Decimal(u)) for o, p, a, i, c, u in balances]
