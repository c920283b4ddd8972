"""API-key and stream-token authentication, and the per-request, org-scoped transaction."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import asyncpg
from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.exceptions import NotAuthorizedException
from litestar.params import FromPath, QueryParameter

from iiq.api.request_db import RequestDb
from iiq.db.types import Connection
from iiq.orgs import Principal, authenticate, looks_like_api_key
from iiq.runtime import Runtime
from iiq.stream_tokens import TOKEN_PREFIX, authenticate_stream_token

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="iiq"'}


def provide_runtime(state: State) -> Runtime:
    runtime: NamedDependency[Runtime] = state.runtime
    return runtime


async def provide_principal(request: Request[Any, Any, Any], db: NamedDependency[RequestDb]) -> Principal:
    """Authenticate the `Authorization: Bearer <key>` header; 401 when missing, malformed or revoked.

    The lookup runs on the request's own connection, which the route then uses too.
    """
    return await _principal_from_header(request, await db.connection())


async def _principal_from_header(request: Request[Any, Any, Any], db: asyncpg.Pool | Connection) -> Principal:
    header = request.headers.get("authorization")
    if not header:
        raise NotAuthorizedException(
            "missing Authorization header: send 'Authorization: Bearer <API key>'", headers=_CHALLENGE
        )
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise NotAuthorizedException("malformed Authorization header: expected 'Bearer <API key>'", headers=_CHALLENGE)
    if key.strip().startswith(TOKEN_PREFIX):
        raise NotAuthorizedException(
            "a stream token opens only GET /experiments/{id}/events?stream_token=...: use an API key here",
            headers=_CHALLENGE,
        )
    principal = await authenticate(db, key.strip())
    if principal is None:
        raise NotAuthorizedException("invalid or revoked API key", headers=_CHALLENGE)
    return principal


async def provide_stream_principal(
    request: Request[Any, Any, Any],
    state: State,
    experiment_id: FromPath[uuid.UUID],
    stream_token: Annotated[
        str | None,
        QueryParameter(
            description="A token from POST /experiments/{experiment_id}/stream-tokens, for clients such as a "
            "browser's EventSource that cannot send an Authorization header; never an API key",
        ),
    ] = None,
) -> Principal:
    """Authenticate the event stream by the Authorization header, or by `?stream_token=` for this experiment.

    When both are sent, the header is used. A URL reaches access logs, so an API key anywhere in
    the query string is rejected with 401 before anything else, even next to a valid header.
    """
    for name, value in request.query_params.multi_items():
        if looks_like_api_key(value) or looks_like_api_key(name):
            raise NotAuthorizedException(
                f"query parameter {name[:20]!r} contains an API key: API keys are accepted only in the "
                "Authorization header. URLs are written to access logs, so rotate that key. A browser's "
                f"EventSource passes a stream token from POST /experiments/{experiment_id}/stream-tokens "
                "as ?stream_token= instead",
                headers=_CHALLENGE,
            )

    if request.headers.get("authorization"):
        # From the pool: a stream lasts long, and must not hold a connection while it does.
        return await _principal_from_header(request, provide_runtime(state).pool)
    if stream_token is None:
        raise NotAuthorizedException(
            "missing credentials: send 'Authorization: Bearer <API key>', or, from a browser's EventSource, "
            f"pass ?stream_token= with a token from POST /experiments/{experiment_id}/stream-tokens",
            headers=_CHALLENGE,
        )
    return await authenticate_stream_token(provide_runtime(state).pool, stream_token, experiment_id)


async def provide_org_conn(principal: NamedDependency[Principal], db: NamedDependency[RequestDb]) -> Connection:
    """Return the request's connection in a transaction scoped to the caller's org.

    `provide_db` commits it after the response is built, or rolls it back when the request failed.
    """
    return await db.scoped(principal.org_id)
