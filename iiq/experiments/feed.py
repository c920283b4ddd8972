"""`Feed`: the recent events of one followed experiment, read once per process for all its streams.

Without it, every stream of an experiment would re-read the events table on every event:
1,000 streams of one experiment cost 1,000 queries per event. A feed keeps the last
`capacity` events and wakes the streams, which take their events from memory. It learns of
each new event in one of two ways:

- an event written by this process is handed over right after its transaction commits
  (`offer`), and the feed takes it without reading anything;
- any other event is announced by its notification (`announce`), and the feed reads it
  from the table once.

The notification of a handed-over event still arrives, but it causes no read because the
feed already contains that sequence number. It may also arrive first, while the writer is still
waiting for its COMMIT to return: the writer has declared the event beforehand (`expect`),
so the feed waits for the hand-off instead of reading, and reads only if the writer then
reports that its transaction did not commit (`abandon`). A statement that commits by itself
learns its event's sequence number only with its reply, after the notification may have
arrived, so its writer declares the write before sending it (`begin_write`): until
`end_write`, every notification waits, and the feed reads only what the hand-off did not
bring. The feed contains a gap-free run of sequence numbers: an event handed over while earlier
ones are missing starts a read from the table instead. A stream that has fallen behind the
feed's window reads from the table under its own org.

The feed reads with row-level security bypassed. That is safe because a stream subscribes
only after its route has found the experiment under the caller's org.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from iiq.db.tx import service_transaction
from iiq.experiments.events import StoredEvent, read_events
from iiq.experiments.states import STATUS_EVENT, TERMINAL
from iiq.queue.codecs import decode_json, encode_json

if TYPE_CHECKING:
    from iiq.experiments.hub import Subscription

logger = logging.getLogger(__name__)

# Events kept per followed experiment; a stream further behind reads from the table.
FEED_CAPACITY = 512
_READ_BATCH = 500

_T = TypeVar("_T")


class Feed:
    def __init__(self, experiment_id: uuid.UUID, pool: asyncpg.Pool | None, capacity: int = FEED_CAPACITY) -> None:
        self.experiment_id = experiment_id
        self.subscribers: set[Subscription] = set()
        self._pool = pool
        # Consecutive sequence numbers only. When not empty, the last one is `_known_seq`.
        self._events: deque[StoredEvent] = deque(maxlen=capacity)
        # Highest sequence number known to be committed; events up to it are in `_events` or older.
        self._known_seq = 0
        # Sequence number of the terminal status event, once the feed contains it.
        self.terminal_seq: int | None = None
        # What the streams send for each cached event, built once for all of them (see `rendered`).
        self._rendered: dict[int, Any] = {}
        # Events published by a transaction of this process that has not ended yet.
        self._expected: set[int] = set()
        # Statements of this process in flight whose events' sequence numbers are not known yet.
        self._writes_in_flight = 0
        # Highest notified sequence number whose read waits for the hand-off of an expected event.
        self._deferred: int | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._again = False

    def events_after(self, after: int) -> list[StoredEvent] | None:
        """Return the cached events after `after`, or None when the cache cannot tell."""
        if not self._events or after < self._events[0].seq - 1:
            return None  # nothing cached yet, or the stream is behind the window
        # Events past the window's end are not lost: the refresh that reads them wakes the stream.
        count = self._events[-1].seq - after
        if count <= 0:
            return []
        # Walk from the newest end: a stream that keeps up requests a few events, not the whole window.
        newest_first = list(itertools.islice(reversed(self._events), count))
        newest_first.reverse()
        return newest_first

    def rendered(self, event: StoredEvent, render: Callable[[StoredEvent], _T]) -> _T:
        """Return `render(event)`, computed once per cached event and shared by all streams."""
        cached = self._rendered.get(event.seq)
        if cached is not None:
            result: _T = cached
            return result
        result = render(event)
        if self._events and self._events[0].seq <= event.seq <= self._events[-1].seq:
            self._rendered[event.seq] = result
        return result

    def expect(self, seq: int) -> None:
        """Note that event `seq` is published by a transaction of this process that has not ended yet.

        Until `offer` or `abandon` names it, a notification for it starts no read: the writer
        calls one of them as soon as its transaction has ended.
        """
        if self._pool is not None:
            self._expected.add(seq)

    def begin_write(self) -> None:
        """Note that a statement of this process that writes an event of this experiment is in flight.

        Until `end_write`, a notification starts no read: it may be for that statement's event,
        which the writer hands over (`offer`) once the statement has returned.
        """
        if self._pool is not None:
            self._writes_in_flight += 1

    def end_write(self, wake: Callable[[], None]) -> None:
        """Note that a statement announced by `begin_write` has returned and its events were offered."""
        if self._writes_in_flight == 0:
            return  # the feed was created while the statement was in flight
        self._writes_in_flight -= 1
        self._release_deferred(wake)

    def abandon(self, seq: int, wake: Callable[[], None]) -> None:
        """Forget expected event `seq`, whose transaction rolled back or whose outcome is unknown."""
        self._expected.discard(seq)
        self._release_deferred(wake)

    def _release_deferred(self, wake: Callable[[], None]) -> None:
        deferred, self._deferred = self._deferred, None
        if deferred is not None and deferred > self._known_seq:
            # A notification was held back for a write of this process that did not bring its
            # event: another writer committed it, or this write rolled back. Read it.
            self.announce(deferred, wake)

    def offer(self, event: StoredEvent, wake: Callable[[], None]) -> None:
        """Take `event`, written by this process, after its transaction committed, then call `wake`.

        Call it only after the commit: the feed trusts that the event is stored.
        """
        self._expected.discard(event.seq)
        if self._pool is None:
            wake()
            return
        if not self._events and self._known_seq == 0:
            # Start the window at this event rather than at the first event ever written.
            self._known_seq = event.seq - 1
        if event.seq <= self._known_seq:
            return  # already read from the table, after its notification
        if event.seq > self._known_seq + 1:
            # Committed events before it are missing (written elsewhere, or handed over later):
            # read them from the table, which returns this one too.
            self.announce(event.seq, wake)
            return
        self._take((_detached(event),))
        if self._deferred is not None and self._deferred <= self._known_seq:
            self._deferred = None
        wake()

    def announce(self, seq: int | None, wake: Callable[[], None]) -> None:
        """Note that events up to `seq` (None: unknown) are committed, refresh, then call `wake`."""
        if self._pool is None:
            wake()
            return
        if seq is not None and seq <= self._known_seq:
            # Handed over already (or read by an earlier refresh), and the streams were woken then.
            return
        if seq is not None and (seq in self._expected or self._writes_in_flight):
            # Its writer may be in this process, handing it over once its COMMIT returns.
            self._deferred = max(seq, self._deferred or 0)
            return
        if seq is not None and not self._events and self._known_seq == 0:
            # Start the window at the announced event rather than at the first event ever written.
            self._known_seq = seq - 1
        if self._refresh is not None and not self._refresh.done():
            self._again = True
            return
        self._refresh = asyncio.create_task(self._read_new(wake), name=f"iiq-feed-{self.experiment_id}")

    def _take(self, events: Iterable[StoredEvent]) -> None:
        """Append the events that continue the feed's run of sequence numbers, and skip the others."""
        for event in events:
            if event.seq != self._known_seq + 1:
                # Held already: a hand-off arrived while this read was under way.
                continue
            if len(self._events) == self._events.maxlen:
                self._rendered.pop(self._events[0].seq, None)
            self._events.append(event)
            self._known_seq = event.seq
            if event.event_type == STATUS_EVENT and event.stage in TERMINAL:
                self.terminal_seq = event.seq

    async def _read_new(self, wake: Callable[[], None]) -> None:
        try:
            while True:
                self._again = False
                if self._pool is None:
                    break
                async with service_transaction(self._pool) as conn:
                    new = await read_events(conn, self.experiment_id, self._known_seq, _READ_BATCH)
                self._take(new)
                wake()
                if not self._again and len(new) < _READ_BATCH:
                    break
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # The streams fall back to reading the table themselves.
            logger.warning("feed refresh failed", extra={"experiment_id": str(self.experiment_id), "error": repr(exc)})
            self._events.clear()
            self._rendered.clear()
            wake()

    def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()


def _detached(event: StoredEvent) -> StoredEvent:
    """Copy `event` with its payload passed through JSON, as a read from the table would return it.

    The handler still owns the payload it emitted and may change it afterwards. The copy
    also turns tuples into lists and NaN into null, as storing the event did.
    """
    return dataclasses.replace(event, payload=decode_json(encode_json(event.payload)))
