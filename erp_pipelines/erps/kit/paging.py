"""Paging: one protocol, three styles, one consistency guard.

A style turns its state into the next request's parameters and a response into a `Page`:

- `Offset`: `from`/`count` style offsets, with the list's version on every page;
- `PageNumber`: `page`/`pageSize` (0- or 1-based) that ends by a page-count header or a body
  envelope's page count (`meta_key`), an `X-Pagination` header without `nextPageLink`, a 204, or a
  short page; the reported total serves as the list's version;
- `Cursor`: Relay `first`/`after`, rows under `edges[].node` or `items`, ended by
  `pageInfo.hasNextPage` (GraphQL, sent by POST: the connector's fetcher puts the parameters
  into the query's variables); a connection field such as `totalCount` can serve as the version.

`read_all` reads a whole list as one consistent snapshot. Paging is only correct while the list
stands still: a row inserted before the current position repeats a row on the next page, a removed
one skips a row. So a page whose version differs from the first page's, or a row key seen twice,
makes it read the list again from the start (at most `max_reads` times); nothing partial is ever
returned. A list that offers no version can only have repeated rows caught, by key.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from erp_pipelines.erps.kit.client import Reply
from erp_pipelines.errors import BadResponse, UpstreamError

log = logging.getLogger(__name__)

LIST_CHANGED_FIX = "the data is being edited in the ERP right now; retry the partition later"


@dataclasses.dataclass(frozen=True)
class Page:
    items: list[Any]
    next: Any = None  # the state that asks for the next page; None: this was the last
    version: Any = None  # the whole list's version as this page saw it, if the ERP tells


class PagingStyle(abc.ABC):
    """How one ERP pages. `start` is the first page's state."""

    start: Any = 0

    @abc.abstractmethod
    def params(self, state: Any) -> dict[str, Any]:
        """The parameters that ask for the page at `state`."""

    @abc.abstractmethod
    def page(self, reply: Reply, state: Any, where: str) -> Page: ...


def _list_at(body: Any, key: str | None, where: str) -> list[Any]:
    items = body if key is None else (body.get(key) if isinstance(body, dict) else None)
    if body is None:
        return []
    if not isinstance(items, list):
        raise BadResponse(f"{where}: the response has no {repr(key) if key else 'JSON array'} list")
    return items


@dataclasses.dataclass(frozen=True)
class Offset(PagingStyle):
    """Offset paging; a page shorter than `size` is the last."""

    size: int
    offset_param: str = "from"
    size_param: str = "count"
    items_key: str | None = "values"
    version_key: str | None = None

    def params(self, state: int) -> dict[str, Any]:
        return {self.offset_param: state, self.size_param: self.size}

    def page(self, reply: Reply, state: int, where: str) -> Page:
        body = reply.body
        items = _list_at(body, self.items_key, where)
        version = body.get(self.version_key) if self.version_key and isinstance(body, dict) else None
        return Page(items, state + len(items) if len(items) >= self.size else None, version)


@dataclasses.dataclass(frozen=True)
class PageNumber(PagingStyle):
    """Page-number paging. The end is, in order of trust: `page_count_header` (total pages),
    `X-Pagination`'s `nextPageLink` (when `pagination_header` is set), a 204 or an empty page, a
    page shorter than `size`. `total_header` (or X-Pagination's `totalCount`, or the envelope's
    `meta_total`) is the version. With `meta_key` the body is an envelope: rows at `items_key`."""

    size: int
    page_param: str = "page"
    size_param: str = "pageSize"
    first_page: int = 0
    items_key: str | None = None
    page_count_header: str | None = None
    total_header: str | None = None
    pagination_header: str | None = None
    meta_key: str | None = None  # a body envelope's metadata object (e.g. "Meta"), read by the two below
    meta_page_count: str | None = None  # its total-pages field
    meta_total: str | None = None  # its total-rows field (the version)

    @property
    def start(self) -> int:  # type: ignore[override]
        return self.first_page

    def params(self, state: int) -> dict[str, Any]:
        return {self.page_param: state, self.size_param: self.size}

    def page(self, reply: Reply, state: int, where: str) -> Page:
        items = _list_at(reply.body, self.items_key, where)
        following = state + 1 if items and len(items) >= self.size else None
        version = reply.headers.get(self.total_header) if self.total_header else None
        pages = _int(reply.headers.get(self.page_count_header)) if self.page_count_header else None
        if pages is not None:
            following = state + 1 if state + 1 - self.first_page < pages and items else None
        if self.meta_key:
            meta = reply.body.get(self.meta_key) if isinstance(reply.body, dict) else None
            if not isinstance(meta, dict):
                raise BadResponse(f"{where}: the response has no {self.meta_key!r} object")
            version = meta.get(self.meta_total) if self.meta_total else version
            pages = _int(meta.get(self.meta_page_count)) if self.meta_page_count else None
            if pages is not None:
                following = state + 1 if state + 1 - self.first_page < pages and items else None
        if self.pagination_header and reply.headers.get(self.pagination_header):
            meta = _json_header(reply.headers[self.pagination_header])
            version = meta.get("totalCount", meta.get("TotalCount", version))
            has_next = meta.get("nextPageLink", meta.get("NextPageLink"))
            if "nextPageLink" in meta or "NextPageLink" in meta:
                following = state + 1 if has_next and items else None
        return Page(items, following, version)


