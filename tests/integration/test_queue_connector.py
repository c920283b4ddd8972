"""AsyncpgConnector and the procrastinate schema installer against a real PostgreSQL.

Each module run creates a database named iiq_conn_test_<random> on the server of the
`admin_url` fixture (see tests/conftest.py) and drops it afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import socket
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import procrastinate
import pytest
import pytest_asyncio
from procrastinate import exceptions, jobs
from procrastinate.manager import JobManager
from procrastinate.schema import SchemaManager

from iiq.queue.connector import AsyncpgConnector, init_connection
from iiq.queue.listener import ListenOptions
from iiq.queue.schema import install_procrastinate_schema

SERVER_SETTINGS = {"search_path": "procrastinate,public"}
# Upper bound for every wait in this module, in seconds.
TIMEOUT = 15.0
# Short listener timings so that loss and recovery happen within a test.
FAST_LISTEN = ListenOptions(check_interval=0.3, check_timeout=0.5, connect_timeout=2.0, reconnect_initial_delay=0.05)


def dsn_for_database(admin_url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(admin_url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


async def wait_until(condition: Callable[[], Awaitable[bool]], description: str) -> None:
    try:
        async with asyncio.timeout(TIMEOUT):
            while not await condition():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {TIMEOUT} s waiting for {description}") from None


@pytest_asyncio.fixture(scope="module")
async def database_dsn(admin_url: str) -> AsyncIterator[str]:
    name = f"iiq_conn_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()

    try:
        yield dsn_for_database(admin_url, name)
    finally:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest_asyncio.fixture(scope="module")
async def pool(database_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(
        database_dsn, init=init_connection, server_settings=SERVER_SETTINGS, min_size=1, max_size=6
    ) as pool:
        async with pool.acquire() as conn:
            await install_procrastinate_schema(conn)
            await conn.execute("CREATE TABLE public.probe_rows (id bigint PRIMARY KEY)")
        yield pool


@dataclasses.dataclass
class Harness:
    app: procrastinate.App
    connector: AsyncpgConnector
    pool: asyncpg.Pool
    record_call: Any
    executed: list[dict[str, Any]]

    @property
    def job_manager(self) -> JobManager:
        return self.app.job_manager

    async def job_count(self) -> int:
        count: int = await self.pool.fetchval("SELECT count(*) FROM procrastinate_jobs")
        return count


@pytest_asyncio.fixture(scope="module")
async def module_harness(pool: asyncpg.Pool, database_dsn: str) -> AsyncIterator[Harness]:
    connector = AsyncpgConnector(pool, dsn=database_dsn, server_settings=SERVER_SETTINGS)
    app = procrastinate.App(connector=connector)
    executed: list[dict[str, Any]] = []

    @app.task(name="record_call")
    async def record_call(**kwargs: Any) -> None:
        executed.append(kwargs)

    async with app.open_async():
        yield Harness(app, connector, pool, record_call, executed)


@pytest_asyncio.fixture
async def harness(module_harness: Harness) -> Harness:
    await module_harness.pool.execute(
        "TRUNCATE procrastinate_jobs, procrastinate_events, procrastinate_workers,"
        " procrastinate_periodic_defers, public.probe_rows"
    )
    module_harness.executed.clear()
    return module_harness


# Schema installation


async def test_schema_install_twice_is_noop(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        assert await install_procrastinate_schema(conn, "procrastinate_twice") is True
        assert await install_procrastinate_schema(conn, "procrastinate_twice") is False

        table = await conn.fetchval("SELECT to_regclass('procrastinate_twice.procrastinate_jobs')")
        assert table is not None


async def test_schema_install_concurrent_installs_once(database_dsn: str) -> None:
    first = await asyncpg.connect(database_dsn)
    second = await asyncpg.connect(database_dsn)
    try:
        async with asyncio.timeout(TIMEOUT):
            results = await asyncio.gather(
                install_procrastinate_schema(first, "procrastinate_race"),
                install_procrastinate_schema(second, "procrastinate_race"),
            )
    finally:
        await first.close()
        await second.close()

    assert sorted(results) == [False, True]


async def test_schema_install_keeps_outer_search_path(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        before = await conn.fetchval("SELECT current_setting('search_path')")
        assert await install_procrastinate_schema(conn, "procrastinate_nested") is True
        after = await conn.fetchval("SELECT current_setting('search_path')")

    assert after == before


async def test_schema_manager_apply_via_connector(database_dsn: str) -> None:
    # No arguments: the script goes over the simple query protocol, and its `%%` (escaped
    # for psycopg by SchemaManager) must reach Postgres as `%`.
    admin = await asyncpg.connect(database_dsn)
    try:
        await admin.execute("CREATE SCHEMA procrastinate_manager")
    finally:
        await admin.close()
    connector = AsyncpgConnector(dsn=database_dsn, server_settings={"search_path": "procrastinate_manager"})

    await connector.open_async()
    try:
        await SchemaManager(connector).apply_schema_async()
        row = await connector.execute_query_one_async(
            "SELECT prosrc LIKE '%%job id: %%' AS has_percent FROM pg_proc"
            " WHERE proname = 'procrastinate_finish_job_v1'"
        )
        assert await JobManager(connector).check_connection_async() is True
        assert row["has_percent"] is True
    finally:
        await connector.close_async()

    with pytest.raises(exceptions.AppNotOpen):
        await connector.execute_query_async("SELECT 1")


# Query translation, results and errors


async def test_repeated_parameter_and_escaped_percent(harness: Harness) -> None:
    row = await harness.connector.execute_query_one_async(
        "SELECT %(x)s::int + %(x)s::int AS doubled, '100%%' AS literal, %(y)s::text AS y",
        x=21,
        y="b",
        unused="ignored like psycopg ignores it",
    )

    assert row == {"doubled": 42, "literal": "100%", "y": "b"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [(5, "5 SECOND"), (2.5, "2.5 SECOND"), ("7", "7 SECOND"), (True, "true SECOND")],
)
async def test_text_parameter_accepts_non_string(harness: Harness, value: object, expected: str) -> None:
    row = await harness.connector.execute_query_one_async("SELECT %(value)s || ' SECOND' AS text", value=value)

    assert row["text"] == expected


async def test_query_one_empty_raises_no_result(harness: Harness) -> None:
    with pytest.raises(exceptions.NoResult):
        await harness.connector.execute_query_one_async("SELECT 1 WHERE false")


async def test_driver_error_wrapped(harness: Harness) -> None:
    with pytest.raises(exceptions.ConnectorException) as caught:
        await harness.connector.execute_query_all_async("SELECT * FROM no_such_table")

    assert isinstance(caught.value.__cause__, asyncpg.UndefinedTableError)
    assert "no_such_table" in str(caught.value)


async def test_missing_argument_raises(harness: Harness) -> None:
    with pytest.raises(exceptions.ConnectorException, match="missing query argument 'a'"):
        await harness.connector.execute_query_one_async("SELECT %(a)s::int AS a")


async def test_sync_api_raises_clear_error(harness: Harness) -> None:
    with pytest.raises(exceptions.ConnectorException, match="async only"):
        harness.connector.execute_query("SELECT 1")
    with pytest.raises(exceptions.ConnectorException, match="async only"):
        harness.record_call.defer(value=1)

    assert harness.connector.get_sync_connector() is harness.connector


async def test_open_async_rejects_second_pool(harness: Harness, database_dsn: str) -> None:
    async with asyncpg.create_pool(database_dsn, init=init_connection, min_size=1) as other:
        with pytest.raises(exceptions.ConnectorException, match="already uses another pool"):
            await harness.connector.open_async(other)

    await harness.connector.open_async(harness.pool)
    await harness.connector.close_async()
    assert await harness.pool.fetchval("SELECT 1") == 1


@pytest.mark.parametrize(
    "value",
    [
        {"nested": [1, 2.5, None, True, "é ☃", {"k": []}]},
        [1, "two", {"three": 3}],
        "plain string",
        2**70,
        -(2**63) - 1,
        None,
        0.1,
    ],
)
async def test_json_codecs_round_trip(pool: asyncpg.Pool, value: object) -> None:
    jsonb_value = await pool.fetchval("SELECT $1::jsonb", value)
    json_value = await pool.fetchval("SELECT $1::json", value)

    assert jsonb_value == value
    assert json_value == value


async def test_json_huge_number_decodes(pool: asyncpg.Pool) -> None:
    # jsonb renders 1e400 as a 401-digit integer, json keeps the text 1e400.
    assert await pool.fetchval("SELECT '1e400'::jsonb") == 10**400
    assert await pool.fetchval("SELECT '1e400'::json") == float("inf")


# Deferring and running jobs


async def test_worker_runs_deferred_job(harness: Harness) -> None:
    args = {"nested": {"values": [1, "é", None, 2**70]}}
    job_id = await harness.record_call.defer_async(payload=args)

    worker = harness.app.run_worker_async(wait=False, install_signal_handlers=False, listen_notify=False)
    await asyncio.wait_for(worker, TIMEOUT)

    assert harness.executed == [{"payload": args}]
    assert await harness.job_manager.get_job_status_async(job_id) == jobs.Status.SUCCEEDED


async def test_worker_wakes_on_notification(harness: Harness) -> None:
    # With a 60 s polling interval only the LISTEN notification can start the job in time.
    worker = asyncio.create_task(
        harness.app.run_worker_async(install_signal_handlers=False, fetch_job_polling_interval=60, listen_notify=True)
    )
    try:

        async def worker_listening() -> bool:
            count: int = await harness.pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %'"
            )
            return count > 0

        await wait_until(worker_listening, "the worker's LISTEN connection")
        await harness.record_call.defer_async(step="notified")

        async def job_ran() -> bool:
            return harness.executed == [{"step": "notified"}]

        await wait_until(job_ran, "the job to run")
    finally:
        worker.cancel()
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(worker, return_exceptions=True)


async def test_transactional_defer_rolled_back_leaves_no_job(harness: Harness) -> None:
    async with harness.pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("INSERT INTO public.probe_rows (id) VALUES (1)")
        await harness.record_call.configure(connection=conn).defer_async(value=1)
        await transaction.rollback()

    assert await harness.job_count() == 0
    assert await harness.pool.fetchval("SELECT count(*) FROM public.probe_rows") == 0


async def test_transactional_defer_committed_leaves_job(harness: Harness) -> None:
    async with harness.pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute("INSERT INTO public.probe_rows (id) VALUES (1)")
            job_id = await harness.record_call.configure(connection=conn).defer_async(value=1)
            # Another session does not see the job before the commit.
            assert await harness.job_count() == 0

    row = await harness.pool.fetchrow("SELECT status, args FROM procrastinate_jobs WHERE id = $1", job_id)
    assert row is not None
    assert row["status"] == "todo"
    assert row["args"] == {"value": 1}
    assert await harness.pool.fetchval("SELECT count(*) FROM public.probe_rows") == 1


async def test_queueing_lock_raises_already_enqueued(harness: Harness) -> None:
    deferrer = harness.record_call.configure(queueing_lock="lock-a")
    await deferrer.defer_async()

    with pytest.raises(exceptions.AlreadyEnqueued) as caught:
        await deferrer.defer_async()

    cause = caught.value.__cause__
    assert isinstance(cause, exceptions.UniqueViolation)
    assert cause.constraint_name == "procrastinate_jobs_queueing_lock_idx_v1"
    assert cause.queueing_lock == "lock-a"


async def test_queueing_lock_on_connection(harness: Harness) -> None:
    await harness.record_call.configure(queueing_lock="lock-b").defer_async()

    async with harness.pool.acquire() as conn:
        with pytest.raises(exceptions.AlreadyEnqueued):
            async with conn.transaction():
                deferrer = harness.record_call.configure(queueing_lock="lock-b", connection=conn)
                await deferrer.defer_async()

    assert await harness.job_count() == 1


async def test_batch_defer_on_connection(harness: Harness) -> None:
    async with harness.pool.acquire() as conn, conn.transaction():
        deferrer = harness.record_call.configure(connection=conn)
        job_ids = await deferrer.batch_defer_async({"n": 1}, {"n": 2}, {"n": 3})

    assert len(set(job_ids)) == 3
    assert await harness.job_count() == 3


async def test_cancel_job_with_connection(harness: Harness) -> None:
    manager = harness.job_manager
    rolled_back_id = await harness.record_call.defer_async(value="rolled back")
    committed_id = await harness.record_call.defer_async(value="committed")

    async with harness.pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        assert await manager.cancel_job_by_id_async(rolled_back_id, connection=conn) is True
        await transaction.rollback()

        async with conn.transaction():
            assert await manager.cancel_job_by_id_async(committed_id, connection=conn) is True
            status = await manager.get_job_status_async(committed_id, connection=conn)
            assert status == jobs.Status.CANCELLED

    assert await manager.get_job_status_async(rolled_back_id) == jobs.Status.TODO
    assert await manager.get_job_status_async(committed_id) == jobs.Status.CANCELLED


# Maintenance queries whose parameters Postgres types as text


async def start_job(harness: Harness) -> tuple[int, jobs.Job]:
    await harness.record_call.defer_async(value="stalled")
    worker_id = await harness.job_manager.register_worker()
    job = await harness.job_manager.fetch_job(queues=None, worker_id=worker_id)
    assert job is not None
    return worker_id, job


async def test_get_stalled_jobs_by_heartbeat(harness: Harness) -> None:
    worker_id, job = await start_job(harness)
    assert list(await harness.job_manager.get_stalled_jobs()) == []

    await harness.pool.execute(
        "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour' WHERE id = $1",
        worker_id,
    )
    stalled = list(await harness.job_manager.get_stalled_jobs(seconds_since_heartbeat=30.5))

    assert [stalled_job.id for stalled_job in stalled] == [job.id]
    assert stalled[0].task_kwargs == {"value": "stalled"}


async def test_get_stalled_jobs_by_start_time(harness: Harness) -> None:
    _, job = await start_job(harness)
    with pytest.warns(DeprecationWarning):
        assert list(await harness.job_manager.get_stalled_jobs(nb_seconds=3600)) == []

    await harness.pool.execute(
        "UPDATE procrastinate_events SET at = now() - interval '2 hours' WHERE job_id = $1",
        job.id,
    )
    with pytest.warns(DeprecationWarning):
        stalled = list(await harness.job_manager.get_stalled_jobs(nb_seconds=3600))

    assert [stalled_job.id for stalled_job in stalled] == [job.id]


async def test_delete_old_jobs(harness: Harness) -> None:
    _, job = await start_job(harness)
    await harness.job_manager.finish_job(job, status=jobs.Status.SUCCEEDED, delete_job=False)
    await harness.job_manager.delete_old_jobs(nb_hours=1)
    assert await harness.job_count() == 1

    await harness.pool.execute(
        "UPDATE procrastinate_events SET at = now() - interval '2 hours' WHERE job_id = $1",
        job.id,
    )
    await harness.job_manager.delete_old_jobs(nb_hours=1)

    assert await harness.job_count() == 0


async def test_prune_stalled_workers(harness: Harness) -> None:
    worker_id = await harness.job_manager.register_worker()
    await harness.pool.execute(
        "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour' WHERE id = $1",
        worker_id,
    )

    pruned = await harness.job_manager.prune_stalled_workers(seconds_since_heartbeat=30.0)

    assert pruned == [worker_id]


async def test_list_queues_decodes_json_stats(harness: Harness) -> None:
    await harness.record_call.defer_async(value=1)
    await harness.record_call.configure(queue="other").defer_async(value=2)

    queues = await harness.job_manager.list_queues_async()

    assert {queue["name"]: queue["todo"] for queue in queues} == {"default": 1, "other": 1}


async def test_scheduled_at_round_trips(harness: Harness) -> None:
    scheduled_at = datetime.datetime(2100, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    await harness.record_call.configure(schedule_at=scheduled_at).defer_async()

    [job] = await harness.job_manager.list_jobs_async()

    assert job.scheduled_at == scheduled_at


# LISTEN connection


OpenUpstream = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class BlackholeProxy:
    """TCP proxy to Postgres that can silently drop all traffic on the connections it has.

    Dropping without closing makes those connections half-open from the client's point of
    view, as when a network path dies. Connections opened later are forwarded normally.
    """

    def __init__(self, open_upstream: OpenUpstream) -> None:
        self.open_upstream = open_upstream
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: list[dict[str, Any]] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def blackhole_existing_connections(self) -> None:
        for connection in self._connections:
            connection["dropping"] = True

    async def stop(self) -> None:
        for connection in self._connections:
            for writer in connection["writers"]:
                writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await self.open_upstream()
        connection: dict[str, Any] = {"dropping": False, "writers": [writer, upstream_writer]}
        self._connections.append(connection)

        async def pipe(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    if not connection["dropping"]:
                        target.write(data)
                        await target.drain()
            except OSError:
                pass
            finally:
                target.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


async def upstream_opener(pool: asyncpg.Pool, dsn: str) -> OpenUpstream:
    """Return a function that connects to the server of `dsn` over TCP or its Unix socket."""
    target = urllib.parse.urlsplit(dsn)
    socket_directory = urllib.parse.parse_qs(target.query).get("host", [""])[0]
    if target.hostname or not socket_directory.startswith("/"):
        host, port = target.hostname or "127.0.0.1", target.port or 5432
        return lambda: asyncio.open_connection(host, port)

    server_port = await pool.fetchval("SELECT current_setting('port')")
    socket_path = f"{socket_directory}/.s.PGSQL.{server_port}"
    return lambda: asyncio.open_unix_connection(socket_path)


@dataclasses.dataclass
class Listening:
    connector: AsyncpgConnector
    application_name: str
    received: asyncio.Queue[tuple[str, str]]
    task: asyncio.Task[None]


@pytest_asyncio.fixture
async def start_listening(
    database_dsn: str,
) -> AsyncIterator[Callable[..., Awaitable[Listening]]]:
    started: list[Listening] = []

    async def start(
        dsn: str = database_dsn,
        channels: tuple[str, ...] = ("iiq_test_channel",),
        options: ListenOptions = FAST_LISTEN,
    ) -> Listening:
        application_name = f"iiq_conn_test_listener_{uuid.uuid4().hex[:8]}"
        connector = AsyncpgConnector(
            dsn=dsn,
            server_settings={"application_name": application_name},
            listen_options=options,
        )
        received: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

        async def on_notification(*, channel: str, payload: str) -> None:
            await received.put((channel, payload))

        task = asyncio.create_task(connector.listen_notify(on_notification, channels))
        listening = Listening(connector, application_name, received, task)
        started.append(listening)
        return listening

    yield start

    for listening in started:
        listening.task.cancel()
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(listening.task, return_exceptions=True)


async def listener_pids(pool: asyncpg.Pool, application_name: str) -> list[int]:
    rows = await pool.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1", application_name)
    return [row["pid"] for row in rows]


async def notify_until_received(pool: asyncpg.Pool, listening: Listening, channel: str = "iiq_test_channel") -> str:
    """Send numbered notifications until one arrives, and return its payload.

    A notification sent before the LISTEN is active is lost, so a single one could be missed.
    """
    async with asyncio.timeout(TIMEOUT):
        for number in range(1_000_000):
            payload = f"{uuid.uuid4().hex}-{number}"
            await pool.execute("SELECT pg_notify($1, $2)", channel, payload)
            try:
                received_channel, received_payload = await asyncio.wait_for(listening.received.get(), 0.2)
            except TimeoutError:
                continue
            assert received_channel == channel
            return received_payload
    raise AssertionError("unreachable")


def log_actions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(record, "action", "") for record in caplog.records]


def records_with_action(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if getattr(record, "action", "") == action]


async def test_listener_delivers_quoted_channel(
    pool: asyncpg.Pool, start_listening: Callable[..., Awaitable[Listening]]
) -> None:
    # The channel name needs quoting as an identifier, like procrastinate's per-queue channels.
    channel = "procrastinate_queue_v1#Mixed Case"
    listening = await start_listening(channels=(channel,))

    payload = await notify_until_received(pool, listening, channel)

    assert payload
    assert not listening.task.done()


async def test_listener_recovers_after_terminate(
    pool: asyncpg.Pool,
    start_listening: Callable[..., Awaitable[Listening]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="iiq.queue.listener")
    # No check query runs within the test, so only the termination listener can see the loss.
    listening = await start_listening(options=dataclasses.replace(FAST_LISTEN, check_interval=600))
    await notify_until_received(pool, listening)
    [old_pid] = await listener_pids(pool, listening.application_name)

    assert await pool.fetchval("SELECT pg_terminate_backend($1)", old_pid) is True
    await notify_until_received(pool, listening)

    [new_pid] = await listener_pids(pool, listening.application_name)
    assert new_pid != old_pid
    lost = records_with_action(caplog, "listen_connection_lost")
    assert [record.reason for record in lost] == ["connection closed"]
    assert "listen_reconnected" in log_actions(caplog)
    assert not listening.task.done()


async def test_listener_recovers_from_half_open(
    pool: asyncpg.Pool,
    database_dsn: str,
    start_listening: Callable[..., Awaitable[Listening]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="iiq.queue.listener")
    proxy = BlackholeProxy(await upstream_opener(pool, database_dsn))
    await proxy.start()
    try:
        target = urllib.parse.urlsplit(database_dsn)
        credentials = target.username or "postgres"
        if target.password:
            credentials += f":{target.password}"
        proxied_dsn = f"postgresql://{credentials}@127.0.0.1:{proxy.port}{target.path}"
        listening = await start_listening(dsn=proxied_dsn)
        await notify_until_received(pool, listening)

        proxy.blackhole_existing_connections()
        await notify_until_received(pool, listening)
    finally:
        await proxy.stop()

    lost = records_with_action(caplog, "listen_connection_lost")
    assert lost
    assert "check query failed" in lost[0].reason
    assert "listen_reconnected" in log_actions(caplog)


async def test_listener_retries_unreachable_server(
    start_listening: Callable[..., Awaitable[Listening]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="iiq.queue.listener")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    listening = await start_listening(dsn=f"postgresql://postgres@127.0.0.1:{closed_port}/postgres")

    async def failed_twice() -> bool:
        return log_actions(caplog).count("listen_connect_failed") >= 2

    await wait_until(failed_twice, "two failed connection attempts")

    assert not listening.task.done()
    attempts = [record.attempt for record in records_with_action(caplog, "listen_connect_failed")]
    assert attempts[:2] == [1, 2]


async def test_listener_cancel_closes_connection(
    pool: asyncpg.Pool, start_listening: Callable[..., Awaitable[Listening]]
) -> None:
    listening = await start_listening()
    await notify_until_received(pool, listening)
    assert len(await listener_pids(pool, listening.application_name)) == 1

    listening.task.cancel()
    async with asyncio.timeout(TIMEOUT):
        await asyncio.gather(listening.task, return_exceptions=True)

    async def backend_gone() -> bool:
        return await listener_pids(pool, listening.application_name) == []

    await wait_until(backend_gone, "the listener backend to exit")
    assert listening.task.cancelled()


async def test_listener_callback_error_propagates(database_dsn: str, pool: asyncpg.Pool) -> None:
    connector = AsyncpgConnector(dsn=database_dsn, listen_options=FAST_LISTEN)

    async def on_notification(*, channel: str, payload: str) -> None:
        raise ValueError(f"bad payload {payload}")

    task = asyncio.create_task(connector.listen_notify(on_notification, ["iiq_error_channel"]))
    async with asyncio.timeout(TIMEOUT):
        while not task.done():
            await pool.execute("SELECT pg_notify('iiq_error_channel', 'x')")
            await asyncio.sleep(0.05)

    with pytest.raises(ValueError, match="bad payload x"):
        task.result()
