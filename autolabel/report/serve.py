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


class _InsideFolder(SimpleHTTPRequestHandler):
    """Serves only files that really lie under the folder: a symlink that leads out of it is not found."""

    def send_head(self):
        root = Path(self.directory).resolve()
        if not Path(self.translate_path(self.path)).resolve().is_relative_to(root):
            self.send_error(404, "File not found")
            return None
        return super().send_head()


def make_server(folder: Path, port: int) -> ThreadingHTTPServer:
    """A server for `folder` bound to 127.0.0.1 (port 0 picks a free one); call serve_forever() on it."""
    if not folder.is_dir():
        raise AutolabelError(
            f"{folder} is not a folder; write a report first with `autolabel report`, or pass its folder"
        )
    if not 0 <= port <= 65535:
        raise AutolabelError(f"--port {port} is not a TCP port; pass one from 1 to 65535, or 0 for any free port")
    handler = functools.partial(_InsideFolder, directory=str(folder))
    try:
        return ThreadingHTTPServer((HOST, port), handler)
    except OSError as err:
        raise AutolabelError(f"cannot listen on {HOST}:{port} ({err.strerror}); pick another --port") from err
