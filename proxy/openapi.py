"""/openapi.json, generated from the pydantic models in `protocol` (one source of truth)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from proxy import protocol as p
from proxy.usage import BASIC_DATE, UNIX_SECONDS

ERROR_STATUSES = {
    "400": "Invalid request (the `param` names the field)",
    "401": "Missing, unknown or revoked API key",
    "403": "The key's role does not allow this",
    "404": "Unknown model, key or route",
    "408": "The request body did not arrive in time",
    "413": "Body too large",
    "429": "Queue full (`rate_limit_exceeded`) or budget exhausted (`budget_exceeded`); see Retry-After",
    "500": "Server error (no details leak)",
    "503": "Overloaded, loading or shutting down",
}
BEARER = [{"bearer": []}]
TIME = {
    "anyOf": [
        {"type": "string", "format": "date-time"},
        {"type": "string", "format": "date"},
        {"type": "string", "pattern": f"^{BASIC_DATE}$", "description": "ISO 8601 basic date (20261128)"},
        {"type": "string", "pattern": f"^{UNIX_SECONDS}$", "description": "Unix seconds (not 8 digits)"},
        {"const": ""},
    ]
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _errors(*codes: str) -> dict[str, Any]:
    return {
        code: {
            "description": ERROR_STATUSES[code],
            "content": {"application/json": {"schema": _ref(p.ErrorEnvelope)}},
        }
        for code in codes
    }


def _json(model: type[BaseModel], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _sse(chunk: type[BaseModel]) -> dict[str, Any]:
    """Each event of a stream: `data: <chunk JSON>` (or an error envelope), the last `data: [DONE]`."""
    return {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "anyOf": [
                        {"const": "[DONE]"},
                        {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": {"anyOf": [_ref(chunk), _ref(p.ErrorEnvelope)]},
                        },
                    ]
                }
            },
        }
    }


GENERATION_ERRORS = ("400", "401", "404", "408", "413", "429", "500", "503")


def _generate(
    summary: str, body: type[BaseModel], answer: type[BaseModel], chunk: type[BaseModel] | None
) -> dict[str, Any]:
    ok = _json(answer)
    if chunk is not None:
        ok["content"]["text/event-stream"] = _sse(chunk)
    return {
        "post": {
            "summary": summary,
            "security": BEARER,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(body)}}},
            "responses": {"200": ok, **_errors(*GENERATION_ERRORS)},
        }
    }


def _public(summary: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "security": [],
            "responses": {"200": {"description": "OK"}, **(extra or {})},
        }
    }


def _query(name: str, schema: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    query = {"name": name, "in": "query", "required": False, "schema": schema}
    return query if description is None else {**query, "description": description}


def openapi_document() -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        p.ChatCompletionRequest,
        p.ChatCompletion,
        p.ChatCompletionChunk,
        p.CompletionRequest,
        p.Completion,
        p.ImageGenerationRequest,
        p.ImagesResponse,
        p.EmbeddingRequest,
        p.EmbeddingList,
        p.ModelList,
        p.ModelCard,
        p.ErrorEnvelope,
        p.EnergyUsage,
        p.KeyCreate,
        p.ApiKey,
        p.ApiKeyList,
        p.KeyRevoked,
        p.UsageReport,
        p.Readiness,
    ]
    _, schema = models_json_schema(
        [
            (m, "validation" if m.__name__.endswith(("Request", "Create")) else "serialization")
            for m in models
        ],
        ref_template="#/components/schemas/{model}",
    )
    paths = {
        "/v1/chat/completions": _generate(
            "Chat completion (SSE when stream)",
            p.ChatCompletionRequest,
            p.ChatCompletion,
            p.ChatCompletionChunk,
        ),
        "/v1/completions": _generate(
            "Text completion (SSE when stream)", p.CompletionRequest, p.Completion, p.Completion
        ),
        "/v1/images/generations": _generate(
            "Image generation (b64_json PNG)", p.ImageGenerationRequest, p.ImagesResponse, None
        ),
        "/v1/embeddings": _generate(
            "Embeddings (proxy mode: forwarded to the upstream; a model served in process makes none)",
            p.EmbeddingRequest,
            p.EmbeddingList,
            None,
        ),
        "/v1/models": {
            "get": {
                "summary": "Served models, each with its task",
                "security": BEARER,
                "responses": {"200": _json(p.ModelList), **_errors("401", "503")},
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "One served model",
                "security": BEARER,
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": _json(p.ModelCard), **_errors("401", "404", "503")},
            }
        },
        "/v1/usage": {
            "get": {
                "summary": "Energy and CO2e: own usage (admins: anyone's), JSON or CSV",
                "security": BEARER,
                "parameters": [
                    _query("user", {"type": "string"}),
                    _query(
                        "start", TIME, "The report covers [start, end): from start on (UTC where no zone)."
                    ),
                    _query("end", TIME, "Up to, not including, end; it must be after start (else 400)."),
                    _query("group_by", {"type": "string", "enum": ["", "model", "task", "day", "user"]}),
                    _query("format", {"type": "string", "enum": ["json", "csv"]}),
                ],
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {
                            "application/json": {"schema": _ref(p.UsageReport)},
                            "text/csv": {"schema": {"type": "string"}},
                        },
                    },
                    **_errors("400", "401", "403", "503"),
                },
            }
        },
        "/v1/keys": {
            "get": {
                "summary": "API keys (admins; never the secrets)",
                "security": BEARER,
                "responses": {"200": _json(p.ApiKeyList), **_errors("401", "403", "503")},
            },
            "post": {
                "summary": "Create a key (admins); the secret is in this answer only",
                "security": BEARER,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(p.KeyCreate)}},
                },
                "responses": {"201": _json(p.ApiKey, "Created"), **_errors("400", "401", "403", "503")},
            },
        },
        "/v1/keys/{key_id}": {
            "delete": {
                "summary": "Revoke a key (admins)",
                "security": BEARER,
                "parameters": [
                    {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": _json(p.KeyRevoked), **_errors("401", "403", "404", "503")},
            }
        },
        "/healthz": _public("Liveness"),
        "/readyz": _public(
            "Readiness: 200 once every model is loaded, 503 while loading, draining or (proxy mode) while "
            "the upstream cannot be reached",
            {"503": _json(p.Readiness, "Loading, failed, draining or the upstream unreachable")},
        ),
        "/metrics": _public("Prometheus metrics (text format; OpenMetrics with exemplars on request)"),
        "/openapi.json": _public("This document"),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "WattProxy",
            "version": "0.1.0",
            "description": "OpenAI-compatible generation API; every usage object carries `energy` "
            "(kWh, J, gCO2e, measurement label, device, uncertainty, carbon intensity, PUE).",
        },
        "paths": paths,
        "components": {
            "schemas": schema.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": BEARER,
    }
