"""Optional sampling profiles of iiq processes with py-spy, taken during a scenario's measured phase.

py-spy is not a dependency of iiq: install it with ``pip install py-spy`` to use ``--profile``.
Profiles are written in py-spy's ``raw`` format (one collapsed stack and its sample count per
line), which `summarize` reads, and which flame-graph tools accept as they are.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Samples per second: enough for phases of a few seconds, cheap for the profiled process.
_RATE = 200


class Profiler:
    """Records one profile per label when a profile directory was given; does nothing otherwise."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.executable = shutil.which("py-spy") if directory else None
        if directory is not None and self.executable is None:
            raise RuntimeError("--profile needs py-spy on PATH: install it with `pip install py-spy`")
        self._taken: set[str] = set()
        self.files: list[Path] = []

    @contextmanager
    def record(self, pid: int, label: str) -> Iterator[None]:
        """Profile `pid` while the block runs, once per label (the first round)."""
        if self.directory is None or self.executable is None or label in self._taken:
            yield
            return
        self._taken.add(label)
        self.directory.mkdir(parents=True, exist_ok=True)
        output = self.directory / f"{label}.txt"
        log = (self.directory / f"{label}.log").open("wb")
        argv = [self.executable, "record", "--pid", str(pid), "--rate", str(_RATE), "--format", "raw"]
        # Blocking mode pauses the process for each sample (tens of microseconds at this rate),
        # which keeps coroutine stacks whole; --nonblocking returns torn stacks under load.
        argv += ["--output", str(output)]
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield
        finally:
            # SIGINT makes py-spy stop sampling and write the file.
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            log.close()
            if output.exists():
                self.files.append(output)


def summarize(path: Path, top: int = 15) -> tuple[int, list[tuple[str, float, float]]]:
    """Return the sample count and the `top` frames by self share, each as (frame, inclusive %, self %)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    if total == 0:
        return 0, []
    rows = [
        (frame, 100.0 * inclusive[frame] / total, 100.0 * samples / total) for frame, samples in own.most_common(top)
    ]
    return total, rows
