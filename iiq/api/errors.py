"""The one place where domain errors and database errors become HTTP responses."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from litestar import Request, Response
from litestar.exceptions import HTTPException

from iiq.errors import (
    AuthenticationError,
    ConflictError,
    EventTooLargeError,
    IdempotencyKeyReused,
    IIQError,
    InvalidTransitionError,
    NotFoundError,
    QuotaExceeded,
    ValidationFailed,
)
from iiq.timefmt import iso_utc

logger = logging.getLogger(__name__)


class PaymentRequiredException(HTTPException):
    status_code = 402


def _body(status: int, detail: str, extra: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"status_code": status, "detail": detail}
    if extra is not None:
        body["extra"] = extra
    return body


def handle_iiq_error(request: Request[Any, Any, Any], exc: IIQError) -> Response[dict[str, Any]]:
    headers: dict[str, str] = {}
    extra: Any = None
    if isinstance(exc, NotFoundError):
        status = 404
    elif isinstance(exc, AuthenticationError):
        status = 401
        headers["WWW-Authenticate"] = 'Bearer realm="iiq"'
    elif isinstance(exc, ValidationFailed):
        status = 422
        extra = {"errors": exc.errors}
        detail = f"invalid experiment input: {len(exc.errors)} error(s)"
        return Response(_body(status, detail, extra), status_code=status)
    elif isinstance(exc, QuotaExceeded):
        status = 429 if exc.reason == "concurrency" else 402
        extra = {"reason": exc.reason, **exc.details}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
    elif isinstance(exc, IdempotencyKeyReused):
        status = 422
        extra = {"idempotency_key": exc.key, "expires_at": iso_utc(exc.expires_at)}
    elif isinstance(exc, ConflictError | InvalidTransitionError):
        status = 409
    elif isinstance(exc, EventTooLargeError):
        status = 413
    else:
        logger.error("unmapped iiq error", extra={"error": repr(exc), "path": request.url.path})
        status = 500
    return Response(_body(status, str(exc), extra), status_code=status, headers=headers)


def handle_postgres_error(request: Request[Any, Any, Any], exc: asyncpg.PostgresError) -> Response[dict[str, Any]]:
    sqlstate = getattr(exc, "sqlstate", "") or ""
    # Class 22 is "data exception": a value Postgres cannot store, such as "\u0000" in jsonb.
    if sqlstate.startswith("22"):
        return Response(_body(400, f"invalid value: {exc.args[0] if exc.args else exc}"), status_code=400)
    logger.error("database error", extra={"sqlstate": sqlstate, "error": repr(exc), "path": request.url.path})
    return Response(_body(500, "internal database error"), status_code=500)


def handle_unexpected_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    if isinstance(exc, HTTPException):
        extra = exc.extra if exc.extra else None
        return Response(
            _body(exc.status_code, exc.detail, extra), status_code=exc.status_code, headers=exc.headers or None
        )
    if isinstance(exc, RecursionError):
        # msgspec decodes recursively: a body nested a thousand levels deep exhausts the stack.
        return Response(_body(400, "request body is nested too deeply: flatten the JSON"), status_code=400)
    logger.exception("unhandled error", extra={"path": request.url.path, "method": request.method})
    return Response(_body(500, "internal server error"), status_code=500)
