"""Shared fixtures: a real Postgres, a fresh database per test session, and a real HTTP server.

Postgres comes from IIQ_TEST_ADMIN_URL (default: the local server at 127.0.0.1:5432, user
postgres); when no server accepts connections there, an embedded server is started in a temporary
directory, so the suite also runs on a machine with only Python.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import uvicorn
from litestar import Litestar

from iiq.api.app import create_app
from iiq.db.embedded import start_embedded, stop_embedded
from iiq.db.pool import connect_admin
from iiq.experiments import quota
from iiq.orgs import create_key, create_org
from iiq.runtime import Runtime, run_migrations
from iiq.settings import Settings, load_settings
from tests.support import tools as _test_tools  # noqa: F401 - registers the test-only tools

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _server_answers(url: str) -> bool:
    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(url, timeout=3)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        await conn.close()
        return True

    return asyncio.run(probe())


@pytest.fixture(scope="session")
def admin_url() -> Iterator[str]:
    url = os.environ.get("IIQ_TEST_ADMIN_URL", DEFAULT_ADMIN_URL)
    if _server_answers(url):
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="iiq-test-pg-") as data_dir:
        yield start_embedded(data_dir)
        stop_embedded(data_dir)


def with_database(url: str, database: str) -> str:
    """Return `url` pointing at `database`, for both TCP and Unix-socket URLs."""
    base, _, query_string = url.partition("?")
    base = base.rsplit("/", 1)[0] + "/" + database
    return f"{base}?{query_string}" if query_string else base


async def create_database(admin_url: str, prefix: str = "iiq_test") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = with_database(admin_url, name)
    await run_migrations(dsn)
    return dsn


async def drop_database(admin_url: str, dsn: str) -> None:
    name = dsn.partition("?")[0].rsplit("/", 1)[1]
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def database_url(admin_url: str) -> AsyncIterator[str]:
    dsn = await create_database(admin_url)
    yield dsn
    await drop_database(admin_url, dsn)


@pytest.fixture(scope="session")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(
        {},
        database_url=database_url,
        data_dir=str(tmp_path_factory.mktemp("iiq-data")),
        cancel_poll_seconds=0.1,
        cancel_grace_seconds=2.0,
        sse_keepalive_seconds=1.0,
        worker_concurrency=20,
        pool_max_size=20,
        default_max_concurrent=50,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    base_url: str
    runtime: Runtime
    settings: Settings


@asynccontextmanager
async def serving(app: Litestar, port: int) -> AsyncIterator[None]:
    """Serve `app` over HTTP with uvicorn in this event loop until the block ends."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, timeout_graceful_shutdown=2
    )
    uv = uvicorn.Server(config)
    task = asyncio.create_task(uv.serve())
    for _ in range(400):
        if uv.started:
            break
        if task.done():
            task.result()
        await asyncio.sleep(0.025)
    try:
        yield
    finally:
        uv.should_exit = True
        await task


@pytest.fixture(scope="session")
async def server(settings: Settings) -> AsyncIterator[Server]:
    """The real app with its worker, served over HTTP by uvicorn in this process."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    app_settings = msgspec.structs.replace(settings, public_url=base_url)
    app = create_app(app_settings)
    async with serving(app, port):
        yield Server(base_url=base_url, runtime=app.state.runtime, settings=app_settings)


@dataclass
class Tenant:
    org_id: uuid.UUID
    key_id: uuid.UUID
    api_key: str
    client: httpx.AsyncClient


async def make_tenant(
    database_url: str,
    base_url: str,
    *,
    monthly_gpu_hours: float = 1000.0,
    max_concurrent: int = 50,
    name: str = "test org",
) -> Tenant:
    conn = await connect_admin(database_url)
    try:
        async with conn.transaction():
            org = await create_org(
                conn, name, monthly_gpu_hours=monthly_gpu_hours, max_concurrent=max_concurrent, now=quota.utc_now()
            )
            key = await create_key(conn, org["id"], "test")
    finally:
        await conn.close()
    client = httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": f"Bearer {key.secret}"}, timeout=httpx.Timeout(30.0)
    )
    return Tenant(org_id=org["id"], key_id=key.id, api_key=key.secret, client=client)


@pytest.fixture
async def tenant_factory(server: Server, database_url: str) -> AsyncIterator[Any]:
    created: list[Tenant] = []

    async def factory(**kwargs: Any) -> Tenant:
        tenant = await make_tenant(database_url, server.base_url, **kwargs)
        created.append(tenant)
        return tenant

    yield factory
    for tenant in created:
        await tenant.client.aclose()


@pytest.fixture
async def tenant(tenant_factory: Any) -> Tenant:
    result: Tenant = await tenant_factory()
    return result


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # CI sets IIQ_FAIL_ON_SKIP: a skipped test there is a test that silently did not run.
    if os.environ.get("IIQ_FAIL_ON_SKIP") and _skipped and exitstatus == 0:
        print(f"\nIIQ_FAIL_ON_SKIP is set and {len(_skipped)} test(s) were skipped: {', '.join(_skipped)}")
        session.exitstatus = 1
