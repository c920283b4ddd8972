"""`Feed`: the recent events of one followed experiment, read once per process for all its streams.

Without it, every stream of an experiment would re-read the events table on every event:
1,000 streams of one experiment cost 1,000 queries per event. A feed reads each new event
once, after the notification for it arrives, keeps the last `capacity` events, and wakes the
streams, which take their events from memory. A stream that has fallen behind the feed's
window reads from the table under its own org instead.

The feed reads with row-level security bypassed. That is safe because a stream subscribes
only after its route has found the experiment under the caller's org.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import asyncpg

from iiq.db.tx import service_transaction
from iiq.experiments.events import StoredEvent, read_events
from iiq.experiments.states import STATUS_EVENT, TERMINAL

if TYPE_CHECKING:
    from iiq.experiments.hub import Subscription

logger = logging.getLogger(__name__)

# Events kept per followed experiment; a stream further behind reads from the table.
FEED_CAPACITY = 512
_READ_BATCH = 500


class Feed:
    def __init__(self, experiment_id: uuid.UUID, pool: asyncpg.Pool | None, capacity: int = FEED_CAPACITY) -> None:
        self.experiment_id = experiment_id
        self.subscribers: set[Subscription] = set()
        self._pool = pool
        self._events: deque[StoredEvent] = deque(maxlen=capacity)
        # Highest sequence number known to be committed; events up to it are in `_events` or older.
        self._known_seq = 0
        # Sequence number of the terminal status event, once the feed has read it.
        self.terminal_seq: int | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._again = False

    def events_after(self, after: int) -> list[StoredEvent] | None:
        """Return the cached events after `after`, or None when the cache cannot tell."""
        if not self._events or after < self._events[0].seq - 1:
            return None  # nothing cached yet, or the stream is behind the window
        # Events past the window's end are not lost: the refresh that reads them wakes the stream.
        return [event for event in self._events if event.seq > after]

    def announce(self, seq: int | None, wake: Callable[[], None]) -> None:
        """Note that events up to `seq` (None: unknown) are committed, refresh, then call `wake`."""
        if self._pool is None:
            wake()
            return
        if seq is not None and not self._events and self._known_seq == 0:
            # Start the window at the announced event rather than at the first event ever written.
            self._known_seq = seq - 1
        if self._refresh is not None and not self._refresh.done():
            self._again = True
            return
        self._refresh = asyncio.create_task(self._read_new(wake), name=f"iiq-feed-{self.experiment_id}")

    async def _read_new(self, wake: Callable[[], None]) -> None:
        try:
            while True:
                self._again = False
                if self._pool is None:
                    break
                async with service_transaction(self._pool) as conn:
                    new = await read_events(conn, self.experiment_id, self._known_seq, _READ_BATCH)
                self._events.extend(new)
                if new:
                    self._known_seq = new[-1].seq
                for event in new:
                    if event.event_type == STATUS_EVENT and event.stage in TERMINAL:
                        self.terminal_seq = event.seq
                wake()
                if not self._again and len(new) < _READ_BATCH:
                    break
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # The streams fall back to reading the table themselves.
            logger.warning("feed refresh failed", extra={"experiment_id": str(self.experiment_id), "error": repr(exc)})
            self._events.clear()
            wake()

    def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
