from decimal import Decimal

import pytest

from erp_pipelines.model import (
    Account,
    Client,
    ClientStatus,
    classify_clients,
    kroner,
    months_between,
    normalise_tenant_id,
)
from erp_pipelines.sandbox.ledger import make_org_number, make_personal_number


def test_valid_org_number_is_normalised():
    number = make_org_number(7)
    assert normalise_tenant_id(f" {number[:3]} {number[3:6]} {number[6:]} ") == number


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("", "has no organisation number"),
        (None, "has no organisation number"),
        ("12345678", "must have 9 digits"),
        ("ABC123456", "is not numeric"),
    ],
)
def test_invalid_tenant_ids_are_refused_with_reason(raw, reason):
    with pytest.raises(ValueError, match=reason):
        normalise_tenant_id(raw)


def test_bad_check_digit_is_refused():
    number = make_org_number(11)
    broken = number[:-1] + str((int(number[-1]) + 1) % 10)
    with pytest.raises(ValueError, match="mod-11"):
        normalise_tenant_id(broken)


def test_personal_number_is_accepted_for_sole_proprietors():
    number = make_personal_number(5)
    assert normalise_tenant_id(number) == number
    with pytest.raises(ValueError, match="personal number"):
        normalise_tenant_id(number[:-1] + str((int(number[-1]) + 1) % 10))


def test_classify_rejects_invalid_numbers_and_the_higher_id_of_a_shared_number():
    good, shared = make_org_number(1), make_org_number(2)
    clients = [
        Client("x", good, "1", "Good AS"),
        Client("x", "", "2", "Nameless AS"),
        Client("x", shared, "4", "Twin B"),
        Client("x", shared, "3", "Twin A"),
    ]
    result = {c.erp_client_id: c for c in classify_clients(clients)}
    assert result["1"].status == ClientStatus.ACTIVE
    assert result["2"].status == ClientStatus.REJECTED and "no organisation number" in result["2"].status_reason
    assert result["3"].status == ClientStatus.ACTIVE  # the lower client id holds the number
    assert result["4"].status == ClientStatus.REJECTED
    assert result["4"].status_reason.startswith(f"organisation number {shared} is held by x client 3 (Twin A)")
    # a holder known from the registry keeps the number, whatever the ids
    held = {c.erp_client_id: c for c in classify_clients(clients, holders={shared: Client("x", shared, "4", "Twin B")})}
    assert held["4"].status == ClientStatus.ACTIVE and held["3"].status == ClientStatus.REJECTED
    assert "it held the number first" in held["3"].status_reason


def test_kroner_is_exact_and_months_are_inclusive():
    assert kroner(0.1 + 0.2) == Decimal("0.30")
    assert kroner(Decimal("1234.5")) == Decimal("1234.50")
    import datetime as dt

    assert months_between(dt.date(2025, 11, 15), dt.date(2026, 2, 1)) == [
        dt.date(2025, 11, 1), dt.date(2025, 12, 1), dt.date(2026, 1, 1), dt.date(2026, 2, 1)
    ]


def test_an_account_without_a_class_is_classified_from_its_number_and_standard_account():
    assert Account("3000", "Salgsinntekt").account_class == "income"
    assert Account("2050", "Annen egenkapital", "EQUITY").account_class == "equity"
    assert Account("19200", "Bank", standard_account="1920").account_class == "asset"
    assert Account("A-1", "Salg", grouping_category="salgsinntekt", grouping_code="3000").account_class == "income"
    assert Account("3000", "Salg", account_class="expense").account_class == "expense"  # the connector's class stands
    assert Account("Z", "Unknown").account_class is None
