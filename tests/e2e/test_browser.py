"""A real headless Chromium follows an experiment with `EventSource` from a page on another origin.

The page is served by a small HTTP server on 127.0.0.1 on a port of its own, so every call to
iiq is cross-origin and needs CORS. Its script does what a browser app does. It issues a stream
token with `fetch`, sending the API key in the Authorization header, which needs a CORS preflight.
It opens `new EventSource(events_url)` with that token and collects every event. It leaves the
source open after the terminal event, so the browser's own reconnect (with Last-Event-ID) must
end it. Then it posts what it received to the page's server, where the test reads it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn

from iiq.api.app import create_app
from iiq.settings import Settings
from tests.conftest import Server, Tenant, free_port, make_tenant
from tests.support.sse import read_stream

CHROMIUM = "/usr/bin/chromium"
INSTALL_HINT = "install Debian's Chromium with `apt-get update && apt-get install -y chromium`"
# Flags for a root user on a machine without network access: no sandbox (root), no GPU, and none of
# Chromium's own background connections, which the closed network refuses.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BROWSER_TIMEOUT_SECONDS = 30.0
STREAM_TOKEN_TTL_SECONDS = 120.0
TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm", "gpu_count": 1}
SLEEP = {"tool_id": "test.sleep", "target": TARGET, "input_config": {"steps": 4, "step_seconds": 0.1}}

# The page's script. Named SSE events reach only listeners of their type, so the page listens to
# each type that iiq emits, and to "message" for unnamed ones.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>iiq EventSource</title></head><body><script>
const config = __CONFIG__;
const received = [];
const errors = [];
let source = null;
let tokenResponse = null;
let issuedAt = null;
let terminalSeen = false;
let reported = false;

function report(reason) {
  if (reported) return;
  reported = true;
  const body = {reason, received, errors, tokenResponse, issuedAt, terminalSeen,
                readyState: source ? source.readyState : null, pageOrigin: location.origin};
  fetch("/report", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
}

function onEvent(event) {
  const data = JSON.parse(event.data);
  received.push({id: event.lastEventId, type: event.type, stage: data.stage, origin: event.origin});
  if (event.type === "status" && ["completed", "failed", "cancelled", "timed_out"].includes(data.stage)) {
    terminalSeen = true;
    // The source stays open on purpose: the server's 204 on the reconnect must close it.
    setTimeout(() => report("still open 12 s after the terminal event"), 12000);
  }
}

async function main() {
  issuedAt = new Date().toISOString();
  const response = await fetch(config.api + "/experiments/" + config.experimentId + "/stream-tokens", {
    method: "POST", headers: {"Authorization": "Bearer " + config.apiKey}});
  tokenResponse = {status: response.status, body: await response.json()};
  if (response.status !== 201) { report("stream token request failed"); return; }
  source = new EventSource(config.api + tokenResponse.body.events_url);
  for (const type of ["status", "progress", "message"]) source.addEventListener(type, onEvent);
  source.onerror = () => {
    errors.push(source.readyState);
    if (source.readyState === EventSource.CLOSED) {
      report(terminalSeen ? "closed after the terminal event" : "closed before the terminal event");
    }
  };
}

setTimeout(() => report("timed out in the page"), 25000);
main().catch((error) => { errors.push(String(error)); report("script error: " + error); });
</script></body></html>
"""


@dataclass
class PageServer:
    """The page's origin: serves the page at / and receives the page's report at /report."""

    origin: str
    page: bytes = b""
    reports: list[dict[str, Any]] = field(default_factory=list)
    reported: threading.Event = field(default_factory=threading.Event)


def _page_handler(state: PageServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
            if self.path != "/":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(state.page)))
            self.end_headers()
            self.wfile.write(state.page)

        def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(min(length, 1_000_000))
            if self.path != "/report":
                self.send_error(404)
                return
            state.reports.append(json.loads(body))
            state.reported.set()
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            """Stay quiet: the test reads the report, not this server's log."""

    return Handler


