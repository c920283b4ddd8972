"""Events written in this process reach its streams right after their commit, on real Postgres.

`iiq serve` runs the worker beside the streams: its runner hands each committed event to the
hub, so a stream need not wait for the notification and a read of the row. These tests check
that the hand-off alone delivers and that a rolled-back event never reaches a stream. They check
that a gap is filled from the table and that a notification for an event the feed contains or
expects causes no read. They also check that the runner learns of a cancel request from its
notification rather than from a poll.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import msgspec
import pytest

from iiq.db.tx import service_transaction
from iiq.experiments.context import ExperimentContext
from iiq.experiments.events import EVENTS_CHANNEL, PostgresEventBus, StoredEvent, append_event
from iiq.experiments.feed import Feed
from iiq.experiments.hub import EventHub
from iiq.experiments.registry import ToolHandler, register, unregister
from iiq.experiments.run_events import RunEvents
from iiq.experiments.runner import _RunBackend, run_experiment
from iiq.experiments.states import Status
from tests.conftest import Server, Tenant
from tests.support.lifecycle import create_unqueued, fetch_events
from tests.support.sse import Message, read_stream

TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm"}


@asynccontextmanager
async def _deaf(hub: EventHub) -> AsyncIterator[None]:
    """Stop `hub` from hearing notifications for the duration of the block."""
    conn = hub._conn
    assert conn is not None
    await conn.remove_listener(EVENTS_CHANNEL, hub._on_notification)  # type: ignore[arg-type]
    try:
        yield
    finally:
        await conn.add_listener(EVENTS_CHANNEL, hub._on_notification)  # type: ignore[arg-type]


class _CountingPool:
    """The service pool, counting the connections taken: one per feed read."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.acquired = 0

    def acquire(self) -> Any:
        self.acquired += 1
        return self._pool.acquire()


async def _emit_concurrently(ctx: ExperimentContext) -> None:
    """Emit `count` events at once, so their commits and hand-offs interleave."""
    count = int(ctx.input_config.get("count", 20))
    await asyncio.gather(
        *(ctx.emit("progress", stage=f"c-{index}", payload={"index": index}) for index in range(count))
    )
    await ctx.save_results({"emitted": count})


async def _emit_then_change(ctx: ExperimentContext) -> None:
    """Emit a payload, then change the list inside it, as a careless handler might."""
    items = ["first"]
    await ctx.emit("progress", stage="shared", payload={"items": items, "pair": (1, 2), "ratio": 0.1})
    items.append("changed after the emit")
    await ctx.save_results({"items": len(items)})


@pytest.fixture(scope="module")
def handoff_tools() -> Iterator[None]:
    handlers = [
        ToolHandler(
            tool_id="test.emit_concurrently",
            validate=lambda cfg: [],
            estimate_cost=lambda cfg: 0.01,
            run=_emit_concurrently,
        ),
        ToolHandler(
            tool_id="test.emit_then_change",
            validate=lambda cfg: [],
            estimate_cost=lambda cfg: 0.01,
            run=_emit_then_change,
        ),
    ]
    for handler in handlers:
        register(handler)
    yield
    for handler in handlers:
        unregister(handler.tool_id)


def _hub(server: Server) -> EventHub:
    hub = server.runtime.hub
    assert hub is not None
    return hub


async def _wait_for_subscribers(hub: EventHub, count: int) -> None:
    for _ in range(200):
        if hub.subscriber_count() >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} subscribers expected, {hub.subscriber_count()} found")


@asynccontextmanager
async def _stream(server: Server, tenant: Tenant, experiment_id: uuid.UUID) -> AsyncIterator[asyncio.Task[Any]]:
    """Open the experiment's SSE stream over HTTP and yield the task that reads it to the end."""
    hub = _hub(server)
    before = hub.subscriber_count()
    task = asyncio.create_task(read_stream(tenant.client, f"/experiments/{experiment_id}/events"))
    try:
        await _wait_for_subscribers(hub, before + 1)
        yield task
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _wait_for_wakes(wakes: list[int], count: int) -> None:
    """Wait up to 2 s for the feed to have woken its streams `count` times."""
    for _ in range(200):
        if len(wakes) >= count:
            return
        await asyncio.sleep(0.01)


def _ids(messages: list[Message]) -> list[int]:
    return [int(message.id or 0) for message in messages]


