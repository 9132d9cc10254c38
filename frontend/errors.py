"""One error type and the handlers that give every failure OpenAI's envelope.

Every response that is not a success, on every route (unknown routes, wrong methods,
malformed bodies, internal faults), has the body
`{"error": {"message", "type", "param", "code"}}`. Tracebacks go to the log, never to the client.
"""

from __future__ import annotations

import logging
import re

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, InternalServerException

from frontend.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_ERROR_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "NotFoundError",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


def error_type_for_status(status: int) -> str:
    if status in _ERROR_TYPE_BY_STATUS:
        return _ERROR_TYPE_BY_STATUS[status]
    return "invalid_request_error" if status < 500 else "server_error"


class OpenAIError(Exception):
    """A failure to report to the client as `{"error": {...}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type_for_status(status)
        self.param = param
        self.code = code
        self.headers = headers  # e.g. Retry-After on a 503

    def to_response_body(self) -> ErrorResponse:
        return ErrorResponse(ErrorInfo(self.message, self.type, self.param, self.code))


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
    )


def engine_unavailable(message: str, code: str, *, retry_after_s: int | None = None) -> OpenAIError:
    headers = None if retry_after_s is None else {"Retry-After": str(retry_after_s)}
    return OpenAIError(503, message, code=code, headers=headers)


def internal_error() -> OpenAIError:
    return OpenAIError(500, "The server had an error while processing the request.")


def client_closed_request() -> OpenAIError:
    """The client went away before its response: nginx's 499, never a server error."""
    return OpenAIError(499, "The client closed the request.", type="client_closed_request")


_MSGSPEC_PATH = re.compile(r" - at `\$\.?(.*)`$")
_MSGSPEC_MISSING = re.compile(r"^Object missing required field `([^`]*)`")


def from_decode_error(exc: msgspec.ValidationError | msgspec.DecodeError) -> OpenAIError:
    """A 400 for a body msgspec could not decode, naming the offending field when known.

    msgspec's messages look like "Expected `int`, got `str` - at `$.n`".
    """
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return bad_request(f"The request body is not valid JSON: {text}")
    match = _MSGSPEC_PATH.search(text)
    param = match.group(1).replace("[...]", "") if match else ""  # "[...]": some value of a map
    missing = _MSGSPEC_MISSING.match(text)
    if missing:  # "Object missing required field `prompt` - at `$.x`" names the field itself
        param = f"{param}.{missing.group(1)}" if param else missing.group(1)
    return bad_request(f"Invalid request: {text}", param=param or None)


def too_deeply_nested() -> OpenAIError:
    return bad_request("The request body is nested too deeply.")


def decode_body(body: bytes, type: type) -> object:
    try:
        return msgspec.json.decode(body, type=type)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_decode_error(exc) from None
    except RecursionError:  # msgspec's decoder gives up at about 1,000 levels
        raise too_deeply_nested() from None


def error_response(exc: OpenAIError) -> Response[ErrorResponse]:
    return Response(exc.to_response_body(), status_code=exc.status, headers=exc.headers)


def error_event(exc: OpenAIError) -> bytes:
    """An error inside a stream that already sent its 200 status."""
    return b"data: " + msgspec.json.encode(exc.to_response_body()) + b"\n\n"


def _handle_openai_error(_: Request, exc: OpenAIError) -> Response[ErrorResponse]:
    return error_response(exc)


# What Litestar's `Request.stream()` raises (as a 500) when the client disconnects while it
# is still sending the body.
_CLIENT_DISCONNECTED_DETAIL = "client disconnected prematurely"


def _is_client_disconnect(exc: HTTPException) -> bool:
    return isinstance(exc, InternalServerException) and exc.detail == _CLIENT_DISCONNECTED_DETAIL


def _handle_http_exception(request: Request, exc: HTTPException) -> Response[ErrorResponse]:
    status = exc.status_code
    if _is_client_disconnect(exc):
        logger.info("client disconnected while sending %s %s", request.method, request.url.path)
        return error_response(client_closed_request())
    if status == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif status == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}"
    elif status >= 500:
        logger.error("HTTP %d on %s %s: %s", status, request.method, request.url.path, exc.detail)
        message = "The server had an error while processing the request."
    else:
        message = exc.detail
        if exc.extra:  # Litestar's own parameter validation lists the failing keys
            message = f"{message}: {msgspec.json.encode(exc.extra).decode()}"
    return error_response(OpenAIError(status, message))


def _handle_decode_error(
    _: Request, exc: msgspec.ValidationError | msgspec.DecodeError
) -> Response[ErrorResponse]:
    return error_response(from_decode_error(exc))


def _handle_recursion_error(request: Request, exc: RecursionError) -> Response[ErrorResponse]:
    """A body that decoded but is nested too deeply for the code that walks it (a template
    rendering a tool's schema, say): the input's fault, not the server's."""
    logger.info("too deeply nested input on %s %s: %s", request.method, request.url.path, exc)
    return error_response(too_deeply_nested())


def _handle_unexpected(request: Request, exc: Exception) -> Response[ErrorResponse]:
    logger.exception("Unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(internal_error())


EXCEPTION_HANDLERS = {
    OpenAIError: _handle_openai_error,
    HTTPException: _handle_http_exception,
    msgspec.ValidationError: _handle_decode_error,
    msgspec.DecodeError: _handle_decode_error,
    RecursionError: _handle_recursion_error,
    Exception: _handle_unexpected,
}
