"""The commands that look after a store: ``elodin unlock`` and ``elodin upgrade``."""

from __future__ import annotations

import argparse

from ._common import _add_store

__all__: list[str] = []


def _add_unlock(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "unlock", help="remove a store's writer lock left by a run that is over (another host)"
    )
    _add_store(p)
    p.add_argument(
        "--force",
        action="store_true",
        help="remove it even when its process is alive on this host",
    )
    p.set_defaults(func=_cmd_unlock)


def _cmd_unlock(args: argparse.Namespace) -> int:
    from ..store import Store

    holder = Store.unlock(args.store, force=args.force)
    if holder is None:
        print(f"{args.store}: not locked")
    else:
        print(f"{args.store}: removed the writer lock of {holder.describe()}")
    return 0


def _add_upgrade(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("upgrade", help="convert a store of an older schema to the current one")
    p.add_argument("store", metavar="STORE")
    p.set_defaults(func=_cmd_upgrade)


def _cmd_upgrade(args: argparse.Namespace) -> int:
    from ..store import upgrade

    print(upgrade(args.store))
    return 0
