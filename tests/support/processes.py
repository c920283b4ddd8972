"""Real iiq processes for end-to-end tests: `iiq serve` and `iiq worker` as subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]

# Fast fault detection, so tests finish in seconds; all are ordinary settings.
FAST_FAULTS = {
    "IIQ_WORKER_HEARTBEAT_SECONDS": "0.5",
    "IIQ_WORKER_LOST_SECONDS": "2",
    "IIQ_RECOVERY_INTERVAL_SECONDS": "0.5",
    "IIQ_CANCEL_GRACE_SECONDS": "2",
    "IIQ_CANCEL_POLL_SECONDS": "0.1",
    "IIQ_SSE_KEEPALIVE_SECONDS": "1",
    "IIQ_TOOL_MODULES": "tests.support.tools",
}


class IIQProcess:
    def __init__(self, args: list[str], database_url: str, log_path: Path, **env: str) -> None:
        environment = {**os.environ, **FAST_FAULTS, "IIQ_DATABASE_URL": database_url, "PYTHONPATH": str(ROOT), **env}
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "iiq.cli", *args],
            cwd=ROOT,
            env=environment,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up, as with the OOM killer."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._log.close()


def wait_until_healthy(base_url: str, process: IIQProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.process.poll() is not None:
            raise AssertionError(f"iiq exited with {process.process.returncode}:\n{process.log()[-3000:]}")
        try:
            if httpx.get(f"{base_url}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"iiq not ready after {timeout} s:\n{process.log()[-3000:]}")
