"""``elodin explore``: the Bokeh server with the explorer's page and its HTTP API.

One process, one tornado IO loop: the page's sessions and the API share one
:class:`~pipeline.explore.data.Explorer` (the map and a few columns per row) and one renderer.
Loopback by default; the server stops on Ctrl-C or SIGTERM (the CLI turns both into
``KeyboardInterrupt``), closing its sockets.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from .. import config
from ..errors import ConfigError

__all__ = ["explore"]

logger = logging.getLogger(__name__)

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_EVERYWHERE = ("0.0.0.0", "::", "")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _hosts(host: str, port: int) -> list[str]:
    """``host:port`` names the browser may use for this server (websocket origins, API Host)."""
    names = {host, "localhost", "127.0.0.1"} if host in _LOOPBACK else {host}
    if host in _EVERYWHERE:
        names = {"localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn()}
        try:
            names |= set(socket.gethostbyname_ex(socket.gethostname())[2])
        except OSError:
            pass
    return sorted(f"[{n}]:{port}" if ":" in n else f"{n}:{port}" for n in names if n)


def explore(
    store: str | os.PathLike,
    *,
    host: str | None = None,
    port: int | None = None,
    browser: bool = True,
    read_only: bool = False,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the explorer of ``store`` until interrupted (Ctrl-C, SIGTERM).

    Parameters
    ----------
    store : path
        A fingerprint store with an ``embedding`` (or ``pca``).
    host, port : optional
        Where to listen (``explore.host`` / ``explore.port``; port 0: any free port).
    browser : bool
        Open the page in the default web browser.
    read_only : bool
        Never write labels into the store.
    ready : callable, optional
        Called with the URL once the server listens (default: print ``Explorer: URL``).
    """
    from bokeh.application import Application
    from bokeh.application.handlers.function import FunctionHandler
    from bokeh.server.server import Server

    from .api import Exports, patterns
    from .app import page_factory
    from .data import Explorer
    from .render import MapRenderer

    host = str(config.get("explore.host", override=host))
    port = config.get_int("explore.port", override=port, minimum=0)
    if port > 65535:
        raise ConfigError(f"--port {port}: expected 0..65535")
    width = config.get_int("explore.map-width", minimum=100)
    height = config.get_int("explore.map-height", minimum=100)
    out = config.get("explore.export-dir")
    explorer = Explorer(store, read_only=read_only)
    export_dir = (
        Path(out)
        if out
        else Path(str(store).rstrip("/")).with_name(
            Path(str(store).rstrip("/")).stem + "-selections"
        )
    )
    exports = Exports(export_dir)
    renderer = MapRenderer(explorer, width=width, height=height)
    if host in _EVERYWHERE:
        logger.warning(
            "serving on every interface (%s): anyone who can reach this machine can browse "
            "the store and set labels; the explorer has no authentication",
            host or "0.0.0.0",
        )
    try:
        if port == 0:
            port = _free_port(host or "0.0.0.0")
        hosts = _hosts(host, port)
        server = Server(
            {"/": Application(FunctionHandler(page_factory(explorer, renderer, exports)))},
            address=host or None,
            port=port,
            allow_websocket_origin=hosts,
            extra_patterns=patterns(explorer, exports, {h.lower() for h in hosts}, renderer),
            num_procs=1,
        )
    except OSError as e:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); give another --port"
        ) from None
    server.start()
    shown = "127.0.0.1" if host in _EVERYWHERE else host
    url = f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"
    (ready or (lambda u: print(f"Explorer: {u}", flush=True)))(url)
    if browser:
        import webbrowser

        threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
    try:
        server.io_loop.start()
    finally:
        server.stop()
        server.unlisten()
        logger.info("explorer of %s stopped", explorer.path)
