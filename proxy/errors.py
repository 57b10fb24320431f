"""The error hierarchy and the one middleware that renders every error in the OpenAI envelope:
{"error": {"message", "type", "param", "code"}}. No stack trace ever reaches a client."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error a client should see. Subclasses fix the status and type."""

    status = 500
    type = "server_error"
    code: str | None = None
    # Set where the request was already recorded, with its own status ("error"), in the ledger and in
    # wattproxy_requests_total (a model or upstream failure after the work ran): not counted again.
    recorded = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else type(self).code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(ApiError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(ApiError):
    status = 403
    type = "permission_error"


class NotFound(ApiError):
    status = 404
    type = "not_found_error"


class RequestTimeout(ApiError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class BudgetExceeded(ApiError):
    status = 429
    type = "budget_exceeded"
    code = "budget_exceeded"


class Overloaded(ApiError):
    status = 503
    type = "overloaded"
    code = "overloaded"


class BadGateway(ApiError):
    """Proxy mode: the upstream server could not be reached or answered nonsense."""

    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


class GatewayTimeout(ApiError):
    """Proxy mode: the upstream server did not answer in time."""

    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class ServerError(ApiError):
    status = 500
    type = "server_error"


def error_response(err: ApiError, request_id: str | None = None) -> web.Response:
    headers = {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    if request_id:
        headers["X-Request-Id"] = request_id
    return web.json_response(err.body(), status=err.status, headers=headers)


# pydantic puts the union member it tried into `loc` (e.g. stop.str, content.list[TextPart]): not a field
_UNION_TAG = re.compile(r"str|int|float|bool|none|constrained-\w+|[a-z-]+\[.*\]|[A-Z]\w*|function-.*")


def _field(err: Any) -> list[str]:
    """An error's location without the union members pydantic names in it."""
    return [str(p) for p in err.get("loc", ()) if not _UNION_TAG.fullmatch(str(p))]


def from_validation_error(e: ValidationError) -> InvalidRequest:
    """The first pydantic error, with the offending field as `param` (dotted path). Where the field is
    a union (`stop`: a string or a list of them), the error of the member the value has the type of
    (five stop strings: "at most 4 items", not "should be a valid string")."""
    errors = e.errors()
    err = errors[0]
    loc = _field(err)
    if err.get("type", "").endswith("_type"):
        err = next(
            (
                x
                for x in errors[1:]
                if _field(x)[: len(loc)] == loc and not x.get("type", "").endswith("_type")
            ),
            err,
        )
        loc = _field(err)
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    cause = (err.get("ctx") or {}).get("error")
    if err.get("type") == "value_error" and isinstance(cause, ValueError):
        msg = str(cause)  # a validator's own words, without pydantic's "Value error, " before them
    if err.get("type") == "missing":
        msg = f"'{param}' is a required property"
    elif param:
        msg = f"Invalid value for '{param}': {msg}"
    return InvalidRequest(
        msg, param=param, code="invalid_value" if err.get("type") != "missing" else "missing"
    )


_HTTP_ERRORS: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: NotFound,
    405: InvalidRequest,
    408: RequestTimeout,
    413: PayloadTooLarge,
    429: RateLimited,
    503: Overloaded,
}


# A server-sent-events answer once its headers are out (set by the handler that starts it): an error
# after that can only end it with an error event, not replace it with an error response.
STREAM = web.RequestKey("stream", web.StreamResponse)


def sse_frame(data: bytes) -> bytes:
    """One server-sent event carrying `data` (a line of its own per line of data)."""
    if b"\n" in data:
        data = data.replace(b"\n", b"\ndata: ")
    return b"data: " + data + b"\n\n"


async def _end_stream(stream: web.StreamResponse, err: ApiError) -> web.StreamResponse:
    """End a started stream with `err` as an error event and [DONE] (what the stream paths send on a
    failure), so that the client gets a well-formed answer that says it failed."""
    with contextlib.suppress(ConnectionResetError):
        await stream.write(sse_frame(json.dumps(err.body()).encode()) + sse_frame(b"[DONE]"))
    return stream


def error_middleware(
    request_id_of: Callable[[web.Request], str | None], max_body_bytes: int
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware factory: ApiError, aiohttp HTTP errors, bad JSON and anything unexpected -> envelope
    (an error event where a stream has started)."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            stream = request.get(STREAM)
            if stream is not None and stream.prepared:
                return await _end_stream(stream, e)
            return error_response(e, request_id_of(request))
        except ValidationError as e:
            return error_response(from_validation_error(e), request_id_of(request))
        except json.JSONDecodeError as e:
            err = InvalidRequest(
                f"request body is not valid JSON: {e.msg} at position {e.pos}", code="invalid_json"
            )
            return error_response(err, request_id_of(request))
        except web.HTTPException as e:
            if e.status < 400:
                raise
            cls = _HTTP_ERRORS.get(e.status, ServerError if e.status >= 500 else InvalidRequest)
            message = e.reason
            if e.status == 413:
                message = f"request body too large (limit {max_body_bytes} bytes)"
            elif e.status == 404:
                message = f"no route for {request.method} {request.path}"
            elif e.status == 405:
                message = f"method {request.method} is not allowed on {request.path}"
            err = cls(message)
            resp = error_response(err, request_id_of(request))
            resp.set_status(e.status)
            for name in ("Allow",):
                if name in e.headers:
                    resp.headers[name] = e.headers[name]
            return resp
        except Exception:
            rid = request_id_of(request)
            # the path as a repr: a client's %0A must not start a line of its own in the log
            log.exception("unhandled error in %s %r (request %s)", request.method, request.path, rid)
            err = ServerError(f"internal server error (request id {rid})")
            stream = request.get(STREAM)
            if stream is not None and stream.prepared:
                return await _end_stream(stream, err)
            return error_response(err, rid)

    return middleware
