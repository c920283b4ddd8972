"""A bounded HTTP/1.1 load generator, run as a process of its own so it shares no event loop with a server.

    python -m tests.bench.loadgen SPEC.json RESULT.json

The spec's ``mode`` selects one of three loops; each stops after ``total`` requests or after
``deadline_s`` seconds, whichever comes first:

- ``closed``: ``connections`` keep-alive connections, each sending its next request as soon
  as the previous response arrives. Records each request's latency.
- ``open``: requests start at a steady ``rate`` per second whatever the responses do, on up
  to ``max_connections`` connections. Records when each response arrived and the ``id`` in it.
- ``streams``: opens Server-Sent Event streams, writes ``ready_path`` once every stream has
  received its first message, then records for each message whose JSON carries an emit
  time (``payload.t``, Unix seconds) how long it took to arrive. It stops when every stream
  has received ``expect_messages`` such messages, or, with ``expect_messages`` 0, when
  ``stop_path`` appears.

The client speaks plain HTTP/1.1 over asyncio sockets, with no HTTP library, so its own cost
per request stays small next to the server's. Its CPU time is reported with the results.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

_decoder = msgspec.json.Decoder()
_MAX_ERRORS_KEPT = 5


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard limit, for thousands of sockets; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_request(host: str, port: int, method: str, path: str, headers: dict[str, str], body: str = "") -> bytes:
    payload = body.encode()
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if payload or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(payload)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def _header_value(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Read one response; return its status, its body and whether the server keeps the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = _header_value(head, b"content-length")
    if length is not None:
        body = await reader.readexactly(int(length))
    elif (_header_value(head, b"transfer-encoding") or b"").lower() == b"chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(chunk[:-2])
        body = b"".join(parts)
    else:
        body = b""
    keep_alive = (_header_value(head, b"connection") or b"").lower() != b"close"
    return status, body, keep_alive


@dataclass
class Tally:
    statuses: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0

    def status(self, code: int) -> None:
        self.statuses[str(code)] = self.statuses.get(str(code), 0) + 1

    def error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < _MAX_ERRORS_KEPT:
            self.errors.append(message)


class Connection:
    """One keep-alive connection that reconnects when the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(raw)
        status, body, keep_alive = await read_response(self.reader)
        if not keep_alive:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run_closed(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec["host"], spec["port"]
    requests = [build_request(host, port, **request) for request in spec["requests"]]
    total = int(spec["total"])
    expect = int(spec.get("expect_status", 200))
    deadline = time.monotonic() + float(spec["deadline_s"])
    latencies: list[float] = []
    tally = Tally()
    issued = 0

    async def worker() -> None:
        nonlocal issued
        connection = Connection(host, port)
        try:
            while issued < total and time.monotonic() < deadline:
                raw = requests[issued % len(requests)]
                issued += 1
                began = time.perf_counter()
                try:
                    status, body = await connection.request(raw)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    tally.error(f"{type(exc).__name__}: {exc}")
                    connection.close()
                    continue
                tally.status(status)
                if status == expect:
                    latencies.append((time.perf_counter() - began) * 1000.0)
                else:
                    tally.error(f"HTTP {status}: {body[:300].decode(errors='replace')}")
        finally:
            connection.close()

    cpu_before = cpu_seconds()
    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(int(spec["connections"]))))
    elapsed = time.perf_counter() - began
    return {
        "ok": len(latencies),
        "elapsed_s": elapsed,
        "latencies_ms": latencies,
        "statuses": tally.statuses,
        "error_count": tally.error_count,
        "errors": tally.errors,
        "cpu_s": cpu_seconds() - cpu_before,
    }


async def run_open(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec["host"], spec["port"]
    requests = [build_request(host, port, **request) for request in spec["requests"]]
    total = int(spec["total"])
    rate = float(spec["rate"])
    expect = int(spec.get("expect_status", 200))
    deadline = time.monotonic() + float(spec["deadline_s"])
    idle: list[Connection] = []
    tally = Tally()
    done: list[dict[str, Any]] = []
    late_ms: list[float] = []

    async def send(raw: bytes) -> None:
        connection = idle.pop() if idle else Connection(host, port)
        sent = time.time()
        try:
            status, body = await connection.request(raw)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            tally.error(f"{type(exc).__name__}: {exc}")
            connection.close()
            return
        received = time.time()
        idle.append(connection)
        tally.status(status)
        if status != expect:
            tally.error(f"HTTP {status}: {body[:300].decode(errors='replace')}")
            return
        done.append({"id": _decoder.decode(body).get("id"), "sent": sent, "received": received})

    cpu_before = cpu_seconds()
    started = time.perf_counter()
    tasks = []
    for index in range(total):
        due = started + index / rate
        pause = due - time.perf_counter()
        if pause > 0:
            await asyncio.sleep(pause)
        else:
            late_ms.append(-pause * 1000.0)
        if time.monotonic() > deadline:
            break
        tasks.append(asyncio.create_task(send(requests[index % len(requests)])))
    if tasks:
        await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()))
    for connection in idle:
        connection.close()
    return {
        "ok": len(done),
        "elapsed_s": time.perf_counter() - started,
        "responses": done,
        "max_start_delay_ms": max(late_ms, default=0.0),
        "statuses": tally.statuses,
        "error_count": tally.error_count,
        "errors": tally.errors,
        "cpu_s": cpu_seconds() - cpu_before,
    }


