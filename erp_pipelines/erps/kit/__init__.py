"""The connector kit, written once for every ERP: HTTP client and retries (`client`), auth
providers (`auth`), paging (`paging`), rate limiting (`throttle`) and concurrency (`tasks`).
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
from erp_pipelines.erps.kit.paging import Cursor, Offset, Page, PageNumber, PagingStyle, read_all
from erp_pipelines.erps.kit.tasks import gather_all
from erp_pipelines.erps.kit.throttle import RateLimit, RateLimitHeaders, Throttle

__all__ = [
    "ApiClient", "ClientCredentials", "Cursor", "HttpStats", "MintedToken", "OAuthApp", "Offset", "Page", "PageNumber",
    "PagingStyle", "RateLimit", "RateLimitHeaders", "RefreshingToken", "Reply", "RequestContext", "RetryPolicy",
    "StaticToken", "Throttle", "Token", "TokenAuth", "decode_json", "gather_all", "read_all",
    "refused_by_token_endpoint",
]
