"""Connection pools: one for the service (row-level security applies) and one-off admin connections."""

from __future__ import annotations

from typing import Any

import asyncpg

from iiq.queue.connector import init_connection

SERVICE_ROLE = "iiq_service"
# Procrastinate's trigger bodies are unqualified, so every session that touches the queue
# needs its schema on the search path.
SEARCH_PATH = "iiq,procrastinate,public"


def service_server_settings() -> dict[str, str]:
    # `role` as a start-up parameter survives the pool's RESET ALL on release, so every
    # connection of the pool runs as the service role, even when the URL names a superuser.
    return {"role": SERVICE_ROLE, "search_path": SEARCH_PATH, "application_name": "iiq"}


async def create_service_pool(dsn: str, *, min_size: int, max_size: int, **kwargs: Any) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=init_connection,
        server_settings=service_server_settings(),
        **kwargs,
    )
    if pool is None:  # asyncpg types the result as Optional
        raise RuntimeError("asyncpg.create_pool returned no pool")
    return pool


async def connect_admin(dsn: str) -> asyncpg.Connection:
    """Connect as the URL's own user, for migrations and operator commands."""
    conn: asyncpg.Connection = await asyncpg.connect(
        dsn, server_settings={"search_path": SEARCH_PATH, "application_name": "iiq-admin"}
    )
    await init_connection(conn)
    return conn
