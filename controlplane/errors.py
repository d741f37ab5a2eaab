"""The control plane's exception tree and the one middleware that answers it.

Every handler raises an :class:`ApiError` leaf carrying what the answer needs;
:func:`error_middleware` turns it, aiohttp's own HTTP errors and anything
unexpected into the one error shape ``{"error", "message", "details"}``.
:func:`malformed_request_response` does the same for HTTP that could not be
parsed, and so never reached a handler.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from gateway.log import controlplane_log
from gateway.store import StoreConflict, StoreUnavailable

__all__ = [
    "ApiError",
    "BodyTooLarge",
    "Conflict",
    "InvalidJson",
    "NotFound",
    "Unauthorized",
    "Unavailable",
    "ValidationFailed",
    "error_middleware",
    "error_response",
    "malformed_request_response",
]

_encoder = msgspec.json.Encoder()


class ApiError(Exception):
    """Root of every error the API answers on purpose."""

    status = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        details: Mapping[str, object] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = dict(details) if details is not None else None
        self.headers = dict(headers or {})


class InvalidJson(ApiError):
    """The request body is not a JSON document."""

    status = 400
    code = "invalid_json"


class Unauthorized(ApiError):
    """No admin token, or not the right one."""

    status = 401
    code = "unauthorized"

    def __init__(self) -> None:
        super().__init__(
            "A valid admin token is required",
            headers={"WWW-Authenticate": 'Bearer realm="agent-gateway-admin"'},
        )


class NotFound(ApiError):
    """A named resource that does not exist."""

    status = 404
    code = "not_found"

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(
            f"{kind} {name!r} does not exist", {"kind": kind, "name": name}
        )
        self.kind = kind
        self.name = name


class Conflict(ApiError):
    """The request contradicts the current state; ``code`` says which rule."""

    status = 409

    def __init__(
        self, code: str, message: str, details: Mapping[str, object] | None = None
    ) -> None:
        super().__init__(message, details)
        self.code = code


class BodyTooLarge(ApiError):
    """The request body is larger than the API accepts."""

    status = 413
    code = "body_too_large"


class ValidationFailed(ApiError):
    """A body field, path or query parameter that breaks the schema or a rule.

    ``field`` is a JSON path such as ``$.endpoint_auth.oauth.audiences[0]`` for
    the body, or the parameter's name for the path and the query.
    """

    status = 422
    code = "validation_error"

    def __init__(
        self, field: str, reason: str, location: str = "body", **extra: object
    ) -> None:
        super().__init__(
            f"{field}: {reason}", {"field": field, "in": location, **extra}
        )
        self.field = field
        self.reason = reason


class Unavailable(ApiError):
    """The store cannot be reached right now."""

    status = 503
    code = "store_unavailable"


def error_response(
    status: int,
    code: str,
    message: str,
    details: object = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {"error": code, "message": message, "details": details}
    return web.Response(
        status=status,
        body=_encoder.encode(body),
        content_type="application/json",
        headers=headers,
    )


def _from_api_error(error: ApiError) -> web.Response:
    return error_response(
        error.status, error.code, error.message, error.details, error.headers
    )


_HTTP_CODES: Mapping[int, tuple[str, str]] = {
    404: ("not_found", "No such route"),
    405: ("method_not_allowed", "Method not allowed on this route"),
    413: ("body_too_large", "The request body is too large"),
}


def _from_http_exception(error: web.HTTPException) -> web.Response:
    """aiohttp's own answers (no route, wrong method) in our error shape."""
    code, message = _HTTP_CODES.get(error.status, ("http_error", error.reason))
    headers = {}
    if isinstance(error, web.HTTPMethodNotAllowed):
        headers["Allow"] = ", ".join(sorted(error.allowed_methods))
        return error_response(405, code, message, _allowed(error), headers)
    return error_response(error.status, code, message)


def _allowed(error: web.HTTPMethodNotAllowed) -> dict[str, Sequence[str]]:
    return {"allowed_methods": sorted(error.allowed_methods)}


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Answer every failure in the one error shape; never leak a traceback."""
    try:
        response: web.StreamResponse = await handler(request)
    except ApiError as error:
        return _from_api_error(error)
    except StoreConflict as error:
        return _from_api_error(
            Conflict(
                "concurrent_change", "Another change won; retry", {"key": error.key}
            )
        )
    except StoreUnavailable as error:
        # The cause names the store's host or directory, never a password.
        controlplane_log.warning("store unavailable during %s: %s", request.path, error)
        return _from_api_error(Unavailable("The store cannot be reached; retry"))
    except web.HTTPException as error:
        return _from_http_exception(error)
    except Exception:
        controlplane_log.exception(
            "unexpected error in %s %s", request.method, request.path
        )
        return error_response(500, "internal_error", "Internal error")
    return response


def malformed_request_response(error: BaseException | None) -> web.Response | None:
    """The answer to HTTP that aiohttp could not parse; None for other errors.

    aiohttp's own answer quotes the start of the offending line (an
    ``Authorization`` header, say) and logs it with a traceback; this one
    says only what kind of request it was, and nothing is logged.
    """
    if isinstance(error, LineTooLong):
        response = error_response(
            431,
            "header_too_large",
            "A request header line is longer than the API accepts",
        )
    elif isinstance(error, HttpProcessingError):
        response = error_response(400, "bad_request", "Malformed HTTP request")
    else:
        return None

    response.force_close()
    return response
