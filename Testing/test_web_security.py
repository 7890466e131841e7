"""``attnseg serve`` against a hostile client: each attack of issue 11, played as a plain HTTP or
websocket client (aiohttp) against the real server on loopback, started as a user starts it.

* A foreign ``Host`` (DNS rebinding) or ``Origin`` (another web site), a cross-site ``<img>``, a
  missing or wrong access token: refused with 403 and a message, on HTTP and on the websocket upgrade.
* Errors: a call that raises in the session is answered without the traceback wslink would send
  (server folders, versions, code); a long file name or a damaged zip is refused with a message.
* A file in ``--data`` whose name is not UTF-8 (a Latin-1 name from a Windows share): offered under a
  readable name and opened; it aborted every session at its start.
* View sizes: a browser asking for an 8000 x 8000 view gets one of at most MAX_VIEW_SIDE pixels a side
  (the session grew by 2.9 GB before).
* Framing (clickjacking): another site's ``<iframe>`` of the server starts no session and shows no page;
  every response forbids framing and MIME sniffing.
* The wslink secret: a client reaching a session's loopback port around the gateway cannot
  authenticate with wslink's well-known default secret; the gateway's own relay can.
* Memory: messages announced and never finished are bounded per session in bytes (in total) and
  in number; the session's resident memory grows by at most one announced message. Complete messages
  that make a session hold more than they weigh (state keys of any name, msgpack arrays of millions
  of empty arrays) meet the session's memory cap: the session ends, the server goes on.
* Reaping: a session nobody connects to gives its slot back within seconds.
* State: a model or a volume named by a server path is refused; the session goes on.
* A public interface without an access token: the server refuses to start; with one, a real
  browser opening the printed URL gets a working session, and without it a refusal.

The upload of a header naming a server file is refused in the real browser (``test_web.py``).
"""
from __future__ import annotations

import asyncio
import io
import os
import re
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import msgpack
import pytest

aiohttp = pytest.importorskip("aiohttp")

from AttnSegLib.web.access import AccessError, AccessPolicy, access_token, normalize_origin  # noqa: E402
from AttnSegLib.web.wslink_guard import (CHUNK_HEADER, MAX_VIEW_SIDE, PendingMessages,  # noqa: E402
                                         with_bounded_view_size, with_secret, without_trace)
from test_web import browser  # noqa: E402,F401  (the Chromium fixture)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "Resources" / "SampleData" / "hippocampus_001_image.nii.gz"
TOKEN = "test-token-0123456789abcdef"
PROXY_ORIGIN = "https://seg.example.org"
UPLOAD_LIMIT_MB = 256
ANNOUNCED_BYTES = 200 * 2**20  # three of these grew a session by 1.2 GB before the fix
CONNECT_TIMEOUT_S = 4
SESSION_START_S = 180
DEFAULT_WSLINK_SECRET = "wslink-secret"
MODEL_KEY = "attnseg__AttnSegState__model__ModelPanel__"
VOLUME_KEY = "attnseg__AttnSegState__volume__VolumePanel__"


# -- without a server: the rules -----------------------------------------------------------------------
def test_hosts_must_be_addresses_or_names_this_server_was_given():
    policy = AccessPolicy.build([PROXY_ORIGIN])
    for host in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "10.1.2.3", "seg.example.org"):
        assert policy.host_problem(host) is None, host
    for host in ("attacker.example:8080", "localhost.attacker.example", "", None):
        assert "does not answer to the name" in policy.host_problem(host)


def test_origins_must_be_the_servers_own_or_allowed():
    policy = AccessPolicy.build([PROXY_ORIGIN])
    assert policy.origin_problem(None, "127.0.0.1:8080", None, None) is None
    assert policy.origin_problem("http://127.0.0.1:8080", "127.0.0.1:8080", "same-origin", "cors") is None
    assert policy.origin_problem(PROXY_ORIGIN, "127.0.0.1:8080", "same-origin", "websocket") is None
    for origin in ("http://attacker.example", "http://127.0.0.1:3000", "null", "https://127.0.0.1:8080/x"):
        assert "not allowed" in policy.origin_problem(origin, "127.0.0.1:8080", "cross-site", "cors"), origin
    assert "another web site" in policy.origin_problem(None, "127.0.0.1:8080", "cross-site", "no-cors")
    assert "another web site" in policy.origin_problem(None, "127.0.0.1:8080", "same-site", "no-cors")
    assert policy.origin_problem(None, "127.0.0.1:8080", "same-origin", "no-cors") is None
    assert policy.origin_problem(None, "127.0.0.1:8080", "cross-site", "navigate") is None
    assert normalize_origin("HTTPS://Seg.Example.org:443/") == "https://seg.example.org"
    with pytest.raises(AccessError, match="scheme://host"):
        normalize_origin("seg.example.org")


