"""What many subcommands share: one declaration of each common flag, so a flag reads and
behaves the same in every subcommand, and the parsing of ``--hdu``."""

from __future__ import annotations

import argparse

__all__: list[str] = []


# One declaration each, so a flag reads and behaves the same in every subcommand.
def _add_compute_flags(p: argparse.ArgumentParser) -> None:
    """Where the tasks run: a Dask scheduler (see :mod:`pipeline.compute`)."""
    p.add_argument("--scheduler", help="local (default), slurm, kubernetes or a scheduler ADDRESS")
    p.add_argument(
        "--workers", type=int, help="worker processes (local) or jobs/pods (slurm, kubernetes)"
    )


def _compute(args: argparse.Namespace) -> dict:
    """The ``scheduler`` / ``workers`` keywords of the Python API, from the compute flags."""
    return {"scheduler": args.scheduler, "workers": args.workers}


def _add_store(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("store", metavar="STORE", help=help)


def _add_block_rows(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-rows", type=int, metavar="N", help="rows per task")


def _add_progress(p: argparse.ArgumentParser, help: str = "no progress bar") -> None:
    p.add_argument("--no-progress", action="store_true", help=help)


def _add_output(p: argparse.ArgumentParser, metavar: str, help: str) -> None:
    p.add_argument("-o", "--output", required=True, metavar=metavar, help=help)


def _add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        choices=["parquet", "fits", "ecsv", "votable", "hats"],
        help="instead of the extension",
    )


def _hdu(value: str | None) -> int | str | None:
    from ..sources import _hdu_value  # the rule of file.fits[N], which str.isdigit is not ("²")

    return _hdu_value(value)
