"""The commands that make a store: ``elodin fingerprint``, ``elodin demo`` and ``elodin run``
(the whole pipeline from one YAML file)."""

from __future__ import annotations

import argparse

from ._common import _add_compute_flags, _add_output, _add_progress, _compute, _hdu

__all__: list[str] = []


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
    _add_output(p, "STORE", "Zarr store to create or add to")
    p.add_argument("--method", choices=["sliding", "full", "blobs", "catalog"])
    p.add_argument("--size", type=int, help="cutout side in pixels")
    p.add_argument("--stride", type=int, help="step between sliding windows in pixels")
    p.add_argument(
        "--edge", choices=["shift", "pad", "drop"], help="edge policy of sliding windows"
    )
    p.add_argument("--catalog", metavar="FILE", help="table of RA/Dec or x/y (method catalog)")
    p.add_argument(
        "--model",
        metavar="NAME|PATH",
        help="built-in model name or ONNX file with its card (default: config model.name)",
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
    _add_progress(p)
    _add_compute_flags(p)
    p.set_defaults(func=_cmd_fingerprint)


def _cmd_fingerprint(args: argparse.Namespace) -> int:
    from ..fingerprint import fingerprint

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
        **_compute(args),
        progress=not args.no_progress,
    )
    print(result)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the main job on the Hubble Deep Field image scikit-image ships"
    )
    p.add_argument("-o", "--output", default="elodin-demo", metavar="DIR")
    _add_compute_flags(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    for line in run_demo(args.output, **_compute(args)):
        print(line)
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="every stage from one config file (scheduled reprocessing)")
    p.add_argument("config_file", metavar="CONFIG.yaml", help="settings with an elodin.run section")
    p.add_argument(
        "--incremental",
        action="store_true",
        help="only new or changed inputs; update the analysis by the refit policy",
    )
    _add_progress(p)
    _add_compute_flags(p)
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from ..runner import run

    result = run(
        args.config_file,
        incremental=args.incremental,
        **_compute(args),
        progress=not args.no_progress,
    )
    for line in result.lines:
        print(line)
    return 0
