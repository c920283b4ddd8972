"""Property-based fuzzing of the whole API from its OpenAPI document, against a real server process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import allow_header_conformance, positive_data_acceptance

from tests.conftest import free_port
from tests.support.processes import ROOT, IIQProcess, wait_until_healthy

# Bounded so the suite stays fast; raise it locally to fuzz harder.
MAX_EXAMPLES = 25


def _cli(database_url: str, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "iiq.cli", *args, "--json"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        env={"IIQ_DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"},
    )
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


@pytest.fixture(scope="module")
def fuzz_target(admin_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    import asyncio

    from tests.conftest import create_database, drop_database

    database_url = asyncio.run(create_database(admin_url, prefix="iiq_fuzz"))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    process = IIQProcess(["serve", "--port", str(port)], database_url, tmp_path_factory.mktemp("fuzz") / "serve.log")
    try:
        wait_until_healthy(base_url, process)
        org = _cli(database_url, "orgs", "create", "fuzz")
        key = _cli(database_url, "keys", "create", "--org", org["org_id"])
        yield base_url, key["api_key"]
    finally:
        process.stop()
        asyncio.run(drop_database(admin_url, database_url))


def _openapi_document() -> dict[str, Any]:
    """The OpenAPI document the server serves, built from the app without starting it."""
    from iiq.api.app import create_app
    from iiq.settings import load_settings

    document: dict[str, Any] = create_app(load_settings({})).openapi_schema.to_schema()
    return document


schema = schemathesis.openapi.from_dict(_openapi_document())


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)
def test_api_fuzz(case: schemathesis.Case, fuzz_target: tuple[str, str]) -> None:
    base_url, api_key = fuzz_target
    if case.path.endswith("/events"):
        # A stream of a running experiment stays open; the event stream has its own tests.
        case.headers = {**(case.headers or {}), "Last-Event-ID": "0"}
    # Opaque values (cursors, stream tokens) match their schema yet are rightly refused with a
    # 4xx, so "schema-valid input must be accepted" does not apply.
    # NOTE: Litestar 2.x answers OPTIONS with an Allow header that lists the methods of only one
    # of the handlers sharing a path (litestar-org/litestar issue 4169, fixed in Litestar 3), so
    # the Allow-header check is left out until iiq moves to Litestar 3. Every other check runs.
    case.call_and_validate(
        base_url=base_url,
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=10,
        excluded_checks=[positive_data_acceptance, allow_header_conformance],
    )
