"""The feed's hand-off of committed events and the subscription's wake-up, without a database.

A feed given events in order never reads the table, so these tests give it a pool that
fails the test if it is ever used.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import uvloop

from iiq.experiments.events import StoredEvent
from iiq.experiments.feed import Feed
from iiq.experiments.hub import EventHub, Subscription

EXPERIMENT = uuid.UUID("00000000-0000-4000-8000-000000000001")


class _UnusedPool:
    """Stands in for the pool where the feed must not read: any use fails the test."""

    def acquire(self) -> Any:
        raise AssertionError("the feed read the table")


def _event(seq: int, event_type: str = "progress", stage: str | None = None, **payload: Any) -> StoredEvent:
    return StoredEvent(
        experiment_id=EXPERIMENT,
        seq=seq,
        event_type=event_type,
        stage=stage,
        payload=payload,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


class _Wakes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def _feed(capacity: int = 512) -> Feed:
    return Feed(EXPERIMENT, _UnusedPool(), capacity=capacity)  # type: ignore[arg-type]


def _seqs(events: list[StoredEvent] | None) -> list[int] | None:
    return None if events is None else [event.seq for event in events]


def test_feed_takes_events_in_order_without_reading() -> None:
    feed, wakes = _feed(), _Wakes()

    for seq in (7, 8, 9):
        feed.offer(_event(seq), wakes)

    assert wakes.count == 3
    assert _seqs(feed.events_after(6)) == [7, 8, 9]
    assert _seqs(feed.events_after(8)) == [9]
    assert feed.events_after(9) == []
    assert feed.events_after(5) is None  # before the window: the stream reads the table


def test_feed_skips_events_it_contains() -> None:
    feed, wakes = _feed(), _Wakes()
    feed.offer(_event(3), wakes)
    feed.offer(_event(4), wakes)

    feed.announce(4, wakes)
    feed.announce(3, wakes)
    feed.offer(_event(4), wakes)

    assert wakes.count == 2
    assert _seqs(feed.events_after(2)) == [3, 4]


def test_feed_records_terminal_event() -> None:
    feed, wakes = _feed(), _Wakes()
    feed.offer(_event(1, "status", "running"), wakes)
    assert feed.terminal_seq is None

    feed.offer(_event(2, "status", "completed"), wakes)

    assert feed.terminal_seq == 2


def test_feed_copies_payload_of_handed_over_event() -> None:
    feed, wakes = _feed(), _Wakes()
    items = ["first"]
    event = _event(1, items=items, pair=(1, 2), ratio=float("nan"))

    feed.offer(event, wakes)
    items.append("changed by the handler after its emit")

    cached = feed.events_after(0)
    assert cached is not None
    # As the table returns it: JSON types, and NaN stored as null.
    assert cached[0].payload == {"items": ["first"], "pair": [1, 2], "ratio": None}


def test_feed_window_drops_oldest_events() -> None:
    feed, wakes = _feed(capacity=3), _Wakes()

    for seq in range(1, 6):
        feed.offer(_event(seq), wakes)

    assert _seqs(feed.events_after(2)) == [3, 4, 5]
    assert feed.events_after(1) is None


def test_rendered_once_per_event_for_all_streams() -> None:
    feed, wakes = _feed(capacity=2), _Wakes()
    for seq in (1, 2):
        feed.offer(_event(seq), wakes)
    calls: list[int] = []

    def render(event: StoredEvent) -> bytes:
        calls.append(event.seq)
        return f"message {event.seq}".encode()

    first = feed.rendered(_event(2), render)
    second = feed.rendered(_event(2), render)
    assert first is second
    assert calls == [2]

    # Once an event leaves the window its rendering is dropped with it, and events outside
    # the window are rendered for each caller.
    feed.offer(_event(3), wakes)
    feed.offer(_event(4), wakes)
    feed.rendered(_event(2), render)
    feed.rendered(_event(2), render)
    assert calls == [2, 2, 2]


class _FailingPool:
    """Counts the feed's reads; each fails as a lost connection would."""

    def __init__(self) -> None:
        self.reads = 0

    def acquire(self) -> Any:
        self.reads += 1
        raise OSError("connection lost")


def test_own_write_notification_awaits_handoff() -> None:
    feed, wakes = _feed(), _Wakes()
    feed.offer(_event(1), wakes)
    feed.begin_write()

    # The statement committed and its notification arrived before its reply: no read.
    feed.announce(2, wakes)
    feed.expect(2)
    feed.offer(_event(2), wakes)
    feed.end_write(wakes)

    assert _seqs(feed.events_after(0)) == [1, 2]


async def test_other_write_read_after_own_write() -> None:
    pool = _FailingPool()
    feed, wakes = Feed(EXPERIMENT, pool, capacity=512), _Wakes()  # type: ignore[arg-type]
    feed.offer(_event(1), wakes)
    feed.begin_write()

    feed.announce(3, wakes)  # another writer's event, after this process's event 2
    await asyncio.sleep(0)
    assert pool.reads == 0
    feed.expect(2)
    feed.offer(_event(2), wakes)
    feed.end_write(wakes)
    await asyncio.sleep(0)

    assert pool.reads == 1


async def test_failed_own_write_reads_notification() -> None:
    pool = _FailingPool()
    feed, wakes = Feed(EXPERIMENT, pool, capacity=512), _Wakes()  # type: ignore[arg-type]
    feed.offer(_event(1), wakes)
    feed.begin_write()

    feed.announce(2, wakes)
    feed.end_write(wakes)  # the statement raised: its writer hands nothing over
    await asyncio.sleep(0)

    assert pool.reads == 1


