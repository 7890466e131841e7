"""The front door of ``attnseg serve``: one isolated session process per browser visit.

A trame server shares one state among every browser connected to it, so two people on one process
would see each other's volumes. The gateway therefore starts a separate session process (its own
MRML scene, uploads and temporary folder; see :mod:`AttnSegLib.web.session`) for every visit to
``/``, on a free loopback port, and relays that session's page and websocket under
``/session/<token>/``, where the token is 128 random bits. A session process exits by itself a short
while after its last browser tab closed (trame's idle timeout); the gateway then forgets it.

Uploads travel inside the websocket as wslink messages, split into chunks whose 12-byte header
declares the whole message's size. The gateway closes a connection that announces a message larger
than the upload limit before any of it reaches the session, so an oversized upload costs no memory;
the page itself refuses such files before sending them, with a message.
"""
from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import WSMsgType, web

log = logging.getLogger(__name__)

WSLINK_CHUNK_HEADER_BYTES = 12  # message id, chunk offset, total message size: three little-endian uint32
_RELAY_MAX_FRAME_BYTES = 64 * 2**20  # one websocket frame; wslink itself sends at most 4 MiB per chunk
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "content-length", "content-encoding"}


@dataclass(frozen=True)
class GatewayConfig:
    data_dir: Path
    max_sessions: int = 4
    upload_limit_bytes: int = 512 * 2**20
    session_idle_timeout_s: int = 60
    session_start_timeout_s: float = 120.0

    @property
    def message_limit_bytes(self) -> int:
        """The largest wslink message a browser may send: an upload plus room for its envelope."""
        return self.upload_limit_bytes + 2**20


