"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the right status."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from starlette.responses import Response

RETRY_AFTER_S = 1  # what a 503 tells a client to wait before retrying


@dataclass
class APIError(Exception):
    """An error answer for one request; raised anywhere in a handler, turned into a response once."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(json.dumps(self.body()), status_code=self.status, headers=self.headers,
                        media_type="application/json")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400 for a request the client must change."""
    return APIError(400, message, "invalid_request_error", param, code)


def too_large(size: int, limit: int, *, exact: bool = True) -> APIError:
    """413 for a body over the server's limit (`size`: its declared length, or what was read when
    the read stopped)."""
    seen = f"{size:,} bytes" if exact else f"more than {limit:,} bytes"
    return APIError(413, f"The request body is {seen}, over this server's limit of {limit:,} "
                         "(hyprjax serve --max-request-bytes)", "invalid_request_error", None, "request_too_large")


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", "invalid_request_error", "model", "model_not_found")


def adapter_not_found(message: str, param: str) -> APIError:
    return APIError(404, message, "invalid_request_error", param, "lora_not_found")


def forbidden(message: str, param: str | None = None) -> APIError:
    return APIError(403, message, "permission_error", param, "forbidden")


def unauthorized() -> APIError:
    return APIError(401, "Missing or incorrect API key; send it as 'Authorization: Bearer KEY'.",
                    "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


def overloaded(message: str) -> APIError:
    """503 with Retry-After, which OpenAI clients honour when they retry."""
    return APIError(503, message, "server_error", None, "queue_full", {"Retry-After": str(RETRY_AFTER_S)})


def internal_error() -> APIError:
    return APIError(500, "The server failed to handle this request; see its log.", "server_error", None, None)