class StreamReader(asyncio.Protocol):
    """Reads one Server-Sent Events response, decoding HTTP chunks and SSE messages as bytes arrive."""

    def __init__(self, request: bytes, owner: StreamRun) -> None:
        self.request = request
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.text = bytearray()
        self.head_done = False
        self.chunked = False
        self.messages = 0
        self.timed = 0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        arrived = time.time()
        self.buffer += data
        if not self.head_done:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            del self.buffer[: end + 4]
            self.head_done = True
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                self.owner.tally.error(f"stream answered HTTP {status}")
                self.close()
                return
            self.chunked = (_header_value(head + b"\r\n", b"transfer-encoding") or b"").lower() == b"chunked"
        self._take_body()
        self._take_messages(arrived)

    def _take_body(self) -> None:
        if not self.chunked:
            self.text += self.buffer.replace(b"\r\n", b"\n")
            self.buffer.clear()
            return
        while True:
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self.buffer[:line_end]).split(b";")[0], 16)
            if len(self.buffer) < line_end + 2 + size + 2:
                return
            chunk = bytes(self.buffer[line_end + 2 : line_end + 2 + size])
            del self.buffer[: line_end + 2 + size + 2]
            if size == 0:
                self.close()
                return
            self.text += chunk.replace(b"\r\n", b"\n")

    def _take_messages(self, arrived: float) -> None:
        while True:
            end = self.text.find(b"\n\n")
            if end < 0:
                return
            block = bytes(self.text[:end])
            del self.text[: end + 2]
            data = [line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
            if not data:
                continue  # a comment, such as a keep-alive
            self.messages += 1
            if self.messages == 1:
                self.owner.established += 1
            try:
                message = _decoder.decode(b"\n".join(data))
                emitted = message.get("payload", {}).get("t") if isinstance(message, dict) else None
            except (msgspec.DecodeError, AttributeError):
                emitted = None
            if emitted is not None:
                self.timed += 1
                self.owner.latencies_ms.append((arrived - float(emitted)) * 1000.0)
                if self.timed == self.owner.expect_messages:
                    self.owner.complete += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if not self.owner.stopping:
            self.owner.lost += 1

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class StreamRun:
    expect_messages: int
    tally: Tally = field(default_factory=Tally)
    latencies_ms: list[float] = field(default_factory=list)
    established: int = 0
    complete: int = 0
    lost: int = 0
    stopping: bool = False


async def _wait_for(condition: Any, deadline: float, interval: float = 0.02) -> bool:
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)
    return True


async def run_streams(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec["host"], spec["port"]
    streams = spec["streams"]
    deadline = time.monotonic() + float(spec["deadline_s"])
    run = StreamRun(expect_messages=int(spec.get("expect_messages", 0)))
    loop = asyncio.get_running_loop()
    readers: list[StreamReader] = []
    gate = asyncio.Semaphore(int(spec.get("connect_concurrency", 100)))

    async def open_stream(stream: dict[str, Any]) -> None:
        raw = build_request(host, port, "GET", stream["path"], {"Accept": "text/event-stream", **stream["headers"]})
        async with gate:
            try:
                _transport, reader = await loop.create_connection(lambda: StreamReader(raw, run), host, port)
            except OSError as exc:
                run.tally.error(f"connect failed: {exc}")
                return
            readers.append(reader)
            # Wait for the first message before the next connection takes this slot, so a burst
            # of connects never outruns the server's accept backlog.
            await _wait_for(lambda: reader.messages > 0 or reader.closed.done(), deadline, 0.005)

    await asyncio.gather(*(open_stream(stream) for stream in streams))
    established = run.established
    # Written whole, then renamed, so the benchmark never reads a half-written file.
    ready_path = Path(spec["ready_path"])
    partial = ready_path.with_suffix(".partial")
    partial.write_text(json.dumps({"established": established, "requested": len(streams)}))  # noqa: ASYNC240
    os.replace(partial, ready_path)

    cpu_before = cpu_seconds()
    if run.expect_messages > 0:
        await _wait_for(lambda: run.complete >= established or time.monotonic() > deadline, deadline + 1)
    else:
        stop_path = Path(spec["stop_path"])
        await _wait_for(lambda: stop_path.exists(), deadline, 0.05)
    cpu_used = cpu_seconds() - cpu_before
    run.stopping = True
    for reader in readers:
        reader.close()
    return {
        "requested": len(streams),
        "established": established,
        "complete": run.complete,
        "lost": run.lost,
        "latencies_ms": run.latencies_ms,
        "error_count": run.tally.error_count,
        "errors": run.tally.errors,
        "cpu_s": cpu_used,
    }


_MODES = {"closed": run_closed, "open": run_open, "streams": run_streams}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tests.bench.loadgen SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    mode = spec.get("mode")
    if mode not in _MODES:
        print(f"loadgen: unknown mode {mode!r}; use one of {', '.join(_MODES)}", file=sys.stderr)
        return 2
    raise_fd_limit()
    result = asyncio.run(_MODES[mode](spec))
    result["pid"] = os.getpid()
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
