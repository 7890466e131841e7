"""The front door of ``attnseg serve``: one isolated session process per browser visit.

A trame server shares one state among every browser connected to it, so two people on one process
would see each other's volumes. The gateway therefore starts a separate session process (its own
MRML scene, uploads and temporary folder; see :mod:`AttnSegLib.web.session`) for every visit, on a
free loopback port, and relays that session's page and websocket under ``/session/<token>/``, where
the token is 128 random bits. ``/`` answers at once with a page that says the session is starting
and asks ``/start`` for one (a session takes seconds to start; ``/start`` answers with a redirect to
it once it is ready, or says why not); while every slot is in use, that page tries again every few
seconds. A session process exits by itself a short
while after its last browser tab closed (trame's idle timeout); the gateway then forgets it.

Every request passes the checks of :mod:`.access` (Host, Origin, access token) first. Uploads travel
inside the websocket as wslink messages, split into chunks; the gateway keeps the account of a
session's partly received messages (:class:`~.wslink_guard.PendingMessages`) and closes a connection
whose chunk would take the session past an upload's size in total, or past a few pending messages,
before that chunk reaches the session. The page itself refuses oversized files before sending them,
with a message. Each session checks a random wslink secret that only the gateway knows: it writes it
into the browser's ``wslink.hello`` (:func:`~.wslink_guard.with_secret`). A session no browser has
connected to within ``connect_timeout_s`` of its start is stopped, so visits that never open the
page cannot hold the slots. An error the session answers a call with reaches the browser without
its traceback (:func:`~.wslink_guard.without_trace`), and the size a browser asks a view to be
rendered at is bounded (:func:`~.wslink_guard.with_bounded_view_size`).

What a complete message makes a session hold is not seen here: trame keeps any state key a client
sends, and msgpack lets a message of a few MiB unpack to a GiB (an array of millions of empty
arrays). Each session's data segment (heap and private mappings, ``RLIMIT_DATA``) is therefore capped
(:attr:`GatewayConfig.session_memory_bytes`): past it the session's allocations fail, so a client
that pushes its session there leaves it stuck at the cap or ended, and the other sessions and the
machine go on.
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

from ..image import physical_memory_bytes
from .access import SECURITY_HEADERS, TOKEN_COOKIE, TOKEN_QUERY, AccessPolicy, is_wildcard
from .wslink_guard import PendingMessages, with_bounded_view_size, with_secret, without_trace

log = logging.getLogger(__name__)

_RELAY_MAX_FRAME_BYTES = 64 * 2**20  # one websocket frame; wslink itself sends at most 4 MiB per chunk
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "content-length", "content-encoding"}
_NOT_FOR_SESSIONS = {"host", "cookie", "authorization"}  # the gateway's business, not the session's
_REAP_INTERVAL_S = 1.0
MIN_SESSION_MEMORY_BYTES = 4 * 2**30


@dataclass(frozen=True)
class GatewayConfig:
    data_dir: Path
    corrections_dir: Path | None = None  # where sessions save corrected cases (web.corrections)
    max_sessions: int = 4
    upload_limit_bytes: int = 512 * 2**20
    session_idle_timeout_s: int = 60
    session_start_timeout_s: float = 120.0
    connect_timeout_s: float = 20.0  # a session no browser connected to by then is stopped
    max_pending_messages: int = 4  # partly received wslink messages per session
    max_connections_per_session: int = 4  # websockets at once (a tab each)
    access: AccessPolicy = field(default_factory=AccessPolicy)
    session_memory_limit_bytes: int | None = None  # default: session_memory_bytes's share of the machine

    @property
    def session_memory_bytes(self) -> int:
        """Each session's data-segment cap: the one given, else the machine's memory shared among
        ``max_sessions``, and at least ``MIN_SESSION_MEMORY_BYTES`` (segmenting the MNI152 whole head
        into MRML nodes peaks at 1.3 GiB resident; an idle session's data segment is about 0.6 GiB)."""
        if self.session_memory_limit_bytes is not None:
            return self.session_memory_limit_bytes
        return max(physical_memory_bytes() // self.max_sessions, MIN_SESSION_MEMORY_BYTES)

    @property
    def message_limit_bytes(self) -> int:
        """The largest wslink message a browser may send: an upload plus room for its envelope."""
        return self.upload_limit_bytes + 2**20


@dataclass
class Session:
    token: str
    port: int
    process: asyncio.subprocess.Process
    secret: str  # the wslink secret the session checks; never sent to a browser
    pending: PendingMessages
    ready: float = field(default_factory=time.monotonic)
    connections: int = 0  # websockets open now
    connected: bool = False  # a browser has opened one

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


def _page(title: str, text: str, status: int, link: bool = True) -> web.Response:
    again = '<p><a href="/">Start a new session</a></p>' if link else ""
    body = (f"<!doctype html><html><head><meta charset='utf-8'><title>AttnSeg: {html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;background:#1e1e1e;color:#eee;margin:4em}"
            "a{color:#8cf}</style></head>"
            f"<body><h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>{again}</body></html>")
    return web.Response(text=body, status=status, content_type="text/html")


STARTING_PAGE = """<!doctype html><html><head><meta charset='utf-8'><title>AttnSeg: starting your session</title>
<style>body{font-family:sans-serif;background:#1e1e1e;color:#eee;margin:4em}a{color:#8cf}
.spinner{width:28px;height:28px;border:4px solid #555;border-top-color:#8cf;border-radius:50%;
animation:spin 1s linear infinite;display:inline-block;vertical-align:middle;margin-right:12px}
@keyframes spin{to{transform:rotate(360deg)}}</style></head>
<body><h2 id="attnseg-starting"><span class="spinner"></span>Starting your AttnSeg session&hellip;</h2>
<p id="attnseg-starting-text">Each visit gets its own session (its own scene, uploads and results); it takes
about 10 to 20 seconds to start. This page moves on by itself.</p>
<script>
async function start() {
  const text = document.getElementById('attnseg-starting-text');
  let response;
  try {
    response = await fetch('/start' + location.search, {credentials: 'same-origin', cache: 'no-store'});
  } catch (error) {
    text.textContent = 'The server does not answer; trying again in 5 s.';
    setTimeout(start, 5000);
    return;
  }
  if (response.ok && response.url.includes('/session/')) {
    location.replace(response.url);
    return;
  }
  const page = new DOMParser().parseFromString(await response.text(), 'text/html');
  const why = page.querySelector('p') ? page.querySelector('p').textContent : 'status ' + response.status;
  text.textContent = why + (response.status === 503 ? ' Trying again in 5 s.' : '');
  if (response.status === 503) setTimeout(start, 5000);
}
start();
</script></body></html>
"""


def _redirect(location: str, status: int) -> web.Response:
    """A redirect returned, not raised, so the access check can add its cookie."""
    return web.Response(status=status, headers={"Location": location})


class Gateway:
    """Starts, relays to, and forgets session processes. Build the aiohttp app with :meth:`app`."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.sessions: dict[str, Session] = {}
        self._client: aiohttp.ClientSession | None = None
        self._starting = 0
        self._browsers: set[web.WebSocketResponse] = set()
        self._stopping: set[asyncio.Task] = set()  # reaped sessions shutting down
        self._reaper: asyncio.Task | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=2**20, middlewares=[self._check_access])
        app.router.add_get("/", self.starting_page)
        app.router.add_get("/start", self.new_session)
        app.router.add_get("/session/{token}", self.add_slash)
        app.router.add_get("/session/{token}/ws", self.relay_websocket)
        app.router.add_route("*", "/session/{token}/{tail:.*}", self.relay_http)
        app.on_response_prepare.append(self._add_security_headers)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    # -- access ---------------------------------------------------------------------------------
    @web.middleware
    async def _check_access(self, request: web.Request, handler) -> web.StreamResponse:
        """Host, Origin and token of every request and websocket upgrade (see :mod:`.access`)."""
        access = self.config.access
        headers = request.headers
        problem = access.host_problem(headers.get("Host")) or access.origin_problem(
            headers.get("Origin"), headers.get("Host"), headers.get("Sec-Fetch-Site"), headers.get("Sec-Fetch-Mode"),
            headers.get("Sec-Fetch-Dest"))
        if problem is not None:
            log.warning("refused %s %s: %s", request.method, request.path, problem)
            return _page("Request refused", problem, 403, link=False)
        query_token = request.query.get(TOKEN_QUERY)
        if not access.token_ok(query_token, request.cookies.get(TOKEN_COOKIE)):
            log.warning("refused %s %s: no valid access token", request.method, request.path)
            return _page("Access token needed", "This server needs its access token: open the address it printed "
                         "when it started (it ends in ?token=...).", 403, link=False)
        response = await handler(request)
        if access.token is not None and query_token is not None and not response.prepared:
            # Opened with the right ?token=: the cookie carries it for the rest of the visit.
            response.set_cookie(TOKEN_COOKIE, access.token, httponly=True, samesite="Strict", path="/",
                                secure=request.secure)
        return response

    @staticmethod
    async def _add_security_headers(_request: web.Request, response: web.StreamResponse) -> None:
        """Every response, the relayed session's included (see :data:`.access.SECURITY_HEADERS`)."""
        response.headers.update(SECURITY_HEADERS)

    # -- lifecycle ------------------------------------------------------------------------------
    async def _on_startup(self, _app) -> None:
        self._client = aiohttp.ClientSession(auto_decompress=False,
                                             timeout=aiohttp.ClientTimeout(total=None, connect=10))
        self._reaper = asyncio.create_task(self._reap_unconnected())

    async def _reap_unconnected(self) -> None:
        """Stop sessions no browser connected to within ``connect_timeout_s`` of their start."""
        while True:
            await asyncio.sleep(_REAP_INTERVAL_S)
            deadline = time.monotonic() - self.config.connect_timeout_s
            for session in [s for s in self.sessions.values() if not s.connected and s.ready < deadline]:
                log.info("session %s… stopped: no browser connected within %.0f s", session.token[:6],
                         self.config.connect_timeout_s)
                del self.sessions[session.token]  # its slot is free now, while it shuts down
                stopping = asyncio.create_task(self._stop(session))
                self._stopping.add(stopping)
                stopping.add_done_callback(self._stopping.discard)

    async def _on_shutdown(self, _app) -> None:
        """Close open websockets, else the server waits for browsers to leave before it stops."""
        for browser in [b for b in self._browsers if b.prepared]:
            await browser.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"server shutting down")

    async def _on_cleanup(self, _app) -> None:
        self._reaper.cancel()
        try:
            await asyncio.gather(*(self._stop(s) for s in list(self.sessions.values())), *self._stopping)
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
                   "--idle-timeout", str(self.config.session_idle_timeout_s),
                   "--memory-limit-bytes", str(self.config.session_memory_bytes)]
        if self.config.corrections_dir is not None:
            command += ["--corrections", str(self.config.corrections_dir)]
        secret = secrets.token_urlsafe(32)
        process = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.PIPE)
        process.stdin.write(secret.encode() + b"\n")  # not on the command line, where `ps` shows it
        await process.stdin.drain()
        process.stdin.close()
        session = Session(secrets.token_urlsafe(16), port, process, secret,
                          PendingMessages(self.config.message_limit_bytes, self.config.max_pending_messages))
        deadline = time.monotonic() + self.config.session_start_timeout_s
        while time.monotonic() < deadline:
            if not session.alive:
                raise RuntimeError(f"the session process exited with status {process.returncode} "
                                   "while starting; the server's log says why")
            try:
                async with self._client.get(session.upstream + "/", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        session.ready = time.monotonic()
                        return session
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.2)
        await self._stop(session)
        raise RuntimeError(f"the session did not start within {self.config.session_start_timeout_s:.0f} s")

    # -- routes ---------------------------------------------------------------------------------
    async def starting_page(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=STARTING_PAGE, content_type="text/html", headers={"Cache-Control": "no-store"})

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
        return _redirect(f"/session/{session.token}/", 303)

    def _session(self, request: web.Request) -> Session | None:
        self._forget_ended()
        return self.sessions.get(request.match_info["token"])

    async def add_slash(self, request: web.Request) -> web.StreamResponse:
        return _redirect(f"/session/{request.match_info['token']}/", 301)

    async def relay_http(self, request: web.Request) -> web.StreamResponse:
        session = self._session(request)
        if session is None:
            return _page("This session has ended", "Sessions end a minute after their last tab closes; "
                         "anything not downloaded is gone.", 404)
        url = f"{session.upstream}/{request.match_info['tail']}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP | _NOT_FOR_SESSIONS}
        query = request.query.copy()
        query.popall(TOKEN_QUERY, None)
        async with self._client.request(request.method, url, params=query, headers=headers,
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
        if session.connections >= self.config.max_connections_per_session:
            return _page("Too many connections", f"A session takes at most {self.config.max_connections_per_session} "
                         "connections at once; close a tab of it.", 429, link=False)
        browser = web.WebSocketResponse(max_msg_size=_RELAY_MAX_FRAME_BYTES, autoping=True)
        session.connections += 1
        session.connected = True
        self._browsers.add(browser)
        try:
            await browser.prepare(request)
            async with self._client.ws_connect(session.upstream + "/ws", max_msg_size=_RELAY_MAX_FRAME_BYTES,
                                               autoping=True) as upstream:
                relays = {asyncio.create_task(self._browser_to_session(browser, upstream, session)),
                          asyncio.create_task(self._session_to_browser(upstream, browser))}
                done, pending = await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                for task in done:  # one side went away mid-send: the relay ends either way
                    if task.exception() is not None:
                        log.debug("session %s…: relay ended: %s", session.token[:6], task.exception())
        except aiohttp.ClientError as err:
            log.warning("session %s… unreachable: %s", session.token[:6], err)
        finally:
            session.connections -= 1
            session.pending.forget(id(browser))
            self._browsers.discard(browser)
            if browser.prepared and not browser.closed:
                await browser.close()
        return browser

    async def _browser_to_session(self, browser: web.WebSocketResponse, upstream, session: Session) -> None:
        """Relay binary wslink chunks within the session's pending-message bounds; close on anything else."""
        async for message in browser:
            if message.type != WSMsgType.BINARY:
                if message.type == WSMsgType.TEXT:
                    await browser.close(code=aiohttp.WSCloseCode.UNSUPPORTED_DATA, message=b"wslink sends binary frames")
                return
            problem = session.pending.admit(id(browser), message.data)
            if problem is not None:
                log.warning("session %s…: closing a connection that sent %s", session.token[:6], problem)
                await browser.close(code=aiohttp.WSCloseCode.MESSAGE_TOO_BIG,
                                    message=f"refused: {problem}"[:120].encode())
                return
            await upstream.send_bytes(with_bounded_view_size(with_secret(message.data, session.secret)))

    async def _session_to_browser(self, upstream, browser: web.WebSocketResponse) -> None:
        async for message in upstream:
            if message.type == WSMsgType.BINARY:
                await browser.send_bytes(without_trace(message.data))
            elif message.type == WSMsgType.TEXT:
                await browser.send_str(message.data)
            else:
                return


def run_gateway(host: str, port: int, config: GatewayConfig) -> None:
    """Serve until interrupted; every session process is stopped on the way out."""
    logging.basicConfig(level=os.environ.get("ATTNSEG_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    shown = socket.gethostname() if is_wildcard(host) else (f"[{host}]" if ":" in host else host)
    token = f"?{TOKEN_QUERY}={config.access.token}" if config.access.token is not None else ""
    print(f"AttnSeg web app: http://{shown}:{port}/{token} (sessions: at most {config.max_sessions}, "
          f"uploads up to {config.upload_limit_bytes / 2**20:.0f} MiB, data: {config.data_dir})", flush=True)
    web.run_app(Gateway(config).app(), host=host, port=port, print=None, access_log=None)
