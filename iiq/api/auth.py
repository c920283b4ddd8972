"""API-key authentication and the per-request, org-scoped transaction."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.exceptions import NotAuthorizedException

from iiq.db.tx import set_org
from iiq.orgs import Principal, authenticate
from iiq.runtime import Runtime

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="iiq"'}


def provide_runtime(state: State) -> Runtime:
    runtime: NamedDependency[Runtime] = state.runtime
    return runtime


async def provide_principal(request: Request, state: State) -> Principal:
    """Authenticate the `Authorization: Bearer <key>` header; 401 when missing, malformed or revoked."""
    header = request.headers.get("authorization")
    if not header:
        raise NotAuthorizedException(
            "missing Authorization header: send 'Authorization: Bearer <API key>'", headers=_CHALLENGE
        )
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise NotAuthorizedException("malformed Authorization header: expected 'Bearer <API key>'", headers=_CHALLENGE)
    principal = await authenticate(provide_runtime(state).pool, key.strip())
    if principal is None:
        raise NotAuthorizedException("invalid or revoked API key", headers=_CHALLENGE)
    return principal


async def provide_org_conn(principal: NamedDependency[Principal], state: State) -> AsyncIterator[asyncpg.Connection]:
    """A connection in a transaction that sees only the caller's org; commits on success."""
    async with provide_runtime(state).pool.acquire() as conn, conn.transaction():
        await set_org(conn, principal.org_id)
        yield conn