async def _never_connect() -> Any:
    raise AssertionError("the hub connected")


def _subscription() -> Subscription:
    return EventHub(_never_connect).subscribe(EXPERIMENT)


async def _timed_wait(subscription: Subscription, timeout: float) -> tuple[bool, float]:
    """Return what `subscription.wait(timeout)` returned and the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    woken = await subscription.wait(timeout)
    return woken, loop.time() - started


async def test_subscription_wait_times_out() -> None:
    subscription = _subscription()

    woken, elapsed = await _timed_wait(subscription, 0.05)

    assert woken is False
    assert elapsed >= 0.04


async def test_subscription_wake_before_wait_is_kept() -> None:
    subscription = _subscription()

    subscription.notify()
    subscription.notify()

    assert await subscription.wait(5) is True
    # Two wake-ups before a wait count as one: the stream reads everything new at once.
    assert await subscription.wait(0.01) is False


async def test_subscription_wake_during_wait_without_extra_task() -> None:
    subscription = _subscription()
    tasks_before = len(asyncio.all_tasks())

    waiting = asyncio.create_task(subscription.wait(5))
    await asyncio.sleep(0.01)
    # The waiting task is the only new task: no task per wait, as asyncio.wait_for would add.
    assert len(asyncio.all_tasks()) == tasks_before + 1
    subscription.notify()

    assert await asyncio.wait_for(waiting, 1) is True


async def test_subscription_wake_racing_timeout_is_not_lost() -> None:
    subscription = _subscription()
    loop = asyncio.get_running_loop()

    waiting = asyncio.create_task(subscription.wait(0.01))
    await asyncio.sleep(0)
    # Both the timer and the wake-up fire before the waiting task resumes.
    loop.call_later(0.01, subscription.notify)
    await asyncio.sleep(0.05)
    first = await waiting

    # Whatever the first wait returned, the wake-up is seen by it or by the next wait.
    assert first or await subscription.wait(0.01)


async def _cancel_a_wait(subscription: Subscription, timeout: float) -> None:
    """Start `subscription.wait(timeout)` in a task, then cancel it, as a disconnecting client does."""
    waiting = asyncio.create_task(subscription.wait(timeout))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_subscription_cancelled_wait_keeps_later_wake() -> None:
    subscription = _subscription()

    await _cancel_a_wait(subscription, 5)
    subscription.notify()

    assert await subscription.wait(0.01) is True


async def test_subscription_one_timer_across_waits() -> None:
    subscription = _subscription()
    waiting = asyncio.create_task(subscription.wait(5))
    await asyncio.sleep(0)
    timer = subscription._timer
    subscription.notify()
    assert await waiting is True

    waiting = asyncio.create_task(subscription.wait(5))
    await asyncio.sleep(0)

    # 1,000 streams of one experiment wait again after every event: no timer per wait.
    assert timer is not None
    assert subscription._timer is timer
    subscription.notify()
    assert await waiting is True


async def _wake_a_wait(subscription: Subscription, timeout: float, after: float) -> bool:
    """Start `subscription.wait(timeout)`, wake it `after` seconds later, and return what it returned."""
    waiting = asyncio.create_task(subscription.wait(timeout))
    await asyncio.sleep(after)
    subscription.notify()
    return await waiting


async def test_subscription_timeout_counts_from_each_wait() -> None:
    subscription = _subscription()
    assert await _wake_a_wait(subscription, 0.1, after=0.05) is True

    woken, elapsed = await _timed_wait(subscription, 0.1)

    # The timer armed by the first wait fires during this one, and re-arms for the rest.
    assert woken is False
    assert elapsed >= 0.09


async def test_subscription_shorter_wait_rearms_sooner() -> None:
    subscription = _subscription()
    assert await _wake_a_wait(subscription, 60, after=0) is True

    woken = await asyncio.wait_for(subscription.wait(0.01), 1)

    assert woken is False


def test_subscription_uvloop_timer_does_not_spin() -> None:
    async def count_deadline_checks(waits: int) -> int:
        subscription = _subscription()
        check = subscription._check_deadline
        calls = 0

        def counting(loop: asyncio.AbstractEventLoop) -> None:
            nonlocal calls
            calls += 1
            check(loop)

        # The timer is armed with the bound method looked up on the instance, so this counts every firing.
        subscription._check_deadline = counting  # type: ignore[method-assign]
        for _ in range(waits):
            assert await subscription.wait(0.05) is False
        return calls

    calls = uvloop.run(count_deadline_checks(20))

    # uvloop's clock moves in whole milliseconds, so a timer may fire just before its deadline.
    # Re-arming for that remainder made the timer fire about 19 times per wait.
    assert calls <= 25


async def test_subscription_close_cancels_timer() -> None:
    subscription = _subscription()
    await _cancel_a_wait(subscription, 60)

    subscription.close()

    assert subscription._timer is None


def test_hub_watchers_of_one_experiment_are_independent() -> None:
    hub = EventHub(_never_connect)
    first: list[int | None] = []
    second: list[int | None] = []
    hub.watch(EXPERIMENT, first.append)
    hub.watch(EXPERIMENT, second.append)

    hub._on_notification(None, 0, "iiq_events_v1", f"{EXPERIMENT}:4")
    # A second run of the same experiment that failed to start stops watching; the first goes on.
    hub.unwatch(EXPERIMENT, second.append)
    hub._on_notification(None, 0, "iiq_events_v1", f"{EXPERIMENT}:5")
    hub._wake_all()

    assert first == [4, 5, None]
    assert second == [4]