def test_only_top_level_navigations_may_come_from_another_site():
    policy = AccessPolicy.build()
    assert policy.origin_problem(None, "127.0.0.1:8080", "cross-site", "navigate", "document") is None
    assert policy.origin_problem(None, "127.0.0.1:8080", "same-origin", "navigate", "iframe") is None
    for dest in ("iframe", "frame", "object", "embed"):
        assert "show it in a frame" in policy.origin_problem(None, "127.0.0.1:8080", "cross-site", "navigate", dest)
        assert "show it in a frame" in policy.origin_problem(None, "127.0.0.1:8080", "same-site", "navigate", dest)


def test_tokens_are_needed_off_loopback_and_compared_whole():
    assert access_token("127.0.0.1", None) is None
    generated = access_token("0.0.0.0", None)
    assert generated and len(generated) >= 16 and generated != access_token("0.0.0.0", None)
    with pytest.raises(AccessError, match="needs an access token"):
        access_token("0.0.0.0", "")
    with pytest.raises(AccessError, match="too short"):
        access_token("127.0.0.1", "short")
    policy = AccessPolicy.build(token=TOKEN)
    assert policy.token_ok(TOKEN, None) and policy.token_ok(None, TOKEN)
    assert not policy.token_ok(None, None) and not policy.token_ok(TOKEN[:-1], None)
    assert not policy.token_ok(TOKEN + "x", "wrong") and not policy.token_ok("ü" * 8, None)


def _chunk(message_id: int, offset: int, total: int, content: bytes = b"") -> bytes:
    return CHUNK_HEADER.pack(message_id, offset, total) + content


def test_pending_messages_are_bounded_in_total_and_number():
    pending = PendingMessages(max_bytes=1000, max_messages=3)
    assert pending.admit(1, _chunk(1, 0, 400)) is None
    assert "at most 1000 per session" in pending.admit(2, _chunk(2, 0, 700))  # another connection counts too
    assert pending.admit(1, _chunk(1, 0, 400, b"x" * 400)) is None  # complete: freed
    assert pending.held_bytes == 0
    for message_id in range(3):
        assert pending.admit(1, _chunk(10 + message_id, 0, 10)) is None
    assert "more than 3" in pending.admit(1, _chunk(20, 0, 10))
    assert "differs" in pending.admit(1, _chunk(10, 0, 11))
    assert "past the end" in pending.admit(1, _chunk(11, 5, 10, b"x" * 6))
    pending.forget(1)
    assert len(pending) == 0 and pending.admit(1, _chunk(1, 0, 1000)) is None


def test_the_gateway_writes_the_sessions_secret_into_hello():
    hello = {"wslink": "1.0", "id": "system:c0:0", "method": "wslink.hello",
             "args": [{"secret": DEFAULT_WSLINK_SECRET}], "kwargs": {}}
    body = msgpack.packb(hello)
    rewritten = with_secret(_chunk(5, 0, len(body), body), "s3cret")
    message_id, offset, total = CHUNK_HEADER.unpack_from(rewritten)
    assert (message_id, offset, total) == (5, 0, len(rewritten) - CHUNK_HEADER.size)
    assert msgpack.unpackb(rewritten[CHUNK_HEADER.size:])["args"] == [{"secret": "s3cret"}]
    other = msgpack.packb({**hello, "method": "trame.state.get"})
    assert with_secret(_chunk(6, 0, len(other), other), "s3cret") == _chunk(6, 0, len(other), other)


def test_the_gateway_cuts_tracebacks_from_error_answers():
    error = {"wslink": "1.0", "id": "rpc:c0:3", "error": {"code": -32001, "message": "Exception raised", "data": {
        "method": "trame.trigger", "exception": "OSError(2, 'No such file', '/srv/secret/x')",
        "trace": 'Traceback (most recent call last):\n  File "/srv/attnseg/webapp.py", line 1'}}}
    body = msgpack.packb(error)
    cut = without_trace(_chunk(7, 0, len(body), body))
    assert CHUNK_HEADER.unpack_from(cut) == (7, 0, len(cut) - CHUNK_HEADER.size)
    answer = msgpack.unpackb(cut[CHUNK_HEADER.size:])
    assert answer["error"] == {"code": -32001, "message": "Exception raised",
                               "data": {"method": "trame.trigger", "exception": "OSError"}}
    result = msgpack.packb({"wslink": "1.0", "id": "rpc:c0:4", "result": {"trace": "a state key"}})
    assert without_trace(_chunk(8, 0, len(result), result)) == _chunk(8, 0, len(result), result)
    part = _chunk(9, 0, len(body) + 10, body)  # the first of two chunks: passed on as it is
    assert without_trace(part) == part


