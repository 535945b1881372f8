"""SAF-T code lists: the 1.20 standard accounts and the 1.30 næringsspesifikasjon grouping codes.

Only lookups; the importer passes mappings through unchanged (a file may legitimately use another
grouping category, e.g. KOSTRA for municipalities).
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"


@functools.cache
def standard_accounts() -> dict[str, str]:
    """1.20 `StandardAccountID` codes (2- and 4-character) → Norwegian description."""
    codes: dict[str, str] = {}
    for name, encoding in (
        ("General_Ledger_Standard_Accounts_2_character.csv", "utf-8-sig"),
        ("General_Ledger_Standard_Accounts_4_character.csv", "cp1252"),
    ):
        with open(DATA_DIR / name, encoding=encoding, newline="") as handle:
            for row in csv.DictReader(handle, delimiter=";"):
                codes[row["AccountID"].strip()] = (
                    row.get("DescriptionNOB") or row.get("DescriptionNOR") or ""
                ).strip()
    return codes


@functools.cache
def naeringsspesifikasjon() -> dict[tuple[str, str], str]:
    """1.30 (GroupingCategory, GroupingCode) pairs of the næringsspesifikasjon list → description."""
    with open(DATA_DIR / "naeringsspesifikasjon.csv", encoding="utf-8-sig", newline="") as handle:
        return {
            (row["GroupingCategory"].strip(), row["GroupingCode"].strip()): row["CodeDescriptionNOB"].strip()
            for row in csv.DictReader(handle, delimiter=";")
            if row.get("GroupingCategory")
        }
