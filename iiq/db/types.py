"""The connection type that query functions accept."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # A direct connection or one acquired from a pool, which asyncpg types as a proxy class.
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
else:
    # Litestar builds msgspec models from handler annotations at run time, and msgspec rejects
    # a union of more than one custom type. asyncpg makes `isinstance(proxy, asyncpg.Connection)`
    # true for a pool's proxy, so at run time the plain class covers both.
    Connection = asyncpg.Connection
