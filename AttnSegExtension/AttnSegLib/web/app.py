"""``attnseg serve``: AttnSeg in the browser, on trame-slicer.

:func:`serve` checks that VTK can render offscreen, then runs the gateway (:mod:`.gateway`), which
gives every browser visit its own session process (:mod:`.session`, :mod:`.webapp`): its own scene,
uploads and results, invisible to any other visitor. It listens on loopback unless told otherwise;
on any other interface it needs an access token (:mod:`.access`).

Limits come from the environment: ``ATTNSEG_WEB_MAX_SESSIONS`` (default 4 sessions at once),
``ATTNSEG_WEB_MAX_UPLOAD_MB`` (default 512 MiB per uploaded volume) and
``ATTNSEG_WEB_CONNECT_TIMEOUT_S`` (default 20: a session no browser connected to by then is stopped)
and ``ATTNSEG_WEB_SESSION_MEMORY_MB`` (default: the machine's memory shared among the sessions, at
least 4 GiB; past it a session's allocations fail, see :mod:`.gateway`).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from .access import AccessPolicy, access_token
from .gateway import GatewayConfig, run_gateway
from .rendering import check_offscreen_rendering

def default_data_dir() -> Path:
    """The shipped sample folder: ``Resources/SampleData`` of the repository or of the installed module."""
    here = Path(__file__).resolve().parent.parent  # AttnSegLib
    for candidate in (here.parents[1] / "Resources" / "SampleData", here.parent / "Resources" / "SampleData"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("the shipped sample data (Resources/SampleData) is missing; pass --data FOLDER")


def _positive_int_from_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise InputError(f"${name}={raw!r}: expected a whole number of at least 1")
    return int(raw)


def serve(host: str = "127.0.0.1", port: int = 8080, data_dir: str | os.PathLike | None = None,
          allowed_origins: tuple[str, ...] = (), token: str | None = None,
          corrections_dir: str | os.PathLike | None = None) -> None:
    """Serve the AttnSeg web app on ``host:port`` until interrupted.

    ``data_dir``: folder whose volumes the page offers (default: the shipped sample).
    ``allowed_origins``: web origins besides the server's own that may use it (e.g. a TLS reverse
    proxy's ``https://seg.example.org``). ``token``: see :func:`access_token`. ``corrections_dir``: an
    existing folder where sessions save corrected cases (:mod:`.corrections`). Raises ``ValueError``
    for a missing folder, bad limits, origins or token, and ``RenderingUnavailable`` when VTK cannot
    draw offscreen (the message names the Debian packages to install).
    """
    access = AccessPolicy.build(allowed_origins, access_token(host, token))
    folder = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
    if not folder.is_dir():
        raise InputError(f"--data {data_dir}: no such folder; give a folder of volumes (.nii.gz, .nrrd, ...)")
    corrections = Path(corrections_dir).expanduser().resolve() if corrections_dir else None
    if corrections is not None and not corrections.is_dir():
        raise InputError(f"--corrections {corrections_dir}: no such folder; create it first (mkdir -p)")
    config = GatewayConfig(
        data_dir=folder,
        corrections_dir=corrections,
        max_sessions=_positive_int_from_env("ATTNSEG_WEB_MAX_SESSIONS", GatewayConfig.max_sessions),
        upload_limit_bytes=_positive_int_from_env("ATTNSEG_WEB_MAX_UPLOAD_MB", 512) * 2**20,
        connect_timeout_s=_positive_int_from_env("ATTNSEG_WEB_CONNECT_TIMEOUT_S", int(GatewayConfig.connect_timeout_s)),
        access=access,
        session_memory_limit_bytes=_positive_int_from_env("ATTNSEG_WEB_SESSION_MEMORY_MB", 0) * 2**20 or None,
    )
    check_offscreen_rendering()
    run_gateway(host, port, config)
