"""What the gateway checks in the wslink messages between a browser and its session.

wslink splits each message into chunks behind a 12-byte header: message id, the chunk's offset and
the whole message's size (three little-endian uint32). The session's un-chunker allocates the whole
declared size when a message's first chunk arrives and holds it until the last, so a client
announcing large messages and never finishing them grows the session's memory for free.
:class:`PendingMessages` keeps the account the un-chunker would keep, for all of a session's
connections together, and refuses the chunk that would take the session past its bounds: the total
bytes of partly received messages and their number.

The session checks a wslink secret in the client's first message (``wslink.hello``). The gateway
writes the session's random secret into that message (:func:`with_secret`), so the browser never
holds it and a client reaching the session's loopback port around the gateway cannot authenticate.

A view's size comes from the browser (``trame.rca.size``: width and height in CSS pixels, device
pixel ratio) and the session renders that view at that size, with nothing to bound it: 8000 x 8000
grew a session by 2.9 GB. The gateway bounds each rendered side to ``MAX_VIEW_SIDE`` pixels
(:func:`with_bounded_view_size`).

When a call raises, wslink answers the client with the exception and its whole traceback (the
server's folders, its Python and library versions, the code around the failing line). The gateway
cuts such an answer down to the method and the exception's type (:func:`without_trace`); the
session's log keeps the traceback.
"""
from __future__ import annotations

import math
import re
import struct

import msgpack

CHUNK_HEADER = struct.Struct("<III")  # message id, chunk offset, total message size
_HELLO_MAX_BYTES = 4096
MAX_VIEW_SIDE = 4096  # rendered pixels per side of a view: a full 4K screen, or half a 5K one at pixel ratio 2
MAX_PIXEL_RATIO = 4.0
_VIEW_SIZE_MAX_BYTES = 1024
_ERROR_MAX_BYTES = 2**20  # an error answer is one chunk this small; larger frames (images) pass unread
_EXCEPTION_TYPE = re.compile(r"[A-Za-z_][\w.]*")


def parse_chunk(frame: bytes) -> tuple[int, int, int] | None:
    """(message id, offset, total size) of a wslink chunk, or None for a frame too short to be one."""
    if len(frame) < CHUNK_HEADER.size:
        return None
    return CHUNK_HEADER.unpack_from(frame)


class PendingMessages:
    """Partly received messages of one session, keyed by (connection, message id).

    ``max_bytes``: the most their declared sizes may add up to; ``max_messages``: the most there
    may be. A browser sends one message at a time, its chunks in order, so one pending message of
    at most an upload's size is all a real client needs.
    """

    def __init__(self, max_bytes: int, max_messages: int):
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self._pending: dict[tuple[int, int], list[int]] = {}  # -> [declared size, bytes received]

    @property
    def held_bytes(self) -> int:
        return sum(declared for declared, _ in self._pending.values())

    def __len__(self) -> int:
        return len(self._pending)

    def admit(self, connection: int, frame: bytes) -> str | None:
        """Count one binary frame from ``connection``; the reason to refuse it (and close), or None."""
        chunk = parse_chunk(frame)
        if chunk is None:
            return "a frame shorter than a wslink chunk header"
        message_id, offset, total = chunk
        content = len(frame) - CHUNK_HEADER.size
        key = (connection, message_id)
        entry = self._pending.get(key)
        if entry is None:
            if total > self.max_bytes - self.held_bytes:
                return (f"a {total}-byte message while {self.held_bytes} bytes are pending "
                        f"(at most {self.max_bytes} per session)")
            if len(self._pending) >= self.max_messages:
                return f"more than {self.max_messages} partly sent messages"
            entry = self._pending[key] = [total, 0]
        elif entry[0] != total:
            return "a chunk whose message size differs from its first chunk's"
        if offset + content > total:
            return "a chunk past the end of its message"
        entry[1] += content
        if entry[1] >= total:  # complete: the session hands it on and frees it
            del self._pending[key]
        return None

    def forget(self, connection: int) -> None:
        """A closed connection's partial messages are dropped by the session too."""
        for key in [k for k in self._pending if k[0] == connection]:
            del self._pending[key]


def _single_chunk_message(frame: bytes, max_bytes: int, marker: bytes = b"") -> dict | None:
    """The msgpack map a frame holds whole (one chunk, at most ``max_bytes``, containing ``marker``), or
    None for any other frame (part of a longer message, an image, not msgpack)."""
    chunk = parse_chunk(frame)
    if chunk is None or chunk[1] != 0 or chunk[2] != len(frame) - CHUNK_HEADER.size or chunk[2] > max_bytes \
            or marker not in frame:
        return None
    try:
        message = msgpack.unpackb(frame[CHUNK_HEADER.size:])
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    return message if isinstance(message, dict) else None


def _repacked(frame: bytes, message: dict) -> bytes:
    """``message`` as one chunk under ``frame``'s message id."""
    body = msgpack.packb(message)
    return CHUNK_HEADER.pack(parse_chunk(frame)[0], 0, len(body)) + body


def with_secret(frame: bytes, secret: str) -> bytes:
    """``frame`` with the secret of a single-chunk ``wslink.hello`` replaced by ``secret``; any
    other frame unchanged."""
    message = _single_chunk_message(frame, _HELLO_MAX_BYTES)
    if message is None or message.get("method") != "wslink.hello":
        return frame
    message["args"] = [{"secret": secret}]
    return _repacked(frame, message)


def with_bounded_view_size(frame: bytes) -> bytes:
    """``frame`` with a single-chunk ``trame.rca.size`` call's width and height cut so that neither
    side, times the pixel ratio (at most ``MAX_PIXEL_RATIO``), exceeds ``MAX_VIEW_SIDE``; any other
    frame unchanged."""
    message = _single_chunk_message(frame, _VIEW_SIZE_MAX_BYTES, b"trame.rca.size")
    args = message.get("args") if message is not None and message.get("method") == "trame.rca.size" else None
    size = args[2] if isinstance(args, list) and len(args) == 3 else None
    if not isinstance(size, dict):
        return frame
    ratio = _finite(size.get("p", 1.0), 1.0)
    ratio = min(ratio, MAX_PIXEL_RATIO) if ratio > 0 else 1.0
    size.update(p=ratio, w=min(_finite(size.get("w", 300), 300), MAX_VIEW_SIDE / ratio),
                h=min(_finite(size.get("h", 300), 300), MAX_VIEW_SIDE / ratio))
    return _repacked(frame, message)


def _finite(value, default: float) -> float:
    """``value`` as a finite float, or ``default``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return float(value) if math.isfinite(value) else default


def without_trace(frame: bytes) -> bytes:
    """``frame`` (from a session) with a wslink error answer's ``data`` cut to the method and the
    exception's type; any other frame unchanged."""
    message = _single_chunk_message(frame, _ERROR_MAX_BYTES, b"trace")
    error = message.get("error") if message is not None else None
    data = error.get("data") if isinstance(error, dict) else None
    if not isinstance(data, dict) or "trace" not in data:
        return frame
    kind = _EXCEPTION_TYPE.match(str(data.get("exception", "")))
    error["data"] = {"method": data.get("method"), "exception": kind.group() if kind else "Exception"}
    return _repacked(frame, message)
