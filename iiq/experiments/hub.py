"""The in-process fan-out of event notifications: one LISTEN connection for all streams.

Notifications carry ``<experiment_id>:<seq>`` only. The hub hands each to the `Feed` of that
experiment, which reads the new rows once for all its subscribers and wakes them. Events that
this process writes itself reach the feed sooner, through `deliver`, right after their commit.
A wake-up is a flag, not a queue, so a slow client costs one flag however many events it has not read
yet. When the LISTEN connection is lost, notifications sent meanwhile are lost too: after
reconnecting the hub refreshes every feed and wakes every subscriber, and each continues from
its last delivered sequence number.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from iiq.experiments.events import EVENTS_CHANNEL, StoredEvent
from iiq.experiments.feed import Feed
from iiq.experiments.metrics import listen_reconnects_total, open_streams

logger = logging.getLogger(__name__)


Connect = Callable[[], Awaitable[asyncpg.Connection]]

# A subscription's timer that fires this close to the wait's deadline ends the wait. uvloop's
# clock moves in whole milliseconds, so its timers can fire just before the time they were set for.
_TIMER_SLACK_SECONDS = 0.002


class Subscription:
    def __init__(self, hub: EventHub, feed: Feed) -> None:
        self.hub = hub
        self.feed = feed
        self.experiment_id = feed.experiment_id
        # A wake-up that no `wait` has taken yet; a wake-up before the wait is kept here.
        self._woken = False
        self._waiter: asyncio.Future[bool] | None = None
        # When the pending wait times out (loop time), and the timer that checks it.
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # Set when the process shuts down: the stream should end now.
        self.closed = False

    def notify(self) -> None:
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    async def wait(self, timeout: float) -> bool:
        """Wait for a wake-up; False when `timeout` seconds passed without one.

        One future per wait, and no timer of its own: `asyncio.wait_for` would add a task per
        wait, and every stream of an experiment waits again after each of its events. The
        subscription's one timer stays armed from wait to wait. When it fires before the
        current wait's deadline, it re-arms for the rest.
        """
        if not self._woken:
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[bool] = loop.create_future()
            self._deadline = loop.time() + timeout
            if self._timer is None or self._timer.when() > self._deadline:
                self._arm(loop, self._deadline)
            self._waiter = waiter
            try:
                if not await waiter:
                    return False
            finally:
                self._waiter = None
        self._woken = False
        return True

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._check_deadline, loop)

    def _check_deadline(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # no wait pending: the next wait arms the timer again
        if self._deadline - loop.time() > _TIMER_SLACK_SECONDS:
            self._arm(loop, self._deadline)
            return
        waiter.set_result(False)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.hub.unsubscribe(self)


class EventHub:
    def __init__(
        self,
        connect: Connect,
        *,
        pool: asyncpg.Pool | None = None,
        health_check_seconds: float = 10.0,
        max_backoff_seconds: float = 5.0,
    ) -> None:
        self._connect = connect
        # Without a pool the feeds cache nothing and every stream reads the table itself.
        self._pool = pool
        self._health_check_seconds = health_check_seconds
        self._max_backoff_seconds = max_backoff_seconds
        self._feeds: dict[uuid.UUID, Feed] = {}
        self._watchers: dict[uuid.UUID, list[Callable[[int | None], None]]] = {}
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    def subscriber_count(self) -> int:
        return sum(len(feed.subscribers) for feed in self._feeds.values())

    def subscribe(self, experiment_id: uuid.UUID) -> Subscription:
        feed = self._feeds.get(experiment_id)
        if feed is None:
            feed = self._feeds[experiment_id] = Feed(experiment_id, self._pool)
        subscription = Subscription(self, feed)
        subscription.closed = self._closing
        feed.subscribers.add(subscription)
        open_streams.inc()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        feed = self._feeds.get(subscription.experiment_id)
        if feed is None or subscription not in feed.subscribers:
            return
        feed.subscribers.discard(subscription)
        open_streams.dec()
        if not feed.subscribers:
            feed.close()
            del self._feeds[subscription.experiment_id]

    def close_streams(self) -> None:
        """Tell every stream of this process to end, for a prompt shutdown."""
        self._closing = True
        for feed in self._feeds.values():
            for subscription in feed.subscribers:
                subscription.closed = True
                subscription.notify()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="iiq-event-hub")
        await asyncio.wait_for(self._ready.wait(), timeout=30)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._close_connection()

    def expect(self, event: StoredEvent) -> None:
        """Note an event published by a transaction of this process that has not ended yet."""
        feed = self._feeds.get(event.experiment_id)
        if feed is not None:
            feed.expect(event.seq)

    def begin_write(self, experiment_id: uuid.UUID) -> None:
        """Note a statement of this process in flight that writes an event of `experiment_id` and commits by itself."""
        feed = self._feeds.get(experiment_id)
        if feed is not None:
            feed.begin_write()

    def end_write(self, experiment_id: uuid.UUID) -> None:
        """Note that the statement announced by `begin_write` returned; its events were delivered first."""
        feed = self._feeds.get(experiment_id)
        if feed is not None:
            feed.end_write(_waker(feed))

    def deliver(self, event: StoredEvent) -> None:
        """Take an event this process wrote, right after its transaction committed.

        The streams get it without waiting for its notification, which causes no read when
        it arrives (see `Feed`). An event of an experiment with no stream here is dropped.
        """
        feed = self._feeds.get(event.experiment_id)
        if feed is not None:
            feed.offer(event, _waker(feed))

    def abandon(self, event: StoredEvent) -> None:
        """Forget an expected event whose transaction rolled back or whose outcome is unknown."""
        feed = self._feeds.get(event.experiment_id)
        if feed is not None:
            feed.abandon(event.seq, _waker(feed))

    def watch(self, experiment_id: uuid.UUID, callback: Callable[[int | None], None]) -> None:
        """Call `callback` with the sequence number of each event notified for `experiment_id`.

        The runner uses it to learn of a cancel request without polling. After the LISTEN
        connection was lost and re-established, `callback` gets None: events may have been missed.
        """
        self._watchers.setdefault(experiment_id, []).append(callback)

    def unwatch(self, experiment_id: uuid.UUID, callback: Callable[[int | None], None]) -> None:
        callbacks = self._watchers.get(experiment_id, [])
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks:
            self._watchers.pop(experiment_id, None)

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        experiment_part, _, seq_part = payload.partition(":")
        try:
            experiment_id = uuid.UUID(experiment_part)
            seq = int(seq_part)
        except ValueError:
            logger.warning("malformed event notification ignored", extra={"payload": payload[:100]})
            return
        feed = self._feeds.get(experiment_id)
        if feed is not None:
            feed.announce(seq, _waker(feed))
        for watcher in self._watchers.get(experiment_id, ()):
            watcher(seq)

    def _on_termination(self, _conn: Any) -> None:
        self._lost.set()

    def _wake_all(self) -> None:
        for feed in self._feeds.values():
            feed.announce(None, _waker(feed))
        for callbacks in list(self._watchers.values()):
            for watcher in list(callbacks):
                watcher(None)

    async def _open(self) -> None:
        conn = await self._connect()
        conn.add_termination_listener(self._on_termination)
        # asyncpg-stubs 0.32 type the payload as `object`, but asyncpg 0.32 always passes the decoded str.
        await conn.add_listener(EVENTS_CHANNEL, self._on_notification)  # type: ignore[arg-type]
        self._conn = conn
        self._lost.clear()

    async def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def _run(self) -> None:
        backoff = 0.1
        first = True
        while True:
            try:
                await self._open()
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                logger.warning("LISTEN connection failed; retrying", extra={"error": repr(exc), "retry_in_s": backoff})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff_seconds)
                continue
            if first:
                logger.info("LISTEN connection open", extra={"channel": EVENTS_CHANNEL})
                first = False
                self._ready.set()
            else:
                listen_reconnects_total.inc()
                logger.warning("LISTEN connection re-established", extra={"channel": EVENTS_CHANNEL})
            backoff = 0.1
            # Anything notified while the connection was down was lost: everyone re-reads.
            self._wake_all()
            await self._watch()
            await self._close_connection()

    async def _watch(self) -> None:
        """Return when the connection is lost; a periodic query finds half-open TCP links."""
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), timeout=self._health_check_seconds)
                logger.warning("LISTEN connection lost", extra={"channel": EVENTS_CHANNEL})
                return
            except TimeoutError:
                pass
            try:
                if self._conn is None:
                    return
                await asyncio.wait_for(self._conn.fetchval("SELECT 1"), timeout=self._health_check_seconds)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                logger.warning("LISTEN connection failed its health check", extra={"error": repr(exc)})
                return


def _waker(feed: Feed) -> Callable[[], None]:
    def wake() -> None:
        for subscription in list(feed.subscribers):
            subscription.notify()

    return wake
