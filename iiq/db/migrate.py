"""`iiq migrate`: install procrastinate's schema, then apply `sql/migrations/*.sql` in order.

Everything runs under one session advisory lock, so two processes migrating at once apply
each migration exactly once. Applied migrations are recorded with a checksum; a released
migration whose file changed is an error, because it would never be applied again.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import asyncpg

from iiq.db.queries import sql_dir
from iiq.errors import ConfigurationError
from iiq.queue.schema import install_procrastinate_schema

logger = logging.getLogger(__name__)

# Any constant works; it only has to differ from other advisory locks taken in this database.
MIGRATION_LOCK_KEY = 0x11C_0001

_CREATE_TABLE = """
CREATE SCHEMA IF NOT EXISTS iiq;
CREATE TABLE IF NOT EXISTS iiq.schema_migrations (
    name        text PRIMARY KEY,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


def migration_files() -> list[Path]:
    return sorted((sql_dir() / "migrations").glob("*.sql"))


def _checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply pending migrations on `conn` (an admin connection); return the names applied."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(_CREATE_TABLE)
        if await install_procrastinate_schema(conn):
            logger.info("procrastinate schema installed")
        done = {
            row["name"]: row["checksum"] for row in await conn.fetch("SELECT name, checksum FROM iiq.schema_migrations")
        }
        for path in migration_files():
            text = path.read_text()
            checksum = _checksum(text)
            if path.name in done:
                if done[path.name] != checksum:
                    raise ConfigurationError(
                        f"migration {path.name} changed after it was applied; released "
                        "migrations are never edited: add a new migration file instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(text)
                await conn.execute(
                    "INSERT INTO iiq.schema_migrations (name, checksum) VALUES ($1, $2)",
                    path.name,
                    checksum,
                )
            logger.info("migration applied", extra={"migration": path.name})
            applied_now.append(path.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied_now
