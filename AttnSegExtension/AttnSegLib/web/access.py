"""Who may talk to ``attnseg serve``: the Host, Origin and access-token checks of every request.

A browser visiting any web site can send requests to a server on this machine's loopback
interface, and a site whose name it controls can point that name at 127.0.0.1 (DNS rebinding). So
every HTTP request and websocket upgrade must:

* name this server in ``Host``: an IP address (a rebinding site can only send its own name),
  ``localhost``, this machine's own name, or the host of an origin allowed with ``--allow-origin``;
* come from this server's own page when it says where it comes from: an ``Origin`` equal to the
  ``Host`` it was sent to, or one of the allowed origins; a request from another origin
  (``Sec-Fetch-Site`` other than ``same-origin``) is refused too unless it opens a page in a tab
  (a top-level navigation), so an ``<img>`` or an ``<iframe>`` on another site (or another port of
  this machine) cannot start sessions, nor show the app inside its own page to steer the user's
  clicks (clickjacking; :data:`SECURITY_HEADERS` tell the browser the same);
* carry the access token when the server has one: ``?token=`` in the URL once (the server then sets
  a cookie for the rest of the visit), compared in constant time. A server listening anywhere but
  loopback always has one (:func:`access_token`).
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..errors import AttnSegError

TOKEN_COOKIE = "attnseg_token"
TOKEN_QUERY = "token"
MIN_TOKEN_CHARS = 16
# On every response: no page of another origin may show this server's pages in a frame, and the
# browser runs or shows a file only as the type the server declared.
SECURITY_HEADERS = {
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # session URLs carry the session's token
}


class AccessError(AttnSegError, ValueError):
    """A bad ``--allow-origin`` or ``--token`` option; the message says what to give instead."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is this machine's loopback interface."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    """``0.0.0.0`` or ``::``: every interface of this machine."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def access_token(host: str, token: str | None) -> str | None:
    """The token the server will ask for: ``token`` as given (``$ATTNSEG_WEB_TOKEN`` when None), a new
    random one on an interface other than loopback when none is given, else None.

    Raises :class:`AccessError` for an empty or short token where one is needed.
    """
    token = os.environ.get("ATTNSEG_WEB_TOKEN") if token is None else token
    if token is None:
        return None if is_loopback(host) else secrets.token_urlsafe(24)
    if not token and not is_loopback(host):
        raise AccessError(f"--host {host} is reachable from other machines, so it needs an access token; leave "
                          "--token out to have one generated, or give one of at least "
                          f"{MIN_TOKEN_CHARS} characters")
    if token and len(token) < MIN_TOKEN_CHARS:
        raise AccessError(f"--token: {len(token)} characters is too short to resist guessing; give at least "
                          f"{MIN_TOKEN_CHARS} (e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    return token or None


def normalize_origin(origin: str) -> str:
    """``scheme://host[:port]``, lower-cased, default port dropped; AccessError for anything else."""
    parts = urlsplit(origin.strip())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username or parts.password:
        raise AccessError(f"--allow-origin {origin!r}: expected scheme://host[:port], e.g. https://seg.example.org")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def _host_name(netloc: str) -> str:
    """The host part of a ``Host`` header value (``[::1]:8080`` -> ``::1``), lower-cased."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:netloc.find("]")] if "]" in netloc else ""
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def machine_names() -> frozenset[str]:
    """This machine's own host name and fully qualified name (set by its administrator, not by a web site)."""
    names = {socket.gethostname(), socket.getfqdn()}
    return frozenset(n.lower() for n in names if n)


@dataclass(frozen=True)
class AccessPolicy:
    """The names and origins this server answers to, and its access token (None: no token needed)."""

    allowed_origins: frozenset[str] = frozenset()
    token: str | None = None
    own_names: frozenset[str] = field(default_factory=machine_names)

    @classmethod
    def build(cls, allowed_origins=(), token: str | None = None) -> "AccessPolicy":
        return cls(frozenset(normalize_origin(o) for o in allowed_origins), token or None)

    def host_problem(self, host_header: str | None) -> str | None:
        """Why a request sent with this ``Host`` is refused, or None."""
        host = _host_name(host_header or "")
        allowed_hosts = {_host_name(urlsplit(o).netloc) for o in self.allowed_origins}
        if host and (_is_ip(host) or host == "localhost" or host in self.own_names or host in allowed_hosts):
            return None
        return (f"this server does not answer to the name {str(host_header)[:100]!r}; open it by its address "
                "(e.g. http://127.0.0.1:PORT/), or start it with --allow-origin http://NAME:PORT")

    def origin_problem(self, origin: str | None, host_header: str | None, fetch_site: str | None,
                       fetch_mode: str | None, fetch_dest: str | None = None) -> str | None:
        """Why a request from this ``Origin`` (and ``Sec-Fetch-Site``, ``-Mode``, ``-Dest``) is refused, or None."""
        if origin is not None:
            try:
                normalized = normalize_origin(origin)
            except AccessError:
                normalized = ""
            same = normalized and urlsplit(normalized).netloc == (host_header or "").strip().lower()
            if not same and normalized not in self.allowed_origins:
                return (f"requests from the web page {origin[:100]!r} are not allowed; open AttnSeg's own page, "
                        "or start the server with --allow-origin for that page's origin")
        top_level = fetch_mode == "navigate" and fetch_dest in (None, "document")
        if fetch_site not in (None, "same-origin", "none") and not top_level:
            return ("another web site may not send requests to this server nor show it in a frame; "
                    "open AttnSeg's own page")
        return None

    def token_ok(self, query_token: str | None, cookie_token: str | None) -> bool:
        """Whether the request carries the access token (always, when the server has none)."""
        if self.token is None:
            return True
        expected = self.token.encode()
        return any(given is not None and hmac.compare_digest(given.encode(), expected)
                   for given in (query_token, cookie_token))
