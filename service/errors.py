"""Domain errors, the one table that maps each to an HTTP status and error type, and the one function that makes
any exception a response (`error_for`: the app's exception handlers and every route's `MeteredRoute` call it).

Body of every error: ``{"error": {"type": ..., "message": ..., "param": ...}}``.
"""

from __future__ import annotations

import logging

import orjson
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

logger = logging.getLogger("logitserve.app")


class ServiceError(Exception):
    def __init__(self, message: str, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class InvalidInput(ServiceError):
    """The request is malformed or names something that does not exist."""


class UnsupportedOption(ServiceError):
    """A well-formed option that this server or this model does not support."""


class Unauthorized(ServiceError):
    pass


class NotFound(ServiceError):
    pass


class MethodNotAllowed(ServiceError):
    pass


class PayloadTooLarge(ServiceError):
    pass


class HostNotAllowed(ServiceError):
    """The Host header names a host outside --allowed-hosts (a DNS-rebinding page, or a misconfigured proxy)."""


class UnsupportedMediaType(ServiceError):
    """A body declared as something other than application/json (a browser's form or text/plain post)."""


class SlowRequest(ServiceError):
    """The client did not send its request within the read timeouts."""


class ResponseTooLarge(ServiceError):
    """The request's results alone exceed --max-result-bytes: refused before any forward runs."""


class QueueFull(ServiceError):
    pass


class NotReady(ServiceError):
    """Workers are loading, restarting, or the server is draining."""


class WorkerFailed(ServiceError):
    """A rank of the replica that held this request's batch died or hung."""


class OutOfMemory(WorkerFailed):
    """The device ran out of memory on this request even in a batch of its own (the rest of its batch was split
    off and answered). 503 rather than 413: it depends on the device's state, not on a documented limit."""


class RequestTimeout(ServiceError):
    pass


class InternalError(ServiceError):
    pass


class ClientDisconnected(Exception):
    """Not sent to anyone: the client is gone."""


ERROR_TABLE: dict[type[ServiceError], tuple[int, str]] = {
    UnsupportedOption: (400, "unsupported_option"),
    HostNotAllowed: (400, "host_not_allowed"),
    Unauthorized: (401, "authentication_error"),
    NotFound: (404, "not_found"),
    MethodNotAllowed: (405, "method_not_allowed"),
    SlowRequest: (408, "request_timeout"),
    PayloadTooLarge: (413, "payload_too_large"),
    UnsupportedMediaType: (415, "unsupported_media_type"),
    InvalidInput: (422, "invalid_request_error"),
    ResponseTooLarge: (422, "response_too_large"),
    QueueFull: (429, "queue_full"),
    InternalError: (500, "internal_error"),
    NotReady: (503, "not_ready"),
    WorkerFailed: (503, "worker_failed"),
    OutOfMemory: (503, "out_of_memory"),
    RequestTimeout: (504, "timeout"),
}

DEFAULT_RETRY_AFTER = {429: 1, 503: 2}


def status_of(exc: ServiceError) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return 500, "internal_error"


def error_response(exc: ServiceError) -> Response:
    status, kind = status_of(exc)
    body = orjson.dumps({"error": {"type": kind, "message": exc.message, "param": exc.param}})
    headers = {}
    retry = exc.retry_after if exc.retry_after is not None else DEFAULT_RETRY_AFTER.get(status)
    if retry is not None:
        headers["Retry-After"] = str(max(1, int(round(retry))))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 408:  # the rest of a slow request is not waited for
        headers["Connection"] = "close"
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_for(request: Request, exc: Exception) -> Response:
    """The response to an exception raised while answering `request`, wherever it was raised (a dependency, a
    route, the router: no route, wrong method): the contract's error body; 499 (never sent) when the client is
    gone; anything else is a bug, logged and answered 500."""
    if isinstance(exc, ServiceError):
        return error_response(exc)
    if isinstance(exc, ClientDisconnected):
        logger.info("%s %s: the client went away (499)", request.method, request.url.path)
        return Response(status_code=499)
    if isinstance(exc, RequestValidationError):
        message, param = format_validation_errors(list(exc.errors()))
        return error_response(InvalidInput(message, param=param))
    if isinstance(exc, HTTPException):
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.url.path}"))
        if exc.status_code == 405:
            return error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}"))
        body = orjson.dumps({"error": {"type": "http_error", "message": str(exc.detail), "param": None}})
        return Response(body, status_code=exc.status_code, media_type="application/json", headers=exc.headers)
    logger.error("request failed: %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(InternalError(f"{type(exc).__name__}: {exc}"))


def format_validation_errors(errors: list[dict]) -> tuple[str, str | None]:
    """Message and param for pydantic errors; locations such as input_ids[2][5] name the sequence index."""
    parts = []
    param = None
    for err in errors[:5]:
        loc = [x for x in err.get("loc", ()) if x not in ("body",)]
        # pydantic's union branches add type names such as 'list[str]' or 'str' to the location
        loc = [x for x in loc if not (isinstance(x, str) and ("[" in x or x in ("str", "int", "list", "function-after")))]
        where = ""
        for x in loc:
            where += f"[{x}]" if isinstance(x, int) else (f".{x}" if where else str(x))
        if param is None and loc:
            param = str(loc[0])
        if len(loc) >= 2 and isinstance(loc[1], int) and loc[0] in ("input_ids", "inputs"):
            where += f" (sequence {loc[1]})"
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", "invalid"))
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more errors")
    return "; ".join(parts), param
