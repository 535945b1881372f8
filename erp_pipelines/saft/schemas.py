"""Which SAF-T Financial version a file is, and whether it validates against that version's XSD.

Version rule (`detect_version`), first match wins:
1. `Header/AuditFileVersion` says 1.20/1.2 or 1.30/1.3: that version (Skatteetaten validates by it too).
2. Otherwise (the official examples say "1.0") the structure decides, reading MasterFiles up to the first
   Transaction and stopping at the first telling element:
   - 1.20: `Account/StandardAccountID`; an Account without `GroupingCategory` (mandatory in 1.30); a balance
     or `AccountID` directly under `Customer`/`Supplier`; `TaxInformation/TaxAmount`;
     `Analysis/AnalysisAmount`.
   - 1.30: `Customer|Supplier/BalanceAccount`; `Transaction/VoucherType|VoucherDescription|ModificationDate`;
     `TaxInformation/DebitTaxAmount|CreditTaxAmount`; `Analysis/DebitAnalysisAmount|CreditAnalysisAmount`.
   - nothing telling (every account has GroupingCategory/GroupingCode, no parties, no such line details):
     1.30.
   The namespace cannot decide: both versions use `urn:StandardAuditFile-Taxation-Financial:NO`.

Validation, two engines over the same XSD files (each schema loaded once):
- xmlschema (the reference, errors with element paths): streamed with `lazy=3` (one Transaction in memory
  at a time). Used for files up to `XMLSCHEMA_MAX_BYTES`. Measured here at ~1.4 MB/s with RSS still growing
  (~95 MB for a 92 MB file), so it cannot take a 1 GB file.
- libxml2 (lxml.etree.XMLSchema): larger files are validated inside the import's own streaming pass, at
  C speed and flat memory. Errors name the element and the transaction reached, not an XPath.
The XSDs' xs:key/xs:keyref selectors are unprefixed XPaths in a namespaced schema, so under XSD 1.0 they
select nothing and both engines (correctly) ignore them; the importer checks line accounts itself.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from xml.etree.ElementTree import ParseError

import xmlschema
from lxml import etree

from erp_pipelines.saft.records import MALFORMED, NAMESPACE, VERSION_1_20, VERSION_1_30, SaftFileRejected
from erp_pipelines.saft.safety import open_xml

DATA_DIR = Path(__file__).parent / "data"
XSD_FILES = {
    VERSION_1_20: DATA_DIR
    / "saft_financial_1.20.xsd",  # upstream name: ..._Schema_v_1.10.xsd (declares 1.20)
    VERSION_1_30: DATA_DIR / "saft_financial_1.30.xsd",
}
XMLSCHEMA_MAX_BYTES = 16 * 1024**2
MAX_LISTED_ERRORS = 5
LAZY_DEPTH = 3  # AuditFile/GeneralLedgerEntries/Journal/Transaction: one transaction held at a time

DECLARED = {"1.20": VERSION_1_20, "1.2": VERSION_1_20, "1.30": VERSION_1_30, "1.3": VERSION_1_30}
# (parent local name, child local name) → the version that child proves
CHILD_MARKERS = {
    ("Account", "StandardAccountID"): VERSION_1_20,
    ("Customer", "BalanceAccount"): VERSION_1_30,
    ("Supplier", "BalanceAccount"): VERSION_1_30,
    ("Transaction", "VoucherType"): VERSION_1_30,
    ("Transaction", "VoucherDescription"): VERSION_1_30,
    ("Transaction", "ModificationDate"): VERSION_1_30,
    ("TaxInformation", "TaxAmount"): VERSION_1_20,
    ("TaxInformation", "DebitTaxAmount"): VERSION_1_30,
    ("TaxInformation", "CreditTaxAmount"): VERSION_1_30,
    ("Analysis", "AnalysisAmount"): VERSION_1_20,
    ("Analysis", "DebitAnalysisAmount"): VERSION_1_30,
    ("Analysis", "CreditAnalysisAmount"): VERSION_1_30,
}
for _party in ("Customer", "Supplier"):
    for _child in (
        "AccountID",
        "OpeningDebitBalance",
        "OpeningCreditBalance",
        "ClosingDebitBalance",
        "ClosingCreditBalance",
    ):
        CHILD_MARKERS[(_party, _child)] = VERSION_1_20
DEFAULT_VERSION = VERSION_1_30


def local_name(tag: str) -> str:
    return tag.rpartition("}")[2]


def declared_version(text: str | None) -> str | None:
    return DECLARED.get((text or "").strip())


def version_hint(element: etree._Element) -> str | None:
    """The version an element of MasterFiles/GeneralLedgerEntries proves, if any (rule 2 above)."""
    parent = local_name(element.tag)
    if parent == "Account" and element.find(f"{{{NAMESPACE}}}GroupingCategory") is None:
        return VERSION_1_20
    if parent == "Line":  # markers sit one level down, in TaxInformation/Analysis
        return next(filter(None, (version_hint(child) for child in element)), None)
    if parent == "Transaction":
        for child in element:
            found = CHILD_MARKERS.get((parent, local_name(child.tag))) or version_hint(child)
            if found:
                return found
        return None
    for child in element:
        found = CHILD_MARKERS.get((parent, local_name(child.tag)))
        if found:
            return found
    return None


# ---------------------------------------------------------------------------------------- engines


@functools.cache
def xmlschema_for(version: str) -> xmlschema.XMLSchema10:
    return xmlschema.XMLSchema10(str(XSD_FILES[version]), allow="sandbox")


_libxml2 = threading.local()  # lxml validators are not shared between threads


def libxml2_schema_for(version: str) -> etree.XMLSchema:
    cache = _libxml2.__dict__.setdefault("schemas", {})
    if version not in cache:
        parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
        cache[version] = etree.XMLSchema(etree.parse(str(XSD_FILES[version]), parser))
    return cache[version]


def xmlschema_errors(path: str | Path, version: str, limit: int = MAX_LISTED_ERRORS) -> list[str]:
    """The first `limit` XSD errors ("path: reason"), streaming; [] when the file is valid."""
    path = Path(path)
    schema = xmlschema_for(version)
    errors: list[str] = []
    with open_xml(path) as stream:
        try:
            resource = xmlschema.XMLResource(stream, lazy=LAZY_DEPTH, defuse="always", allow="none")
            for error in schema.iter_errors(resource):
                errors.append(f"{error.path or '/'}: {error.reason}")
                if len(errors) >= limit:
                    break
        except (ParseError, etree.XMLSyntaxError) as exc:
            raise SaftFileRejected(path, f"not well-formed XML ({exc})", code=MALFORMED) from None
        except xmlschema.XMLResourceError as exc:
            raise SaftFileRejected(path, f"refused by the XML reader ({exc})", code=MALFORMED) from None
    return errors
