"""`RunEvents` news: a notification from another writer wakes the runner's next wait, never lost."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from iiq.experiments.events import PostgresEventBus, StoredEvent
from iiq.experiments.run_events import RunEvents


class _Streams:
    """The local streams of a process, reduced to the watch a runner registers."""

    def __init__(self) -> None:
        self.watchers: list[Callable[[int | None], None]] = []

    def expect(self, event: StoredEvent) -> None: ...

    def deliver(self, event: StoredEvent) -> None: ...

    def abandon(self, event: StoredEvent) -> None: ...

    def watch(self, experiment_id: uuid.UUID, callback: Callable[[int | None], None]) -> None:
        self.watchers.append(callback)

    def unwatch(self, experiment_id: uuid.UUID, callback: Callable[[int | None], None]) -> None:
        self.watchers.remove(callback)


def _watched() -> tuple[RunEvents, _Streams]:
    streams = _Streams()
    events = RunEvents(Any, PostgresEventBus(local=streams), uuid.uuid4())  # type: ignore[arg-type]
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


async def test_own_events_are_not_news() -> None:
    events, streams = _watched()
    events.note_published(
        StoredEvent(
            experiment_id=events.experiment_id,
            seq=3,
            event_type="progress",
            stage=None,
            payload={},
            created_at=datetime.now(UTC),
        )
    )

    streams.watchers[0](3)

    assert await _woken(events, 0.01) is False