@dataclasses.dataclass(frozen=True)
class Cursor(PagingStyle):
    """Relay cursor paging: `connection` is the dotted path to the connection object in the body
    (e.g. `data.accounts`); rows are `edges[].node` or `items`. `version_key`: a field of the
    connection that changes when rows are inserted or removed (e.g. `totalCount`)."""

    size: int
    connection: str
    rows: str = "edges"  # "edges" (node per edge) or "items"
    first_param: str = "first"
    after_param: str = "after"
    start: Any = None
    version_key: str | None = None

    def params(self, state: str | None) -> dict[str, Any]:
        return {self.first_param: self.size, self.after_param: state}

    def connection_of(self, body: Any) -> Any:
        """The connection object in a response body; None where it is missing."""
        node = body
        for part in self.connection.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    def page(self, reply: Reply, state: str | None, where: str) -> Page:
        node = self.connection_of(reply.body)
        if not isinstance(node, dict):
            raise BadResponse(f"{where}: the response has no {self.connection}")
        raw = _list_at(node, self.rows, where)
        items = [edge.get("node") if isinstance(edge, dict) else edge for edge in raw] if self.rows == "edges" else raw
        info = node.get("pageInfo") or {}
        cursor = info.get("endCursor")
        following = cursor if info.get("hasNextPage") and cursor and cursor != state else None
        return Page(items, following, node.get(self.version_key) if self.version_key else None)


PageFetcher = Callable[[dict[str, Any]], Awaitable[Reply]]  # usually `ApiClient.reply`


async def read_all(
    fetch: PageFetcher,
    style: PagingStyle,
    *,
    identity: Callable[[Any], Any],
    where: str,
    params: Mapping[str, Any] | None = None,
    max_reads: int = 3,
    erp: str | None = None,
    tenant: str | None = None,
) -> list[Any]:
    """Every row of a paged list, as one consistent snapshot (see the module docstring).
    `identity(row)` is the row's key; a row without one (None) is left to the caller's schema check."""
    problem = ""
    for _ in range(max_reads):
        items: list[Any] = []
        seen: set[Any] = set()
        first_version: Any = None
        state, problem = style.start, ""
        while True:
            page = style.page(await fetch({**(params or {}), **style.params(state)}), state, where)
            if page.version is not None:
                if first_version is None:
                    first_version = page.version
                elif page.version != first_version:
                    problem = "changed"
                    break
            for item in page.items:
                key = identity(item)
                if key is None:
                    continue
                if key in seen:
                    problem = problem or f"duplicate:{key}"
                seen.add(key)
            items.extend(page.items)
            if problem or page.next is None:
                break
            state = page.next
        if not problem:
            return items
        log.info("%s: the list changed while it was paged (%s); reading it again", where, problem)
    if problem == "changed":
        raise UpstreamError(
            f"{where}: the list changed while it was being paged, {max_reads} reads in a row; nothing was stored",
            erp=erp, tenant=tenant, fix=LIST_CHANGED_FIX,
        )
    raise BadResponse(
        f"{where}: the response lists {problem.partition(':')[2]} more than once, {max_reads} reads in a row; "
        "nothing was stored",
        erp=erp, tenant=tenant, fix=LIST_CHANGED_FIX,
    )


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _json_header(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}
