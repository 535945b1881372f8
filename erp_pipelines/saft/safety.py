"""Opening SAF-T files without trusting them.

Three layers, cheapest first:
1. `check_envelope` reads the first 64 KiB and the last 1 KiB: a DTD (`<!DOCTYPE`/`<!ENTITY` anywhere in
   the first 64 KiB) is refused before any parser runs (SAF-T never needs one; DTDs carry XXE and
   entity-expansion attacks); then a file that is not XML at all (`not_xml`), whose root element is not
   a SAF-T Financial AuditFile (`not_saft`), or that does not end with `</AuditFile>` (`truncated`) is
   refused, in that order (cheap even for 1 GB).
2. `iterparse` builds lxml parsers that never resolve entities, load DTDs or touch the network, and keep
   libxml2's size limits (`huge_tree=False`: text nodes ≤ 10 MB, depth ≤ 256; file size is unlimited).
3. `refuse_doctype` re-checks the parsed document's DTD, for prologs too long for layer 1.

`open_xml` also opens a `.zip` holding exactly one XML file, streaming (never extracted to disk).
"""

from __future__ import annotations

import codecs
import contextlib
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from lxml import etree

from erp_pipelines.saft.records import (
    BAD_ZIP,
    CONTAINS_DTD,
    NAMESPACE,
    NOT_SAFT,
    NOT_XML,
    TRUNCATED,
    SaftFileRejected,
)

