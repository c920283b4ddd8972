"""Install procrastinate's tables, types and functions into a Postgres schema of their own."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from procrastinate.schema import SchemaManager

if TYPE_CHECKING:
    import asyncpg

logger = logging.getLogger(__name__)

# Key of the transaction-level advisory lock that serializes concurrent installs.
# It is the bytes "iiq" followed by the lock number 1, so other iiq locks can take 2, 3, ...
INSTALL_LOCK_KEY = 0x6969_7100_0000_0001

_JOBS_TABLE_EXISTS = """
SELECT EXISTS (
    SELECT 1
      FROM pg_catalog.pg_tables
     WHERE schemaname = $1 AND tablename = 'procrastinate_jobs'
)
"""


def quote_identifier(name: str) -> str:
    """Quote a Postgres identifier, doubling any embedded double quote."""
    if not name or "\x00" in name:
        raise ValueError(f"invalid Postgres identifier {name!r}: use a non-empty name without NUL characters")
    return '"' + name.replace('"', '""') + '"'


async def install_procrastinate_schema(conn: asyncpg.Connection[asyncpg.Record], schema: str = "procrastinate") -> bool:
    """Create `schema` and apply procrastinate's schema SQL in it, unless its jobs table exists.

    Returns True when this call installed the schema and False when it was already there.
    Processes that call this at the same time queue on an advisory lock, so exactly one
    installs. The script is not idempotent, which is why the jobs table is checked first.

    The work runs in one transaction, or in a savepoint when the caller has a transaction
    open. In the savepoint case the advisory lock is held until the caller's transaction ends.
    """
    quoted_schema = quote_identifier(schema)

    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", INSTALL_LOCK_KEY)

        if await conn.fetchval(_JOBS_TABLE_EXISTS, schema):
            logger.debug(
                "Procrastinate schema already installed",
                extra={"action": "install_procrastinate_schema", "schema": schema},
            )
            return False

        # SET LOCAL lasts until the end of the outermost transaction, not of a savepoint,
        # so the caller's search_path is put back explicitly once the script has run.
        previous_search_path = await conn.fetchval("SELECT current_setting('search_path')")

        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted_schema}")
        await conn.execute(f"SET LOCAL search_path TO {quoted_schema}")

        # Without arguments asyncpg sends the script over the simple query protocol,
        # which is the only one that accepts several statements in one message.
        await conn.execute(SchemaManager.get_schema())

        await conn.execute("SELECT set_config('search_path', $1, true)", previous_search_path)

    logger.info(
        "Installed procrastinate schema",
        extra={"action": "install_procrastinate_schema", "schema": schema},
    )
    return True
