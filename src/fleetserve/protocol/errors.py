"""OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}` with a matching HTTP status."""

from __future__ import annotations

import orjson

from fleetserve.errors import FleetserveError

_TYPE_BY_STATUS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "TimeoutError",
    413: "RequestEntityTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class APIError(FleetserveError):
    """An error that reaches the client as OpenAI-shaped JSON with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.error_type = error_type or _TYPE_BY_STATUS.get(status, "APIError")
        self.headers = headers or {}
        self.code = code

    def body(self) -> dict[str, object]:
        return error_body(
            self.status, self.message, param=self.param, error_type=self.error_type, code=self.code
        )

    def json_bytes(self) -> bytes:
        return orjson.dumps(self.body())


def error_body(
    status: int,
    message: str,
    *,
    param: str | None = None,
    error_type: str | None = None,
    code: str | None = None,
) -> dict[str, object]:
    """`code` is OpenAI's machine-readable code (`invalid_api_key`, `rate_limit_exceeded`); the status
    when there is none."""
    return {
        "error": {
            "message": message,
            "type": error_type or _TYPE_BY_STATUS.get(status, "APIError"),
            "param": param,
            "code": status if code is None else code,
        }
    }
