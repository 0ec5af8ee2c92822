"""The ``elodin`` command's parser and :func:`main`: logging, the store's writer lock, SIGTERM
as Ctrl-C, and every :class:`~pipeline.errors.ElodinError` as one line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ..errors import ElodinError
from . import analysis, fingerprint, models, stores, views

__all__ = ["build_parser", "main"]


# Each subcommand's ``_add_<name>`` (flags, and its ``_cmd_<name>`` handler as ``func``), in the
# order ``elodin --help`` lists them.
COMMANDS = (
    models._add_models,
    fingerprint._add_fingerprint,
    fingerprint._add_demo,
    views._add_report,
    analysis._add_reduce,
    analysis._add_cluster,
    analysis._add_embed,
    analysis._add_similar,
    analysis._add_index,
    analysis._add_neighbors,
    analysis._add_outliers,
    analysis._add_export,
    analysis._add_crossmatch,
    views._add_explore,
    stores._add_unlock,
    stores._add_upgrade,
    fingerprint._add_run,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elodin",
        description="Survey-scale image fingerprinting: cutouts -> ImageNet CNN (ONNX) -> Zarr -> analysis.",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="YAML of settings (under an `elodin:` key)"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def _writer_lock(args: argparse.Namespace):
    """The store's writer lock for the analysis stages that write into it (``fingerprint``
    takes its own), so two writers never share a store."""
    import contextlib

    if args.command in ("reduce", "cluster", "embed", "outliers", "index", "neighbors"):
        from ..store import Store

        if Store.exists(args.store):
            return Store.lock(args.store)
    return contextlib.nullcontext()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # distributed sets its loggers to INFO when it is imported (from dask.config's `logging`);
    # the terminal shows the progress bar instead, unless -vv asks for everything.
    import dask.config

    quiet = "warning" if args.verbose < 2 else "debug"
    dask.config.set({"logging.distributed": quiet})
    for name in ("distributed", "dask_jobqueue", "dask_kubernetes", "kr8s"):
        logging.getLogger(name).setLevel(quiet.upper())
    from .. import interrupts

    # SIGTERM (scancel, kubectl delete, a job timeout) unwinds like Ctrl-C, so the store's
    # writer lock is given back and the Dask workers this process started are closed.
    previous = interrupts.install()
    try:
        if args.config:
            from .. import config

            config.load_file(args.config)
        from .. import numba_cache

        numba_cache.configure()  # before anything imports numba (umap-learn, pynndescent)
        with _writer_lock(args):
            code = int(args.func(args) or 0)
        interrupts.raise_if_interrupted()  # a signal whose KeyboardInterrupt was lost
        return code
    except ElodinError as e:
        # One line whatever the message holds (a file name or value with a newline in it).
        print(f"elodin: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("elodin: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`elodin similar ... | head`): stop quietly, as `cat` does, and
        # point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # killed by SIGPIPE, as the shell reports it for other tools
    finally:
        interrupts.restore(previous)