async def test_handed_over_events_reach_stream_without_notification(
    server: Server, tenant: Tenant, handoff_tools: None
) -> None:
    pool, hub = server.runtime.pool, _hub(server)
    experiment_id = await create_unqueued(pool, server.settings, tenant.org_id, "test.emit", {"count": 5, "size": 3})
    subscription = hub.subscribe(experiment_id)
    try:
        async with _stream(server, tenant, experiment_id) as stream:
            async with _deaf(hub):
                status = await run_experiment(
                    pool, experiment_id, PostgresEventBus(local=hub), settings=server.settings
                )

            # No notification was heard and nothing was read: the feed contains the run's events
            # (running, five progress events, completed) as soon as the run returns.
            cached = subscription.feed.events_after(2)
            assert cached is not None
            assert [(event.seq, event.stage) for event in cached] == [
                (3, "running"),
                *((4 + index, f"event-{index}") for index in range(5)),
                (9, "completed"),
            ]
            assert subscription.feed.terminal_seq == 9
            assert await subscription.wait(0) is True

            messages, _ = await asyncio.wait_for(stream, timeout=10)
    finally:
        subscription.close()

    assert status is Status.COMPLETED
    assert _ids(messages) == list(range(1, 10))
    assert messages[-1].data["stage"] == "completed"


async def test_rolled_back_event_never_reaches_feed(server: Server, tenant: Tenant) -> None:
    pool, hub = server.runtime.pool, _hub(server)
    experiment_id = await create_unqueued(pool, server.settings, tenant.org_id, "test.sleep", {"steps": 1})
    writer = RunEvents(pool, PostgresEventBus(local=hub), experiment_id)
    subscription = hub.subscribe(experiment_id)
    try:
        # Rolled back by an error in the transaction, after the event was published.
        with pytest.raises(RuntimeError):
            async with writer.transaction() as (conn, tx_bus):
                event = await append_event(conn, experiment_id, "note", "doomed", {}, max_payload_bytes=1000)
                await tx_bus.publish(conn, event)
                raise RuntimeError("the transaction fails after the event was published")

        # Rolled back by the commit itself: a deferred constraint fails at COMMIT.
        with pytest.raises(asyncpg.UniqueViolationError):
            async with writer.transaction() as (conn, tx_bus):
                await conn.execute(
                    "CREATE TEMP TABLE handoff_commit_check (x int UNIQUE DEFERRABLE INITIALLY DEFERRED) ON COMMIT DROP"
                )
                await conn.execute("INSERT INTO handoff_commit_check VALUES (1), (1)")
                event = await append_event(conn, experiment_id, "note", "doomed", {}, max_payload_bytes=1000)
                await tx_bus.publish(conn, event)

        # Neither the hand-off nor a notification woke the feed's streams.
        assert await subscription.wait(0.3) is False
        assert subscription.feed.events_after(2) is None

        # The next committed event reuses the rolled-back sequence number and is delivered.
        async with writer.transaction() as (conn, tx_bus):
            event = await append_event(conn, experiment_id, "note", "kept", {}, max_payload_bytes=1000)
            await tx_bus.publish(conn, event)
        cached = subscription.feed.events_after(2)
        assert cached is not None
        assert [(event.seq, event.stage) for event in cached] == [(3, "kept")]
    finally:
        subscription.close()

    stored = await fetch_events(pool, experiment_id)
    assert [row["stage"] for row in stored] == ["pending", "queued", "kept"]


async def _append_unannounced(pool: asyncpg.Pool, experiment_id: uuid.UUID, count: int) -> list[StoredEvent]:
    async with service_transaction(pool) as conn:
        return [
            await append_event(conn, experiment_id, "note", f"n-{index}", {"index": index}, max_payload_bytes=1000)
            for index in range(count)
        ]


async def test_gap_reads_table_and_held_notification_reads_nothing(server: Server, tenant: Tenant) -> None:
    pool = server.runtime.pool
    experiment_id = await create_unqueued(pool, server.settings, tenant.org_id, "test.sleep", {"steps": 1})
    third, fourth, fifth = await _append_unannounced(pool, experiment_id, 3)
    counting = _CountingPool(pool)
    feed = Feed(experiment_id, counting)  # type: ignore[arg-type]
    wakes: list[int] = []

    def wake() -> None:
        wakes.append(len(wakes))

    # In order: taken without a read.
    feed.offer(third, wake)
    feed.announce(third.seq, wake)
    assert counting.acquired == 0
    assert len(wakes) == 1

    # The fourth event is missing: the fifth starts a read, which returns both.
    feed.offer(fifth, wake)
    await _wait_for_wakes(wakes, 2)
    cached = feed.events_after(2)
    assert cached is not None
    assert [event.seq for event in cached] == [3, 4, 5]
    assert counting.acquired == 1

    # Their notifications and a late hand-off of the fourth event change nothing.
    feed.announce(fourth.seq, wake)
    feed.announce(fifth.seq, wake)
    feed.offer(fourth, wake)
    await asyncio.sleep(0.05)
    assert counting.acquired == 1
    assert len(wakes) == 2
    feed.close()


