"""Stream tokens: short-lived credentials with which a browser follows one experiment's events.

A browser's `EventSource` cannot send an Authorization header, so it passes a stream token in
the query string instead. URLs reach access logs, proxy logs and browser history, so a token
is limited to what such a leak can cost. It opens only the read-only event stream of the one
experiment it was issued for. It expires after `stream_token_ttl_seconds` and stops working
when the API key that issued it is revoked. It authenticates no other route, so it cannot
issue another token. API keys themselves are rejected in a URL.

A token reads ``iiqs_<43 URL-safe characters>`` (256 random bits), so it needs no escaping in
a URL and cannot be mistaken for an API key (``iiq_...``). Only its SHA-256 hash is stored, and
the token is looked up by that hash: timing differences of the lookup reveal bytes of a hash,
not of the token.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from iiq.db.queries import query
from iiq.db.tx import set_bypass
from iiq.db.types import Connection
from iiq.errors import AuthenticationError, NotFoundError
from iiq.orgs import Principal
from iiq.timefmt import iso_utc

TOKEN_PREFIX = "iiqs_"
_TOKEN_PATTERN = re.compile(r"^iiqs_[A-Za-z0-9_-]{43}$")


@dataclass(frozen=True)
class NewStreamToken:
    token: str
    experiment_id: uuid.UUID
    expires_at: datetime

    @property
    def events_url(self) -> str:
        return f"/experiments/{self.experiment_id}/events?stream_token={self.token}"


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _how_to_get_one(experiment_id: uuid.UUID) -> str:
    return f"create a new one with POST /experiments/{experiment_id}/stream-tokens"


async def issue_stream_token(
    conn: Connection, principal: Principal, experiment_id: uuid.UUID, ttl_seconds: float
) -> NewStreamToken:
    """Issue a token for the stream of `experiment_id`, in `conn`'s transaction scoped to the caller's org.

    Raises `NotFoundError` when the experiment does not exist or belongs to another org.
    """
    if await conn.fetchrow(query("get_experiment_status"), experiment_id) is None:
        raise NotFoundError("experiment", experiment_id)

    # Deleting the org's expired tokens here keeps the table at about one TTL's worth of tokens.
    await conn.execute(query("delete_expired_stream_tokens"), principal.org_id)

    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires_at = await conn.fetchval(
        query("insert_stream_token"), hash_token(token), principal.org_id, experiment_id, principal.key_id, ttl_seconds
    )
    return NewStreamToken(token=token, experiment_id=experiment_id, expires_at=expires_at)


async def authenticate_stream_token(pool: asyncpg.Pool, token: str, experiment_id: uuid.UUID) -> Principal:
    """Return the caller a token stands for, on the stream of `experiment_id` only.

    Raises `AuthenticationError` when the token is malformed, unknown, issued for another
    experiment, expired, or issued by a revoked API key. The message never names the experiment
    a token belongs to, and a token of one org is rejected the same way on every other experiment,
    so it reveals nothing about another org's experiments.
    """
    if _TOKEN_PATTERN.match(token) is None:
        raise AuthenticationError(f"invalid stream token: {_how_to_get_one(experiment_id)}")

    async with pool.acquire() as conn, conn.transaction():
        # The org is what this lookup finds out, so it runs before any org can be set.
        await set_bypass(conn)
        row = await conn.fetchrow(query("find_stream_token"), hash_token(token))

    if row is None:
        raise AuthenticationError(f"invalid stream token: {_how_to_get_one(experiment_id)}")
    if row["experiment_id"] != experiment_id:
        raise AuthenticationError(
            f"the stream token is not valid for experiment {experiment_id}: a token opens only the stream "
            f"of the experiment it was issued for; {_how_to_get_one(experiment_id)}"
        )
    if row["revoked_at"] is not None:
        raise AuthenticationError(
            f"the stream token was issued by an API key that has been revoked: {_how_to_get_one(experiment_id)}"
        )
    if row["expired"]:
        raise AuthenticationError(
            f"the stream token expired at {iso_utc(row['expires_at'])}: {_how_to_get_one(experiment_id)}"
        )
    return Principal(org_id=row["org_id"], key_id=row["key_id"], key_name=row["key_name"])
