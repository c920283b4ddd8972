"""Idempotency keys for creates: a retried request with the same key returns the first result.

A client sends ``Idempotency-Key: <key>`` with a create. The key row is inserted at the start
of the create's transaction, before validation and quota admission, and its experiment id is
set before that transaction commits:

- A retry after the first request committed finds the row. The same request (route and body)
  returns the experiment created the first time, so nothing is inserted and no quota is
  reserved again. A different request raises `IdempotencyKeyReused`.
- A concurrent request with the same key waits on the row's unique index entry until the
  first transaction ends. After a commit it finds the row as above; after a rollback it
  claims the key itself.
- A create that is rejected (invalid input, quota) rolls back the key row with it, so the
  same key can be sent again with a corrected request.

Keys are scoped to the org and expire `Settings.idempotency_key_ttl_seconds` after their first
use (24 hours by default). An expired key is deleted when it is next sent, and then counts as
new. Each keyed create also deletes a bounded batch of the org's other expired keys, so no
sweeper runs: an org that stops sending keys keeps its expired rows until its next keyed create.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from iiq.db.queries import query
from iiq.db.types import Connection
from iiq.errors import ConflictError, IdempotencyKeyReused, NotFoundError
from iiq.experiments.create import canonical_json

logger = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 200
# Maximum expired keys of the org that one keyed create deletes. Each keyed create adds one key,
# so expired keys cannot pile up while the org keeps creating.
_PURGE_BATCH = 100
# A claim only repeats when the key it conflicted with expired and was purged in between.
_CLAIM_ATTEMPTS = 3


@dataclass(frozen=True)
class Outcome:
    """The experiment row a keyed create returns, and whether an earlier request created it."""

    row: asyncpg.Record
    replayed: bool


def check_key(key: str) -> str | None:
    """Return an error message for a key the API does not accept, or None for a valid key."""
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        return (
            f"{HEADER} must be 1 to {MAX_KEY_LENGTH} characters long, got {len(key)}: "
            "send a random value such as a UUID"
        )
    if not key.isprintable():
        return f"{HEADER} contains control characters: send a random value such as a UUID"
    return None


def request_hash(route: str, body: Any) -> str:
    """Return the SHA-256 hex digest of `route` and the canonical JSON of the parsed `body`.

    `route` names the operation and any path parameter (such as the template id), so one key
    sent to two routes counts as two different requests.
    """
    return hashlib.sha256(canonical_json({"route": route, "body": body})).hexdigest()


async def create_once(
    conn: Connection,
    org_id: uuid.UUID,
    key: str,
    request_digest: str,
    ttl_seconds: float,
    create: Callable[[], Awaitable[asyncpg.Record]],
) -> Outcome:
    """Run `create` unless `key` was already used; must run in the create's own transaction.

    Returns the new experiment, or the one an earlier request with this key and the same
    `request_digest` created. Raises `IdempotencyKeyReused` when the earlier request differs.
    """
    for _ in range(_CLAIM_ATTEMPTS):
        await conn.execute(query("delete_expired_key"), org_id, key)
        if await conn.fetchval(query("claim_key"), org_id, key, request_digest, ttl_seconds) is not None:
            row = await create()
            await conn.execute(query("set_key_experiment"), org_id, key, row["id"])
            await conn.execute(query("purge_expired_keys"), org_id, _PURGE_BATCH)
            return Outcome(row=row, replayed=False)

        stored = await conn.fetchrow(query("get_key"), org_id, key)
        if stored is None:
            # The key expired and another transaction deleted it after our claim conflicted.
            continue
        return Outcome(row=await _replay(conn, org_id, key, stored, request_digest), replayed=True)

    raise ConflictError(f"{HEADER} {key!r} is being reused by concurrent requests: retry the request")


async def _replay(
    conn: Connection, org_id: uuid.UUID, key: str, stored: asyncpg.Record, request_digest: str
) -> asyncpg.Record:
    if stored["request_hash"] != request_digest:
        raise IdempotencyKeyReused(key, stored["expires_at"])

    experiment_id = stored["experiment_id"]
    if experiment_id is None:
        # Only possible if a transaction committed a key without its create, which create_once prevents.
        raise ConflictError(f"{HEADER} {key!r} has no experiment recorded: send a new key")
    row = await conn.fetchrow(query("get_experiment"), experiment_id)
    if row is None:
        raise NotFoundError("experiment", experiment_id)

    logger.info("idempotent create replayed", extra={"experiment_id": str(experiment_id), "org_id": str(org_id)})
    return row
