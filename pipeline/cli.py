"""The ``elodin`` command.

Each subcommand has an ``_add_<name>`` function that declares its flags and a ``_cmd_<name>``
handler that calls the Python API; the handlers stay thin so that scripts and the command line
do the same thing. User-caused problems arrive as :class:`~pipeline.errors.ElodinError` and are
printed as one line (``elodin: error: ...``) with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
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
    msub = p.add_subparsers(dest="models_cmd", required=True, metavar="{list,export,info,adapt}")
    msub.add_parser("list", help="list the built-in models")
    e = msub.add_parser("export", help="export a built-in model to ONNX (prints its path last)")
    e.add_argument("name")
    e.add_argument("--force", action="store_true", help="export again even if cached")
    i = msub.add_parser("info", help="describe a model (built-in name or ONNX path)")
    i.add_argument("name")
    a = msub.add_parser(
        "adapt", help="fine-tune a built-in on your own cutouts, self-supervised (no labels)"
    )
    a.add_argument("base", help="built-in model to start from, e.g. efficientnet-lite0:native")
    a.add_argument("inputs", nargs="+", help="images, as for fingerprint")
    a.add_argument("--name", required=True, help="name of the new model (--model NAME)")
    a.add_argument("--epochs", type=int, help="passes over the cutouts (model.adapt.epochs)")
    a.add_argument("--hdu", help="FITS HDU name or number")
    a.add_argument("--variable", help="variable of a Zarr/xarray mosaic")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import export, zoo

    if args.models_cmd == "list":
        print(f"{'name':<22} {'resolution':>10} {'features':>8}  source")
        for card in zoo.builtin_cards():
            print(f"{card.name:<22} {card.resolution!s:>10} {card.feature_dim:>8}  {card.source}")
        return 0
    if args.models_cmd == "adapt":
        from .models.adapt import adapt

        card = adapt(
            args.base,
            args.inputs,
            args.name,
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


# ------------------------------------------------------------------------ flags many share
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


# ---------------------------------------------------------------------------------- fingerprint


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
    _add_output(p, "STORE", "Zarr store to create or add to")
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
    _add_progress(p)
    _add_compute_flags(p)
    p.set_defaults(func=_cmd_fingerprint)


def _hdu(value: str | None) -> int | str | None:
    from .sources import _hdu_value  # the rule of file.fits[N], which str.isdigit is not ("²")

    return _hdu_value(value)


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
        **_compute(args),
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
    _add_compute_flags(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    for line in run_demo(args.output, **_compute(args)):
        print(line)
    return 0


# --------------------------------------------------------------------------------------- report
@command
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
    from .report import make_report

    print(make_report(args.store, args.output, query=args.query, n_similar=args.n))
    return 0


# ------------------------------------------------------------------------------------- analysis


@command
def _add_reduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reduce", help="exact incremental PCA of the fingerprints (writes pca)")
    _add_store(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--components", type=int, metavar="N", help="components kept (default 20)")
    g.add_argument(
        "--variance",
        type=float,
        metavar="F",
        help="keep components up to this explained variance, e.g. 0.99",
    )
    p.add_argument(
        "--features",
        metavar="fingerprint|pixels",
        help="CNN fingerprints (pca) or the cutout-pixel baseline (pca_pixels)",
    )
    p.add_argument(
        "--refit", action="store_true", help="ignore the saved sums and read every row again"
    )
    _add_block_rows(p)
    _add_compute_flags(p)
    p.set_defaults(func=_cmd_reduce)


def _cmd_reduce(args: argparse.Namespace) -> int:
    from .analysis import reduce

    print(
        reduce(
            args.store,
            components=args.components,
            variance=args.variance,
            features=args.features,
            refit=args.refit,
            block_rows=args.block_rows,
            **_compute(args),
        )
    )
    return 0


@command
def _add_cluster(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="group the cutouts in PCA space (writes cluster)")
    _add_store(p)
    p.add_argument("--algorithm", metavar="kmeans|agglomerative|affinity|hdbscan")
    p.add_argument("--n-clusters", type=int, metavar="K", help="kmeans and agglomerative")
    p.add_argument(
        "--sample-size", type=int, metavar="N", help="rows the sample-fitted methods see"
    )
    p.add_argument("--min-cluster-size", type=int, metavar="N", help="hdbscan's smallest group")
    p.add_argument(
        "--min-samples", type=int, metavar="N", help="hdbscan's neighbours of a core row"
    )
    p.add_argument(
        "--features",
        metavar="fingerprint|pixels",
        help="feature space whose PCA is grouped, as for reduce (default fingerprint)",
    )
    # The old flag and values (the reduction's variable name): still work, warn once.
    p.add_argument("--on", metavar="pca|pca_pixels", help=argparse.SUPPRESS)
    _add_block_rows(p)
    _add_compute_flags(p)
    p.set_defaults(func=_cmd_cluster)


def _cluster_features(args: argparse.Namespace) -> str | None:
    """``--features``, or the deprecated ``--on pca|pca_pixels`` it replaced (warned once)."""
    from .errors import ConfigError

    if args.on is None:
        return args.features
    if args.features is not None:
        raise ConfigError("give --features (or the deprecated --on), not both")
    import warnings

    from .analysis.clustering import DEPRECATED_FEATURES, feature_space

    new = DEPRECATED_FEATURES.get(args.on, args.on)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        value = feature_space(args.on)
    logger.warning("--on %s is deprecated: use --features %s", args.on, new)
    return value


def _cmd_cluster(args: argparse.Namespace) -> int:
    from .analysis import cluster

    result = cluster(
        args.store,
        algorithm=args.algorithm,
        n_clusters=args.n_clusters,
        sample_size=args.sample_size,
        features=_cluster_features(args),
        min_cluster_size=args.min_cluster_size,
        min_samples=args.min_samples,
        block_rows=args.block_rows,
        **_compute(args),
    )
    print(result)
    return 0


@command
def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="2-D map of the cutouts, UMAP or t-SNE (writes embedding)")
    _add_store(p)
    p.add_argument("--method", metavar="umap|tsne")
    p.add_argument("--sample-size", type=int, metavar="N", help="rows the map is fitted on")
    _add_block_rows(p)
    _add_compute_flags(p)
    p.set_defaults(func=_cmd_embed)


def _cmd_embed(args: argparse.Namespace) -> int:
    from .analysis import embed

    print(
        embed(
            args.store,
            method=args.method,
            sample_size=args.sample_size,
            block_rows=args.block_rows,
            **_compute(args),
        )
    )
    return 0


@command
def _add_similar(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("similar", help="the cutouts most similar to a query")
    _add_store(p)
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--cutout", type=int, metavar="INDEX", help="query by row index")
    q.add_argument("--image", metavar="FILE", help="query by an image file (fingerprinted now)")
    q.add_argument(
        "--radec",
        type=float,
        nargs=2,
        metavar=("RA", "DEC"),
        help="query by sky position (degrees)",
    )
    p.add_argument("-n", type=int, metavar="N", help="rows listed (default 9)")
    p.add_argument("--metric", metavar="l2|cosine|jaccard")
    p.add_argument(
        "--exclude-overlaps",
        action="store_true",
        default=None,
        help="leave out windows overlapping the query window",
    )
    p.add_argument(
        "--exact", action="store_true", help="scan every row even when the store has an index"
    )
    _add_block_rows(p)
    _add_compute_flags(p)
    p.set_defaults(func=_cmd_similar)


def _cmd_similar(args: argparse.Namespace) -> int:
    from .analysis import similar

    table = similar(
        args.store,
        cutout=args.cutout,
        image=args.image,
        radec=args.radec,
        n=args.n,
        metric=args.metric,
        exclude_overlaps=args.exclude_overlaps,
        exact=args.exact,
        block_rows=args.block_rows,
        **_compute(args),
    )
    print(f"query: {table.meta.get('query')} ({table.meta.get('metric')})")
    # Four significant digits on the terminal; the Table (the API's answer) keeps them all.
    table["distance"].info.format = ".4g"
    table.pprint(max_lines=-1, max_width=-1)
    return 0


@command
def _add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="FAISS index of the vectors for fast similar (in the store)")
    _add_store(p)
    p.add_argument("--kind", metavar="auto|flat|ivf|ivfpq|hnsw")
    p.add_argument("--space", metavar="pca|fingerprint", help="vectors indexed (default pca)")
    p.add_argument("--metric", metavar="l2|cosine")
    p.add_argument(
        "--rebuild", action="store_true", help="build again even when it could be extended"
    )
    _add_block_rows(p)
    _add_progress(p)
    _add_compute_flags(p)
    p.set_defaults(func=_cmd_index)


def _cmd_index(args: argparse.Namespace) -> int:
    from .analysis import build_index

    print(
        build_index(
            args.store,
            kind=args.kind,
            space=args.space,
            metric=args.metric,
            rebuild=args.rebuild,
            block_rows=args.block_rows,
            **_compute(args),
            progress=not args.no_progress,
        )
    )
    return 0


@command
def _add_neighbors(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("neighbors", help="k-NN graph of every cutout from the index")
    _add_store(p)
    p.add_argument("-k", type=int, metavar="K", help="neighbours per row (default 20)")
    _add_block_rows(p)
    _add_progress(p)
    _add_compute_flags(p)
    p.set_defaults(func=_cmd_neighbors)


def _cmd_neighbors(args: argparse.Namespace) -> int:
    from .analysis import neighbors

    print(
        neighbors(
            args.store,
            k=args.k,
            block_rows=args.block_rows,
            **_compute(args),
            progress=not args.no_progress,
        )
    )
    return 0


@command
def _add_outliers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("outliers", help="k-NN distance outlier scores (writes outlier_score)")
    _add_store(p)
    p.add_argument("-n", type=int, metavar="N", help="rows listed (default 50)")
    p.add_argument("-k", type=int, metavar="K", help="neighbours averaged (default 10)")
    p.add_argument("--reference-size", type=int, metavar="N", help="rows in the reference sample")
    _add_block_rows(p)
    _add_compute_flags(p)
    p.set_defaults(func=_cmd_outliers)


def _cmd_outliers(args: argparse.Namespace) -> int:
    from .analysis import outliers

    table = outliers(
        args.store,
        n=args.n,
        k=args.k,
        reference_size=args.reference_size,
        block_rows=args.block_rows,
        **_compute(args),
    )
    table.pprint(max_lines=-1, max_width=-1)
    return 0


@command
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="catalog of the valid cutouts (Parquet, FITS, ECSV, VOTable or HATS)"
    )
    _add_store(p)
    _add_output(
        p, "CATALOG", "catalog.parquet, .fits, .ecsv, .vot / .xml or .hats (a directory, for lsdb)"
    )
    _add_format(p)
    _add_block_rows(p)
    _add_progress(p, "no progress bar (HATS)")
    _add_compute_flags(p)
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from .analysis import export
    from .analysis.export import output_format

    hats = {}
    if output_format(args.output, args.format) == "hats":
        hats = {
            "scheduler": args.scheduler,
            "workers": args.workers,
            "progress": not args.no_progress,
        }
    elif args.scheduler is not None or args.workers is not None:
        from .errors import ConfigError

        raise ConfigError("--scheduler / --workers only apply to a HATS export")
    print(export(args.store, args.output, format=args.format, block_rows=args.block_rows, **hats))
    return 0


@command
def _add_crossmatch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "crossmatch", help="pair the cutouts with the rows of an external catalog on the sky"
    )
    _add_store(p)
    p.add_argument(
        "catalog",
        metavar="CATALOG",
        help="HATS catalog (directory or URL) or a FITS / ECSV / Parquet / CSV table with RA/Dec",
    )
    p.add_argument(
        "--radius", type=float, required=True, metavar="ARCSEC", help="match radius in arcsec"
    )
    p.add_argument(
        "--nearest",
        action="store_true",
        default=None,
        help="only the nearest catalog row of each cutout (default: all within the radius)",
    )
    _add_output(p, "MATCHED", "matched.parquet, .fits, .ecsv, .vot or .hats")
    _add_format(p)
    _add_block_rows(p)
    _add_progress(p)
    _add_compute_flags(p)
    p.set_defaults(func=_cmd_crossmatch)


def _cmd_crossmatch(args: argparse.Namespace) -> int:
    from .analysis.crossmatch import crossmatch_file

    result = crossmatch_file(
        args.store,
        args.catalog,
        args.output,
        radius=args.radius,
        nearest=args.nearest,
        format=args.format,
        block_rows=args.block_rows,
        **_compute(args),
        progress=not args.no_progress,
    )
    print(f"{result.path}: {result.n_rows} pairs within {args.radius:g} arcsec")
    return 0


# -------------------------------------------------------------------------------------- explore
@command
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
    from .explore import explore

    try:
        explore(
            args.store,
            host=args.host,
            port=args.port,
            browser=not args.no_browser,
            read_only=args.read_only,
        )
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the normal way to stop a server
        print("Explorer stopped", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------- unlock
@command
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
    from .store import Store

    holder = Store.unlock(args.store, force=args.force)
    if holder is None:
        print(f"{args.store}: not locked")
    else:
        print(f"{args.store}: removed the writer lock of {holder.describe()}")
    return 0


# -------------------------------------------------------------------------------------- upgrade
@command
def _add_upgrade(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("upgrade", help="convert a store of an older schema to the current one")
    p.add_argument("store", metavar="STORE")
    p.set_defaults(func=_cmd_upgrade)


def _cmd_upgrade(args: argparse.Namespace) -> int:
    from .store import upgrade

    print(upgrade(args.store))
    return 0


# ------------------------------------------------------------------------------------------ run
@command
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
    from .runner import run

    result = run(
        args.config_file,
        incremental=args.incremental,
        **_compute(args),
        progress=not args.no_progress,
    )
    for line in result.lines:
        print(line)
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


def _writer_lock(args: argparse.Namespace):
    """The store's writer lock for the analysis stages that write into it (``fingerprint``
    takes its own), so two writers never share a store."""
    import contextlib

    if args.command in ("reduce", "cluster", "embed", "outliers", "index", "neighbors"):
        from .store import Store

        if Store.exists(args.store):
            return Store.lock(args.store)
    return contextlib.nullcontext()


def _terminate_like_ctrl_c():
    """SIGTERM (scancel, kubectl delete, a job timeout) unwinds like Ctrl-C, so the store's
    writer lock is given back and the Dask workers this process started are closed. Returns the
    handler it replaced (None outside the main thread)."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, interrupt)


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
    previous = _terminate_like_ctrl_c()
    try:
        if args.config:
            from . import config

            config.load_file(args.config)
        from . import numba_cache

        numba_cache.configure()  # before anything imports numba (umap-learn, pynndescent)
        with _writer_lock(args):
            return int(args.func(args) or 0)
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
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
