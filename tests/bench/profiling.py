"""Optional profiles taken during a scenario's measured phase: py-spy samples and Postgres wait events.

py-spy is not a dependency of iiq: install it with ``pip install py-spy`` to use ``--profile``.
Profiles are written in py-spy's ``raw`` format (one collapsed stack and its sample count per
line), which `summarize` reads, and which flame-graph tools accept as they are. Beside each,
the wait events of the database's busy backends, sampled from pg_stat_activity, show what
Postgres waited for. Both samplers take CPU from the processes they watch, so the figures of
a profiled run are slower than those of a plain one.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg

# Samples per second: enough for phases of a few seconds, cheap for the profiled process.
_RATE = 200
# Seconds between two samples of pg_stat_activity.
_WAIT_INTERVAL_S = 0.02
_WAIT_QUERY = """
SELECT CASE
           WHEN state = 'idle in transaction' THEN 'idle in transaction (waiting for the client)'
           WHEN wait_event IS NULL THEN 'running (CPU)'
           ELSE wait_event_type || ': ' || wait_event
       END AS backend_state,
       count(*)::int AS backends
FROM pg_stat_activity
WHERE datname = current_database() AND state IN ('active', 'idle in transaction') AND pid <> pg_backend_pid()
GROUP BY 1
"""


class WaitSampler:
    """A sampler of what the busy backends of one database wait for, in a thread with its own event loop."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._stop = threading.Event()
        self.counts: Counter[str] = Counter()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._sample()), name="bench-wait-sampler")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> Counter[str]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.counts

    async def _sample(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            while not self._stop.is_set():
                for row in await conn.fetch(_WAIT_QUERY):
                    self.counts[row["backend_state"]] += row["backends"]
                await asyncio.sleep(_WAIT_INTERVAL_S)
        finally:
            await conn.close()


def describe_waits(counts: Counter[str], top: int = 6) -> str:
    total = sum(counts.values())
    if total == 0:
        return "no busy backend was seen"
    return ", ".join(f"{state} {100.0 * seen / total:.0f} %" for state, seen in counts.most_common(top))


class Profiler:
    """Records one profile per label when a profile directory was given; does nothing otherwise."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.executable = shutil.which("py-spy") if directory else None
        if directory is not None and self.executable is None:
            raise RuntimeError("--profile needs py-spy on PATH: install it with `pip install py-spy`")
        self._taken: set[str] = set()
        self.files: list[Path] = []
        self.waits: dict[str, Counter[str]] = {}

    @contextmanager
    def record(self, pid: int, label: str, dsn: str | None = None) -> Iterator[None]:
        """Profile `pid`, and the backends of `dsn`'s database, while the block runs; once per label."""
        if self.directory is None or self.executable is None or label in self._taken:
            yield
            return
        self._taken.add(label)
        self.directory.mkdir(parents=True, exist_ok=True)

        sampler = WaitSampler(dsn) if dsn else None
        if sampler is not None:
            sampler.start()
        output = self.directory / f"{label}.txt"
        log = (self.directory / f"{label}.log").open("wb")
        argv = [self.executable, "record", "--pid", str(pid), "--rate", str(_RATE), "--format", "raw"]
        # Blocking mode (the default) pauses the process briefly for each sample and keeps
        # coroutine stacks whole; --nonblocking returned torn stacks under load here.
        argv += ["--output", str(output)]
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield
        finally:
            _stop_py_spy(process)
            log.close()
            if output.exists():
                self.files.append(output)
            if sampler is not None:
                self._save_waits(label, sampler.stop())

    def _save_waits(self, label: str, counts: Counter[str]) -> None:
        assert self.directory is not None
        self.waits[label] = counts
        lines = "".join(f"{seen} {state}\n" for state, seen in counts.most_common())
        (self.directory / f"{label}-waits.txt").write_text(lines)


def _stop_py_spy(process: subprocess.Popen[bytes]) -> None:
    # SIGINT makes py-spy stop sampling and write its output file.
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


# Frames of these files are the event loop and the interpreter, not the work being profiled.
_PLUMBING = ("asyncio/", "selectors.py", "threading.py", "concurrent/", "<frozen", "runpy", "contextlib.py")


def _function(frame: str) -> str:
    """Return ``name (path)`` of a py-spy frame ``name (path:line)``, so all lines of a function add up."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def summarize(path: Path, top: int = 8) -> tuple[int, list[tuple[str, float]]]:
    """Return the busy samples of the main thread and its `top` functions by inclusive share (percent).

    Samples of other threads, of module imports and of waiting in the event loop's selector
    are left out.
    iiq's own functions are ranked when the process has any; otherwise every function except
    the event loop's and the interpreter's.
    """
    inclusive: Counter[str] = Counter()
    busy = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        if "Thread._bootstrap" in frames[0] or frames[-1].startswith("EpollSelector.select"):
            continue
        if any(frame.startswith("_call_with_frames_removed") for frame in frames):
            continue  # importing modules at start-up, before the measured work
        count = int(count_text)
        busy += count
        for function in {_function(frame) for frame in frames}:
            inclusive[function] += count
    if busy == 0:
        return 0, []
    # Entry points such as `main` are on nearly every stack, so they do not show where time goes.
    informative = [function for function in inclusive if inclusive[function] < 0.95 * busy]
    own_code = [function for function in informative if "(iiq/" in function]
    candidates = own_code or [f for f in informative if not any(part in f for part in _PLUMBING)]
    ranked = sorted(candidates, key=lambda function: inclusive[function], reverse=True)[:top]
    return busy, [(function, 100.0 * inclusive[function] / busy) for function in ranked]