def _view_size(frame: bytes) -> dict:
    return msgpack.unpackb(frame[CHUNK_HEADER.size:])["args"][2]


def test_the_gateway_bounds_the_size_views_are_rendered_at():
    def size_call(size) -> bytes:
        body = msgpack.packb({"wslink": "1.0", "id": "rpc:c0:5", "method": "trame.rca.size", "args": ["Red", "o", size],
                              "kwargs": {}})
        return _chunk(5, 0, len(body), body)
    assert _view_size(with_bounded_view_size(size_call({"w": 800, "h": 600, "p": 2}))) == {"w": 800, "h": 600, "p": 2}
    assert _view_size(with_bounded_view_size(size_call({"w": 8000, "h": 600, "p": 1}))) == {
        "w": MAX_VIEW_SIDE, "h": 600, "p": 1}
    assert _view_size(with_bounded_view_size(size_call({"w": 3000, "h": 3000, "p": 1e6}))) == {
        "w": MAX_VIEW_SIDE / 4, "h": MAX_VIEW_SIDE / 4, "p": 4}
    for hostile in ({"w": float("inf"), "h": float("nan"), "p": -1}, {"w": "9" * 20, "h": True, "p": "x"}):
        assert _view_size(with_bounded_view_size(size_call(hostile))) == {"w": 300, "h": 300, "p": 1}
    other = size_call({"w": 8000, "h": 8000}).replace(b"trame.rca.size", b"trame.rca.push")
    assert with_bounded_view_size(other) == other


# -- a real server on loopback ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(env_extra: dict, args: list[str]):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env_extra}
    process = subprocess.Popen([sys.executable, "-m", "AttnSegLib.cli", "serve", "--host", "127.0.0.1",
                                "--port", str(port), *args], env=env, cwd=REPO)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, f"attnseg serve exited with status {process.returncode}"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process, f"http://127.0.0.1:{port}"
        time.sleep(0.25)
    process.kill()
    pytest.fail("attnseg serve did not listen within 60 s")


def _stop_server(process) -> None:
    assert process.poll() is None, "the server died during the tests"
    process.terminate()
    assert process.wait(60) == 0, "attnseg serve did not stop cleanly on SIGTERM"


@pytest.fixture(scope="module")
def server():
    """``attnseg serve --token ... --allow-origin https://seg.example.org`` on loopback."""
    process, url = _start_server({"ATTNSEG_WEB_MAX_UPLOAD_MB": str(UPLOAD_LIMIT_MB), "ATTNSEG_WEB_MAX_SESSIONS": "2"},
                                 ["--token", TOKEN, "--allow-origin", PROXY_ORIGIN])
    yield process, url
    _stop_server(process)


def run(coroutine):
    return asyncio.run(coroutine)


async def _get(url: str, **kwargs) -> tuple[int, str, dict]:
    async with aiohttp.ClientSession() as client, client.get(url, allow_redirects=False, **kwargs) as response:
        return response.status, await response.text(), dict(response.headers)


@pytest.fixture(scope="module")
def session(server):
    """(session URL, token cookie) of one session opened with the token, as a browser opens it."""
    _, url = server
    status, _, headers = run(_get(f"{url}/start?token={TOKEN}", timeout=aiohttp.ClientTimeout(total=SESSION_START_S)))
    assert status == 303, status
    cookie = re.search(r"attnseg_token=([^;]+)", headers["Set-Cookie"]).group(1)
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    return url + headers["Location"], {"attnseg_token": cookie}


