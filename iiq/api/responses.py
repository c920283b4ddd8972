"""OpenAPI descriptions of the error responses that routes share."""

from __future__ import annotations

from litestar.datastructures import ResponseHeader
from litestar.openapi.datastructures import ResponseSpec

from iiq.api.schemas import ErrorBody


def _error(description: str) -> ResponseSpec:
    return ResponseSpec(data_container=ErrorBody, description=description, generate_examples=False)


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
    409: _error("Rare: concurrent requests kept reclaiming this expired Idempotency-Key; retry the request"),
    413: _error("Request body too large"),
    422: _error(
        "Unknown tool or invalid input (`extra.errors` lists every problem), or an Idempotency-Key "
        "already used for a different request"
    ),
    429: _error("The org is at its cap of concurrent experiments; see Retry-After"),
}
FROM_TEMPLATE_RESPONSES = {
    **CREATE_RESPONSES,
    404: _error("No such template in the caller's org"),
}
TEMPLATE_WRITE_RESPONSES = {
    **AUTH_RESPONSES,
    400: _error("Malformed JSON or a field of the wrong type"),
    404: _error("No such template in the caller's org"),
    409: _error("The org already has a template of this name"),
    413: _error("Request body too large"),
    422: _error("Unknown tool or invalid template: `extra.errors` lists every problem"),
}

IDEMPOTENCY_HEADERS = [
    ResponseHeader(
        name="Idempotent-Replayed",
        description=(
            "`true` when an earlier request with the same Idempotency-Key created the experiment; absent otherwise"
        ),
        documentation_only=True,
    )
]
