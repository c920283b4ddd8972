"""Liveness and readiness, with each dependency broken in turn on an app of its own."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from litestar import Litestar

from iiq.api.app import create_app
from iiq.runtime import FULL_COLLECTION_EVERY
from iiq.settings import Settings
from tests.conftest import Server, free_port, serving


@pytest.fixture
async def app_client(settings: Settings) -> AsyncIterator[tuple[Litestar, Any]]:
    port = free_port()
    app = create_app(msgspec.structs.replace(settings, worker_concurrency=1))
    async with serving(app, port), httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        yield app, client


async def test_ready_when_healthy(app_client: tuple[Litestar, Any]) -> None:
    _, client = app_client

    live = await client.get("/health/live")
    ready = await client.get("/health/ready")

    assert live.status_code == 200
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"postgres": "ok", "listen": "ok", "worker": "ok"}


async def test_not_ready_without_worker(app_client: tuple[Litestar, Any]) -> None:
    app, client = app_client
    app.state.worker_stop.set()
    await app.state.worker_task

    ready = await client.get("/health/ready")

    assert ready.status_code == 503
    assert ready.json()["checks"]["worker"] == "stopped"


async def test_not_ready_without_listen(app_client: tuple[Litestar, Any]) -> None:
    app, client = app_client
    hub = app.state.runtime.hub

    async def fail_to_connect() -> asyncpg.Connection:
        raise OSError("connection refused (test)")

    hub._connect = fail_to_connect  # every reconnect attempt now fails
    hub._conn.terminate()

    ready = await client.get("/health/ready")

    assert ready.status_code == 503
    assert ready.json()["checks"]["listen"] == "disconnected"


async def test_not_ready_without_postgres(app_client: tuple[Litestar, Any]) -> None:
    app, client = app_client
    pool = app.state.runtime.pool
    app.state.runtime.pool = await asyncpg.create_pool("postgresql://nobody@127.0.0.1:1/none", min_size=0)

    ready = await client.get("/health/ready")
    live = await client.get("/health/live")

    app.state.runtime.pool = pool
    assert ready.status_code == 503
    assert ready.json()["checks"]["postgres"].startswith("failed")
    assert live.status_code == 200


async def test_garbage_collector_tuned(server: Server) -> None:
    # Full collections skip what start-up created, and run less often than Python's default
    # (see iiq.runtime._tune_garbage_collector).
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[2] == FULL_COLLECTION_EVERY