class WslinkClient:
    """Just enough of wslink's protocol: chunked msgpack requests, answers matched by id."""

    def __init__(self, ws):
        self.ws = ws
        self._next = 0

    async def send(self, method: str, args: list, rpc_id: str | None = None):
        self._next += 1
        rpc_id = rpc_id or f"rpc:c0:{self._next}"
        body = msgpack.packb({"wslink": "1.0", "id": rpc_id, "method": method, "args": args, "kwargs": {}})
        await self.ws.send_bytes(_chunk(self._next, 0, len(body), body))
        parts: dict[int, bytearray] = {}
        while True:
            frame = await self.ws.receive(timeout=60)
            assert frame.type == aiohttp.WSMsgType.BINARY, f"connection ended: {frame}"
            message_id, offset, total = CHUNK_HEADER.unpack_from(frame.data)
            buffer = parts.setdefault(message_id, bytearray(total))
            content = frame.data[CHUNK_HEADER.size:]
            buffer[offset:offset + len(content)] = content
            if offset + len(content) >= total:
                message = msgpack.unpackb(bytes(parts.pop(message_id)))
                if message.get("id") == rpc_id:
                    return message

    async def hello(self, secret: str = DEFAULT_WSLINK_SECRET):
        return await self.send("wslink.hello", [{"secret": secret}], "system:c0:0")


def _ws_url(session_url: str) -> str:
    return session_url.replace("http://", "ws://") + "ws"


def test_foreign_hosts_origins_and_missing_tokens_are_refused(server, session):
    _, url = server
    session_url, cookies = session
    refusals = [
        ({"Host": "attacker.example"}, {}, "does not answer to the name"),
        ({"Origin": "http://attacker.example"}, cookies, "are not allowed"),
        ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}, cookies, "another web site"),
        ({}, {}, "Access token needed"),
        ({}, {"attnseg_token": TOKEN[:-1] + "x"}, "Access token needed"),
    ]
    for target in (url + "/", url + "/start", session_url):
        for headers, cookie, message in refusals:
            status, text, _ = run(_get(target, headers=headers, cookies=cookie))
            assert status == 403 and message in text, (target, headers, status, text[:300])
    # The same checks guard the websocket upgrade.
    for headers, cookie in [({"Origin": "http://attacker.example"}, cookies), ({"Host": "rebound.example"}, cookies),
                            ({"Origin": url}, {})]:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            run(_ws_connect_and_close(_ws_url(session_url), headers, cookie))
        assert refused.value.status == 403
    # The server's own page, and an allowed proxy origin, get through.
    assert run(_get(session_url, cookies=cookies, headers={"Origin": url}))[0] == 200
    assert run(_get(session_url, cookies=cookies, headers={"Origin": PROXY_ORIGIN}))[0] == 200


def test_every_response_forbids_framing_and_sniffing_and_frames_start_no_session(server, session):
    process, url = server
    session_url, cookies = session
    sessions = _session_pids(process)
    iframe = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"}
    for target, headers, cookie, status in [
            (url + "/", {}, {}, 403), (f"{url}/?token={TOKEN}", {}, {}, 200), (session_url, {}, cookies, 200),
            (f"{url}/start?token={TOKEN}", iframe, cookies, 403), (session_url, iframe, cookies, 403)]:
        got, text, response_headers = run(_get(target, headers=headers, cookies=cookie))
        assert got == status, (target, headers, got, text[:300])
        assert response_headers.get("Content-Security-Policy") == "frame-ancestors 'none'", target
        assert response_headers.get("X-Frame-Options") == "DENY", target
        assert response_headers.get("X-Content-Type-Options") == "nosniff", target
    assert _session_pids(process) == sessions  # the framed /start started none


async def _ask_for_a_view_size(session_url: str, cookies: dict, side: int, pid: int) -> tuple[int, int]:
    """(resident bytes before, peak within 5 s after) the session is asked to render its axial view
    ``side`` x ``side`` pixels."""
    async with aiohttp.ClientSession(cookies=cookies) as client, client.ws_connect(_ws_url(session_url)) as ws:
        wslink = WslinkClient(ws)
        await wslink.hello()
        await wslink.send("trame.state.get", [])
        before = peak = _resident_bytes(pid)
        await wslink.send("trame.rca.size", ["Red", "test", {"w": side, "h": side, "p": 1}])
        for _ in range(25):
            await asyncio.sleep(0.2)
            peak = max(peak, _resident_bytes(pid))
        await wslink.send("trame.rca.size", ["Red", "test", {"w": 400, "h": 400, "p": 1}])
        return before, peak


def test_a_browser_cannot_make_a_view_render_huge(server, session):
    session_url, cookies = session
    pid, _ = _session_process(server[0])
    before, peak = run(_ask_for_a_view_size(session_url, cookies, 8000, pid))
    print(f"8000 x 8000 view asked for: session resident {before / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB")
    assert peak - before < 2**31, f"the session grew by {(peak - before) / 2**20:.0f} MiB"


