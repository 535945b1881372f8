"""GraphQL support, written once for every GraphQL ERP (graphql-core).

- Queries: one operation per `.graphql` file in `specs/<erp>/`, next to the ERP's SDL schema
  (`schema.graphql`, written from the vendor's documented types). `QueryBook(erp)` loads both;
  `book.query("accounts")` is the text a connector sends, `book.problems()` validates every query
  against the schema (tests), and simulators execute requests against the same schema.
- Sending: `post_query` POSTs `{"query", "variables"}` through the kit's `ApiClient` (throttle,
  retries, error mapping); `page_fetcher` makes a `read_all` fetcher that puts the paging
  parameters (`first`/`after`) into the variables; `GraphQLCursor` is the kit's `Cursor` that also
  takes the last edge's `cursor` when `pageInfo` has no `endCursor`.
- Errors: GraphQL answers HTTP 200 with `errors[]`. `graphql_body_check(erp, classify)` is the client's
  `check_body` hook: `classify(error, context)` maps one error object to the taxonomy (throttling
  codes to `RateLimited`, so the client pauses and retries); unclassified errors become
  `BadResponse`. A body with both `data` and `errors` is refused whole: never half-stored.
- Simulators: `execute_graphql(schema, body, root_value=..., context=...)` runs a request body
  against the schema and returns the response document (validation errors included, as a server would).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
from graphql import (
    GraphQLError,
    GraphQLSchema,
    OperationDefinitionNode,
    build_schema,
    parse,
    validate,
)
from graphql import execute as execute_document
from graphql.language import DocumentNode

from erp_pipelines.erps.kit.client import ApiClient, BodyCheck, Reply, RequestContext
from erp_pipelines.erps.kit.paging import Cursor, Page, PageFetcher, _list_at
from erp_pipelines.errors import BadResponse, ErpError, RateLimited

SPECS_ROOT = Path(__file__).resolve().parents[3] / "specs"
SCHEMA_FILE = "schema.graphql"
MAX_MESSAGE = 200  # characters of an ERP's error message kept in ours

ErrorClassifier = Callable[[Mapping[str, Any], RequestContext], ErpError | None]


# ---------------------------------------------------------------------------------------- queries


@dataclasses.dataclass(frozen=True)
class Query:
    """One `.graphql` file: its name (the file's stem), text and parsed document."""

    name: str
    text: str
    document: DocumentNode

    @property
    def operation_name(self) -> str | None:
        for definition in self.document.definitions:
            if isinstance(definition, OperationDefinitionNode) and definition.name:
                return definition.name.value
        return None


class QueryBook:
    """An ERP's schema and queries, from `specs/<erp>/` (or `folder`)."""

    def __init__(self, erp: str, folder: Path | None = None) -> None:
        self.erp = erp
        self.folder = folder or SPECS_ROOT / erp
        self.schema: GraphQLSchema = load_schema(self.folder / SCHEMA_FILE)
        self.queries: dict[str, Query] = {}
        for path in sorted(self.folder.glob("*.graphql")):
            if path.name != SCHEMA_FILE:
                text = path.read_text(encoding="utf-8")
                self.queries[path.stem] = Query(path.stem, text, parse(text))

    def query(self, name: str) -> str:
        return self.queries[name].text

    def problems(self, text: str | None = None) -> dict[str, list[str]]:
        """Validation errors against the schema: of `text`, or of every query in the book."""
        if text is not None:
            return {"query": validation_errors(self.schema, text)}
        return {name: found for name, query in self.queries.items()
                if (found := [e.message for e in validate(self.schema, query.document)])}

    def name_of(self, text: str) -> str | None:
        """The book's name for a query text sent (None: not one of the book's queries)."""
        return next((name for name, query in self.queries.items() if query.text == text), None)


@functools.cache
def load_schema(path: Path) -> GraphQLSchema:
    """An SDL file as a schema (cached: connectors, tests and simulators share one)."""
    return build_schema(Path(path).read_text(encoding="utf-8"))


def validation_errors(schema: GraphQLSchema, text: str) -> list[str]:
    """Why `text` is not a valid query against `schema` (empty: it is)."""
    try:
        document = parse(text)
    except GraphQLError as error:
        return [error.message]
    return [error.message for error in validate(schema, document)]


# ---------------------------------------------------------------------------------------- sending


async def post_query(
    api: ApiClient, url: str, query: str, variables: Mapping[str, Any] | None = None, *,
    auth: httpx.Auth | None = None, tenant: str | None = None, headers: Mapping[str, str] | None = None,
    **request: Any,
) -> Reply:
    """POST one query (`url`: the endpoint, absolute or below the client's base URL). The
    client's `check_body` hook has already refused any `errors[]`; `reply.body["data"]` is whole."""
    body = {"query": query, "variables": dict(variables or {})}
    return await api.reply("POST", url, json_body=body, auth=auth, tenant=tenant,
                           headers={"Content-Type": "application/json", **(headers or {})}, **request)


def data_of(reply: Reply, field: str, where: str) -> Any:
    """`data.<field>` of a reply, or `BadResponse`."""
    data = reply.body.get("data") if isinstance(reply.body, dict) else None
    if not isinstance(data, dict) or field not in data:
        raise BadResponse(f"{where}: the response has no data.{field}")
    return data[field]


def page_fetcher(api: ApiClient, url: str, query: str, variables: Mapping[str, Any] | None = None,
                 **request: Any) -> PageFetcher:
    """A `read_all` fetcher: the paging parameters become the query's variables."""
    async def fetch(params: dict[str, Any]) -> Reply:
        return await post_query(api, url, query, {**(variables or {}), **params}, **request)

    return fetch


@dataclasses.dataclass(frozen=True)
class GraphQLCursor(Cursor):
    """Relay paging where the next `after` is `pageInfo.endCursor` or, when the ERP sends none,
    the last edge's `cursor` (as some ERPs' own samples page)."""

    def page(self, reply: Reply, state: str | None, where: str) -> Page:
        page = super().page(reply, state, where)
        if page.next is not None or self.rows != "edges":
            return page
        node = self.connection_of(reply.body)
        info = node.get("pageInfo") or {}
        edges = _list_at(node, "edges", where)
        if not info.get("hasNextPage") or info.get("endCursor") or not edges:
            return page
        last = edges[-1].get("cursor") if isinstance(edges[-1], dict) else None
        if not last or last == state:
            raise BadResponse(f"{where}: hasNextPage without a cursor to continue from")
        return dataclasses.replace(page, next=last)


# ---------------------------------------------------------------------------------------- errors


def error_code(error: Mapping[str, Any]) -> str | None:
    """An error object's code: on the error object itself (some ERPs) or in `extensions.code`
    (the common convention)."""
    code = error.get("code")
    if code is None and isinstance(error.get("extensions"), Mapping):
        code = error["extensions"].get("code")
    return str(code) if code is not None else None


def error_messages(errors: list[Any]) -> str:
    shown = []
    for error in errors[:3]:
        if isinstance(error, Mapping):
            code, message = error_code(error), str(error.get("message") or "")[:MAX_MESSAGE]
            shown.append(f"{code}: {message}" if code else message)
    return "; ".join(shown) or "unreadable errors"


def graphql_body_check(erp: str, classify: ErrorClassifier | None = None) -> BodyCheck:
    """The `check_body` hook of a GraphQL ERP (see the module docstring). Throttling outranks
    everything: a body whose errors include one that `classify` maps to `RateLimited` is retried
    (or, for `QuotaExhausted`, stops the run) whatever else it carries."""

    def check(response: httpx.Response, body: Any, context: RequestContext) -> ErpError | None:
        if not isinstance(body, dict):
            return BadResponse("the GraphQL response is not a JSON object", erp=erp)
        errors = body.get("errors")
        if errors in (None, []):
            if not isinstance(body.get("data"), dict):
                return BadResponse("the GraphQL response has neither data nor errors", erp=erp)
            return None
        if not isinstance(errors, list):
            return BadResponse("the GraphQL response's errors is not a list", erp=erp)
        mapped = [found for error in errors if isinstance(error, Mapping)
                  and (found := classify(error, context) if classify else None) is not None]
        throttled = [error for error in mapped if isinstance(error, RateLimited)]
        if throttled or mapped:
            return (throttled or mapped)[0]
        if body.get("data") is not None:
            return BadResponse(
                f"the response carries data and errors ({error_messages(errors)}); partial data is refused, "
                "nothing was stored", erp=erp, fix="retry the partition; if it persists, report the error to the ERP",
            )
        return BadResponse(f"the ERP answered with errors: {error_messages(errors)}", erp=erp)

    return check


# ---------------------------------------------------------------------------------------- simulators


def execute_graphql(schema: GraphQLSchema, body: Any, *, root_value: Any = None,
                    context: Any = None) -> dict[str, Any]:
    """Run a request body `{"query", "variables", "operationName"}` against `schema` (parse,
    validate, execute with graphql-core) and return the response document as a server sends it."""
    if not isinstance(body, Mapping) or not isinstance(body.get("query"), str):
        return {"errors": [{"message": "the request body has no query"}]}
    try:
        document = parse(body["query"])
    except GraphQLError as error:
        return {"errors": [error.formatted]}
    invalid = validate(schema, document)
    if invalid:
        return {"errors": [error.formatted for error in invalid]}
    result = execute_document(schema, document, root_value=root_value, context_value=context,
                              variable_values=body.get("variables") or None,
                              operation_name=body.get("operationName"))
    if hasattr(result, "__await__"):
        raise TypeError("async resolvers are not supported by execute_graphql(); use sync resolvers")
    response: dict[str, Any] = {}
    if result.errors:
        response["errors"] = [error.formatted for error in result.errors]
    response["data"] = result.data
    return response
