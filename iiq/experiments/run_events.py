"""`RunEvents`: how one run writes its events, and learns of events of the run written by others.

Every write of a run goes through `RunEvents`: `single_statement()` for the statements that
commit by themselves, which are all the runner sends, and `transaction()` for a write of
several statements. In a process that also serves streams (`iiq serve`), the committed
events go straight to them, and the runner watches its experiment's notifications so that a
cancel request wakes it at once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from iiq.db.tx import scoped_transaction
from iiq.db.types import Connection
from iiq.experiments.events import EventBus, LocalEventBus, StoredEvent

# Seconds between two reads of a running experiment's row when its notifications are watched
# (`iiq serve`). A cancel request's notification wakes the runner at once, and so does the
# re-established LISTEN connection after a loss. This poll is only the last resort.
WATCHED_CANCEL_POLL_SECONDS = 10.0


class RunEvents:
    """The event writer of one run, which also reports events of the run written by others.

    Every transaction of the run publishes through `transaction()`. When this process also
    serves streams (`iiq serve`), each committed event goes to them at once (see
    `LocalStreams`), and the run's notifications are watched. An event that the runner did
    not write (a cancel request, or the run ended elsewhere) resolves `next_news()`, so the
    supervisor checks the row at once instead of at its next poll.
    """

    def __init__(self, db: asyncpg.Pool, bus: EventBus, experiment_id: uuid.UUID) -> None:
        self._db = db
        self.bus = bus
        self.experiment_id = experiment_id
        self.local = bus.local if isinstance(bus, LocalEventBus) else None
        # Sequence numbers this runner published whose notification has not arrived yet.
        self._own: set[int] = set()
        self._news: asyncio.Future[None] | None = None
        self._news_pending = False
        self.watching = False
        # Statements in flight that commit by themselves, and the notifications that arrived
        # meanwhile: those may be for their events, whose sequence numbers come with the reply.
        self._writes_in_flight = 0
        self._notified_during_write: list[int | None] = []

    def watch(self) -> None:
        if self.local is not None:
            self.local.watch(self.experiment_id, self._on_notification)
            self.watching = True

    def close(self) -> None:
        if self.watching and self.local is not None:
            self.local.unwatch(self.experiment_id, self._on_notification)
            self.watching = False

    def next_news(self) -> asyncio.Future[None]:
        """Return a future that news of this run resolves: at once when news came since `take_news`."""
        news: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._news_pending:
            news.set_result(None)
        self._news = news
        return news

    def take_news(self) -> None:
        """Mark the news so far as seen: the caller reads the row next, which reflects it."""
        self._news_pending = False

    def _on_notification(self, seq: int | None) -> None:
        if self._writes_in_flight:
            self._notified_during_write.append(seq)
            return
        if seq is not None and seq in self._own:
            self._own.discard(seq)
            return
        # Someone else wrote an event of this run, or notifications may have been lost.
        self._announce_news()

    def _announce_news(self) -> None:
        # Kept until `take_news`, so news that arrives while no wait is pending (during the
        # supervisor's read of the row, say) still wakes the next wait.
        self._news_pending = True
        if self._news is not None and not self._news.done():
            self._news.set_result(None)

    def note_published(self, event: StoredEvent) -> None:
        """Record `event`, published by a transaction that has not committed yet."""
        if self.watching:
            self._own.add(event.seq)
        if self.local is not None:
            self.local.expect(event)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[tuple[Connection, EventBus]]:
        """Open a service transaction and yield its connection and the bus to publish with.

        Its events reach this process's streams only once the commit has succeeded, so a
        rolled-back event never reaches a stream, and before the connection goes back to
        the pool, whose reset query would delay the streams by a round trip.
        """
        async with self._publishing(scoped=True) as published:
            yield published

    @asynccontextmanager
    async def single_statement(self) -> AsyncIterator[tuple[Connection, EventBus]]:
        """Yield a connection outside any transaction, for one write that commits by itself.

        The write must set its own scope (as iiq.append_running_event does). Its event reaches
        this process's streams once the statement has returned, which is after its commit.
        """
        async with self._publishing(scoped=False) as published:
            yield published

    @asynccontextmanager
    async def _publishing(self, *, scoped: bool) -> AsyncIterator[tuple[Connection, EventBus]]:
        published = TransactionBus(self)
        committed = False
        try:
            async with self._db.acquire() as conn:
                try:
                    if scoped:
                        async with scoped_transaction(conn, None):
                            yield conn, published
                    else:
                        # An event is published only after the statement that wrote it has
                        # returned, so every published event is committed, even if the block raises.
                        committed = True
                        self._begin_write()
                        try:
                            yield conn, published
                        finally:
                            self._end_write(published.events)
                    committed = True
                finally:
                    if scoped and committed and self.local is not None:
                        for event in published.events:
                            self.local.deliver(event)
        finally:
            if not committed and published.events:
                for event in published.events:
                    # Another writer may now take this sequence number: its notification is news.
                    self._own.discard(event.seq)
                    if self.local is not None:
                        self.local.abandon(event)
                # Its notification may have arrived already and been taken for ours.
                self._announce_news()

    def _begin_write(self) -> None:
        self._writes_in_flight += 1
        if self.local is not None:
            self.local.begin_write(self.experiment_id)

    def _end_write(self, events: list[StoredEvent]) -> None:
        """Hand over the events of a statement that committed by itself, then take the notifications held meanwhile."""
        if self.local is not None:
            for event in events:
                self.local.deliver(event)
            self.local.end_write(self.experiment_id)
        self._writes_in_flight -= 1
        if not self._writes_in_flight:
            notified, self._notified_during_write = self._notified_during_write, []
            for seq in notified:
                self._on_notification(seq)


class TransactionBus:
    """The bus of one transaction of a run, which publishes each event and records it for the hand-off."""

    def __init__(self, run: RunEvents) -> None:
        self._run = run
        self.events: list[StoredEvent] = []

    async def publish(self, conn: Connection, event: StoredEvent) -> None:
        await self._run.bus.publish(conn, event)
        self.events.append(event)
        self._run.note_published(event)
