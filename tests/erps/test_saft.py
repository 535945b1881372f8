"""SAF-T Financial import: official examples, the truth-ledger generator, hostile files, the connector."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import os
import re
import time
import zipfile
from decimal import Decimal
from pathlib import Path

import pytest

from erp_pipelines.erps.saft import (
    SaftConnector,
    SaftFileRejected,
    SaftInvalidOrgNumber,
    import_file,
    read_header,
    validate_file,
)
from erp_pipelines.errors import BadResponse, ConfigError, InvalidTenantId
from erp_pipelines.model import Balance, ClientStatus, classify_clients, months_between
from erp_pipelines.saft import codelists
from erp_pipelines.saft.safety import iterparse
from erp_pipelines.sandbox.ledger import CHART, TruthTenant, generate_ledger
from erp_pipelines.sandbox.saft import (
    GROUPING_1_30,
    STANDARD_ACCOUNT_1_20,
    write_demo_drop,
    write_saft_file,
    zip_file,
)

EXAMPLES = Path(__file__).parent / "saft_examples"
EXAMPLE_888 = EXAMPLES / "ExampleFile SAF-T Financial_888888888_20180228235959.xml"
EXAMPLE_999 = EXAMPLES / "ExampleFile SAF-T Financial_999999999_20161125213512.xml"
MONTHS_2025 = months_between(dt.date(2025, 1, 1), dt.date(2025, 12, 1))
D = Decimal


@functools.cache
def ledger():
    return generate_ledger(5, first_month=dt.date(2024, 1, 1), last_month=dt.date(2025, 12, 1))


def tenant(index: int = 0) -> TruthTenant:
    return ledger().tenants[index]


def bad_checksum_tenant() -> TruthTenant:
    return next(t for t in ledger().tenants if t.name == "Feil Kontrollsiffer AS")


def kr(ore: int) -> Decimal:
    return (D(ore) / 100).quantize(D("0.01"))


def truth_balances(truth: TruthTenant, months, *, repeat: int = 1) -> list[Balance]:
    """What an import must produce: `tenant.balances(month)` itself, or with `repeat` > 1 the generator's
    scaled file (the first month's opening, then `repeat` × each month's movement)."""
    if repeat == 1:
        rows = [
            Balance(month, str(b.account.number), kr(b.opening), kr(b.movement), kr(b.closing))
            for month in months
            for b in truth.balances(month)
        ]
        return by_key(rows)
    rows = []
    for first in truth.balances(months[0]):
        opening = first.opening
        for month in months:
            movement = repeat * next(b.movement for b in truth.balances(month) if b.account == first.account)
            rows.append(
                Balance(month, str(first.account.number), kr(opening), kr(movement), kr(opening + movement))
            )
            opening += movement
    return by_key(rows)


def by_key(balances) -> list[Balance]:
    return sorted(balances, key=lambda b: (b.account_number, b.period))


def issue_set(issues):
    return {(i.check, i.account_number, i.period, i.expected, i.actual) for i in issues}


def edit(source: Path, target: Path, *replacements: tuple[str, str], count: int = 1) -> Path:
    text = source.read_text(encoding="utf-8-sig")
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new, count)
    target.write_text(text, encoding="utf-8")
    return target


# ---------------------------------------------------------------------------------------- official examples


def test_official_888888888_imports_as_1_20():
    result = import_file(EXAMPLE_888)
    header = result.header
    assert (header.version, header.declared_version) == ("1.20", "1.0")  # detected from StandardAccountID
    assert (header.org_number, header.company_name) == ("888888888", "Tøyen Lekefabrikk AS")
    assert (header.first_month, header.last_month) == (dt.date(2017, 1, 1), dt.date(2017, 4, 1))
    assert header.date_created == dt.date(2018, 1, 10)
    assert header.software == "Nøyaktig Regnskapssystem N-SYS 12.002"
    assert result.validated_with == "xmlschema"
    assert (result.transactions, result.lines) == (53, 170)
    assert result.line_debit == result.line_credit == D("9487049.35")
    assert len(result.accounts) == 22 and len(result.balances) == 22 * 4
    rows = {(b.account_number, b.period.month): b for b in result.balances}
    assert [rows[("1500", m)].closing for m in (1, 2, 3, 4)] == [
        D("372197.50"),
        D("553947.50"),
        D("-169800.00"),
        D("103700.00"),
    ]
    assert rows[("1500", 1)] == Balance(
        dt.date(2017, 1, 1), "1500", D("15000.00"), D("357197.50"), D("372197.50")
    )
    assert [rows[("3000", m)].closing for m in (1, 2, 3, 4)] == [
        D("-717838.00"),
        D("-1210838.00"),
        D("-1643838.00"),
        D("-2316338.00"),
    ]
    assert rows[("2400", 4)] == Balance(
        dt.date(2017, 4, 1), "2400", D("-224275.00"), D("12250.00"), D("-212025.00")
    )
    assert rows[("1920", 4)].closing == D(
        "724407.00"
    )  # the file declares 670568.75: see the reconciliation test


def test_official_888888888_reconciliation_is_exactly_its_known_mismatches():
    issues = import_file(EXAMPLE_888).issues
    april, january = dt.date(2017, 4, 1), dt.date(2017, 1, 1)
    assert issue_set(issues) == {
        ("closing_balance", "1920", april, D("670568.75"), D("724407.00")),
        ("closing_balance", "2711", april, D("0.00"), D("-0.35")),
        ("closing_balance", "2740", april, D("0.00"), D("0.35")),
        # the totals agree (53 transactions, 9 487 049.35 each side); the illustrative chart's opening
        # balances do not sum to zero (no equity/result account takes the 2 545 410 debit surplus)
        ("opening_trial_balance", None, january, D("0.00"), D("2545410.00")),
    }
    assert all(i.org_number == "888888888" and i.source_file == EXAMPLE_888.name for i in issues)
    assert issues[0].as_row() == {
        "org_number": "888888888",
        "source": EXAMPLE_888.name,
        "check_name": "closing_balance",
        "account_number": "1920",
        "period": april,
        "expected": D("670568.75"),
        "actual": D("724407.00"),
        "message": issues[0].message,
    }
    assert "difference 53838.25" in next(i.message for i in issues if i.account_number == "1920")


def test_official_999999999_imports_with_its_placeholder_balances_reported():
    result = import_file(EXAMPLE_999)
    assert (result.header.version, result.header.org_number, result.header.company_name) == (
        "1.20",
        "999999999",
        "Selskapet AS",
    )
    assert result.months == tuple(months_between(dt.date(2015, 1, 1), dt.date(2015, 12, 1)))
    assert len(result.balances) == 4 * 12
    rows = {(b.account_number, b.period.month): b for b in result.balances}
    assert rows[("4000", 10)] == Balance(
        dt.date(2015, 10, 1), "4000", D("0.00"), D("10000.00"), D("10000.00")
    )
    assert rows[("1925", 12)].closing == D("-11265.44")
    december = dt.date(2015, 12, 1)
    assert issue_set(result.issues) == {
        ("closing_balance", "1925", december, D("12345.67"), D("-11265.44")),
        ("closing_balance", "2400", december, D("-12345.67"), D("-1234.56")),
        ("closing_balance", "2740", december, D("-12345.67"), D("1265.44")),
        ("closing_balance", "4000", december, D("0.00"), D("10000.00")),
        ("opening_trial_balance", None, dt.date(2015, 1, 1), D("0.00"), D("-1234.56")),
    }


def test_standard_account_mappings_reach_their_own_columns(tmp_path):
    chart_120 = {a.account_number: a for a in import_file(EXAMPLE_888).chart}
    mapping = {n: (a.standard_account, a.grouping_category, a.grouping_code) for n, a in chart_120.items()}
    assert mapping["1920"] == (None, "StandardAccountID", "19")  # a 2-digit StandardAccountID is no 4-digit one
    assert mapping["3000"] == (None, "StandardAccountID", "30")
    assert chart_120["1920"].account_type == "GL" and chart_120["1920"].name == "Bankinnskudd"
    assert chart_120["1920"].account_class == "asset" and chart_120["3000"].account_class == "income"
    generated = {
        version: {
            a.account_number: (a.standard_account, a.grouping_category, a.grouping_code, a.account_class)
            for a in import_file(write_saft_file(tenant(), tmp_path / f"{version}.xml", version)).chart
        }
        for version in ("1.20", "1.30")
    }
    assert generated["1.20"]["1920"] == ("1920", None, None, "asset")
    assert generated["1.20"]["5180"] == ("5092", None, None, "expense")
    assert generated["1.30"]["1920"] == (None, "balanseverdiForOmloepsmiddel", "1920", "asset")
    assert generated["1.30"]["6900"] == (None, "annenDriftskostnad", "6995", "expense")
    assert generated["1.30"]["3000"] == (None, "salgsinntekt", "3000", "income")


def test_generator_mappings_exist_in_the_code_lists():
    accounts = {a.number for a in tenant().accounts}
    assert set(GROUPING_1_30) == accounts
    assert set(GROUPING_1_30.values()) <= set(codelists.naeringsspesifikasjon())
    standard = codelists.standard_accounts()
    assert all(STANDARD_ACCOUNT_1_20.get(n, str(n)) in standard for n in accounts)


# ---------------------------------------------------------------------------------------- generator


@pytest.mark.parametrize("version", ["1.30", "1.20"])
def test_generated_file_reproduces_the_truth_ledger_to_the_ore(tmp_path, version):
    truth = tenant(1)
    result = import_file(write_saft_file(truth, tmp_path / "ledger.xml", version, 2025))
    assert (result.header.version, result.header.org_number) == (version, truth.org_number)
    assert result.validated_with == "xmlschema"
    assert by_key(result.balances) == truth_balances(truth, MONTHS_2025)
    assert len(result.balances) == len(truth.accounts) * 12
    assert result.issues == ()


def test_generated_file_of_a_sole_proprietor_uses_the_personal_number(tmp_path):
    truth = tenant(3)
    assert len(truth.org_number) == 11
    result = import_file(write_saft_file(truth, tmp_path / "enk.xml"))
    assert result.header.org_number == truth.org_number and result.issues == ()


@pytest.mark.parametrize("version", ["1.30", "1.20"])
def test_version_detected_from_structure_when_the_header_says_1_0(tmp_path, version):
    source = write_saft_file(tenant(), tmp_path / "declared.xml", version)
    target = edit(
        source, tmp_path / "undeclared.xml", (f"<AuditFileVersion>{version}<", "<AuditFileVersion>1.0<")
    )
    header = read_header(target)
    assert (header.version, header.declared_version) == (version, "1.0")


def test_libxml2_streaming_engine_gives_the_same_import(tmp_path):
    path = write_saft_file(tenant(), tmp_path / "big.xml", repeat=3)
    streamed, checked = import_file(path, validation="libxml2"), import_file(path, validation="xmlschema")
    assert streamed.validated_with == "libxml2"
    assert streamed.balances == checked.balances and streamed.issues == checked.issues == ()
    assert by_key(streamed.balances) == truth_balances(tenant(), MONTHS_2025, repeat=3)


def test_zip_with_one_xml_imports_like_the_xml(tmp_path):
    xml = write_saft_file(tenant(), tmp_path / "ledger.xml")
    archive = tmp_path / "ledger.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.write(xml, "export/SAF-T.xml")
    assert import_file(archive).balances == import_file(xml).balances
    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as zipped:
        zipped.write(xml, "a.xml")
        zipped.write(xml, "b.xml")
    with pytest.raises(SaftFileRejected, match=re.escape("exactly one .xml file; this one holds 2")):
        import_file(two)


# ---------------------------------------------------------------------------------------- periods


def test_fiscal_year_numbered_periods_are_booked_by_transaction_date(tmp_path):
    """Periods numbered from July (Jan 2025 = period 7 of fiscal year 2024): calendar reading falls outside
    the selection, so lines go by TransactionDate and the balances are still the truth."""
    source = write_saft_file(tenant(), tmp_path / "calendar.xml")
    text = source.read_text(encoding="utf-8")

    def shift(match: re.Match) -> str:
        month = int(match.group(1))
        period, year = (month + 6, 2024) if month <= 6 else (month - 6, 2025)
        return f"<Period>{period}</Period>\n\t\t\t\t<PeriodYear>{year}</PeriodYear>"

    shifted = tmp_path / "fiscal.xml"
    shifted.write_text(
        re.sub(r"<Period>(\d+)</Period>\n\t\t\t\t<PeriodYear>2025</PeriodYear>", shift, text),
        encoding="utf-8",
    )
    result = import_file(shifted)
    assert result.period_mapping == "transaction_date"
    assert by_key(result.balances) == truth_balances(tenant(), MONTHS_2025)
    assert [i.check for i in result.issues] == ["period_mapping"]


def test_period_13_is_booked_in_december_and_reported(tmp_path):
    source = write_saft_file(tenant(), tmp_path / "calendar.xml")
    text = source.read_text(encoding="utf-8")
    last = text.rindex("<Period>12</Period>")
    year_end = tmp_path / "period13.xml"
    year_end.write_text(
        text[:last] + "<Period>13</Period>" + text[last + len("<Period>12</Period>") :], encoding="utf-8"
    )
    result = import_file(year_end)
    assert result.period_mapping == "calendar"
    assert by_key(result.balances) == truth_balances(tenant(), MONTHS_2025)
    assert issue_set(result.issues) == {("period_mapping", None, dt.date(2025, 12, 1), None, None)}


def test_lines_on_an_account_missing_from_the_chart_are_reported(tmp_path):
    source = write_saft_file(tenant(), tmp_path / "ok.xml")
    broken = edit(
        source,
        tmp_path / "unknown.xml",
        (
            "<AccountID>1900</AccountID>\n\t\t\t\t\t<ValueDate>",
            "<AccountID>1999</AccountID>\n\t\t\t\t\t<ValueDate>",
        ),
    )
    result = import_file(broken)  # valid: the XSD's keyrefs select nothing under XSD 1.0
    moved = kr(next(ore for v in tenant().vouchers if v.date.year == 2025 for n, ore in v.lines if n == 1900))
    closing = next(
        b.closing
        for b in truth_balances(tenant(), MONTHS_2025)
        if b.account_number == "1900" and b.period.month == 12
    )
    assert issue_set(result.issues) == {
        ("unknown_account", "1999", None, None, moved),
        ("closing_balance", "1900", dt.date(2025, 12, 1), closing, closing - moved),
    }
    assert (
        next(a for a in result.chart if a.account_number == "1999").name == "(not in the chart of accounts)"
    )


def test_an_account_listed_twice_is_reported(tmp_path):
    source = write_saft_file(tenant(), tmp_path / "ok.xml")
    text = source.read_text(encoding="utf-8")
    first = text[text.index("\t\t\t<Account>") : text.index("</Account>") + len("</Account>\n")]
    twice = tmp_path / "twice.xml"
    twice.write_text(
        text.replace(first, first + first.replace("Maskiner og anlegg", "Kopi"), 1), encoding="utf-8"
    )
    result = import_file(twice)
    assert [(i.check, i.account_number) for i in result.issues] == [("duplicate_account", "1200")]
    assert "ignored: 'Kopi'" in result.issues[0].message
    assert by_key(result.balances) == truth_balances(tenant(), MONTHS_2025)


# ---------------------------------------------------------------------------------------- refusals


def test_xsd_invalid_file_is_refused_with_its_first_errors(tmp_path):
    source = write_saft_file(tenant(), tmp_path / "ok.xml")
    broken = edit(
        source,
        tmp_path / "invalid.xml",
        ("<AccountType>GL</AccountType>", "<AccountType>XX</AccountType>"),
        ("<Amount>", "<Amount>abc"),
    )
    with pytest.raises(SaftFileRejected) as refused:
        import_file(broken)
    error = refused.value
    assert isinstance(error, BadResponse)
    assert "does not validate against the SAF-T Financial 1.30 XSD" in error.reason
    line = "/AuditFile/GeneralLedgerEntries/Journal/Transaction[1]/Line[1]"
    assert error.errors == (
        "/AuditFile/MasterFiles/GeneralLedgerAccounts/Account[1]/AccountType: value must be one of ['GL']",
        f"{line}/DebitAmount/Amount: invalid value 'abc148821.37' for xs:decimal",
    )
    assert "re-export the SAF-T Financial file from the ERP" in str(error)
    assert tenant().org_number in str(error)
    with pytest.raises(
        SaftFileRejected, match=re.escape("1.30 XSD (libxml2, streamed; reading had reached")
    ) as streamed:
        import_file(broken, validation="libxml2")
    ns = "{urn:StandardAuditFile-Taxation-Financial:NO}"
    assert streamed.value.errors[:2] == (
        (
            f"Element '{ns}AccountType': [facet 'enumeration'] The value 'XX' is not an element of the set {{'GL'}}."
        ),
        (
            f"Element '{ns}Amount': 'abc148821.37' is not a valid value of the atomic type '{ns}SAFmonetaryType'."
        ),
    )


def test_official_example_declaring_1_30_is_refused_against_the_1_30_xsd(tmp_path):
    relabelled = edit(
        EXAMPLE_999, tmp_path / "999.xml", ("<n1:AuditFileVersion>1.0<", "<n1:AuditFileVersion>1.30<")
    )
    with pytest.raises(
        SaftFileRejected, match=re.escape("1.30 XSD (as declared in AuditFileVersion)")
    ) as refused:
        validate_file(relabelled)
    assert len(refused.value.errors) == 5 and "StandardAccountID" in refused.value.errors[0]


XXE = """<?xml version="1.0" encoding="UTF-8"?>
{padding}<!DOCTYPE AuditFile [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>
<AuditFile xmlns="urn:StandardAuditFile-Taxation-Financial:NO"><Header>
<AuditFileVersion>1.30</AuditFileVersion><Company><RegistrationNumber>888888888</RegistrationNumber><Name>&xxe;</Name></Company></Header></AuditFile>
"""
LAUGHS = """<?xml version="1.0"?>
{padding}<!DOCTYPE lolz [<!ENTITY lol "lol">{entities}]>
<AuditFile xmlns="urn:StandardAuditFile-Taxation-Financial:NO"><Header><Company><Name>&lol9;</Name>
</Company></Header></AuditFile>
"""


def laughs(padding: str = "") -> str:
    """lol9 expands to 10^9 "lol"s (3 GB) if anything resolves entities."""
    entities = "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(2, 10))
    return LAUGHS.format(padding=padding, entities=f'<!ENTITY lol1 "{"&lol;" * 10}">{entities}')


def passwd_fragment() -> str:
    first = Path("/etc/passwd").read_text().splitlines()[0]
    return first.split(":")[0] + ":" + first.split(":")[1]  # e.g. "root:x"


@pytest.mark.parametrize("padding", ["", f"<!-- {'x' * 70_000} -->\n"], ids=["plain", "past-the-prescan"])
def test_xxe_file_is_refused_without_reading_local_files(tmp_path, padding):
    path = tmp_path / "xxe.xml"
    path.write_text(XXE.format(padding=padding), encoding="utf-8")
    with pytest.raises(SaftFileRejected, match="contains a DTD") as refused:
        import_file(path)
    assert passwd_fragment() not in str(refused.value) and passwd_fragment() not in repr(
        refused.value.__dict__
    )
    # the parser layer alone never expands the entity either
    with open(path, "rb") as stream:
        names = [
            e.text for _, e in iterparse(stream, tag="{urn:StandardAuditFile-Taxation-Financial:NO}Name")
        ]
    assert not any(passwd_fragment() in (name or "") for name in names)


@pytest.mark.parametrize("padding", ["", f"<!-- {'x' * 70_000} -->\n"], ids=["plain", "past-the-prescan"])
def test_billion_laughs_is_refused_quickly(tmp_path, padding):
    path = tmp_path / "laughs.xml"
    path.write_text(laughs(padding), encoding="utf-8")
    started = time.perf_counter()
    with pytest.raises(SaftFileRejected, match=r"contains a DTD|refused an entity expansion"):
        import_file(path)
    assert time.perf_counter() - started < 1.0


def test_truncated_file_is_refused(tmp_path):
    source = write_saft_file(tenant(), tmp_path / "ok.xml")
    data = source.read_bytes()
    truncated = tmp_path / "truncated.xml"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        SaftFileRejected, match="the file is truncated: it does not end with the closing </AuditFile> tag"
    ):
        import_file(truncated)
    # cut inside the file but with a closing tag appended: the parser catches it
    spliced = tmp_path / "spliced.xml"
    spliced.write_bytes(data[: len(data) // 2] + b"\n</AuditFile>\n")
    with pytest.raises(SaftFileRejected, match="not well-formed XML"):
        import_file(spliced)


def test_invalid_organisation_number_is_refused_with_the_reason(tmp_path):
    truth = bad_checksum_tenant()
    path = write_saft_file(truth, tmp_path / "bad.xml")
    with pytest.raises(SaftInvalidOrgNumber) as refused:
        import_file(path)
    assert isinstance(refused.value, InvalidTenantId) and isinstance(refused.value, BadResponse)
    assert f"organisation number {truth.org_number} fails the mod-11 check digit" in str(refused.value)
    assert "correct the organisation number in the ERP's company settings" in str(refused.value)


def test_files_that_are_not_saft_financial_are_refused(tmp_path):
    cash = edit(
        EXAMPLE_999,
        tmp_path / "cash.xml",
        ("urn:StandardAuditFile-Taxation-Financial:NO", "urn:StandardAuditFile-Taxation-CashRegister:NO"),
        count=2,
    )
    with pytest.raises(SaftFileRejected, match="Cash Register"):
        import_file(cash)
    bare = tmp_path / "bare.xml"
    bare.write_text("<AuditFile><Header/></AuditFile>\n", encoding="utf-8")
    with pytest.raises(SaftFileRejected, match="not in the SAF-T Financial namespace"):
        import_file(bare)


# ---------------------------------------------------------------------------------------- connector


def run(coroutine):
    return asyncio.run(coroutine)


def touch(path: Path, when: dt.datetime) -> None:
    stamp = when.timestamp()
    os.utime(path, (stamp, stamp))


def test_connector_groups_one_company_and_newer_file_wins_overlap(tmp_path):
    truth, other = tenant(0), tenant(1)
    # older export Jan–Jun, every voucher twice; newer export Apr–Dec: Apr–Jun overlap, newer wins
    write_saft_file(
        truth,
        tmp_path / "a_h1.xml",
        first_month=dt.date(2025, 1, 1),
        last_month=dt.date(2025, 6, 1),
        created=dt.date(2025, 7, 1),
        repeat=2,
    )
    write_saft_file(
        truth,
        tmp_path / "b_rest.xml",
        first_month=dt.date(2025, 4, 1),
        last_month=dt.date(2025, 12, 1),
        created=dt.date(2026, 1, 15),
    )
    write_saft_file(other, tmp_path / "other.xml")
    write_saft_file(bad_checksum_tenant(), tmp_path / "bad_number.xml")
    invalid = write_saft_file(tenant(2), tmp_path / "invalid.xml")
    edit(invalid, invalid, ("<AccountType>GL</AccountType>", "<AccountType>XX</AccountType>"))
    (tmp_path / "xxe.xml").write_text(XXE.format(padding=""), encoding="utf-8")
    (tmp_path / "notes.txt").write_text("ignored")
    connector = SaftConnector(tmp_path)

    clients = run(connector.list_clients())
    assert sorted((c.erp_client_id, c.name) for c in clients) == sorted(
        [
            (truth.org_number, truth.name),
            (other.org_number, other.name),
            (tenant(2).org_number, tenant(2).name),  # listed from its header; refused when fetched
            (bad_checksum_tenant().org_number, "Feil Kontrollsiffer AS"),
        ]
    )
    classified = {c.erp_client_id: c for c in classify_clients(clients)}
    assert classified[bad_checksum_tenant().org_number].status == ClientStatus.REJECTED
    assert (
        "mod-11" in connector.problems["bad_number.xml"] and "contains a DTD" in connector.problems["xxe.xml"]
    )
    client = classified[truth.org_number]

    balances = run(connector.fetch_balances(client, MONTHS_2025))
    q1 = months_between(dt.date(2025, 1, 1), dt.date(2025, 3, 1))
    q2_on = months_between(dt.date(2025, 4, 1), dt.date(2025, 12, 1))
    assert by_key(b for b in balances if b.period in q1) == truth_balances(truth, q1, repeat=2)
    assert by_key(b for b in balances if b.period >= dt.date(2025, 4, 1)) == truth_balances(truth, q2_on)
    assert run(connector.fetch_balances(client, [dt.date(2025, 5, 17)])) == [
        b for b in by_key(balances) if b.period == dt.date(2025, 5, 1)
    ]

    issues = run(connector.reconciliation_issues(client))
    april = dt.date(2025, 4, 1)
    doubled_q1 = {
        str(a.number): (kr(o + 2 * m), kr(o + m))
        for a in truth.accounts
        for o in [next(b.opening for b in truth.balances(dt.date(2025, 1, 1)) if b.account is a)]
        for m in [sum(b.movement for month in q1 for b in truth.balances(month) if b.account is a)]
        if m != 0
    }
    assert {(i.account_number, i.expected, i.actual) for i in issues if i.check == "file_seam"} == {
        (account, expected, actual) for account, (expected, actual) in doubled_q1.items()
    }
    overlap = [i for i in issues if i.check == "file_overlap"]
    assert [(i.source_file, i.period) for i in overlap] == [("a_h1.xml", april)]
    assert "2025-04..2025-06 of a_h1.xml are superseded by the newer b_rest.xml" in overlap[0].message
    assert {i.check for i in issues} == {"file_seam", "file_overlap"}

    accounts = run(connector.fetch_accounts(client))
    assert [a.account_number for a in accounts] == sorted(str(a.number) for a in truth.accounts)

    with pytest.raises(SaftInvalidOrgNumber):
        run(connector.fetch_balances(classified[bad_checksum_tenant().org_number], MONTHS_2025))
    with pytest.raises(
        SaftFileRejected, match=re.escape("invalid.xml' refused: does not validate")
    ) as refused:
        run(connector.fetch_balances(classified[tenant(2).org_number], MONTHS_2025))
    assert refused.value.errors == (
        "/AuditFile/MasterFiles/GeneralLedgerAccounts/Account[1]/AccountType: value must be one of ['GL']",
    )


def test_connector_reports_months_no_file_covers(tmp_path):
    truth = tenant(1)
    write_saft_file(
        truth, tmp_path / "q1.xml", first_month=dt.date(2025, 1, 1), last_month=dt.date(2025, 3, 1)
    )
    write_saft_file(
        truth, tmp_path / "h2.xml", first_month=dt.date(2025, 7, 1), last_month=dt.date(2025, 12, 1)
    )
    connector = SaftConnector(tmp_path)
    (client,) = run(connector.list_clients())
    assert issue_set(run(connector.reconciliation_issues(client))) == {
        ("coverage_gap", None, dt.date(2025, 4, 1), None, None)
    }
    covered = [m for m in MONTHS_2025 if not dt.date(2025, 4, 1) <= m <= dt.date(2025, 6, 1)]
    assert by_key(run(connector.fetch_balances(client, MONTHS_2025))) == [
        b for b in truth_balances(truth, MONTHS_2025) if b.period in covered
    ]


def test_connector_breaks_a_date_created_tie_by_modification_time(tmp_path):
    truth = tenant(2)
    older = write_saft_file(truth, tmp_path / "first.xml", created=dt.date(2026, 1, 15))
    newer = write_saft_file(truth, tmp_path / "second.xml", created=dt.date(2026, 1, 15), repeat=3)
    touch(older, dt.datetime(2026, 2, 1, 12))
    touch(newer, dt.datetime(2026, 1, 20, 12))  # the tripled file is older on disk: the truth wins
    connector = SaftConnector(tmp_path)
    (client,) = run(connector.list_clients())
    assert by_key(run(connector.fetch_balances(client, MONTHS_2025))) == truth_balances(truth, MONTHS_2025)
    touch(newer, dt.datetime(2026, 3, 1, 12))
    assert by_key(run(connector.fetch_balances(client, MONTHS_2025))) == truth_balances(
        truth, MONTHS_2025, repeat=3
    )


def test_connector_fingerprints_detect_changes(tmp_path):
    path = write_saft_file(tenant(), tmp_path / "ledger.xml")
    connector = SaftConnector(tmp_path)
    (first,) = run(connector.fingerprints())
    assert (first.size, first.path) == (path.stat().st_size, str(path)) and len(first.sha256) == 64
    assert run(connector.fingerprints()) == [first]
    write_saft_file(tenant(), path, repeat=2)
    (second,) = run(connector.fingerprints())
    assert second.sha256 != first.sha256 and second.cursor != first.cursor


def test_year_end_seam_compares_assets_and_liabilities_only(tmp_path):
    truth = tenant(1)
    write_saft_file(truth, tmp_path / "2024.xml", "1.20", 2024, repeat=2)  # 2024's movements doubled
    write_saft_file(truth, tmp_path / "2025.xml", "1.30", 2025)
    connector = SaftConnector(tmp_path)
    (client,) = run(connector.list_clients())
    issues = run(connector.reconciliation_issues(client))
    moved_2024 = {
        str(b.account.number): b.closing - truth.balances(dt.date(2024, 1, 1))[i].opening
        for i, b in enumerate(truth.balances(dt.date(2024, 12, 1)))
    }
    expected = {n for n, moved in moved_2024.items() if moved and n[0] in "12" and not n.startswith("20")}
    assert {i.account_number for i in issues if i.check == "file_seam"} == expected
    assert {i.period for i in issues} == {dt.date(2025, 1, 1)} and {i.check for i in issues} == {"file_seam"}


def test_demo_drop_gives_three_clean_companies(tmp_path):
    paths = write_demo_drop(tmp_path)
    assert [p.suffix for p in paths] == [".xml"] * 4 + [".zip"]
    connector = SaftConnector(tmp_path)
    clients = classify_clients(run(connector.list_clients()))
    assert len(clients) == 3 and all(c.status == ClientStatus.OK for c in clients)
    for client in clients:
        assert run(connector.reconciliation_issues(client)) == []
    first = clients[[c.erp_client_id for c in clients].index(paths[0].stem.split("_")[1])]
    months = months_between(dt.date(2024, 1, 1), dt.date(2025, 12, 1))
    assert len(run(connector.fetch_balances(first, months))) == len(CHART) * 24
    assert connector.scheduled_refresh is False


def test_connector_without_its_folder_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigError, match="SAFT_DROP_DIR"):
        run(SaftConnector(tmp_path / "missing").list_clients())


def test_connector_class_contract():
    assert (SaftConnector.erp, SaftConnector.display_name) == ("saft", "SAF-T Financial (file import)")
    (setting,) = SaftConnector.settings
    assert (setting.field, setting.env, setting.secret) == ("drop_dir", "SAFT_DROP_DIR", False)
    assert (
        SaftConnector.rate_limit.requests_per_second,
        SaftConnector.rate_limit.max_in_flight,
        SaftConnector.rate_limit.source,
    ) == (None, 1, "files")


# ---------------------------------------------------------------------------------------- refused files

CSV = "Konto;Navn;Saldo\n1920;Bankinnskudd Fjordkraft;724407,00\n"
UBL = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<Invoice xmlns="urn:oasis:names:specification:ubl:schema:xsd:Invoice-2"><ID>1</ID></Invoice>\n'
)


def write_refusable(folder: Path) -> dict[str, str]:
    """One file per refusal reason (and a good one, good.xml) in `folder`: file name → expected reason.
    Listing refuses the first three; spliced.xml (tenant 4) and invalid.xml (tenant 2) have readable
    headers and are refused when imported."""
    good = write_saft_file(tenant(0), folder / "good.xml")
    data = good.read_bytes()
    (folder / "ledger.csv.xml").write_text(CSV, encoding="utf-8")
    (folder / "invoice.xml").write_text(UBL, encoding="utf-8")
    (folder / "cut.xml").write_bytes(data[: len(data) // 2])
    other = write_saft_file(tenant(4), folder / "spliced.xml").read_bytes()
    (folder / "spliced.xml").write_bytes(other[: len(other) // 2] + b"\n</AuditFile>\n")
    invalid = write_saft_file(tenant(2), folder / "invalid.xml")
    edit(invalid, invalid, ("<AccountType>GL</AccountType>", "<AccountType>XX</AccountType>"))
    return {
        "ledger.csv.xml": "not_xml",
        "invoice.xml": "not_saft",
        "cut.xml": "truncated",
        "spliced.xml": "malformed",
        "invalid.xml": "invalid",
    }


IMPORT_TIME = ("spliced.xml", "invalid.xml")


def test_each_refusal_has_its_true_reason_and_fix(tmp_path):
    expected = write_refusable(tmp_path)
    fixes = {}
    for name, reason in expected.items():
        with pytest.raises(SaftFileRejected) as refused:
            import_file(tmp_path / name)
        assert (name, refused.value.code) == (name, reason)
        assert name in str(refused.value) and refused.value.fix
        fixes[reason] = refused.value
    assert "not XML" in fixes["not_xml"].detail and "truncated" not in fixes["not_xml"].detail
    assert "root element 'Invoice'" in fixes["not_saft"].detail
    assert "CSV" in fixes["not_xml"].fix and "SAF-T Financial" in fixes["not_saft"].fix
    assert "does not end with the closing </AuditFile> tag" in fixes["truncated"].detail
    assert "copy it again" in fixes["truncated"].fix
    assert "1.30 XSD" in fixes["invalid"].detail and "AccountType" in fixes["invalid"].errors[0]
    assert "Bankinnskudd" not in fixes["not_xml"].detail  # a refusal never quotes the content
    assert import_file(tmp_path / "good.xml").header.org_number == tenant(0).org_number


def test_connector_lists_refused_and_ignored_files_and_logs_them(tmp_path, caplog):
    expected = write_refusable(tmp_path)
    (tmp_path / "notes.txt").write_text("ring regnskapsfører")
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.4\n")
    connector = SaftConnector(tmp_path)
    with caplog.at_level("WARNING", logger="erp_pipelines.erps.saft"):
        clients = run(connector.list_clients())
    # the spliced and the invalid file's headers are readable: they are listed, and refused when imported
    assert sorted(c.erp_client_id for c in clients) == sorted(tenant(i).org_number for i in (0, 2, 4))
    listed_refusals = {k: v for k, v in expected.items() if k not in IMPORT_TIME}
    assert {r.file_name: r.reason for r in connector.refused_files} == listed_refusals
    assert {(r.file_name, r.reason) for r in connector.ignored_files} == {
        ("notes.txt", "ignored_type"),
        ("report.pdf", "ignored_type"),
    }
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for name in [*listed_refusals, "notes.txt", "report.pdf"]:
        assert name in logged
    assert "[not_xml]" in logged and "Fix:" in logged

    by_org = {c.org_number: c for c in clients}
    good, invalid, spliced = (by_org[tenant(i).org_number] for i in (0, 2, 4))
    with pytest.raises(SaftFileRejected) as refused:
        run(connector.fetch_balances(invalid, MONTHS_2025))
    assert refused.value.code == "invalid" and invalid.org_number in refused.value.tenant
    with pytest.raises(SaftFileRejected, match="not well-formed XML"):
        run(connector.fetch_accounts(spliced))
    assert {r.file_name: r.reason for r in connector.refused_files} == expected
    assert by_key(run(connector.fetch_balances(good, MONTHS_2025))) == truth_balances(tenant(0), MONTHS_2025)
    # the import's refusal stays listed while the file is unchanged
    run(connector.list_clients())
    assert connector.file_refusals["invalid.xml"].reason == "invalid"


def test_refused_and_ignored_files_land_in_the_warehouse(tmp_path):
    from erp_pipelines.erps.extract import BALANCES
    from erp_pipelines.pipeline import load_tenants, refresh_clients
    from erp_pipelines.warehouse import Warehouse

    drop = tmp_path / "drop"
    drop.mkdir()
    expected = write_refusable(drop)
    (drop / "notes.txt").write_text("ring regnskapsfører")
    warehouse = Warehouse(tmp_path / "w.duckdb")

    async def refresh():
        return await refresh_clients(SaftConnector(drop), warehouse)

    listed, change = run(refresh())
    assert change.counts["files_refused"] == 3 and change.counts["files_ignored"] == 1
    rows = {r["file_name"]: r for r in warehouse.refused_files("saft")}
    assert {name: r["reason"] for name, r in rows.items()} == {
        **{k: v for k, v in expected.items() if k not in IMPORT_TIME},
        "notes.txt": "ignored_type",
    }
    csv = rows["ledger.csv.xml"]
    assert csv["erp"] == "saft" and "ledger.csv.xml" in csv["message"] and "CSV" in csv["fix"]
    assert csv["fingerprint"] == hashlib.sha256(CSV.encode()).hexdigest()
    assert not any("Bankinnskudd" in str(v) for r in rows.values() for v in r.values())

    async def load():
        connector = SaftConnector(drop)
        return [b async for b in load_tenants(connector, warehouse, [c for c in listed if c.is_active],
                                              what=(BALANCES,), months=MONTHS_2025)]

    batches = run(load())
    assert [e.client.org_number for b in batches for e in b.loaded] == [tenant(0).org_number]
    assert sorted(e.client.org_number for b in batches for e in b.failed) == sorted(
        tenant(i).org_number for i in (2, 4)
    )
    assert warehouse.query("SELECT count(*) FROM balances WHERE org_number = ?", [tenant(0).org_number]) == [
        (len([b for b in truth_balances(tenant(0), MONTHS_2025) if not b.is_zero]),)
    ]
    after_load = {r["file_name"]: r for r in warehouse.refused_files("saft")}
    assert {name: r["reason"] for name, r in after_load.items()} == {**expected, "notes.txt": "ignored_type"}
    invalid = after_load["invalid.xml"]
    assert "AccountType" in invalid["message"] and after_load["spliced.xml"]["reason"] == "malformed"

    # listed again: rows kept (first seen unchanged); removed or replaced files drop out
    (drop / "ledger.csv.xml").unlink()
    write_saft_file(tenant(1), drop / "cut.xml")
    run(refresh())
    again = {r["file_name"]: r for r in warehouse.refused_files("saft")}
    assert sorted(again) == ["invalid.xml", "invoice.xml", "notes.txt", "spliced.xml"]
    assert again["invoice.xml"]["first_seen_at"] == rows["invoice.xml"]["first_seen_at"]
    assert again["invoice.xml"]["last_seen_at"] >= rows["invoice.xml"]["last_seen_at"]
    assert again["invalid.xml"]["first_seen_at"] == invalid["first_seen_at"]


def test_a_rezipped_identical_export_keeps_its_fingerprint(tmp_path):
    xml = write_saft_file(tenant(0), tmp_path / "ledger.xml")
    archive = zip_file(xml, member_time=(2026, 1, 1, 0, 0, 0))
    xml_bytes = xml.read_bytes()
    xml.unlink()
    connector = SaftConnector(tmp_path)
    (first,) = run(connector.fingerprints())
    before = run(connector.tenant_fingerprints())
    zipped_once = archive.read_bytes()

    xml.write_bytes(xml_bytes)
    zip_file(xml, member_time=(2026, 3, 4, 5, 6, 8))
    xml.unlink()
    touch(archive, dt.datetime(2026, 3, 4, 5, 7))
    assert archive.read_bytes() != zipped_once  # another zip ...
    connector = SaftConnector(tmp_path)
    (second,) = run(connector.fingerprints())
    assert second.sha256 == first.sha256 == hashlib.sha256(xml_bytes).hexdigest()  # ... of the same XML
    assert second.cursor == first.cursor and run(connector.tenant_fingerprints()) == before


def test_demo_drop_is_written_identically_each_time(tmp_path):
    first = {p.name: p.read_bytes() for p in write_demo_drop(tmp_path / "a")}
    second = {p.name: p.read_bytes() for p in write_demo_drop(tmp_path / "b")}
    assert first == second
