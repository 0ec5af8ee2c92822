"""Similarity search ("show me more like this one"): nearest rows to a query, streamed over the store.

The query is one row, so no N x N matrix is ever built: each block task (on the Dask workers
when there are any) computes the distances of its rows to the query and keeps its own best
``n`` with ``np.argpartition``; the client merges those candidates. Memory is one block per
task plus ``n`` candidates per block, whatever the number of rows.

Metrics
    ``l2`` and ``cosine`` in PCA space (``pca``), and ``jaccard``: one minus the Jaccard index
    of the sets of top-k ImageNet classes (``top_class``), as Elodin-NN did.

Queries
    ``cutout``: a row index. ``image``: an image file, fingerprinted on the spot with the
    store's model and preprocessing and projected with the stored PCA. ``radec``: the cutout
    nearest to that sky position (refused when it is further than one window side from every
    cutout: the position is outside the store's footprint). With ``exclude_overlaps``, windows
    of the same image that intersect the query window are left out (neighbouring sliding
    windows share pixels, so they are trivially similar); the query row itself is always left
    out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import config
from ..errors import ConfigError, InputError, StoreError
from ..store import Store
from . import _base

__all__ = [
    "METRICS",
    "angular_separation",
    "distances",
    "fingerprint_image",
    "nearest_cutout",
    "similar",
]

logger = logging.getLogger(__name__)

METRICS = ("l2", "cosine", "jaccard")


# ------------------------------------------------------------------------------- distances
def distances(values: np.ndarray, query: np.ndarray, metric: str) -> np.ndarray:
    """Distance of every row of ``values`` to ``query``: the one home of the three metrics
    (the similarity search and the report both call it).

    Parameters
    ----------
    values : array, shape (n, d)
        ``pca`` (or ``fingerprint``) rows for ``l2`` / ``cosine``; ``top_class`` rows for
        ``jaccard``, where -1 marks no class.
    query : array, shape (d,)
    metric : {"l2", "cosine", "jaccard"}

    Returns
    -------
    ndarray, shape (n,)
        ``l2``: Euclidean distance. ``cosine``: one minus the cosine similarity. ``jaccard``:
        one minus the Jaccard index of the two class sets.

    Notes
    -----
    Two rows with nothing to compare are as far apart as the metric can say, never NaN:
    Jaccard of two empty class sets (an empty union) is taken as 0, so the distance is 1.0,
    and the cosine of a zero vector with anything is taken as 0 (distance 1.0). A user asking
    for "more like this" then sees such rows ranked last rather than silently dropped or
    ranked first; NaN is kept for empty slots, which the callers mask with ``valid``.
    """
    if metric == "jaccard":
        rows = np.asarray(values)
        q = np.unique(np.asarray(query)[np.asarray(query) >= 0])
        present = rows >= 0
        # A row's top-k classes are distinct, so counting entries counts set members.
        inter = (np.isin(rows, q) & present).sum(axis=1)
        union = present.sum(axis=1) + len(q) - inter
        return 1.0 - inter / np.maximum(union, 1)
    x = np.asarray(values, np.float64)
    q = np.asarray(query, np.float64)
    if metric == "l2":
        return np.sqrt(((x - q) ** 2).sum(axis=1))
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1) * np.linalg.norm(q)
        dot = x @ q
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(norms > 0, 1.0 - dot / np.where(norms > 0, norms, 1.0), 1.0)
    raise ValueError(f"unknown metric {metric!r}")


def angular_separation(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle separation in degrees (haversine, numerically stable at small angles)."""
    ra1, dec1, ra2, dec2 = (np.deg2rad(np.asarray(v, np.float64)) for v in (ra1, dec1, ra2, dec2))
    h = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.rad2deg(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def _boxes(x, y, w, h):
    x0 = np.asarray(x, np.float64) - (np.asarray(w) - 1) / 2
    y0 = np.asarray(y, np.float64) - (np.asarray(h) - 1) / 2
    return x0, x0 + w, y0, y0 + h


# ----------------------------------------------------------------------------- block tasks
def _search_block(
    path: str,
    variable: str,
    start: int,
    stop: int,
    query: np.ndarray,
    metric: str,
    n: int,
    skip: int | None,
    box: tuple | None,
):
    """Best ``n`` rows of ``[start, stop)``: (row indices, distances)."""
    g = Store.zarr(path)
    valid = np.asarray(g["valid"][start:stop], bool)
    if not valid.any():
        return np.zeros(0, np.int64), np.zeros(0)
    d = distances(g[variable][start:stop], query, metric)
    d = np.where(valid, d, np.nan)
    if skip is not None and start <= skip < stop:
        d[skip - start] = np.nan
    if box is not None:
        image, bx0, bx1, by0, by1 = box
        imgs = _base.to_str(g["image"][start:stop])
        x0, x1, y0, y1 = _boxes(
            g["x"][start:stop], g["y"][start:stop], g["width"][start:stop], g["height"][start:stop]
        )
        overlap = (imgs == image) & (x0 < bx1) & (bx0 < x1) & (y0 < by1) & (by0 < y1)
        d[overlap] = np.nan
    top = _base.TopN(n)
    top.add(d, np.arange(start, stop))
    return top.index, top.scores


def _nearest_block(path: str, start: int, stop: int, ra: float, dec: float):
    g = Store.zarr(path)
    valid = np.asarray(g["valid"][start:stop], bool)
    sep = angular_separation(ra, dec, g["ra"][start:stop], g["dec"][start:stop])
    sep = np.where(valid, sep, np.nan)
    if not np.isfinite(sep).any():
        return -1, np.inf
    i = int(np.nanargmin(sep))
    return start + i, float(sep[i])


def _at(st: Store, name: str, rows: np.ndarray) -> np.ndarray:
    """``name`` at the sorted store ``rows`` (reads only the chunks holding them)."""
    return np.asarray(st.array(name).oindex[rows])


def _indexed(st: Store, query: np.ndarray, metric: str, n: int, skip: int | None, box):
    """The best ``n`` rows from the store's neighbour index, as one block task's answer
    (``[(rows, distances)]``), or None when the index is missing, stale or of another metric.

    Candidates are asked for in growing numbers until ``n`` survive the query row and the
    overlap filter; their distances are computed again from the stored ``pca`` rows, so they
    are the scan's to the last bit.
    """
    from . import index as nn

    # An ivfpq index comes as its codes alone (a sixth of its bytes: a one-off query must not
    # load the full vectors it keeps for re-ranking); its candidates, ``rerank`` times as
    # many, are re-ranked below from the stored rows, as FAISS's re-rank would.
    model, why = nn.usable_index(st, metric=metric, codes=True)
    if model is None:
        logger.info("%s: %s; scanning every row", st.path, why)
        return None
    factor = int(model.params_.get("rerank", 1)) if model.kind_ == "ivfpq-codes" else 1
    k = (n + 1) * factor
    while True:
        k = min(k, model.n_indexed)
        _, ids = model.kneighbors(query[None], k)
        rows = np.sort(ids[0][ids[0] >= 0])
        keep = rows != (-1 if skip is None else skip)
        if box is not None and len(rows):
            image, bx0, bx1, by0, by1 = box
            x0, x1, y0, y1 = _boxes(
                _at(st, "x", rows),
                _at(st, "y", rows),
                _at(st, "width", rows),
                _at(st, "height", rows),
            )
            same = _base.to_str(_at(st, "image", rows)) == image
            keep &= ~(same & (x0 < bx1) & (bx0 < x1) & (y0 < by1) & (by0 < y1))
        if keep.sum() >= n or k >= model.n_indexed:
            break
        k *= 4
    rows = rows[keep]
    d = distances(_at(st, "pca", rows), query, metric) if len(rows) else np.zeros(0)
    return [(rows, d)]


def _ranges(n_rows: int, block: int) -> list[tuple[int, int]]:
    return [(s, min(n_rows, s + block)) for s in range(0, n_rows, block)]


# ------------------------------------------------------------------------------- queries
def _check_row(st: Store, index: int) -> int:
    if isinstance(index, bool) or int(index) != index:
        raise ConfigError(f"--cutout {index!r}: expected a row index")
    index = int(index)
    if not 0 <= index < st.n_rows:
        raise StoreError(
            f"{st.path}: cutout index {index} is out of range (the store has rows 0..{st.n_rows - 1})"
        )
    if not bool(st.array("valid")[index]):
        raise StoreError(f"{st.path}: row {index} is an empty slot (no cutout there)")
    return index


def _pixel_scale(st: Store, row: int) -> float | None:
    """Degrees per pixel of the image of ``row``: from its WCS, else from two of its cutouts."""
    image = str(st.array("image")[row])
    table = st.images()
    i = table.find(image)
    if i is not None and table.source_record(i) is not None:
        # The recorded WCS header: no file is opened.
        from astropy.wcs.utils import proj_plane_pixel_scales

        try:
            wcs = table.source(i).wcs
        except (InputError, OSError, ValueError):
            wcs = None
        if wcs is not None:
            return float(np.mean(proj_plane_pixel_scales(wcs.celestial)))
    # The file is gone or has no WCS here: the cutouts of the same chunk give the scale.
    c = st.chunk_rows
    s0 = row - row % c
    sl = slice(max(0, s0 - 4 * c), min(st.n_rows, s0 + 5 * c))
    imgs = _base.to_str(st.array("image")[sl])
    x, y = st.array("x")[sl], st.array("y")[sl]
    ra, dec = st.array("ra")[sl], st.array("dec")[sl]
    i = row - sl.start
    pix = np.hypot(x - x[i], y - y[i])
    ok = (imgs == image) & np.isfinite(ra) & (pix > 0)
    if not ok.any():
        return None
    j = np.flatnonzero(ok)[np.argmax(pix[ok])]
    return float(angular_separation(ra[i], dec[i], ra[j], dec[j]) / pix[j])


def nearest_cutout(
    store: str | os.PathLike | Store,
    ra: float,
    dec: float,
    *,
    block_rows: int | None = None,
    client=None,
) -> tuple[int, float]:
    """Row of the cutout nearest to (``ra``, ``dec``) in degrees, and its separation in degrees.

    Raises :class:`StoreError` when the position is further than one window side from every
    cutout (outside the store's footprint) or no cutout has sky coordinates.
    """
    from dask import delayed

    st = _base.open_store(store)
    _base.valid_count(st, stage="similar")
    if not (np.isfinite(ra) and np.isfinite(dec) and -90 <= dec <= 90):
        raise ConfigError(f"--radec {ra} {dec}: not a sky position in degrees")
    block = _base.block_rows(st, block_rows)
    with _base.runner(client) as run:
        found = run.compute(
            *[
                delayed(_nearest_block)(st.path, a, b, float(ra), float(dec))
                for a, b in _ranges(st.n_rows, block)
            ]
        )
    row, sep = min(found, key=lambda t: t[1]) if found else (-1, np.inf)
    if row < 0:
        raise StoreError(
            f"{st.path}: no cutout has sky coordinates (the images have no celestial WCS); query by --cutout instead"
        )
    side = max(int(st.array("width")[row]), int(st.array("height")[row]))
    scale = _pixel_scale(st, row)
    if scale is None:
        logger.warning(
            "%s: cannot tell the pixel scale of %s; not checking the footprint",
            st.path,
            st.array("image")[row],
        )
    elif sep > side * scale:
        raise StoreError(
            f"{st.path}: RA {ra} Dec {dec} is outside the store's footprint: the nearest cutout (row {row}) is "
            f"{sep * 3600:.1f} arcsec away, more than one window ({side * scale * 3600:.1f} arcsec)"
        )
    return row, float(sep)


def fingerprint_image(
    store: str | os.PathLike | Store, path: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray]:
    """Fingerprint one image file as the store's cutouts were: same model (its sha256 checked),
    same preprocessing, resampled to the store's cutout side when its size differs.

    Returns the features ``(D,)`` and top classes ``(k,)``.
    """
    from ..cutouts import CutoutReader, resize
    from ..models import get_session
    from ..models.recorded import recorded_model
    from ..sources import open_sources

    st = _base.open_store(store)
    attrs = st.attrs
    sources = open_sources([str(path)])
    if len(sources) != 1:
        raise InputError(f"{path}: expected one image, found {len(sources)}")
    src = sources[0]
    ny, nx = src.shape
    data = src.read(0, ny, 0, nx)[None]
    side = int((attrs.get("cutouts") or {}).get("size") or max(ny, nx))
    if (ny, nx) != (side, side):
        data = resize(data, (1, data.shape[1], side, side)).astype(np.float32)
    reader = CutoutReader({src.id: src}, preprocess=attrs.get("preprocess") or {})
    rgb, _ = reader.prepare(data, src.id)
    model = recorded_model(attrs, where=str(st.path))
    session = get_session(
        model.path, topk=int(attrs.get("topk", 20)), sha256=attrs.get("model_sha256")
    )
    out = session.infer(rgb)
    return out.features[0], out.top_class[0]


def similar(
    store: str | os.PathLike | Store,
    *,
    cutout: int | None = None,
    image: str | os.PathLike | None = None,
    radec: Sequence[float] | None = None,
    n: int | None = None,
    metric: str | None = None,
    exclude_overlaps: bool | None = None,
    exact: bool = False,
    block_rows: int | None = None,
    client=None,
    scheduler: str | None = None,
    workers: int | None = None,
):
    """The ``n`` rows most similar to a query (exactly one of ``cutout``, ``image``, ``radec``).

    Parameters
    ----------
    store : path or Store
    cutout : int, optional
        Query by row index.
    image : path, optional
        Query by an image file, fingerprinted on the spot.
    radec : (ra, dec), optional
        Query by sky position (degrees): the nearest cutout is the query.
    n : int, optional
        Rows returned (default ``analysis.similar.n``).
    metric : {"l2", "cosine", "jaccard"}, optional
    exclude_overlaps : bool, optional
        Leave out windows of the same image intersecting the query window.
    exact : bool
        Scan every row even when the store's neighbour index (``elodin index``) could answer.
        Without it, ``l2`` and ``cosine`` queries use the index when it covers the store and
        matches its data; a stale index is reported (a warning) and the rows are scanned.
    block_rows, client, scheduler, workers
        Rows per task and where the tasks run.

    Returns
    -------
    astropy.table.Table
        ``rank, index, image, x, y, ra, dec, distance``, nearest first; ``meta`` describes the
        query.
    """
    from dask import delayed

    st = _base.open_store(store)
    given = [q is not None for q in (cutout, image, radec)]
    if sum(given) != 1:
        raise ConfigError("give exactly one query: --cutout INDEX, --image FILE or --radec RA DEC")
    metric = _base.choice(config.get("analysis.similar.metric", override=metric), "metric", METRICS)
    n = config.get_int("analysis.similar.n", override=n, minimum=1)
    exclude = bool(config.get("analysis.similar.exclude-overlaps", override=exclude_overlaps))
    variable = "top_class" if metric == "jaccard" else "pca"
    if variable == "pca":
        _base.require(st, "pca", "reduce")
    _base.valid_count(st, stage="similar")
    block = _base.block_rows(st, block_rows)
    meta: dict[str, Any] = {"metric": metric}
    with _base.runner(client, scheduler=scheduler, workers=workers) as run:
        row = None
        if radec is not None:
            if len(radec) != 2:
                raise ConfigError("--radec needs two numbers: RA and Dec in degrees")
            row, sep = nearest_cutout(
                st, float(radec[0]), float(radec[1]), block_rows=block, client=run.client
            )
            meta.update(
                query=f"RA {radec[0]} Dec {radec[1]}",
                query_index=row,
                query_separation_arcsec=sep * 3600,
            )
        elif cutout is not None:
            row = _check_row(st, cutout)
            meta.update(query=f"cutout {row}", query_index=row)
        if row is not None:
            query = np.asarray(st.array(variable)[row])
            w, h = int(st.array("width")[row]), int(st.array("height")[row])
            x0, x1, y0, y1 = _boxes(st.array("x")[row], st.array("y")[row], w, h)
            box = (
                (str(st.array("image")[row]), float(x0), float(x1), float(y0), float(y1))
                if exclude
                else None
            )
        else:
            features, classes = fingerprint_image(st, image)
            if metric == "jaccard":
                query = classes
            else:
                from .reduce import load_pca

                query = load_pca(st).transform(features[None])[0]
            box = None
            meta.update(query=f"image {image}")
        found = None if exact or metric == "jaccard" else _indexed(st, query, metric, n, row, box)
        meta["search"] = "exact" if found is None else "index"
        if found is None:
            tasks = [
                delayed(_search_block)(st.path, variable, a, b, query, metric, n, row, box)
                for a, b in _ranges(st.n_rows, block)
            ]
            found = run.compute(*tasks)
    top = _base.TopN(n)
    for idx, dist in found:
        top.add(dist, idx)
    table = _base.row_table(st, top.index, {"distance": top.scores})
    table.add_column(np.arange(1, len(table) + 1), name="rank", index=0)
    table.meta.update(meta)
    return table
