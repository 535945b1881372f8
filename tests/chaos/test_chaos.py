"""The chaos suite (small size; `make chaos` runs the same with 1,000 tenants): faults injected
through the sandbox, the real pipeline, the warehouse checked against the truth ledger."""

import asyncio
import datetime as dt

import httpx
import pytest

from erp_pipelines.chaos import KINDS, ChaosOptions, run_chaos
from erp_pipelines.erps.http import consistent_offset_list, gather_all
from erp_pipelines.erps.tripletex import TripletexConnector
from erp_pipelines.errors import BadResponse, UpstreamError
from erp_pipelines.model import classify_clients
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.tripletex import TripletexSandbox

FAILING = [k for k in KINDS if not k.survives]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    result = run_chaos(tmp_path_factory.mktemp("chaos"), ChaosOptions(tenants=24, seed=7))
    print(result.summary())
    return result


def test_the_run_completes_and_every_outcome_is_the_expected_one(report):
    assert report.unexpected == [], "\n".join(report.unexpected)
    assert report.tenants == 24 + 1  # plus the client created while the client list was paged
    assert report.tenants_failed == report.expected_failures == len(FAILING)
    assert report.tenants_ok == report.tenants - len(FAILING)
    for kind in KINDS:  # every kind was dealt out and ended as it must
        outcome = report.outcomes[kind.name]
        assert outcome == ({"landed": 1} if kind.survives else {kind.error.__name__: 1}), kind.name


def test_healthy_tenants_land_exactly_once_and_equal_the_truth(report):
    assert report.rows_expected > 0
    assert report.rows_landed == report.rows_expected
    assert report.rows_lost == 0
    assert report.rows_duplicated == 0
    assert report.rows_wrong == 0
    assert report.accounts_duplicated == 0 and report.accounts_wrong == 0


def test_failures_stay_on_their_tenant_name_it_and_the_fix_and_keep_previous_data(report):
    assert report.failed_tenants_touched == 0
    assert set(report.sample_errors) == {k.name for k in FAILING}
    for kind in FAILING:
        message = report.sample_errors[kind.name]
        assert "(orgnr " in message and "Fix:" in message and kind.fix in message, message


def test_faults_really_fired(report):
    fired = report.faults_fired
    for kind in ("latency", "error", "rate_limit", "drop_connection", "timeout", "malformed_json", "drop_field"):
        assert fired.get(kind, 0) > 0, kind
    assert fired["mid_run_actions"] == 4  # revoke, API access off, identity switch, sessions expired


def test_retries_are_bounded_and_limits_respected(report):
    assert report.over_bound == [], report.over_bound
    assert report.requests_per_tenant_max <= report.requests_per_tenant_bound
    assert report.pause_violations == [], report.pause_violations  # Retry-After / reset header waited out
    assert report.http_429s_received == report.http_429s_sent  # every 429 seen (and paused for)
    assert report.http_429s_from_limit <= 0.05 * report.requests  # the client stays under the ERP's limit
    assert report.retries < 0.25 * report.requests
    assert report.sessions_minted <= report.session_bound  # the expired session was re-minted once


def test_the_report_prints_the_figures(report):
    text = report.summary()
    for figure in ("tenants ok / failed", "rows lost", "rows duplicated", "retries", "429s received"):
        assert figure in text
    assert report.clean and "verdict:               PASS" in text


# ---------------------------------------------------------------------------------------- paging


def _ledger():
    return generate_ledger(4, first_month=dt.date(2026, 2, 1), last_month=dt.date(2026, 3, 1))


def _connector(sandbox, page_size=8):
    return TripletexConnector(
        base_url="http://tripletex.sandbox/v2", consumer_token=sandbox.consumer_token,
        employee_token=sandbox.accountant_employee_token, transport=httpx.ASGITransport(app=sandbox.app),
        page_size=page_size,
    )


@pytest.mark.parametrize("action", ["insert", "remove"])
def test_a_chart_that_changes_while_paged_is_read_again_never_repeating_or_skipping(action):
    ledger = _ledger()
    sandbox = TripletexSandbox(ledger)
    tenant = ledger.valid_tenants[0]
    sandbox.mutate_during_paging("/ledger/account", action, position=0, after_requests=1, tenant=tenant.erp_client_id)

    async def scenario():
        async with _connector(sandbox) as connector:
            client = next(c for c in classify_clients(await connector.list_clients())
                          if c.erp_client_id == str(tenant.erp_client_id))
            return await connector.fetch_accounts(client)

    numbers = [a.account_number for a in asyncio.run(scenario())]
    chart = [str(a.number) for a in tenant.accounts]
    assert len(numbers) == len(set(numbers))  # nothing repeated
    if action == "insert":  # the account created mid-read is there, once; nothing was skipped
        assert sorted(numbers) == sorted(chart + ["1000"])
    else:  # the removed account is gone; every other one is there (none skipped by the shift)
        assert sorted(numbers) == sorted(chart[1:])
    pages = sandbox.stats.requests(template="GET /v2/ledger/account")
    assert len(pages) > len(chart) // 8 + 1  # it was read again


def test_a_client_list_that_changes_while_paged_lists_each_client_once():
    ledger = _ledger()
    sandbox = TripletexSandbox(ledger)
    sandbox.mutate_during_paging("/company/>withLoginAccess", "insert", position=0, after_requests=1)

    async def scenario():
        async with _connector(sandbox, page_size=3) as connector:
            return await connector.list_clients()

    ids = [c.erp_client_id for c in asyncio.run(scenario())]
    assert len(ids) == len(set(ids)) == len(ledger.tenants)  # the new client included, nobody twice


def test_a_list_that_never_stops_changing_fails_after_bounded_reads():
    calls = []

    async def fetch_page(query):
        calls.append(query)
        return {"versionDigest": f"v{len(calls)}", "values": [{"id": query["from"] + i} for i in range(2)]}

    with pytest.raises(UpstreamError) as caught:
        asyncio.run(consistent_offset_list(fetch_page, page_size=2, identity=lambda r: r["id"],
                                           version_key="versionDigest", where="GET x", erp="x", tenant="T (orgnr 1)"))
    assert len(calls) == 6  # three reads, each stopped at the first page whose version differs
    assert "T (orgnr 1)" in str(caught.value) and "retry the partition later" in str(caught.value)


def test_a_repeated_row_under_a_stable_version_is_refused():
    async def fetch_page(query):
        return {"versionDigest": "same", "values": [{"id": 1}, {"id": 1}][: 2 if query["from"] == 0 else 0]}

    with pytest.raises(BadResponse, match="lists 1 more than once"):
        asyncio.run(consistent_offset_list(fetch_page, page_size=2, identity=lambda r: r["id"],
                                           version_key="versionDigest", where="GET x"))


def test_gather_all_cancels_the_rest_when_one_fails():
    finished = []

    async def slow(n):
        await asyncio.sleep(0.5)
        finished.append(n)

    async def fail():
        await asyncio.sleep(0.01)
        raise BadResponse("broken")

    async def scenario():
        with pytest.raises(BadResponse):
            await gather_all(slow(1), fail(), slow(2))
        await asyncio.sleep(0.6)

    asyncio.run(scenario())
    assert finished == []  # nothing kept running behind the failed tenant
