"""The report's query: its similar rows from the analysis package (the store's k-NN graph when
it serves, else :func:`pipeline.analysis.similar`), or None for the report's own brute force."""

from __future__ import annotations

import numpy as np

from .. import config
from ..store import Store

__all__: list[str] = []


def _similar_via_analysis(st: Store, row: int | None, n: int, metric: str):
    """``(rows, distances, how)`` from :func:`pipeline.analysis.similar` (streamed over the
    store, honouring ``analysis.similar.exclude-overlaps``), or ``(None, None, "")`` when the
    variable the metric needs is missing; the report then searches by
    brute force."""
    if row is None or n <= 0:
        return None, None, ""
    from ..analysis import similar

    need = "top_class" if metric == "jaccard" else "pca"
    try:
        st.array(need)
    except KeyError:
        return None, None, ""
    what = {
        "l2": "L2 distance in PCA space",
        "cosine": "cosine distance in PCA space",
        "jaccard": "1 - Jaccard index of the top-k ImageNet classes",
    }[metric]
    found = _similar_from_graph(st, row, n, metric)
    if found is not None:
        return (*found, f"{what} (the store's k-NN graph, `elodin neighbors`)")
    table = similar(st, cutout=row, n=n, metric=metric)
    return (
        np.asarray(table["index"], dtype=np.int64),
        np.asarray(table["distance"], dtype=np.float64),
        f"{what} (pipeline.analysis.similar)",
    )


def _similar_from_graph(st: Store, row: int, n: int, metric: str):
    """``(rows, distances)``: the query's first ``n`` neighbours in the store's k-NN graph when
    it has at least ``n`` per row in ``metric`` and still matches the store (one row read, no
    search); None otherwise, or when ``analysis.similar.exclude-overlaps`` asks for a filter
    the graph did not apply."""
    if metric == "jaccard" or config.get("analysis.similar.exclude-overlaps", False):
        return None
    try:
        from ..analysis.index import GRAPH_DIST_VAR, GRAPH_VAR, graph_for
    except ImportError:
        return None
    if graph_for(st, n, metric=metric) is None:
        return None
    rows = np.asarray(st.array(GRAPH_VAR)[row][:n], np.int64)
    dist = np.asarray(st.array(GRAPH_DIST_VAR)[row][:n], np.float64)
    keep = rows >= 0
    if keep.sum() < n:
        return None
    return rows[keep], dist[keep]
