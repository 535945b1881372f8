"""Fixtures for the sandbox tests: the Tripletex spec (loaded once), a sandbox, clients and validators."""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_support import SyncASGITransport
from openapi_core import Config, OpenAPI
from openapi_schema_validator import OAS30Validator
from openapi_support import OpenAPIRequest, OpenAPIResponse

from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.tripletex import (
    DEFAULT_ACCOUNTANT_EMPLOYEE_TOKEN,
    DEFAULT_CONSUMER_TOKEN,
    TripletexSandbox,
)

TRIPLETEX_SPEC = Path(__file__).resolve().parents[2] / "specs" / "tripletex" / "tripletex-openapi.json"
SPEC_HOST = "https://tripletex.no"  # the spec's server is https://tripletex.no/v2
TODAY = dt.date(2026, 4, 15)
LAST_MONTH = dt.date(2026, 3, 1)
COMPANY_KEY = "sandbox-company-key-80001"  # a single company's own employee token
COMPANY_KEY_CLIENT = 80_001


# ---------------------------------------------------------------------------------------- spec


@pytest.fixture(scope="session")
def tripletex_spec() -> dict[str, Any]:
    return json.loads(TRIPLETEX_SPEC.read_text())


def with_typed_parameter_defaults(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy whose integer/number/boolean parameter defaults are typed ("0" -> 0). The spec writes
    them as strings, and openapi-core applies defaults of omitted parameters, so every request
    without `from`/`count` would otherwise fail request validation."""
    spec = copy.deepcopy(spec)
    casts = {"integer": int, "number": float, "boolean": lambda text: text == "true"}
    for operations in spec["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []) if isinstance(operation, dict) else []:
                schema = parameter.get("schema", {})
                if isinstance(schema.get("default"), str) and schema.get("type") in casts:
                    schema["default"] = casts[schema["type"]](schema["default"])
    return spec


@pytest.fixture(scope="session")
def tripletex_openapi(tripletex_spec) -> OpenAPI:
    # The spec fails openapi-core's strict spec check (string defaults on integer params).
    return OpenAPI.from_dict(with_typed_parameter_defaults(tripletex_spec), config=Config(spec_validator_cls=None))






class TripletexContract:
    """Checks responses against tripletex-openapi.json.

    Success: openapi-core validates request and response, then every key of the body must be a
    property the schema declares (the spec never sets additionalProperties, so openapi-core alone
    would accept misspelt fields). Errors: the body must match the `ApiError` schema; the spec
    declares no error responses per operation."""

    def __init__(self, spec: dict[str, Any], openapi: OpenAPI) -> None:
        self.spec = spec
        self.openapi = openapi
        api_error = copy.deepcopy(spec["components"]["schemas"]["ApiError"])
        api_error["properties"]["validationMessages"]["items"] = spec["components"]["schemas"]["ApiValidationMessage"]
        # Real Tripletex sends "validationMessages": null when there is nothing to list (NOTES §2.3).
        api_error["properties"]["validationMessages"]["nullable"] = True
        api_error["required"] = ["status", "code", "message", "requestId"]
        self.api_error = OAS30Validator(api_error)

    def check(self, response: httpx.Response, template: str, status: int | None = None) -> Any:
        """Validate a success response of the operation at `template` (path below /v2)."""
        method = response.request.method.lower()
        operation = self.spec["paths"][template][method]
        expected = status or int(next(iter(operation["responses"])))
        assert response.status_code == expected, response.text
        assert response.headers.get("x-tlx-request-id")
        request = OpenAPIRequest(response.request, SPEC_HOST)
        self.openapi.validate_request(request)
        self.openapi.validate_response(request, OpenAPIResponse(response))
        schema = operation["responses"][str(expected)]["content"]["application/json"]["schema"]
        body = response.json()
        self.assert_declared_fields(schema, body, "$")
        return body

    def check_error(self, response: httpx.Response, status: int, code: int | None = None) -> dict[str, Any]:
        assert response.status_code == status, response.text
        body = response.json()
        errors = sorted(str(e.message) for e in self.api_error.iter_errors(body))
        assert not errors, errors
        self.assert_declared_fields({"$ref": "#/components/schemas/ApiError"}, body, "$")
        assert body["status"] == status
        if code is not None:
            assert body["code"] == code, body
        assert body["requestId"] == response.headers["x-tlx-request-id"]
        return body

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            schema = self.spec["components"]["schemas"][name]
        return schema

    def assert_declared_fields(self, schema: dict[str, Any], value: Any, where: str) -> None:
        schema = self.resolve(schema)
        if isinstance(value, dict) and "properties" in schema:
            undeclared = set(value) - set(schema["properties"])
            assert not undeclared, f"{where}: fields not in the spec: {sorted(undeclared)}"
            for key, item in value.items():
                self.assert_declared_fields(schema["properties"][key], item, f"{where}.{key}")
        elif isinstance(value, list) and "items" in schema:
            for i, item in enumerate(value):
                self.assert_declared_fields(schema["items"], item, f"{where}[{i}]")


@pytest.fixture(scope="session")
def contract(tripletex_spec, tripletex_openapi) -> TripletexContract:
    return TripletexContract(tripletex_spec, tripletex_openapi)


# ---------------------------------------------------------------------------------------- sandbox


@pytest.fixture
def ledger():
    # 5 valid tenants (index 3 is a sole proprietorship) + 4 rejected fixtures = 9 clients
    return generate_ledger(5, last_month=LAST_MONTH)


@pytest.fixture
def sandbox(ledger) -> TripletexSandbox:
    return TripletexSandbox(ledger, today=TODAY, company_tokens={COMPANY_KEY: COMPANY_KEY_CLIENT})


class TripletexTestClient:
    """A sync httpx.Client over the ASGI app that logs in on first use."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http
        self.tokens: dict[str, str] = {}

    def login(self, employee_token: str = DEFAULT_ACCOUNTANT_EMPLOYEE_TOKEN,
              expiration: dt.date = TODAY + dt.timedelta(days=7)) -> str:
        response = self.http.post("/token/session/:create", json={
            "consumerToken": DEFAULT_CONSUMER_TOKEN,
            "employeeToken": employee_token,
            "expirationDate": expiration.isoformat(),
        })
        assert response.status_code == 201, response.text
        self.tokens[employee_token] = response.json()["value"]["token"]
        return self.tokens[employee_token]

    def get(self, path: str, user: int | str = 0, *, employee_token: str = DEFAULT_ACCOUNTANT_EMPLOYEE_TOKEN,
            **params: Any) -> httpx.Response:
        token = self.tokens.get(employee_token) or self.login(employee_token)
        return self.http.get(path, params=params, auth=(str(user), token))


@pytest.fixture
def company_key() -> tuple[str, int]:
    """(employee token, client id) of the company key the `sandbox` fixture accepts."""
    return COMPANY_KEY, COMPANY_KEY_CLIENT


@pytest.fixture
def api(sandbox):
    with httpx.Client(transport=SyncASGITransport(sandbox.app), base_url="http://tripletex.test/v2") as http:
        yield TripletexTestClient(http)


@pytest.fixture
def admin(sandbox):
    """A client for the admin routes (/_sandbox/...)."""
    with httpx.Client(transport=SyncASGITransport(sandbox.app), base_url="http://tripletex.test/_sandbox") as http:
        yield http
