"""Checking Fiken sandbox responses against the vendor's spec (specs/fiken/fiken-openapi.yaml)."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import httpx
import yaml
from openapi_core import OpenAPI
from openapi_support import OpenAPIRequest, OpenAPIResponse

FIKEN_SPEC = Path(__file__).resolve().parents[2] / "specs" / "fiken" / "fiken-openapi.yaml"
SPEC_HOST = "https://api.fiken.no"  # the spec's server is https://api.fiken.no/api/v2
PAGING_HEADERS = ("Fiken-Api-Page", "Fiken-Api-Page-Size", "Fiken-Api-Page-Count", "Fiken-Api-Result-Count")


def _string_keys(value: Any) -> Any:
    """Mapping keys as strings, as JSON would have them: the YAML writes one response code as a
    bare integer (`201:` under inbox POST), which openapi-core's spec check cannot digest."""
    if isinstance(value, dict):
        return {str(k): _string_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_string_keys(v) for v in value]
    return value


@functools.cache
def fiken_spec() -> dict[str, Any]:
    return _string_keys(yaml.safe_load(FIKEN_SPEC.read_text(encoding="utf-8")))






class FikenContract:
    """Success: openapi-core validates request and response (the spec passes openapi-core's strict
    spec check once its keys are strings), then every key of the body must be a property the schema
    declares (the spec never forbids additional properties) and list answers carry every
    `Fiken-Api-*` header. Errors: Fiken documents no error body; ours is
    {"error", "error_description"} (an assumption of the sandbox) and nothing else."""

    def __init__(self) -> None:
        self.spec = fiken_spec()
        self.openapi = OpenAPI.from_dict(self.spec)

    def check(self, response: httpx.Response, template: str) -> Any:
        """Validate a 200 answer of the GET operation at `template` (path below /api/v2)."""
        assert response.status_code == 200, response.text
        request = OpenAPIRequest(response.request, SPEC_HOST)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # openapi-core cannot check the oauth2 scheme ("Unsupported scheme type")
            self.openapi.validate_request(request)
            self.openapi.validate_response(request, OpenAPIResponse(response))
        operation = self.spec["paths"][template]["get"]
        answer = operation["responses"]["200"]
        body = response.json()
        self.assert_declared_fields(answer["content"]["application/json"]["schema"], body, "$")
        for name in answer.get("headers", {}):
            assert response.headers.get(name, "").isdigit(), f"{template}: header {name} missing"
        return body

    @staticmethod
    def check_error(response: httpx.Response, status: int, reason: str | None = None) -> dict[str, Any]:
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        assert set(body) == {"error", "error_description"}, body
        assert isinstance(body["error"], str) and isinstance(body["error_description"], str)
        if reason is not None:
            assert body["error"] == reason, body
        return body

    def properties(self, schema: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the schema with $ref resolved, its declared properties with allOf merged)."""
        while "$ref" in schema:
            schema = self.spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
        declared = dict(schema.get("properties", {}))
        for part in schema.get("allOf", ()):
            declared.update(self.properties(part)[1])
        return schema, declared

    def assert_declared_fields(self, schema: dict[str, Any], value: Any, where: str) -> None:
        schema, declared = self.properties(schema)
        if isinstance(value, dict) and declared:
            undeclared = set(value) - set(declared)
            assert not undeclared, f"{where}: fields not in the spec: {sorted(undeclared)}"
            for key, item in value.items():
                self.assert_declared_fields(declared[key], item, f"{where}.{key}")
        elif isinstance(value, list) and "items" in schema:
            for i, item in enumerate(value):
                self.assert_declared_fields(schema["items"], item, f"{where}[{i}]")
