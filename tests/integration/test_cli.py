"""The `iiq` operator commands, run as real subprocesses against the test database and server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from iiq.db.migrate import migration_files
from iiq.db.pool import connect_admin
from tests.conftest import Server, with_database

REPO_ROOT = Path(__file__).resolve().parents[2]
# Upper bound, in seconds, for one CLI process; a migration of an empty database takes a few.
CLI_TIMEOUT = 120.0


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str


async def run_cli(database_url: str, *args: str) -> Completed:
    """Run `python -m iiq.cli ARGS` with IIQ_DATABASE_URL set; kill it after CLI_TIMEOUT seconds."""
    env = {**os.environ, "IIQ_DATABASE_URL": database_url, "IIQ_LOG_LEVEL": "WARNING"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "iiq.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=REPO_ROOT,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=CLI_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"iiq {' '.join(args)} did not exit within {CLI_TIMEOUT} s") from None
    assert process.returncode is not None
    return Completed(process.returncode, stdout.decode(), stderr.decode())


def parse_json(result: Completed) -> dict[str, Any]:
    """Return the single JSON object that a `--json` command printed on stdout."""
    assert result.returncode == 0, f"exit {result.returncode}; stderr: {result.stderr}"
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one line of JSON on stdout, got: {result.stdout!r}"
    value: dict[str, Any] = json.loads(lines[0])
    assert isinstance(value, dict), value
    return value


def client_for(server: Server, api_key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30.0)


async def create_org(database_url: str, name: str = "cli org") -> str:
    org_id: str = parse_json(await run_cli(database_url, "orgs", "create", name, "--json"))["org_id"]
    return org_id


async def create_key(database_url: str, org_id: str) -> dict[str, Any]:
    return parse_json(await run_cli(database_url, "keys", "create", "--org", org_id, "--json"))


@pytest.fixture
async def empty_database(admin_url: str) -> AsyncIterator[str]:
    """A new database with no schema at all, dropped afterwards."""
    name = f"iiq_cli_test_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield with_database(admin_url, name)
    finally:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


# --- orgs ---


async def test_module_runs_help() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "iiq.cli",
        "--help",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), timeout=CLI_TIMEOUT)

    assert process.returncode == 0
    assert b"usage: iiq" in stdout


async def test_orgs_create_json(database_url: str) -> None:
    result = parse_json(await run_cli(database_url, "orgs", "create", "Acme Research", "--json"))

    assert uuid.UUID(result["org_id"])
    assert result["name"] == "Acme Research"


async def test_orgs_create_stores_row(database_url: str) -> None:
    org_id = await create_org(database_url, "stored org")

    conn = await asyncpg.connect(database_url)
    try:
        name = await conn.fetchval("SELECT name FROM iiq.orgs WHERE id = $1", uuid.UUID(org_id))
        quota_rows = await conn.fetchval(
            "SELECT count(*) FROM iiq.experiment_quota WHERE org_id = $1", uuid.UUID(org_id)
        )
    finally:
        await conn.close()

    assert name == "stored org"
    assert quota_rows == 1


async def test_orgs_create_text(database_url: str) -> None:
    result = await run_cli(database_url, "orgs", "create", "text org")

    assert result.returncode == 0, result.stderr
    fields = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    assert "org_id" in fields, result.stdout
    assert uuid.UUID(fields["org_id"])
    assert fields["name"] == "text org"


@pytest.mark.parametrize("name", ["", "x" * 201], ids=["empty", "201-characters"])
async def test_orgs_create_invalid_name(database_url: str, name: str) -> None:
    result = await run_cli(database_url, "orgs", "create", name, "--json")

    assert result.returncode != 0
    assert "name" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


# --- keys ---


async def test_keys_create_works(database_url: str, server: Server) -> None:
    org_id = await create_org(database_url)

    key = await create_key(database_url, org_id)
    async with client_for(server, key["api_key"]) as client:
        response = await client.get("/quota")

    assert key["org_id"] == org_id
    assert uuid.UUID(key["key_id"])
    assert response.status_code == 200, response.text


async def test_keys_create_text(database_url: str) -> None:
    org_id = await create_org(database_url)

    result = await run_cli(database_url, "keys", "create", "--org", org_id)

    assert result.returncode == 0, result.stderr
    assert org_id in result.stdout
    assert "api_key: iiq_" in result.stdout


async def test_keys_create_empty_name(database_url: str) -> None:
    org_id = await create_org(database_url)

    result = await run_cli(database_url, "keys", "create", "--org", org_id, "--name", "", "--json")

    assert result.returncode != 0
    assert "name" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


async def test_keys_revoke(database_url: str, server: Server) -> None:
    org_id = await create_org(database_url)
    key = await create_key(database_url, org_id)

    async with client_for(server, key["api_key"]) as client:
        before = await client.get("/quota")
        revoked = parse_json(await run_cli(database_url, "keys", "revoke", key["key_id"], "--json"))
        after = await client.get("/quota")

    assert before.status_code == 200, before.text
    assert revoked["key_id"] == key["key_id"]
    assert revoked["revoked_at"]
    assert after.status_code == 401, after.text


async def test_keys_revoke_twice(database_url: str) -> None:
    key = await create_key(database_url, await create_org(database_url))

    first = parse_json(await run_cli(database_url, "keys", "revoke", key["key_id"], "--json"))
    second = parse_json(await run_cli(database_url, "keys", "revoke", key["key_id"], "--json"))

    assert second["revoked_at"] == first["revoked_at"]


async def test_keys_revoke_text(database_url: str) -> None:
    org_id = await create_org(database_url)
    key = await create_key(database_url, org_id)

    result = await run_cli(database_url, "keys", "revoke", key["key_id"])

    assert result.returncode == 0, result.stderr
    assert org_id in result.stdout
    assert key["key_id"] in result.stdout


async def test_keys_create_unknown_org(database_url: str) -> None:
    missing = str(uuid.uuid4())

    result = await run_cli(database_url, "keys", "create", "--org", missing, "--json")

    assert result.returncode != 0
    assert missing in result.stderr
    assert "not found" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


async def test_keys_create_invalid_org(database_url: str) -> None:
    result = await run_cli(database_url, "keys", "create", "--org", "acme")

    assert result.returncode != 0
    assert "acme" in result.stderr
    assert "UUID" in result.stderr


async def test_keys_revoke_unknown_key(database_url: str) -> None:
    missing = str(uuid.uuid4())

    result = await run_cli(database_url, "keys", "revoke", missing, "--json")

    assert result.returncode != 0
    assert missing in result.stderr
    assert "Traceback" not in result.stderr


# --- quota ---


async def test_quota_set_max_concurrent(database_url: str, server: Server) -> None:
    org_id = await create_org(database_url)
    key = await create_key(database_url, org_id)

    result = parse_json(await run_cli(database_url, "quota", "set", "--org", org_id, "--max-concurrent", "3", "--json"))
    async with client_for(server, key["api_key"]) as client:
        response = await client.get("/quota")

    assert result["max_concurrent"] == 3
    assert response.status_code == 200, response.text
    assert response.json()["max_concurrent"] == 3
    # The command prints what GET /quota shows, in-flight numbers included.
    assert {name: result[name] for name in response.json()} == response.json()


async def test_quota_set_monthly_hours(database_url: str, server: Server) -> None:
    org_id = await create_org(database_url)
    key = await create_key(database_url, org_id)
    async with client_for(server, key["api_key"]) as client:
        before = (await client.get("/quota")).json()

        result = parse_json(
            await run_cli(database_url, "quota", "set", "--org", org_id, "--monthly-gpu-hours", "12.5", "--json")
        )
        after = (await client.get("/quota")).json()

    assert result["monthly_gpu_hours"] == 12.5
    assert after["monthly_gpu_hours"] == 12.5
    assert after["max_concurrent"] == before["max_concurrent"]


@pytest.mark.parametrize("value", ["nan", "-1"])
async def test_quota_set_invalid_monthly_hours(database_url: str, server: Server, value: str) -> None:
    org_id = await create_org(database_url)
    key = await create_key(database_url, org_id)
    async with client_for(server, key["api_key"]) as client:
        before = (await client.get("/quota")).json()

        result = await run_cli(database_url, "quota", "set", "--org", org_id, "--monthly-gpu-hours", value, "--json")
        after = (await client.get("/quota")).json()

    assert result.returncode != 0, f"--monthly-gpu-hours {value} was accepted: {result.stdout}"
    assert "--monthly-gpu-hours" in result.stderr
    assert after["monthly_gpu_hours"] == before["monthly_gpu_hours"]


async def test_quota_set_unknown_org(database_url: str) -> None:
    missing = str(uuid.uuid4())

    result = await run_cli(database_url, "quota", "set", "--org", missing, "--max-concurrent", "3")

    assert result.returncode != 0
    assert missing in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["0", "-2", "three"])
async def test_quota_set_invalid_max_concurrent(database_url: str, value: str) -> None:
    org_id = await create_org(database_url)

    result = await run_cli(database_url, "quota", "set", "--org", org_id, "--max-concurrent", value)

    assert result.returncode != 0
    assert "--max-concurrent" in result.stderr
    assert "Traceback" not in result.stderr


async def test_quota_set_without_limits(database_url: str) -> None:
    org_id = await create_org(database_url)

    result = await run_cli(database_url, "quota", "set", "--org", org_id)

    assert result.returncode != 0
    assert "--max-concurrent" in result.stderr


# --- migrate ---


async def test_migrate_twice(empty_database: str) -> None:
    expected = [path.name for path in migration_files()]

    first = await run_cli(empty_database, "migrate")
    second = await run_cli(empty_database, "migrate")

    assert first.returncode == 0, first.stderr
    for name in expected:
        assert name in first.stdout, f"{name} is missing from the first migrate output: {first.stdout!r}"
    assert second.returncode == 0, second.stderr
    assert "nothing" in second.stdout
    for name in expected:
        assert name not in second.stdout, f"the second migrate applied {name} again: {second.stdout!r}"


async def test_migrate_concurrent(empty_database: str) -> None:
    expected = sorted(path.name for path in migration_files())

    results = await asyncio.gather(run_cli(empty_database, "migrate"), run_cli(empty_database, "migrate"))

    conn = await asyncpg.connect(empty_database)
    try:
        recorded = [row["name"] for row in await conn.fetch("SELECT name FROM iiq.schema_migrations ORDER BY name")]
    finally:
        await conn.close()
    assert results[0].returncode == 0, results[0].stderr
    assert results[1].returncode == 0, results[1].stderr
    assert recorded == expected
    applied_by = [name for result in results for name in expected if name in result.stdout]
    assert sorted(applied_by) == expected, f"each migration is applied by exactly one process: {results}"


async def test_migrate_then_orgs_create(empty_database: str) -> None:
    migrated = await run_cli(empty_database, "migrate")

    org_id = await create_org(empty_database, "fresh database org")

    assert migrated.returncode == 0, migrated.stderr
    assert uuid.UUID(org_id)


async def test_quota_recount_repairs_wrong_counts(database_url: str, server: Server) -> None:
    org_id = await create_org(database_url)
    key = await create_key(database_url, org_id)
    async with client_for(server, key["api_key"]) as client:
        created = await client.post(
            "/experiments",
            json={
                "tool_id": "test.sleep",
                "target": {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm"},
                "input_config": {"steps": 600, "step_seconds": 0.1, "cost": 0.5},
            },
        )
        assert created.status_code == 201, created.text
        conn = await connect_admin(database_url)
        try:
            # What an engine older than migration 006 would leave: a count that misses a run.
            await conn.execute(
                "UPDATE iiq.experiment_quota SET active = 7, reserved_gpu_hours = 3 WHERE org_id = $1",
                uuid.UUID(org_id),
            )
        finally:
            await conn.close()

        result = parse_json(await run_cli(database_url, "quota", "recount", "--org", org_id, "--json"))
        again = parse_json(await run_cli(database_url, "quota", "recount", "--org", org_id, "--json"))
        quota_view = (await client.get("/quota")).json()
        await client.post(f"/experiments/{created.json()['id']}/cancel")

    assert result["orgs_checked"] == 1
    assert result["orgs_corrected"] == [
        {
            "org_id": org_id,
            "active_before": 7,
            "active": 1,
            "reserved_gpu_hours_before": 3.0,
            "reserved_gpu_hours": 0.5,
        }
    ]
    assert again["orgs_corrected"] == []
    assert (quota_view["active"], quota_view["reserved_gpu_hours"]) == (1, 0.5)


async def test_quota_recount_unknown_org(database_url: str) -> None:
    result = await run_cli(database_url, "quota", "recount", "--org", str(uuid.uuid4()))

    assert result.returncode == 1
    assert "not found" in result.stderr


async def test_run_ends_when_count_is_too_low(database_url: str, server: Server) -> None:
    org_id = await create_org(database_url)
    key = await create_key(database_url, org_id)
    async with client_for(server, key["api_key"]) as client:
        created = await client.post(
            "/experiments",
            json={
                "tool_id": "test.sleep",
                "target": {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm"},
                "input_config": {"steps": 600, "step_seconds": 0.1},
            },
        )
        conn = await connect_admin(database_url)
        try:
            await conn.execute("UPDATE iiq.experiment_quota SET active = 0 WHERE org_id = $1", uuid.UUID(org_id))
        finally:
            await conn.close()

        experiment_url = f"/experiments/{created.json()['id']}"
        cancelled = await client.post(f"{experiment_url}/cancel")
        for _ in range(150):
            status = (await client.get(experiment_url)).json()["status"]
            if status == "cancelled":
                break
            await asyncio.sleep(0.1)
        quota_view = (await client.get("/quota")).json()

    assert cancelled.status_code == 200, cancelled.text
    assert status == "cancelled"
    assert quota_view["active"] == 0
