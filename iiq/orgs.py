"""Orgs and their API keys.

A key reads ``iiq_<prefix>_<secret>``. The prefix finds the row; only a SHA-256 hash of the
whole key is stored and compared in constant time. Keys carry 256 random bits, so a fast
hash is enough: there is nothing to brute-force as with passwords.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from iiq.db.queries import query
from iiq.db.tx import set_bypass
from iiq.db.types import Connection
from iiq.errors import NotFoundError
from iiq.experiments import quota

_KEY_PATTERN = re.compile(r"^iiq_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
# The start of an API key anywhere in a string, such as "Bearer iiq_<prefix>_..." in a query value.
_KEY_FRAGMENT = re.compile(r"iiq_[0-9a-f]{16}_")


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: an org and the key it used."""

    org_id: uuid.UUID
    key_id: uuid.UUID
    key_name: str

    @property
    def created_by(self) -> str:
        return f"api_key:{self.key_id}"


@dataclass(frozen=True)
class NewKey:
    id: uuid.UUID
    org_id: uuid.UUID
    name: str
    prefix: str
    secret: str
    created_at: datetime


def looks_like_api_key(value: str) -> bool:
    """Tell whether `value` is, starts like, or contains an API key; a truncated key counts too."""
    return value.startswith("iiq_") or _KEY_FRAGMENT.search(value) is not None


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


async def create_org(
    conn: Connection, name: str, *, monthly_gpu_hours: float, max_concurrent: int, now: datetime
) -> asyncpg.Record:
    """Create an org with its quota row, in the caller's transaction."""
    await set_bypass(conn)
    org_id = uuid.uuid4()
    org = await conn.fetchrow(query("insert_org"), org_id, name)
    if org is None:
        # INSERT ... RETURNING returns the new row or raises, so None here would be a bug.
        raise RuntimeError(f"insert_org returned no row for org {org_id}")
    await quota.insert_quota(conn, org["id"], monthly_gpu_hours, max_concurrent, now)
    return org


async def create_key(conn: Connection, org_id: uuid.UUID, name: str) -> NewKey:
    await set_bypass(conn)
    if await conn.fetchrow(query("get_org"), org_id) is None:
        raise NotFoundError("org", org_id)
    prefix = secrets.token_hex(8)
    secret = f"iiq_{prefix}_{secrets.token_urlsafe(32)}"
    key_id = uuid.uuid4()
    row = await conn.fetchrow(query("insert_api_key"), key_id, org_id, prefix, hash_key(secret), name)
    if row is None:
        raise RuntimeError(f"insert_api_key returned no row for API key {key_id}")
    return NewKey(id=row["id"], org_id=org_id, name=name, prefix=prefix, secret=secret, created_at=row["created_at"])


async def revoke_key(conn: Connection, key_id: uuid.UUID) -> asyncpg.Record:
    await set_bypass(conn)
    row = await conn.fetchrow(query("revoke_api_key"), key_id)
    if row is None:
        raise NotFoundError("API key", key_id)
    return row


async def authenticate(db: asyncpg.Pool | Connection, key: str) -> Principal | None:
    """Return the caller for `key`, or None when it is malformed, unknown or revoked."""
    match = _KEY_PATTERN.match(key)
    if match is None:
        return None
    # The org is what this lookup finds out, so it runs before any org can be set: the SQL
    # function bypasses row-level security for this one statement (migration 005).
    row = await db.fetchrow(query("find_api_key"), match.group(1))
    if row is None or not hmac.compare_digest(row["key_hash"], hash_key(key)) or row["revoked_at"] is not None:
        return None
    return Principal(org_id=row["org_id"], key_id=row["id"], key_name=row["name"])
