"""``elodin models``: list, export, describe and adapt models."""

from __future__ import annotations

import argparse

from ._common import _hdu

__all__: list[str] = []


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list, export and describe models")
    msub = p.add_subparsers(dest="models_cmd", required=True, metavar="{list,export,info,adapt}")
    msub.add_parser("list", help="list the built-in models")
    e = msub.add_parser("export", help="export a built-in model to ONNX (prints its path last)")
    e.add_argument("name")
    e.add_argument("--force", action="store_true", help="export again even if cached")
    i = msub.add_parser("info", help="describe a model (built-in name or ONNX path)")
    i.add_argument("name")
    a = msub.add_parser(
        "adapt", help="adapt a built-in to your own cutouts, self-supervised (no labels)"
    )
    a.add_argument(
        "base",
        help="built-in model to start from, e.g. efficientnet-lite0:native:stages:zoom3:rot4 "
        "(simsiam: a plain one, e.g. efficientnet-lite0:native)",
    )
    a.add_argument("inputs", nargs="+", help="images, as for fingerprint")
    a.add_argument("--name", required=True, help="name of the new model (--model NAME)")
    a.add_argument(
        "--method",
        metavar="{head,simsiam}",
        help="head: a linear head on the frozen encoder (default); simsiam: fine-tune it "
        "(model.adapt.method)",
    )
    a.add_argument(
        "--epochs",
        type=int,
        help="head: augmented views of each cutout; simsiam: passes over the cutouts "
        "(model.adapt.epochs)",
    )
    a.add_argument("--hdu", help="FITS HDU name or number")
    a.add_argument("--variable", help="variable of a Zarr/xarray mosaic")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from ..models import export, zoo

    if args.models_cmd == "list":
        print(f"{'name':<22} {'resolution':>10} {'features':>8}  source")
        for card in zoo.builtin_cards():
            print(f"{card.name:<22} {card.resolution!s:>10} {card.feature_dim:>8}  {card.source}")
        return 0
    if args.models_cmd == "adapt":
        from ..models.adapt import adapt

        card = adapt(
            args.base,
            args.inputs,
            args.name,
            method=args.method,
            epochs=args.epochs,
            hdu=_hdu(args.hdu),
            variable=args.variable,
        )
        print(f"adapted model {args.name}: {card} (use --model {args.name})")
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
