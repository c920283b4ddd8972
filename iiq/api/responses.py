"""OpenAPI descriptions of the error answers that routes share."""

from __future__ import annotations

from litestar.openapi.datastructures import ResponseSpec

from iiq.api.schemas import ErrorBody


def _error(description: str) -> ResponseSpec:
    return ResponseSpec(data_container=ErrorBody, description=description)


AUTH_RESPONSES = {401: _error("Missing, malformed, unknown or revoked API key")}
READ_RESPONSES = {
    **AUTH_RESPONSES,
    400: _error("Invalid parameter"),
    404: _error("No such resource in the caller's org"),
    409: _error("The resource's state does not allow this"),
}
CREATE_RESPONSES = {
    **AUTH_RESPONSES,
    400: _error("Malformed JSON or a field of the wrong type"),
    402: _error("The org's monthly GPU-hour budget does not cover the estimate"),
    413: _error("Request body too large"),
    422: _error("Unknown tool or invalid input: `extra.errors` lists every problem"),
    429: _error("The org is at its cap of concurrent experiments; see Retry-After"),
}