def _session_pids(server_process) -> set[int]:
    children = Path(f"/proc/{server_process.pid}/task/{server_process.pid}/children").read_text().split()
    return {int(pid) for pid in children if b"AttnSegLib.web.session" in Path(f"/proc/{pid}/cmdline").read_bytes()}


async def _ws_connect_and_close(ws_url: str, headers: dict, cookies: dict) -> None:
    async with aiohttp.ClientSession(cookies=cookies) as client, client.ws_connect(ws_url, headers=headers):
        pass


def _session_process(server_process) -> tuple[int, int]:
    """(pid, loopback port) of the gateway's session process."""
    children = Path(f"/proc/{server_process.pid}/task/{server_process.pid}/children").read_text().split()
    for pid in children:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"AttnSegLib.web.session" in argv:
            return int(pid), int(argv[argv.index(b"--port") + 1])
    pytest.fail("no session process found")


def _resident_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


async def _hello_around_and_through_the_gateway(session_url: str, cookies: dict, port: int):
    async with aiohttp.ClientSession() as client, client.ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
        around = await WslinkClient(ws).hello()
    async with aiohttp.ClientSession(cookies=cookies) as client, client.ws_connect(_ws_url(session_url)) as ws:
        through = await WslinkClient(ws).hello()
    return around, through


def test_the_wslink_secret_is_random_and_only_the_gateway_knows_it(server, session):
    session_url, cookies = session
    pid, port = _session_process(server[0])
    assert b"secret" not in Path(f"/proc/{pid}/cmdline").read_bytes().lower()
    around, through = run(_hello_around_and_through_the_gateway(session_url, cookies, port))
    assert "Authentication failed" in str(around.get("error")), around
    assert "clientID" in through.get("result", {}), through


async def _announce_and_abandon(ws_url: str, cookies: dict, count: int, size: int, pid: int):
    """Hello, then up to ``count`` first chunks of ``size``-byte messages never finished; returns
    (close code, close message, the session's peak resident bytes while they were pending)."""
    async with aiohttp.ClientSession(cookies=cookies) as client, client.ws_connect(ws_url) as ws:
        assert "clientID" in (await WslinkClient(ws).hello())["result"]
        peak = _resident_bytes(pid)
        for message_id in range(100, 100 + count):
            await ws.send_bytes(_chunk(message_id, 0, size, b"\0" * 16))
            closing = await _close_within(ws, 1.5)
            if closing is not None:
                return ws.close_code, str(closing.extra), peak
            peak = max(peak, _resident_bytes(pid))  # taken: the session now holds the message
        return None, "", peak


