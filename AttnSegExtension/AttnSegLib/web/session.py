"""A session process: ``python -m AttnSegLib.web.session --port P --data DIR``.

Started by the gateway (:mod:`.gateway`), one per browser visit. It serves one trame page on a
loopback port, keeps uploads and exports in a private temporary folder that is deleted when it ends,
and exits by itself once no browser has been connected for ``--idle-timeout`` seconds. Its wslink
secret is the first line of its standard input (the gateway writes a random one there): a client
must present it in ``wslink.hello``, so the loopback port is of no use to anyone but the gateway.
"""
from __future__ import annotations

import argparse
import logging
import resource
import sys
import tempfile
from pathlib import Path

from .rendering import prefer_offscreen_window


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m AttnSegLib.web.session", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="loopback port to listen on")
    parser.add_argument("--data", type=Path, required=True, help="folder of volumes offered for opening")
    parser.add_argument("--upload-limit-bytes", type=int, default=512 * 2**20)
    parser.add_argument("--idle-timeout", type=int, default=60,
                        help="seconds without a connected browser before the session ends")
    parser.add_argument("--corrections", type=Path, default=None, help="the server's corrections folder")
    parser.add_argument("--memory-limit-bytes", type=int, default=None,
                        help="cap on the process's data segment (RLIMIT_DATA): heap and private mappings")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_limit_bytes is not None:  # past it this session's allocations fail, not the machine's
        resource.setrlimit(resource.RLIMIT_DATA, (args.memory_limit_bytes, args.memory_limit_bytes))
    secret = "" if sys.stdin.isatty() else sys.stdin.readline().strip()
    if not secret:
        raise SystemExit("session: no wslink secret on standard input; sessions are started by `attnseg serve`")
    # trame reads sys.argv itself: the session's options are not its own, the secret is (and changing
    # sys.argv does not show it in the process's command line). One word with "=": a secret that starts
    # with "-" (token_urlsafe draws from A-Z a-z 0-9 - _) would otherwise read as an option and end the
    # session with a usage error, one start in 64.
    sys.argv = [sys.argv[0], f"--authKey={secret}"]
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s session %(name)s %(levelname)s %(message)s")
    prefer_offscreen_window()

    from trame.app import get_server

    from .webapp import AttnSegWebApp

    with tempfile.TemporaryDirectory(prefix="attnseg-session-") as work_dir:
        server = get_server(client_type="vue3")
        AttnSegWebApp(server, args.data.resolve(), Path(work_dir), args.upload_limit_bytes,
                      corrections_dir=args.corrections)
        server.start(host="127.0.0.1", port=args.port, open_browser=False, show_connection_info=False,
                     timeout=args.idle_timeout)


if __name__ == "__main__":
    main()
