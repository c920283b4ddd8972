"""`RunEvents` news: a notification from another writer wakes the runner's next wait, never lost.

Also the hand-off of an event written by a statement that commits by itself: its notification
may arrive before the statement's reply, and must not be taken for news.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from iiq.experiments.events import PostgresEventBus, StoredEvent
from iiq.experiments.run_events import RunEvents


class _Streams:
    """The local streams of a process, reduced to the watch a runner registers."""

    def __init__(self) -> None:
        self.watchers: list[Callable[[int | None], None]] = []
        self.delivered: list[int] = []
        self.writes_in_flight = 0

    def expect(self, event: StoredEvent) -> None: ...

    def begin_write(self, experiment_id: uuid.UUID) -> None:
        self.writes_in_flight += 1

    def end_write(self, experiment_id: uuid.UUID) -> None:
        self.writes_in_flight -= 1

    def deliver(self, event: StoredEvent) -> None:
        self.delivered.append(event.seq)

    def abandon(self, event: StoredEvent) -> None: ...

    def watch(self, experiment_id: uuid.UUID, callback: Callable[[int | None], None]) -> None:
        self.watchers.append(callback)

    def unwatch(self, experiment_id: uuid.UUID, callback: Callable[[int | None], None]) -> None:
        self.watchers.remove(callback)


class _Pool:
    """A pool whose connections are never used: the tests publish events they make up."""

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        yield None


def _watched() -> tuple[RunEvents, _Streams]:
    streams = _Streams()
    events = RunEvents(_Pool(), PostgresEventBus(local=streams), uuid.uuid4())  # type: ignore[arg-type]
    events.watch()
    return events, streams


async def _woken(events: RunEvents, timeout: float) -> bool:
    done, _ = await asyncio.wait({events.next_news()}, timeout=timeout)
    return bool(done)


async def test_news_wakes_waiting_runner() -> None:
    events, streams = _watched()
    waiting = asyncio.ensure_future(_woken(events, 1.0))
    await asyncio.sleep(0)

    streams.watchers[0](7)

    assert await waiting is True


async def test_news_between_waits_wakes_next_wait() -> None:
    events, streams = _watched()
    # The supervisor's wait ends on its poll timeout, then it reads the row...
    assert await _woken(events, 0.01) is False
    events.take_news()
    # ...and the cancel request's notification arrives while that read is under way.
    streams.watchers[0](7)

    assert await _woken(events, 0.2) is True


async def test_taken_news_does_not_wake_again() -> None:
    events, streams = _watched()
    streams.watchers[0](7)
    assert await _woken(events, 0.2) is True

    events.take_news()

    assert await _woken(events, 0.01) is False


def _event(events: RunEvents, seq: int) -> StoredEvent:
    return StoredEvent(
        experiment_id=events.experiment_id,
        seq=seq,
        event_type="progress",
        stage=None,
        payload={},
        created_at=datetime.now(UTC),
    )


async def test_own_events_are_not_news() -> None:
    events, streams = _watched()
    events.note_published(_event(events, 3))

    streams.watchers[0](3)

    assert await _woken(events, 0.01) is False


async def test_early_own_notification_not_news() -> None:
    events, streams = _watched()

    async with events.single_statement() as (conn, bus):
        assert streams.writes_in_flight == 1
        streams.watchers[0](3)  # the statement committed; its reply has not arrived yet
        await bus.publish(conn, _event(events, 3))

    assert streams.writes_in_flight == 0
    assert streams.delivered == [3]
    assert await _woken(events, 0.01) is False


async def test_other_event_during_write_is_news() -> None:
    events, streams = _watched()

    async with events.single_statement() as (conn, bus):
        streams.watchers[0](4)  # a cancel request, committed just after this statement
        await bus.publish(conn, _event(events, 3))

    assert await _woken(events, 0.2) is True


async def test_failed_write_notification_is_news() -> None:
    events, streams = _watched()

    try:
        async with events.single_statement():
            streams.watchers[0](3)
            raise OSError("connection lost")
    except OSError:
        pass

    assert streams.delivered == []
    assert await _woken(events, 0.2) is True