@pytest.fixture
def page_server() -> Iterator[PageServer]:
    port = free_port()
    state = PageServer(origin=f"http://127.0.0.1:{port}")
    httpd = ThreadingHTTPServer(("127.0.0.1", port), _page_handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # The message and every field, extras included, so a secret anywhere in a record is found.
        self.lines.append(f"{record.name} {record.getMessage()} {record.__dict__!r}")


@dataclass
class CorsServer:
    base_url: str
    settings: Settings
    logs: _Capture


@pytest.fixture
async def cors_server(settings: Settings, page_server: PageServer) -> AsyncIterator[CorsServer]:
    """iiq with CORS for the page's origin and uvicorn's access log on, its records captured."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    app_settings = msgspec.structs.replace(
        settings,
        public_url=base_url,
        cors_origins=page_server.origin,
        stream_token_ttl_seconds=STREAM_TOKEN_TTL_SECONDS,
    )
    app = create_app(app_settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=True, timeout_graceful_shutdown=2
    )

    # uvicorn writes an access line only when "uvicorn.access" has a handler, so this one turns it on.
    capture = _Capture()
    saved = {name: logging.getLogger(name).level for name in ("uvicorn.access", "iiq")}
    for name in saved:
        logging.getLogger(name).addHandler(capture)
        logging.getLogger(name).setLevel(logging.INFO)

    uv = uvicorn.Server(config)
    task = asyncio.create_task(uv.serve())
    try:
        for _ in range(400):
            if uv.started:
                break
            if task.done():
                task.result()
            await asyncio.sleep(0.025)
        assert uv.started, "the CORS-enabled iiq server did not start within 10 s"
        yield CorsServer(base_url=base_url, settings=app_settings, logs=capture)
    finally:
        uv.should_exit = True
        await task
        for name, level in saved.items():
            logging.getLogger(name).removeHandler(capture)
            logging.getLogger(name).setLevel(level)


@pytest.fixture
async def cors_tenant(cors_server: CorsServer, database_url: str) -> AsyncIterator[Tenant]:
    tenant = await make_tenant(database_url, cors_server.base_url, name="browser org")
    yield tenant
    await tenant.client.aclose()


def _headless_flag(chromium: str) -> str:
    """Return --headless=new where Chromium has it (version 109 on), else --headless."""
    version = subprocess.run([chromium, "--version"], capture_output=True, text=True, timeout=30, check=False)
    match = re.search(r"Chromium (\d+)\.", version.stdout)
    return "--headless=new" if match and int(match.group(1)) >= 109 else "--headless"


@pytest.fixture
def chromium() -> list[str]:
    """The command that starts headless Chromium, without its profile and page; skips when it is missing."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing: {INSTALL_HINT}")
    return [CHROMIUM, _headless_flag(CHROMIUM), *CHROMIUM_FLAGS]


