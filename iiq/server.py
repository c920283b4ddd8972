"""The uvicorn server of `iiq serve`, which starts iiq's own shutdown as soon as a signal arrives."""

from __future__ import annotations

import logging
from types import FrameType

import uvicorn
from litestar import Litestar

logger = logging.getLogger(__name__)


class IIQServer(uvicorn.Server):
    """uvicorn waits for open connections before it runs the lifespan shutdown, so event
    streams would hold a stopping process open. On SIGTERM or SIGINT this server ends the
    streams and signals the worker to stop taking jobs, then lets uvicorn shut down as usual.
    """

    def __init__(self, config: uvicorn.Config, app: Litestar) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        logger.info("shutdown requested", extra={"signal": sig})
        begin_shutdown(self._app)
        super().handle_exit(sig, frame)


def begin_shutdown(app: Litestar) -> None:
    runtime = app.state.get("runtime")
    if runtime is not None and runtime.hub is not None:
        runtime.hub.close_streams()
    stop = app.state.get("worker_stop")
    if stop is not None:
        stop.set()
