"""The bare Server-Sent Events baseline: Litestar on uvicorn, pushing messages from in-process queues.

    python -m tests.bench.baseline_sse --port PORT

`GET /streams/{key}` sends one message at once (as iiq replays stored events), then every
message pushed to `key`. `POST /emit` starts pushing: for each key, `count` messages
`interval_s` apart from the Unix time `start_at`, shifted by the key's `offset_s`. Each
message has the JSON shape of an iiq event with the emit time in ``payload.t``, is encoded
once and is put on the queue of every stream of that key. There is no database, no
authentication and no per-stream read: the floor that iiq's streams are compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import uvicorn
from litestar import Litestar, get, post
from litestar.response import ServerSentEvent, ServerSentEventMessage

from tests.bench.loadgen import raise_fd_limit

_queues: dict[str, set[asyncio.Queue[ServerSentEventMessage]]] = defaultdict(set)
_emitters: set[asyncio.Task[None]] = set()


def _message(seq: int, stage: str, payload: dict[str, Any]) -> ServerSentEventMessage:
    data = msgspec.json.encode(
        {
            "seq": seq,
            "event_type": "progress",
            "stage": stage,
            "payload": payload,
            "created_at": datetime.now(UTC),
        }
    ).decode()
    return ServerSentEventMessage(data=data, event="progress", id=str(seq))


async def _follow(key: str) -> AsyncIterator[ServerSentEventMessage]:
    queue: asyncio.Queue[ServerSentEventMessage] = asyncio.Queue()
    _queues[key].add(queue)
    try:
        yield _message(1, "ready", {"ready": True})
        while True:
            yield await queue.get()
    finally:
        _queues[key].discard(queue)


@get("/streams/{key:str}", media_type="text/event-stream")
async def stream(key: str) -> ServerSentEvent:
    return ServerSentEvent(_follow(key))


class EmitPlan(msgspec.Struct):
    keys: list[str]
    count: int
    interval_s: float
    start_at: float
    # Seconds added to the start of each key's emits, by key; a missing key starts at `start_at`.
    offsets_s: dict[str, float] = {}


async def _emit(key: str, plan: EmitPlan) -> None:
    start = plan.start_at + plan.offsets_s.get(key, 0.0)
    for index in range(plan.count):
        delay = start + index * plan.interval_s - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        message = _message(index + 2, f"tick-{index}", {"t": time.time(), "index": index})
        for queue in _queues.get(key, ()):
            queue.put_nowait(message)


@post("/emit", status_code=202)
async def emit(data: EmitPlan) -> dict[str, int]:
    for key in data.keys:
        task = asyncio.create_task(_emit(key, data))
        _emitters.add(task)
        task.add_done_callback(_emitters.discard)
    return {"keys": len(data.keys)}


@get("/health")
async def health() -> dict[str, int]:
    return {"streams": sum(len(queues) for queues in _queues.values())}


app = Litestar(route_handlers=[stream, emit, health])


def main() -> None:
    parser = argparse.ArgumentParser(description="bare Litestar SSE endpoint for the iiq benchmark")
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    args = parser.parse_args()
    raise_fd_limit()
    # The same uvicorn settings as `iiq serve`, so only the application differs.
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_config=None, access_log=False, timeout_graceful_shutdown=2)


if __name__ == "__main__":
    main()