async def _stop_browser(browser: asyncio.subprocess.Process) -> None:
    """Stop Chromium with SIGTERM, then SIGKILL, sent to the process group that starts at its PID."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(browser.pid, sig)
        except ProcessLookupError:
            break
        try:
            await asyncio.wait_for(browser.wait(), timeout=10)
            break
        except TimeoutError:
            continue
    # Chromium's helper processes share the group and may outlive the main process briefly.
    for _ in range(50):
        try:
            os.killpg(browser.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.1)


async def _run_page(chromium: list[str], page_server: PageServer, tmp_path: Path) -> tuple[dict[str, Any], str]:
    """Load the page in headless Chromium; return the page's report and Chromium's log."""
    log_path = tmp_path / "chromium.log"
    command = [*chromium, f"--user-data-dir={tmp_path / 'chromium-profile'}", page_server.origin + "/"]
    with log_path.open("wb") as log:
        browser = await asyncio.create_subprocess_exec(
            *command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            for _ in range(int(BROWSER_TIMEOUT_SECONDS * 10)):
                if page_server.reported.is_set() or browser.returncode is not None:
                    break
                await asyncio.sleep(0.1)
        finally:
            await _stop_browser(browser)
    browser_log = log_path.read_text(errors="replace")
    assert page_server.reports, (
        f"no report from the page within {BROWSER_TIMEOUT_SECONDS:.0f} s "
        f"(Chromium exit code {browser.returncode}); Chromium's log ends:\n{browser_log[-3000:]}"
    )
    return page_server.reports[0], browser_log


async def test_chromium_follows_stream_with_token(
    chromium: list[str], cors_server: CorsServer, cors_tenant: Tenant, page_server: PageServer, tmp_path: Path
) -> None:
    created = await cors_tenant.client.post("/experiments", json=SLEEP)
    assert created.status_code == 201, created.text
    experiment = created.json()
    page_config = {"api": cors_server.base_url, "experimentId": experiment["id"], "apiKey": cors_tenant.api_key}
    page_server.page = PAGE.replace("__CONFIG__", json.dumps(page_config)).encode()

    report, browser_log = await _run_page(chromium, page_server, tmp_path)

    assert report["reason"] == "closed after the terminal event", (report, browser_log[-3000:])
    assert report["tokenResponse"]["status"] == 201
    stored, _ = await asyncio.wait_for(read_stream(cors_tenant.client, experiment["events_url"]), timeout=30)
    seen = [(event["id"], event["type"], event["stage"]) for event in report["received"]]
    assert seen == [(message.id, message.event, message.data["stage"]) for message in stored]
    assert [event["id"] for event in report["received"]] == [str(n) for n in range(1, len(stored) + 1)]
    assert seen[0][1:] == ("status", "pending")
    assert seen[-1][1:] == ("status", "completed")
    assert {event["origin"] for event in report["received"]} == {cors_server.base_url}
    assert report["errors"][-1] == 2  # EventSource.CLOSED: the browser stopped reconnecting


async def test_chromium_requests_keep_api_key_out_of_logs(
    chromium: list[str], cors_server: CorsServer, cors_tenant: Tenant, page_server: PageServer, tmp_path: Path
) -> None:
    created = await cors_tenant.client.post("/experiments", json=SLEEP)
    assert created.status_code == 201, created.text
    experiment = created.json()
    page_config = {"api": cors_server.base_url, "experimentId": experiment["id"], "apiKey": cors_tenant.api_key}
    page_server.page = PAGE.replace("__CONFIG__", json.dumps(page_config)).encode()

    report, _ = await _run_page(chromium, page_server, tmp_path)

    assert report["reason"] == "closed after the terminal event", report
    token = report["tokenResponse"]["body"]
    assert cors_tenant.api_key not in token["events_url"]
    events_path = f"/experiments/{experiment['id']}/events"
    access = [line for line in cors_server.logs.lines if line.startswith("uvicorn.access") and events_path in line]
    # The access log records the query string, so the check below can fail: the token is there, the key never.
    assert any(f"stream_token={token['token']}" in line and " 200" in line for line in access), access
    assert any(" 204" in line for line in access), access  # the browser's reconnect after the terminal event
    assert all(cors_tenant.api_key not in line for line in cors_server.logs.lines)
    assert any(f"/experiments/{experiment['id']}/stream-tokens" in line for line in cors_server.logs.lines)
    lifetime = datetime.fromisoformat(token["expires_at"]) - datetime.fromisoformat(report["issuedAt"])
    assert abs(lifetime.total_seconds() - STREAM_TOKEN_TTL_SECONDS) < 10


async def test_cors_preflight_for_page_origin(cors_server: CorsServer, page_server: PageServer) -> None:
    request_headers = "authorization, content-type, idempotency-key, last-event-id"
    async with httpx.AsyncClient(base_url=cors_server.base_url, timeout=10) as client:
        allowed = await client.options(
            "/experiments",
            headers={
                "Origin": page_server.origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": request_headers,
            },
        )
        foreign = await client.options(
            "/experiments",
            headers={"Origin": "http://127.0.0.1:1", "Access-Control-Request-Method": "POST"},
        )
        simple = await client.get("/health/live", headers={"Origin": page_server.origin})

    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == page_server.origin
    allowed_headers = {value.strip().lower() for value in allowed.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key", "last-event-id"} <= allowed_headers
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert foreign.status_code == 400
    assert "access-control-allow-origin" not in foreign.headers
    assert simple.headers["access-control-allow-origin"] == page_server.origin
    assert "Retry-After" in simple.headers["access-control-expose-headers"]


async def test_no_cors_headers_without_origins(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
        response = await client.get("/health/live", headers={"Origin": "http://127.0.0.1:1"})

    assert server.settings.cors_origins == ""
    assert "access-control-allow-origin" not in response.headers
