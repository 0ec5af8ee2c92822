"""The ``elodin`` command.

Each subcommand has an ``_add_<name>`` function that declares its flags and a ``_cmd_<name>``
handler that calls the Python API; the handlers stay thin so that scripts and the command line
do the same thing. User-caused problems arrive as :class:`~pipeline.errors.ElodinError` and are
printed as one line (``elodin: error: ...``) with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from .errors import ElodinError

__all__ = ["main"]

logger = logging.getLogger(__name__)

_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def command(add: Callable[[argparse._SubParsersAction], None]):
    """Register a subcommand's ``_add_...`` function (keeps ``build_parser`` one loop)."""
    _COMMANDS.append(add)
    return add


# --------------------------------------------------------------------------------------- models
@command
def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list, export and describe models")
    msub = p.add_subparsers(dest="models_cmd", required=True, metavar="{list,export,info}")
    msub.add_parser("list", help="list the built-in models")
    e = msub.add_parser("export", help="export a built-in model to ONNX (prints its path last)")
    e.add_argument("name")
    e.add_argument("--force", action="store_true", help="export again even if cached")
    i = msub.add_parser("info", help="describe a model (built-in name or ONNX path)")
    i.add_argument("name")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import export, zoo

    if args.models_cmd == "list":
        print(f"{'name':<22} {'resolution':>10} {'features':>8}  source")
        for card in zoo.builtin_cards():
            print(f"{card.name:<22} {card.resolution!s:>10} {card.feature_dim:>8}  {card.source}")
        return 0
    if args.models_cmd == "export":
        card = zoo.resolve(args.name)
        path = export.ensure_onnx(card, force=args.force)
        print(path)
        return 0
    card = zoo.resolve(args.name)
    path = export.ensure_onnx(card) if card.builtin else card.path
    for key, value in zoo.describe(card, path).items():
        print(f"{key:<14} {value}")
    return 0


# ---------------------------------------------------------------------------------- fingerprint
def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", help="local (default), slurm, kubernetes or a scheduler ADDRESS")
    p.add_argument(
        "--workers", type=int, help="worker processes (local) or jobs/pods (slurm, kubernetes)"
    )


@command
def _add_fingerprint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fingerprint", help="cut images into cutouts and store their CNN fingerprints"
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="FITS, Zarr, PNG/JPEG/TIFF files, globs, directories or @list.txt",
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="STORE", help="Zarr store to create or add to"
    )
    p.add_argument("--method", choices=["sliding", "full", "blobs", "catalog"])
    p.add_argument("--size", type=int, help="cutout side in pixels")
    p.add_argument("--stride", type=int, help="step between sliding windows in pixels")
    p.add_argument(
        "--edge", choices=["shift", "pad", "drop"], help="edge policy of sliding windows"
    )
    p.add_argument("--catalog", metavar="FILE", help="table of RA/Dec or x/y (method catalog)")
    p.add_argument(
        "--model", metavar="NAME|PATH", help="built-in model name or ONNX file with its card"
    )
    p.add_argument("--batch-size", type=int)
    p.add_argument("--tile-size", type=int, help="tile side in pixels (unit of work and resume)")
    p.add_argument("--hdu", help="FITS HDU name or number")
    p.add_argument("--variable", help="variable of a Zarr/xarray mosaic")
    p.add_argument(
        "--gpu",
        action="store_true",
        default=None,
        help="inference tasks ask for the GPU=1 resource",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_cluster_flags(p)
    p.set_defaults(func=_cmd_fingerprint)


def _hdu(value: str | None) -> int | str | None:
    return int(value) if value is not None and value.isdigit() else value


def _cmd_fingerprint(args: argparse.Namespace) -> int:
    from .fingerprint import fingerprint

    result = fingerprint(
        args.inputs,
        args.output,
        method=args.method,
        size=args.size,
        stride=args.stride,
        edge=args.edge,
        catalog=args.catalog,
        model=args.model,
        batch_size=args.batch_size,
        tile_size=args.tile_size,
        hdu=_hdu(args.hdu),
        variable=args.variable,
        gpu=args.gpu,
        scheduler=args.scheduler,
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(result)
    return 0


# ----------------------------------------------------------------------------------------- demo
@command
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the main job on the Hubble Deep Field image scikit-image ships"
    )
    p.add_argument("-o", "--output", default="elodin-demo", metavar="DIR")
    _add_cluster_flags(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    for line in run_demo(args.output, scheduler=args.scheduler, workers=args.workers):
        print(line)
    return 0


# --------------------------------------------------------------------------------------- report
@command
def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="PNG figures and an index.html that opens from disk")
    p.add_argument("store", metavar="STORE", help="fingerprint store (after the analysis stages)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory for the report")
    p.add_argument(
        "--query", type=int, metavar="INDEX", help="cutout whose similar cutouts are shown"
    )
    p.add_argument(
        "-n", type=int, metavar="N", help="similar cutouts shown (default 9, from config)"
    )
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import make_report

    print(make_report(args.store, args.output, query=args.query, n_similar=args.n))
    return 0


# ------------------------------------------------------------------------------------------ main
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
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.config:
            from . import config

            config.load_file(args.config)
        return int(args.func(args) or 0)
    except ElodinError as e:
        print(f"elodin: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("elodin: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