HEAD_BYTES = 64 * 1024
TAIL_BYTES = 1024
MAX_ZIP_MEMBER_BYTES = 16 * 1024**3  # an export larger than this is not a plausible SAF-T file
DTD_MARKERS = ("<!DOCTYPE", "<!ENTITY")
AUDIT_FILE = f"{{{NAMESPACE}}}AuditFile"
CASH_REGISTER_NAMESPACE = "urn:StandardAuditFile-Taxation-CashRegister:NO"
CLOSING_TAG = re.compile(r"</([A-Za-z_][\w.-]*:)?AuditFile\s*>\s*(<!--.*?-->\s*)*$", re.DOTALL)
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def is_zip(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".zip"


def _zip_member(archive: zipfile.ZipFile, path: Path) -> zipfile.ZipInfo:
    members = [
        info
        for info in archive.infolist()
        if not info.is_dir()
        and info.filename.lower().endswith(".xml")
        and not info.filename.startswith("__MACOSX/")
    ]
    if len(members) != 1:
        raise SaftFileRejected(
            path, f"a SAF-T zip must hold exactly one .xml file; this one holds {len(members)}", code=BAD_ZIP
        )
    if members[0].file_size > MAX_ZIP_MEMBER_BYTES:
        raise SaftFileRejected(
            path,
            f"the XML inside the zip unpacks to {members[0].file_size} bytes (limit {MAX_ZIP_MEMBER_BYTES})",
            code=BAD_ZIP,
        )
    return members[0]


@contextlib.contextmanager
def open_xml(path: str | Path) -> Iterator[IO[bytes]]:
    """The file's XML bytes as a binary stream (seekable; for a zip, the single XML member)."""
    path = Path(path)
    if not is_zip(path):
        with open(path, "rb") as handle:
            yield handle
        return
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise SaftFileRejected(path, f"not a readable zip file ({exc})", code=BAD_ZIP) from None
    with archive, archive.open(_zip_member(archive, path)) as handle:
        yield handle


def xml_size(path: Path) -> int:
    """Size of the XML itself (uncompressed, for a zip)."""
    if not is_zip(path):
        return path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        return _zip_member(archive, path).file_size


def _decode(data: bytes) -> str:
    for bom, encoding in BOMS:
        if data.startswith(bom):
            return data[len(bom) :].decode(encoding, errors="replace")
    return data.decode("utf-8", errors="replace")


def check_envelope(path: Path) -> None:
    """Refuse DTDs, non-XML, non-SAF-T and truncated files by looking at the first and last bytes only.
    Messages never quote the file's content."""
    with open_xml(path) as handle:
        head = handle.read(HEAD_BYTES)
        if not head.strip():
            raise SaftFileRejected(path, "the file is empty", code=TRUNCATED)
        size = handle.seek(0, 2)
        handle.seek(max(0, size - TAIL_BYTES))
        tail = handle.read()
    text = _decode(head)
    if any(marker in text for marker in DTD_MARKERS):  # a DTD can only sit in the prolog, i.e. here
        raise SaftFileRejected(path, _dtd_reason(), code=CONTAINS_DTD)
    try:
        root = root_tag(head)
    except ValueError:
        raise SaftFileRejected(path, "not XML: the file does not start with an XML element", code=NOT_XML) from None
    if root is not None:  # None: a prolog longer than the head; the parser checks the root later
        refuse_unless_saft_root(path, root)
    if not CLOSING_TAG.search(_decode_tail(tail, head)):
        raise SaftFileRejected(
            path, "the file is truncated: it does not end with the closing </AuditFile> tag", code=TRUNCATED
        )


def root_tag(head: bytes) -> str | None:
    """The root element's tag ("{namespace}name") from the file's first bytes, or None when they end
    before it. ValueError when they are not XML."""
    parser = etree.XMLPullParser(
        events=("start",), resolve_entities=False, load_dtd=False, no_network=True, huge_tree=False
    )
    try:
        parser.feed(head)
    except etree.XMLSyntaxError as exc:
        for _, element in parser.read_events():  # an error after the root started: the root still counts
            return element.tag
        raise ValueError(str(exc)) from None
    for _, element in parser.read_events():
        return element.tag
    return None


def refuse_unless_saft_root(path: Path, tag: str) -> None:
    """`not_saft` unless the root element is {urn:StandardAuditFile-Taxation-Financial:NO}AuditFile."""
    if tag == AUDIT_FILE:
        return
    namespace = tag[1:].partition("}")[0] if tag.startswith("{") else ""
    name = tag.rpartition("}")[2]
    if namespace == CASH_REGISTER_NAMESPACE:
        reason = "this is a SAF-T Cash Register file, not a SAF-T Financial file"
    elif name == "AuditFile":
        reason = (
            f"its elements are not in the SAF-T Financial namespace {NAMESPACE} "
            f"(they are in {namespace or 'no namespace'})"
        )
    else:
        reason = f"not a SAF-T Financial file (root element {name!r})"
    raise SaftFileRejected(path, reason, code=NOT_SAFT)


def _decode_tail(tail: bytes, head: bytes) -> str:
    for bom, encoding in BOMS:
        if head.startswith(bom) and encoding.startswith(("utf-16", "utf-32")):
            width = 2 if encoding.startswith("utf-16") else 4
            return tail[len(tail) % width :].decode(encoding, errors="replace")
    return tail.decode("utf-8", errors="replace")


def _dtd_reason() -> str:
    return (
        "the file contains a DTD (<!DOCTYPE>/<!ENTITY>); SAF-T files never do, and DTDs are how XML "
        "files read local files (XXE) or exhaust memory (entity expansion). Not parsed"
    )


def iterparse(source: IO[bytes], *, tag=None, events=("end",), schema: etree.XMLSchema | None = None):
    """lxml iterparse that resolves no entities, loads no DTD and never touches the network."""
    return etree.iterparse(
        source,
        events=events,
        tag=tag,
        schema=schema,
        resolve_entities=False,
        load_dtd=False,
        no_network=True,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


def refuse_doctype(path: Path, element: etree._Element) -> None:
    """Belt and braces: a document that got past `check_envelope` with a DTD is still refused."""
    info = element.getroottree().docinfo
    if info.doctype or info.internalDTD is not None or info.externalDTD is not None:
        raise SaftFileRejected(path, _dtd_reason(), code=CONTAINS_DTD)
