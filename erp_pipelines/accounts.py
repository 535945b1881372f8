"""Canonical account columns, the same for every source: `account_class` and the SAF-T mapping.

`account_class` is one of asset, liability, equity, income or expense. `classify_account` decides it:

1. a 4-digit NS 4102 account number in a range of `NS_4102_RANGES`;
2. else the ERP's own account type, through the table the connector passes (`type_classes`);
3. else the SAF-T standard account (or grouping code), read as an NS 4102 number;
4. else the account number's leading digits (e.g. a 5-digit chart's `30100`, or `1920.01`).

The ERP's own type stays in `account_type`, unchanged. `saft_mapping` splits a source's SAF-T mapping
into `standard_account` (4 digits only), `grouping_category` and `grouping_code`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

AccountClass = Literal["asset", "liability", "equity", "income", "expense"]
ACCOUNT_CLASSES: tuple[AccountClass, ...] = ("asset", "liability", "equity", "income", "expense")

# NS 4102 (Norsk Standard kontoplan) number ranges, inclusive
NS_4102_RANGES: tuple[tuple[int, int, AccountClass], ...] = (
    (1000, 1999, "asset"),  # eiendeler
    (2000, 2099, "equity"),  # egenkapital
    (2100, 2999, "liability"),  # avsetninger, langsiktig og kortsiktig gjeld
    (3000, 3999, "income"),  # salgsinntekt og annen driftsinntekt
    (4000, 7999, "expense"),  # varekostnad, lønn, avskrivninger, andre driftskostnader
    (8000, 8099, "income"),  # finansinntekter
    (8100, 8199, "expense"),  # finanskostnader
    (8300, 8399, "expense"),  # skattekostnad
    (8800, 8999, "equity"),  # årsresultat, overføringer og disponeringer
)
# the class of a leading digit, when no range above holds the number
LEADING_DIGIT_CLASSES: Mapping[str, AccountClass] = {
    "1": "asset", "2": "liability", "3": "income", "4": "expense", "5": "expense", "6": "expense",
    "7": "expense", "8": "expense",
}
# `grouping_category` of a SAF-T `StandardAccountID` that is not a 4-digit standard account (the
# 2-character code list, e.g. `30`): the code goes to `grouping_code`
STANDARD_ACCOUNT_ID_GROUPING = "StandardAccountID"

_FOUR_DIGITS = re.compile(r"\d{4}")
_LEADING_DIGITS = re.compile(r"\d+")


def ns_4102_class(number: str | None) -> AccountClass | None:
    """The class of a 4-digit NS 4102 account number in one of `NS_4102_RANGES`, else None."""
    text = (number or "").strip()
    if not _FOUR_DIGITS.fullmatch(text):
        return None
    value = int(text)
    return next((cls for low, high, cls in NS_4102_RANGES if low <= value <= high), None)


def leading_digits_class(code: str | None) -> AccountClass | None:
    """The class from a code's leading digits read as an NS 4102 number: `30` → 3000 → income,
    `30100` → 3010, `1920.01` → 1920; a digit outside every range by `LEADING_DIGIT_CLASSES`."""
    match = _LEADING_DIGITS.match((code or "").strip())
    if not match:
        return None
    digits = match.group()
    return ns_4102_class(digits[:4].ljust(4, "0")) or LEADING_DIGIT_CLASSES.get(digits[0])


def classify_account(
    account_number: str,
    account_type: str | None = None,
    standard_account: str | None = None,
    grouping_code: str | None = None,
    *,
    type_classes: Mapping[str, AccountClass] | None = None,
) -> AccountClass | None:
    """The account's class (see the module docstring for the order). `type_classes`: the ERP's own
    account types → class, from its connector module. None when nothing tells (no digits, no type)."""
    by_number = ns_4102_class(account_number)
    if by_number:
        return by_number
    by_type = (type_classes or {}).get((account_type or "").strip())
    if by_type:
        return by_type
    for code in (standard_account, grouping_code, account_number):
        found = leading_digits_class(code)
        if found:
            return found
    return None


def saft_mapping(
    standard_account_id: str | None = None, grouping_category: str | None = None, grouping_code: str | None = None,
) -> tuple[str | None, str | None, str | None]:
    """(standard_account, grouping_category, grouping_code), one format each: `standard_account` is a
    4-digit SAF-T standard account or None. Another `StandardAccountID` (the 2-character list's `30`)
    becomes grouping category `StandardAccountID` with that code, unless the source gives a grouping;
    a combined `salgsinntekt:3000` is split into category and code."""
    standard = (standard_account_id or "").strip() or None
    category = (grouping_category or "").strip() or None
    code = (grouping_code or "").strip() or None
    if standard and ":" in standard and not (category or code):
        category, _, code = (part.strip() or None for part in standard.partition(":"))
        standard = None
    if standard and not _FOUR_DIGITS.fullmatch(standard):
        if not (category or code):
            category, code = STANDARD_ACCOUNT_ID_GROUPING, standard
        standard = None
    return standard, category, code