async def _close_within(ws, seconds: float):
    """The close frame if the server closes within ``seconds`` (its view images are skipped), else None."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            frame = await ws.receive(timeout=left)
        except asyncio.TimeoutError:
            return None
        if frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
            return frame
    return None


async def _state(session_url: str, cookies: dict, changes: dict | None = None, trigger: str | None = None) -> dict:
    async with aiohttp.ClientSession(cookies=cookies) as client, client.ws_connect(_ws_url(session_url)) as ws:
        wslink = WslinkClient(ws)
        await wslink.hello()
        if changes:
            await wslink.send("trame.state.update", [[{"key": k, "value": v} for k, v in changes.items()]])
        if trigger:
            await wslink.send("trame.trigger", [trigger, [], {}])
        return (await wslink.send("trame.state.get", []))["result"]["state"]


def test_abandoned_messages_cannot_grow_a_session(server, session):
    session_url, cookies = session
    pid, _ = _session_process(server[0])
    before = _resident_bytes(pid)
    code, reason, resident = run(_announce_and_abandon(_ws_url(session_url), cookies, 3, ANNOUNCED_BYTES, pid))
    grown = resident - before
    print(f"session resident memory: {before / 2**20:.0f} MiB before, {resident / 2**20:.0f} MiB with three "
          f"{ANNOUNCED_BYTES / 2**20:.0f} MiB messages announced (+{grown / 2**20:.0f} MiB)")
    assert code == 1009 and "bytes are pending" in reason, (code, reason)
    assert grown < 1.5 * ANNOUNCED_BYTES, f"the session grew by {grown / 2**20:.0f} MiB"
    code, reason, _ = run(_announce_and_abandon(_ws_url(session_url), cookies, 6, 1000, pid))
    assert code == 1009 and "partly sent messages" in reason, (code, reason)
    # The session goes on: a new connection is answered.
    assert run(_state(session_url, cookies))[VOLUME_KEY + "choices"]


def test_a_client_cannot_name_server_paths(server, session):
    session_url, cookies = session
    for path in ("/etc", "/etc/passwd", str(REPO / "Resources" / "Models" / "hippocampus_unet")):
        state = run(_state(session_url, cookies, {MODEL_KEY + "selected": path}))
        assert state[MODEL_KEY + "error"].startswith("choose a model from the list"), state[MODEL_KEY + "error"]
        assert path not in state[MODEL_KEY + "error"] and not state[MODEL_KEY + "description"]
    offered = run(_state(session_url, cookies))[VOLUME_KEY + "choices"]
    preloaded = run(_state(session_url, cookies))[VOLUME_KEY + "loaded"]  # the first volume offered
    assert preloaded == offered[0]["value"].removesuffix(".nii.gz")
    template = run(_state(session_url, cookies))["trame__template_main"]
    open_trigger = re.search(r"id=\"attnseg-open\"[^>]*@click=\"trigger\('([^']+)'\)\"", template).group(1)
    for name in ("../../../../etc/passwd", "/etc/passwd", ".."):
        state = run(_state(session_url, cookies, {VOLUME_KEY + "selected": name}, trigger=open_trigger))
        assert state[VOLUME_KEY + "error"] == "choose a volume from the list first"
        assert state[VOLUME_KEY + "loaded"] == preloaded  # nothing else was opened
    # What the server offered still works.
    state = run(_state(session_url, cookies, {VOLUME_KEY + "selected": offered[0]["value"]}, trigger=open_trigger))
    assert state[VOLUME_KEY + "loaded"] and not state[VOLUME_KEY + "error"]


def test_sessions_nobody_connects_to_are_reaped_within_seconds():
    process, url = _start_server({"ATTNSEG_WEB_MAX_SESSIONS": "1",
                                  "ATTNSEG_WEB_CONNECT_TIMEOUT_S": str(CONNECT_TIMEOUT_S)}, [])
    try:
        timeout = aiohttp.ClientTimeout(total=SESSION_START_S)
        assert run(_get(url + "/start", timeout=timeout))[0] == 303  # a visit that never opens the page
        ready = time.monotonic()
        status, text, _ = run(_get(url + "/start"))
        assert status == 503 and "All sessions are in use" in text
        # The front page answers at once, full or not: it says a session is starting and asks /start
        # (again every 5 s while the server is full).
        asked = time.monotonic()
        front, page, _ = run(_get(url + "/"))
        assert front == 200 and "Starting your AttnSeg session" in page and "fetch('/start'" in page
        assert time.monotonic() - asked < 5
        while status == 503 and time.monotonic() - ready < 60:
            time.sleep(0.2)
            freed = time.monotonic()
            status, _, _ = run(_get(url + "/start", timeout=timeout))  # starts a session once the slot is free
        assert status == 303, "the slot was never given back"
        print(f"unconnected session reaped {freed - ready:.1f} s after it was ready (timeout {CONNECT_TIMEOUT_S} s)")
        assert freed - ready < CONNECT_TIMEOUT_S + 4
    finally:
        _stop_server(process)


def test_a_public_interface_without_a_token_is_refused():
    result = subprocess.run([sys.executable, "-m", "AttnSegLib.cli", "serve", "--host", "0.0.0.0", "--token", ""],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    error = result.stderr.strip()
    assert "needs an access token" in error and "\n" not in error, error


async def _calls_that_fail(session_url: str, cookies: dict) -> list[dict]:
    """The session's answers to a trigger called with wrong arguments, an upload with a 300-character
    name and an upload of a damaged zip; and the volume panel's error after each upload."""
    async with aiohttp.ClientSession(cookies=cookies) as client, client.ws_connect(_ws_url(session_url)) as ws:
        wslink = WslinkClient(ws)
        await wslink.hello()
        template = (await wslink.send("trame.state.get", []))["result"]["state"]["trame__template_main"]
        send = re.search(r"trigger\('([^']+)', \[\[file\]\]\)", template).group(1)
        answers = [await wslink.send("trame.trigger", [send, [1, 2, 3, 4, 5], {}])]
        broken = bytearray(_zip_with_one_member())
        broken[49:99] = bytes(b ^ 0x55 for b in broken[49:99])  # inside the member's deflate stream
        for name, content in (("a" * 300 + ".nii.gz", SAMPLE.read_bytes()), ("series.zip", bytes(broken))):
            upload = {"name": name, "size": len(content), "type": "", "lastModified": 0, "content": content}
            answers.append(await wslink.send("trame.trigger", [send, [[upload]], {}]))
            answers.append({"volume error": (await wslink.send("trame.state.get", []))["result"]["state"][
                VOLUME_KEY + "error"]})
        return answers