@dataclass
class Session:
    token: str
    port: int
    process: asyncio.subprocess.Process
    started: float = field(default_factory=time.monotonic)

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    @property
    def upstream(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def declared_message_size(frame: bytes) -> int | None:
    """Total size a wslink chunk says its message has, or None for a frame too short to be a chunk."""
    if len(frame) < WSLINK_CHUNK_HEADER_BYTES:
        return None
    return int.from_bytes(frame[8:12], "little", signed=False)


def _page(title: str, text: str, status: int, link: bool = True) -> web.Response:
    again = '<p><a href="/">Start a new session</a></p>' if link else ""
    body = (f"<!doctype html><html><head><meta charset='utf-8'><title>AttnSeg: {html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;background:#1e1e1e;color:#eee;margin:4em}"
            "a{color:#8cf}</style></head>"
            f"<body><h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>{again}</body></html>")
    return web.Response(text=body, status=status, content_type="text/html")


class Gateway:
    """Starts, relays to, and forgets session processes. Build the aiohttp app with :meth:`app`."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.sessions: dict[str, Session] = {}
        self._client: aiohttp.ClientSession | None = None
        self._starting = 0
        self._browsers: set[web.WebSocketResponse] = set()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=2**20)
        app.router.add_get("/", self.new_session)
        app.router.add_get("/session/{token}", self.add_slash)
        app.router.add_get("/session/{token}/ws", self.relay_websocket)
        app.router.add_route("*", "/session/{token}/{tail:.*}", self.relay_http)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    # -- lifecycle ------------------------------------------------------------------------------
    async def _on_startup(self, _app) -> None:
        self._client = aiohttp.ClientSession(auto_decompress=False,
                                             timeout=aiohttp.ClientTimeout(total=None, connect=10))

    async def _on_shutdown(self, _app) -> None:
        """Close open websockets, else the server waits for browsers to leave before it stops."""
        for browser in list(self._browsers):
            await browser.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"server shutting down")

    async def _on_cleanup(self, _app) -> None:
        try:
            await asyncio.gather(*(self._stop(s) for s in list(self.sessions.values())))
        finally:
            if self._client is not None:
                await self._client.close()

    def _forget_ended(self) -> None:
        for token in [t for t, s in self.sessions.items() if not s.alive]:
            log.info("session %s… ended (exit status %s)", token[:6], self.sessions[token].process.returncode)
            del self.sessions[token]

    async def _stop(self, session: Session, grace_s: float = 10.0) -> None:
        """SIGTERM (the session deletes its folder on the way out), SIGKILL after ``grace_s``."""
        with contextlib.suppress(ProcessLookupError):
            session.process.terminate()
            try:
                await asyncio.wait_for(session.process.wait(), grace_s)
            except asyncio.TimeoutError:
                log.warning("session %s… ignored SIGTERM for %.0f s; killing it", session.token[:6], grace_s)
                session.process.kill()
                await session.process.wait()
        self.sessions.pop(session.token, None)

    async def _start(self) -> Session:
        port = free_loopback_port()
        command = [sys.executable, "-m", "AttnSegLib.web.session", "--port", str(port),
                   "--data", str(self.config.data_dir),
                   "--upload-limit-bytes", str(self.config.upload_limit_bytes),
                   "--idle-timeout", str(self.config.session_idle_timeout_s)]
        process = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL)
        session = Session(secrets.token_urlsafe(16), port, process)
        deadline = time.monotonic() + self.config.session_start_timeout_s
        while time.monotonic() < deadline:
            if not session.alive:
                raise RuntimeError(f"the session process exited with status {process.returncode} "
                                   "while starting; the server's log says why")
            try:
                async with self._client.get(session.upstream + "/", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return session
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.2)
        await self._stop(session)
        raise RuntimeError(f"the session did not start within {self.config.session_start_timeout_s:.0f} s")

    # -- routes ---------------------------------------------------------------------------------
    async def new_session(self, request: web.Request) -> web.StreamResponse:
        self._forget_ended()
        if len(self.sessions) + self._starting >= self.config.max_sessions:
            return _page("All sessions are in use",
                         f"This server runs at most {self.config.max_sessions} sessions at once; close one "
                         "or try again in a minute.", 503)
        self._starting += 1
        try:
            session = await self._start()
        except RuntimeError as err:
            log.error("session failed to start: %s", err)
            return _page("The session could not start", str(err), 500)
        finally:
            self._starting -= 1
        self.sessions[session.token] = session
        log.info("session %s… on loopback port %d (%d running)", session.token[:6], session.port, len(self.sessions))
        raise web.HTTPSeeOther(f"/session/{session.token}/")

    def _session(self, request: web.Request) -> Session | None:
        self._forget_ended()
        return self.sessions.get(request.match_info["token"])

    async def add_slash(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently(f"/session/{request.match_info['token']}/")

    async def relay_http(self, request: web.Request) -> web.StreamResponse:
        session = self._session(request)
        if session is None:
            return _page("This session has ended", "Sessions end a minute after their last tab closes; "
                         "anything not downloaded is gone.", 404)
        url = f"{session.upstream}/{request.match_info['tail']}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP | {"host"}}
        async with self._client.request(request.method, url, params=request.query, headers=headers,
                                        data=await request.read()) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP})
            if "Content-Encoding" in upstream.headers:
                response.headers["Content-Encoding"] = upstream.headers["Content-Encoding"]
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(2**16):
                await response.write(chunk)
            await response.write_eof()
            return response

    async def relay_websocket(self, request: web.Request) -> web.StreamResponse:
        session = self._session(request)
        if session is None:
            return _page("This session has ended", "Reload the start page for a new session.", 404)
        browser = web.WebSocketResponse(max_msg_size=_RELAY_MAX_FRAME_BYTES, autoping=True)
        await browser.prepare(request)
        self._browsers.add(browser)
        try:
            async with self._client.ws_connect(session.upstream + "/ws", max_msg_size=_RELAY_MAX_FRAME_BYTES,
                                               autoping=True) as upstream:
                relays = {asyncio.create_task(self._browser_to_session(browser, upstream)),
                          asyncio.create_task(self._session_to_browser(upstream, browser))}
                _, pending = await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        except aiohttp.ClientError as err:
            log.warning("session %s… unreachable: %s", session.token[:6], err)
        finally:
            self._browsers.discard(browser)
            if not browser.closed:
                await browser.close()
        return browser

    async def _browser_to_session(self, browser: web.WebSocketResponse, upstream) -> None:
        limit = self.config.message_limit_bytes
        async for message in browser:
            if message.type == WSMsgType.BINARY:
                size = declared_message_size(message.data)
                if size is not None and size > limit:
                    log.warning("closing a connection that sent a %d-byte message (limit %d)", size, limit)
                    await browser.close(code=aiohttp.WSCloseCode.MESSAGE_TOO_BIG,
                                        message=b"message over the upload limit")
                    return
                await upstream.send_bytes(message.data)
            elif message.type == WSMsgType.TEXT:
                await upstream.send_str(message.data)
            else:
                return

    async def _session_to_browser(self, upstream, browser: web.WebSocketResponse) -> None:
        async for message in upstream:
            if message.type == WSMsgType.BINARY:
                await browser.send_bytes(message.data)
            elif message.type == WSMsgType.TEXT:
                await browser.send_str(message.data)
            else:
                return


def run_gateway(host: str, port: int, config: GatewayConfig) -> None:
    """Serve until interrupted; every session process is stopped on the way out."""
    logging.basicConfig(level=os.environ.get("ATTNSEG_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(f"AttnSeg web app: http://{host}:{port}/ (sessions: at most {config.max_sessions}, "
          f"uploads up to {config.upload_limit_bytes / 2**20:.0f} MiB, data: {config.data_dir})", flush=True)
    web.run_app(Gateway(config).app(), host=host, port=port, print=None, access_log=None)
