"""The analysis commands: ``reduce``, ``cluster``, ``embed``, ``similar``, ``index``,
``neighbors``, ``outliers``, ``export`` and ``crossmatch``, each a thin call of
:mod:`pipeline.analysis`."""

from __future__ import annotations

import argparse
import logging

from ._common import (
    _add_block_rows,
    _add_compute_flags,
    _add_format,
    _add_output,
    _add_progress,
    _add_store,
    _compute,
)

__all__: list[str] = []

logger = logging.getLogger(__name__)


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
    p.add_argument(
        "--scale",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="standardise each feature before the PCA (default: analysis.reduce.scale, auto: "
        "yes for the fingerprints of a :multi or :stages model, as the default model's)",
    )
    _add_block_rows(p)
    _add_compute_flags(p)
    p.set_defaults(func=_cmd_reduce)


def _cmd_reduce(args: argparse.Namespace) -> int:
    from ..analysis import reduce

    print(
        reduce(
            args.store,
            components=args.components,
            variance=args.variance,
            features=args.features,
            refit=args.refit,
            scale=args.scale,
            block_rows=args.block_rows,
            **_compute(args),
        )
    )
    return 0


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
    from ..errors import ConfigError

    if args.on is None:
        return args.features
    if args.features is not None:
        raise ConfigError("give --features (or the deprecated --on), not both")
    import warnings

    from ..analysis.clustering import DEPRECATED_FEATURES, feature_space

    new = DEPRECATED_FEATURES.get(args.on, args.on)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        value = feature_space(args.on)
    logger.warning("--on %s is deprecated: use --features %s", args.on, new)
    return value


def _cmd_cluster(args: argparse.Namespace) -> int:
    from ..analysis import cluster

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


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="2-D map of the cutouts, UMAP or t-SNE (writes embedding)")
    _add_store(p)
    p.add_argument("--method", metavar="umap|tsne")
    p.add_argument("--sample-size", type=int, metavar="N", help="rows the map is fitted on")
    _add_block_rows(p)
    _add_compute_flags(p)
    p.set_defaults(func=_cmd_embed)


def _cmd_embed(args: argparse.Namespace) -> int:
    from ..analysis import embed

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
    from ..analysis import similar

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
    from ..analysis import build_index

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


def _add_neighbors(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("neighbors", help="k-NN graph of every cutout from the index")
    _add_store(p)
    p.add_argument("-k", type=int, metavar="K", help="neighbours per row (default 20)")
    _add_block_rows(p)
    _add_progress(p)
    _add_compute_flags(p)
    p.set_defaults(func=_cmd_neighbors)


def _cmd_neighbors(args: argparse.Namespace) -> int:
    from ..analysis import neighbors

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
    from ..analysis import outliers

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
    from ..analysis import export
    from ..analysis.export import output_format

    hats = {}
    if output_format(args.output, args.format) == "hats":
        hats = {
            "scheduler": args.scheduler,
            "workers": args.workers,
            "progress": not args.no_progress,
        }
    elif args.scheduler is not None or args.workers is not None:
        from ..errors import ConfigError

        raise ConfigError("--scheduler / --workers only apply to a HATS export")
    print(export(args.store, args.output, format=args.format, block_rows=args.block_rows, **hats))
    return 0


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
    from ..analysis.crossmatch import crossmatch_file

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