def _zip_with_one_member() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("slice.dcm", b"A" * 100_000)
    return buffer.getvalue()


# Last of the shared session's tests: the long-named upload replaces the volume on screen.
def test_failing_calls_are_answered_without_tracebacks_and_bad_uploads_with_a_message(server, session):
    session_url, cookies = session
    wrong_arguments, long_name, long_name_state, damaged_zip, damaged_zip_state = run(
        _calls_that_fail(session_url, cookies))
    assert wrong_arguments["error"]["data"] == {"method": "trame.trigger", "exception": "TypeError"}, wrong_arguments
    assert "error" not in long_name and long_name_state == {"volume error": ""}, (long_name, long_name_state)
    assert "error" not in damaged_zip, damaged_zip
    assert damaged_zip_state["volume error"].startswith("series.zip: not a readable zip (Error -3 while decompressing")
    for answer in (wrong_arguments, long_name, damaged_zip):
        assert "Traceback" not in str(answer) and str(REPO) not in str(answer) and "/tmp" not in str(answer)


def test_a_data_file_whose_name_is_not_utf8_is_offered_and_opened(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "hippocampus_001_image.nii.gz").write_bytes(SAMPLE.read_bytes())
    latin1 = os.fsencode(data) + b"/caf\xe9.nii.gz"  # sorted first: the volume every session opens at its start
    Path(os.fsdecode(latin1)).write_bytes(SAMPLE.read_bytes())
    process, url = _start_server({"ATTNSEG_WEB_MAX_SESSIONS": "1"}, ["--data", str(data)])
    try:
        status, text, headers = run(_get(url + "/start", timeout=aiohttp.ClientTimeout(total=SESSION_START_S)))
        assert status == 303, (status, text[:300])  # was 500: the session died (std::logic_error, SIGABRT)
        state = run(_state(url + headers["Location"], {}))
        assert [c["value"] for c in state[VOLUME_KEY + "choices"]] == ["caf?.nii.gz", "hippocampus_001_image.nii.gz"]
        assert state[VOLUME_KEY + "loaded"] == "caf?" and not state[VOLUME_KEY + "error"]
    finally:
        _stop_server(process)


@pytest.mark.browser
def _expanding_state_update(message_id: int, key: str, count: int) -> list[bytes]:
    """The wslink chunks (4 MiB, as wslink sends them) of a ``trame.state.update`` setting ``key`` to
    ``count`` empty arrays: about ``count`` bytes on the wire, about 64 x ``count`` bytes unpacked."""
    prefix = msgpack.packb({"wslink": "1.0", "id": "rpc:c0:9", "method": "trame.state.update", "kwargs": {}})
    # written by hand so the client never holds the unpacked list: a fifth map entry "args", [[{"key":
    # key, "value": array32 of ``count`` empty arrays}]]
    value = b"\x82" + msgpack.packb("key") + msgpack.packb(key) + msgpack.packb("value") + b"\xdd" + \
        count.to_bytes(4, "big") + b"\x90" * count
    body = bytes([prefix[0] + 1]) + prefix[1:] + msgpack.packb("args") + b"\x91\x91" + value
    step = 4 * 2**20
    return [_chunk(message_id, offset, len(body), body[offset:offset + step]) for offset in range(0, len(body), step)]


async def _push_state(session_url: str, cookies: dict, messages: list[list[bytes]], pid: int) -> tuple[int, bool]:
    """Send ``messages`` (each a list of chunks) one by one; (the session's peak data segment meanwhile,
    whether it ended)."""
    peak = 0
    async with aiohttp.ClientSession(cookies=cookies) as client, client.ws_connect(_ws_url(session_url)) as ws:
        await WslinkClient(ws).hello()
        for chunks in messages:
            if not Path(f"/proc/{pid}").exists():
                return peak, True
            try:
                for chunk in chunks:
                    await ws.send_bytes(chunk)
            except ConnectionError:  # the session ended and the gateway closed the connection
                return peak, True
            for _ in range(10):
                await asyncio.sleep(0.2)
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:  # ended
                    return peak, True
                if "VmData" not in status:  # a zombie: its memory is gone
                    return peak, True
                peak = max(peak, int(re.search(r"VmData:\s+(\d+) kB", status).group(1)) * 1024)
    return peak, not Path(f"/proc/{pid}/status").exists() or "VmData" not in Path(f"/proc/{pid}/status").read_text()


