"""The kit's GraphQL support: query books validated against an SDL, the errors[] body check (partial
data refused, throttling first), Relay cursor paging by the last edge's cursor, and execution for
simulators."""

from __future__ import annotations

import httpx
import pytest
from graphql import build_schema

from erp_pipelines.erps.kit import (
    GraphQLCursor,
    QueryBook,
    Reply,
    RequestContext,
    execute_graphql,
    graphql_body_check,
    validation_errors,
)
from erp_pipelines.errors import BadResponse, ClientAccessError, RateLimited

SCHEMA = build_schema("""
type Query { items(first: Int, after: String): ItemConnection }
type ItemConnection { edges: [ItemEdge!]! pageInfo: PageInfo! }
type ItemEdge { cursor: String! node: Item! }
type Item { id: Int! name: String }
type PageInfo { hasNextPage: Boolean! endCursor: String }
""")
CONTEXT = RequestContext("POST", "/graphql", None)
RESPONSE = httpx.Response(200)


def reply(body) -> Reply:
    return Reply(200, httpx.Headers(), body)


def test_every_query_of_a_book_is_checked_against_its_schema(tmp_path):
    (tmp_path / "schema.graphql").write_text("type Query { items(first: Int, after: String): ItemConnection }\n"
                                             "type ItemConnection { total: Int }\n")
    (tmp_path / "good.graphql").write_text("query Good { items(first: 1) { total } }")
    (tmp_path / "bad.graphql").write_text("query Bad { items { count } }")
    book = QueryBook("example", tmp_path)
    assert set(book.queries) == {"good", "bad"}
    assert book.queries["good"].operation_name == "Good"
    assert list(book.problems()) == ["bad"] and "count" in book.problems()["bad"][0]
    assert book.name_of(book.query("good")) == "good" and book.name_of("{ items { total } }") is None


def test_validation_errors_name_the_unknown_field_and_the_syntax_error():
    assert validation_errors(SCHEMA, "{ items(first: 2) { edges { node { id } } } }") == []
    assert "price" in validation_errors(SCHEMA, "{ items { edges { node { price } } } }")[0]
    assert validation_errors(SCHEMA, "{ items(")


def test_the_body_check_passes_data_and_refuses_errors_and_partial_data():
    check = graphql_body_check("example")
    assert check(RESPONSE, {"data": {"items": None}}, CONTEXT) is None
    assert isinstance(check(RESPONSE, {"errors": [{"message": "boom"}]}, CONTEXT), BadResponse)
    partial = check(RESPONSE, {"data": {"items": {"edges": []}}, "errors": [{"message": "timed out"}]}, CONTEXT)
    assert isinstance(partial, BadResponse) and "partial data is refused" in str(partial)
    assert isinstance(check(RESPONSE, {}, CONTEXT), BadResponse)
    assert isinstance(check(RESPONSE, [1, 2], CONTEXT), BadResponse)


def test_a_throttling_code_outranks_every_other_error():
    def classify(error, context):
        if error.get("code") == "SLOW_DOWN":
            return RateLimited("slow down", retry_after=2.0)
        if (error.get("extensions") or {}).get("code") == "DENIED":
            return ClientAccessError("denied")
        return None

    check = graphql_body_check("example", classify)
    body = {"data": {"x": 1}, "errors": [{"message": "a", "extensions": {"code": "DENIED"}},
                                         {"message": "b", "code": "SLOW_DOWN"}]}
    limited = check(RESPONSE, body, CONTEXT)
    assert isinstance(limited, RateLimited) and limited.retry_after == 2.0
    denied = check(RESPONSE, {"errors": [{"message": "a", "extensions": {"code": "DENIED"}}]}, CONTEXT)
    assert isinstance(denied, ClientAccessError)


def test_the_cursor_continues_from_the_last_edge_without_an_end_cursor():
    style = GraphQLCursor(2, "data.items")
    body = {"data": {"items": {"edges": [{"cursor": "7", "node": {"id": 7}}, {"cursor": "9", "node": {"id": 9}}],
                               "pageInfo": {"hasNextPage": True}}}}
    page = style.page(reply(body), None, "items")
    assert page.items == [{"id": 7}, {"id": 9}] and page.next == "9"
    assert style.params(page.next) == {"first": 2, "after": "9"}
    body["data"]["items"]["pageInfo"] = {"hasNextPage": True, "endCursor": "x9"}
    assert style.page(reply(body), None, "items").next == "x9"
    body["data"]["items"]["pageInfo"] = {"hasNextPage": False}
    assert style.page(reply(body), None, "items").next is None
    stuck = {"data": {"items": {"edges": [{"cursor": "9", "node": {"id": 9}}], "pageInfo": {"hasNextPage": True}}}}
    with pytest.raises(BadResponse):
        style.page(reply(stuck), "9", "items")


def test_execute_validates_and_runs_the_resolvers():
    class Root:
        def items(self, info, first=None, after=None):
            return {"edges": [{"cursor": "1", "node": {"id": 1, "name": "one"}}][:first],
                    "pageInfo": {"hasNextPage": False}}

    ok = execute_graphql(SCHEMA, {"query": "query($n: Int) { items(first: $n) { edges { node { name } } } }",
                                  "variables": {"n": 1}}, root_value=Root())
    assert ok == {"data": {"items": {"edges": [{"node": {"name": "one"}}]}}}
    invalid = execute_graphql(SCHEMA, {"query": "{ items { edges { node { price } } } }"}, root_value=Root())
    assert "data" not in invalid and "price" in invalid["errors"][0]["message"]
    assert execute_graphql(SCHEMA, {"variables": {}})["errors"]