async def test_notification_before_hand_off_reads_nothing(server: Server, tenant: Tenant) -> None:
    pool = server.runtime.pool
    experiment_id = await create_unqueued(pool, server.settings, tenant.org_id, "test.sleep", {"steps": 1})
    third, fourth = await _append_unannounced(pool, experiment_id, 2)
    counting = _CountingPool(pool)
    feed = Feed(experiment_id, counting)  # type: ignore[arg-type]
    wakes: list[int] = []

    def wake() -> None:
        wakes.append(len(wakes))

    # The writer's COMMIT has not returned yet when the notification arrives.
    feed.expect(third.seq)
    feed.announce(third.seq, wake)
    assert counting.acquired == 0
    assert wakes == []
    feed.offer(third, wake)
    assert counting.acquired == 0
    assert len(wakes) == 1

    # A writer that cannot tell whether it committed abandons the event: the notification
    # held back meanwhile is read after all.
    feed.expect(fourth.seq)
    feed.announce(fourth.seq, wake)
    feed.abandon(fourth.seq, wake)
    await _wait_for_wakes(wakes, 2)
    cached = feed.events_after(2)
    assert cached is not None
    assert [event.seq for event in cached] == [3, 4]
    assert counting.acquired == 1
    feed.close()


async def test_cancel_request_wakes_runner_without_poll(server: Server, tenant: Tenant) -> None:
    pool = server.runtime.pool
    # The poll alone would take 30 s to see the request.
    settings = msgspec.structs.replace(server.settings, cancel_poll_seconds=30.0, cancel_grace_seconds=0.5)
    experiment_id = await create_unqueued(pool, settings, tenant.org_id, "test.ignore_cancel", {"seconds": 60}, TARGET)
    run = asyncio.create_task(run_experiment(pool, experiment_id, server.runtime.bus, settings=settings))
    for _ in range(200):
        if (await tenant.client.get(f"/experiments/{experiment_id}")).json()["status"] == "running":
            break
        await asyncio.sleep(0.02)

    response = await tenant.client.post(f"/experiments/{experiment_id}/cancel")
    assert response.status_code == 200, response.text
    status = await asyncio.wait_for(run, timeout=10)

    assert status is Status.CANCELLED


async def test_own_notifications_do_not_wake_runner(
    server: Server, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = server.runtime.pool
    settings = msgspec.structs.replace(server.settings, cancel_poll_seconds=30.0)
    checks: list[uuid.UUID] = []
    check_cancelled = _RunBackend.check_cancelled

    async def counted(self: _RunBackend) -> bool:
        checks.append(self.experiment_id)
        return await check_cancelled(self)

    monkeypatch.setattr(_RunBackend, "check_cancelled", counted)
    experiment_id = await create_unqueued(
        pool, settings, tenant.org_id, "test.sleep", {"steps": 20, "step_seconds": 0.01}, TARGET
    )
    # test.sleep checks once per step itself; any further check came from a notification.
    status = await run_experiment(pool, experiment_id, server.runtime.bus, settings=settings)

    assert status is Status.COMPLETED
    assert len(checks) == 20


async def test_concurrent_emits_stream_in_order(server: Server, tenant: Tenant, handoff_tools: None) -> None:
    pool = server.runtime.pool
    experiment_id = await create_unqueued(
        pool, server.settings, tenant.org_id, "test.emit_concurrently", {"count": 30}, TARGET
    )

    async with _stream(server, tenant, experiment_id) as stream:
        status = await run_experiment(pool, experiment_id, server.runtime.bus, settings=server.settings)
        messages, _ = await asyncio.wait_for(stream, timeout=10)

    assert status is Status.COMPLETED
    # pending, queued, running, 30 progress events, completed: each once, in sequence order.
    assert _ids(messages) == list(range(1, 35))
    stored = await fetch_events(pool, experiment_id)
    assert [(row["seq"], row["stage"]) for row in stored] == [
        (int(message.id or 0), message.data["stage"]) for message in messages
    ]


async def test_handed_over_payload_matches_table(server: Server, tenant: Tenant, handoff_tools: None) -> None:
    pool = server.runtime.pool
    experiment_id = await create_unqueued(pool, server.settings, tenant.org_id, "test.emit_then_change", {}, TARGET)

    async with _stream(server, tenant, experiment_id) as stream:
        await run_experiment(pool, experiment_id, server.runtime.bus, settings=server.settings)
        live, _ = await asyncio.wait_for(stream, timeout=10)
    # Opened after the run, this stream reads every event from the table.
    replayed, _ = await asyncio.wait_for(
        read_stream(tenant.client, f"/experiments/{experiment_id}/events?last_event_id=0"), timeout=10
    )

    shared = [message.data["payload"] for message in live if message.data["stage"] == "shared"]
    assert shared == [{"items": ["first"], "pair": [1, 2], "ratio": 0.1}]
    assert [message.data for message in live] == [message.data for message in replayed]
