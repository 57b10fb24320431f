"""/openapi.json, generated from the pydantic models in `protocol` (one source of truth)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from proxy import protocol as p

ERROR_STATUSES = {
    "400": "Invalid request (the `param` names the field)",
    "404": "Unknown model or route",
    "413": "Body too large",
    "429": "Queue full (`rate_limit_exceeded`) or budget exhausted (`budget_exceeded`); see Retry-After",
    "500": "Server error (no details leak)",
    "503": "Overloaded, loading or shutting down",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _errors() -> dict[str, Any]:
    return {
        code: {"description": text, "content": {"application/json": {"schema": _ref(p.ErrorEnvelope)}}}
        for code, text in ERROR_STATUSES.items()
    }


def _post(summary: str, body: type[BaseModel], answer: type[BaseModel], stream: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": _ref(answer)}}
    if stream:
        content["text/event-stream"] = {
            "schema": {
                "type": "string",
                "description": "`data: <chunk JSON>` events, ending with `data: [DONE]`",
            }
        }
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(body)}}},
            "responses": {"200": {"description": "OK", "content": content}, **_errors()},
        }
    }


def _get(summary: str, answer: type[BaseModel] | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "OK"}
    if answer is not None:
        ok["content"] = {"application/json": {"schema": _ref(answer)}}
    return {"get": {"summary": summary, "responses": {"200": ok, **(extra or {})}}}


def openapi_document() -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        p.ChatCompletionRequest,
        p.ChatCompletion,
        p.ChatCompletionChunk,
        p.CompletionRequest,
        p.Completion,
        p.ImageGenerationRequest,
        p.ImagesResponse,
        p.ModelList,
        p.ModelCard,
        p.ErrorEnvelope,
        p.EnergyUsage,
    ]
    _, schema = models_json_schema(
        [(m, "validation" if m.__name__.endswith("Request") else "serialization") for m in models],
        ref_template="#/components/schemas/{model}",
    )
    paths = {
        "/v1/chat/completions": _post(
            "Chat completion (SSE when stream)", p.ChatCompletionRequest, p.ChatCompletion, True
        ),
        "/v1/completions": _post(
            "Text completion (SSE when stream)", p.CompletionRequest, p.Completion, True
        ),
        "/v1/images/generations": _post(
            "Image generation (b64_json PNG)", p.ImageGenerationRequest, p.ImagesResponse, False
        ),
        "/v1/models": _get("Served models, each with its task", p.ModelList),
        "/v1/models/{model}": {
            "get": {
                **_get("One served model", p.ModelCard, {"404": _errors()["404"]})["get"],
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
            }
        },
        "/healthz": _get("Liveness", None),
        "/readyz": _get("Readiness: 200 once every model is loaded, 503 while loading or draining", None),
        "/metrics": _get("Prometheus metrics (text format; OpenMetrics with exemplars on request)", None),
        "/openapi.json": _get("This document", None),
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
        "components": {"schemas": schema.get("$defs", {})},
    }