def test_a_session_cannot_take_more_than_its_memory_cap(tmp_path):
    """Eight messages of 16 MiB of empty msgpack arrays, each kept by trame under its own state key,
    would make a session hold about 8 GiB; capped at 1.5 GiB, its allocations fail there (the session
    goes on or ends: either way it holds no more), the server goes on and starts the next visitor's
    session."""
    cap_mb = 1536
    process, url = _start_server({"ATTNSEG_WEB_MAX_UPLOAD_MB": "16", "ATTNSEG_WEB_SESSION_MEMORY_MB": str(cap_mb)}, [])
    try:
        timeout = aiohttp.ClientTimeout(total=SESSION_START_S)
        status, _, headers = run(_get(url + "/start", timeout=timeout))
        assert status == 303
        pid, _ = _session_process(process)
        messages = [_expanding_state_update(100 + n, f"junk{n}", 16 * 2**20 - 4096) for n in range(8)]
        peak, ended = run(_push_state(url + headers["Location"], {}, messages, pid))
        print(f"session data segment peaked at {peak / 2**20:.0f} MiB (cap {cap_mb} MiB); ended: {ended}")
        assert peak <= cap_mb * 2**20  # never past the cap (sampled every 0.2 s)
        assert ended or peak > 0.8 * cap_mb * 2**20  # the attack reached it: the session ended, or sits at it
        assert process.poll() is None
        assert run(_get(url + "/start", timeout=timeout))[0] == 303  # the next visitor gets a session
    finally:
        _stop_server(process)


def test_a_browser_needs_the_token_once_and_then_works(server, browser):
    _, url = server
    page = browser.new_page()
    response = page.goto(url + "/")
    assert response.status == 403 and "Access token needed" in page.inner_text("body")
    page.goto(f"{url}/?token={TOKEN}", timeout=SESSION_START_S * 1000)
    # While the session starts the page says so (it used to stay blank for 12-16 s), then moves on by itself.
    assert "Starting your AttnSeg session" in page.inner_text("#attnseg-starting")
    page.wait_for_selector("#attnseg-open", timeout=SESSION_START_S * 1000)
    assert TOKEN not in page.url  # the cookie carries it from here on: page, assets and websocket
    page.click("#attnseg-open")
    page.wait_for_selector("#attnseg-loaded-volume", timeout=60_000)
    assert "hippocampus_001_image" in page.inner_text("#attnseg-loaded-volume")
    page.close()


ATTACKER_PAGE = """<!doctype html><html><body><h1>win a prize</h1>
<iframe id="front" src="{url}/" width="600" height="400"></iframe>
<iframe id="start" src="{url}/start" width="600" height="400"></iframe></body></html>"""


@pytest.mark.browser
def test_another_site_cannot_frame_the_app_nor_start_sessions_in_frames(browser, tmp_path):
    """A server without a token (loopback, the default): a page of another site framing its front page and
    ``/start`` gets neither shown, and no session is started for it."""
    process, url = _start_server({"ATTNSEG_WEB_MAX_SESSIONS": "2"}, [])
    attacker = None
    try:
        (tmp_path / "index.html").write_text(ATTACKER_PAGE.format(url=url))
        attacker_port = _free_port()
        attacker = subprocess.Popen([sys.executable, "-m", "http.server", str(attacker_port), "--bind", "127.0.0.1"],
                                    cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        page = browser.new_page()
        statuses = {}
        page.on("response", lambda response: statuses.setdefault(response.url, response.status))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # http.server takes a moment to listen
            try:
                page.goto(f"http://localhost:{attacker_port}/index.html")  # localhost: another site than 127.0.0.1
                break
            except Exception:  # noqa: BLE001  (connection refused while it starts)
                time.sleep(0.2)
        page.wait_for_load_state("load")
        time.sleep(3)  # a framed starting page would have asked /start by now
        assert statuses.get(f"{url}/start") == 403, statuses
        framed = [f for f in page.frames if f is not page.main_frame]
        assert len(framed) == 2
        for frame in framed:
            assert "AttnSeg" not in frame.content(), frame.url
        assert not _session_pids(process), "a framed page started a session"
        page.close()
    finally:
        if attacker is not None:
            attacker.terminate()
            attacker.wait(10)
        _stop_server(process)
