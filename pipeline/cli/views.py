"""The commands that show a store: ``elodin report`` (static HTML) and ``elodin explore`` (a
Bokeh server)."""

from __future__ import annotations

import argparse
import sys

from ._common import _add_output, _add_store

__all__: list[str] = []


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="PNG figures and an index.html that opens from disk")
    _add_store(p, "fingerprint store (after the analysis stages)")
    _add_output(p, "DIR", "directory for the report")
    p.add_argument(
        "--query", type=int, metavar="INDEX", help="cutout whose similar cutouts are shown"
    )
    p.add_argument(
        "-n", type=int, metavar="N", help="similar cutouts shown (default 9, from config)"
    )
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from ..report import make_report

    print(make_report(args.store, args.output, query=args.query, n_similar=args.n))
    return 0


def _add_explore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explore", help="interactive explorer in the browser: map, cutouts, neighbours, labels"
    )
    _add_store(p, "fingerprint store (after embed)")
    p.add_argument("--port", type=int, metavar="N", help="port (default 5006; 0: any free port)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--no-browser", action="store_true", help="do not open a web browser")
    p.add_argument("--read-only", action="store_true", help="never write labels into the store")
    p.set_defaults(func=_cmd_explore)


def _cmd_explore(args: argparse.Namespace) -> int:
    from ..explore import explore

    try:
        explore(
            args.store,
            host=args.host,
            port=args.port,
            browser=not args.no_browser,
            read_only=args.read_only,
        )
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the normal way to stop a server
        from .. import interrupts

        interrupts.handled()
        print("Explorer stopped", file=sys.stderr)
    return 0
