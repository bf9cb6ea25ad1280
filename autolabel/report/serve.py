"""`autolabel serve`: a reports folder over HTTP on 127.0.0.1 only (the standard library's server).

Reports open from disk too; serving helps when a browser restricts file:// pages
or the folder lives on another machine reached through an SSH tunnel.
"""

from __future__ import annotations

import functools
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from autolabel.errors import AutolabelError

HOST = "127.0.0.1"  # never all interfaces: reports show corpus text


def make_server(folder: Path, port: int) -> ThreadingHTTPServer:
    """A server for `folder` bound to 127.0.0.1 (port 0 picks a free one); call serve_forever() on it."""
    if not folder.is_dir():
        raise AutolabelError(f"{folder} is not a folder; write a report first with `autolabel report`, or pass its folder")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    try:
        return ThreadingHTTPServer((HOST, port), handler)
    except OSError as err:
        raise AutolabelError(f"cannot listen on {HOST}:{port} ({err.strerror}); pick another --port") from err
