"""The connector kit, written once for every ERP: HTTP client and retries (`client`), auth
providers (`auth`), paging (`paging`), rate limiting (`throttle`), concurrency (`tasks`) and
GraphQL queries, schemas and error bodies (`graphql`).
Plain Python; no Dagster."""

from erp_pipelines.erps.kit.auth import (
    ClientCredentials,
    MintedToken,
    OAuthApp,
    RefreshingToken,
    StaticToken,
    Token,
    TokenAuth,
    refused_by_token_endpoint,
)
from erp_pipelines.erps.kit.client import (
    ApiClient,
    HttpStats,
    Reply,
    RequestContext,
    RetryPolicy,
    decode_json,
)
from erp_pipelines.erps.kit.graphql import (
    GraphQLCursor,
    Query,
    QueryBook,
    data_of,
    error_code,
    execute_graphql,
    graphql_body_check,
    page_fetcher,
    post_query,
    validation_errors,
)
from erp_pipelines.erps.kit.paging import Cursor, Offset, Page, PageNumber, PagingStyle, read_all
from erp_pipelines.erps.kit.tasks import gather_all
from erp_pipelines.erps.kit.throttle import RateLimit, RateLimitHeaders, Throttle

__all__ = [
    "ApiClient", "ClientCredentials", "Cursor", "GraphQLCursor", "HttpStats", "MintedToken", "OAuthApp", "Offset",
    "Page", "PageNumber", "PagingStyle", "Query", "QueryBook", "RateLimit", "RateLimitHeaders", "RefreshingToken",
    "Reply", "RequestContext", "RetryPolicy",
    "StaticToken", "Throttle", "Token", "TokenAuth", "data_of", "decode_json", "error_code", "execute_graphql",
    "gather_all", "graphql_body_check", "page_fetcher", "post_query", "read_all",
    "refused_by_token_endpoint", "validation_errors",
]
