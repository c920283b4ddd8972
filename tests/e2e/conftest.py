"""Fixtures for end-to-end tests: a database of their own, so no in-process worker takes their jobs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import create_database, drop_database


@pytest.fixture
async def e2e_database(admin_url: str) -> AsyncIterator[str]:
    dsn = await create_database(admin_url, prefix="iiq_e2e")
    yield dsn
    await drop_database(admin_url, dsn)
