"""Build the report: choose rows (streaming), read their thumbnails, draw, write index.html.

Two passes over the store's per-row variables, block by block:

1. counts (valid rows, cluster sizes, rows per image), the embedding's extent, the interactive
   sample, the top outliers, a random few per cluster, PCA cluster centres when the store has
   none, and the windows drawn on each mosaic overlay;
2. the cutout nearest each map cell's centre, the cutouts nearest each cluster's centre and,
   when the analysis package offers no similarity search, the query's nearest neighbours.

Then only the chosen rows' windows are read back from the source images (thumbnails.py), once
each, and the figures are drawn. Missing analysis variables skip their figures with a note on
the page and in the log; they never stop the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..store import Store
from . import figures
from .select import KSmallest, grid_cells, iter_rows, random_keys, take_rows
from .thumbnails import (
    ThumbnailReader,
    downsample_factor,
    downsampled_image,
    to_uint8,
    window_boxes,
)

__all__ = ["Report", "build_report", "make_report"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Report:
    """What was made: ``index`` (the page) and ``manifest`` (also in ``report.json``)."""

    index: Path
    manifest: dict


def make_report(
    store: str | os.PathLike | Store,
    out_dir: str | os.PathLike,
    *,
    query: int | None = None,
    n_similar: int = 9,
    **options: Any,
) -> Path:
    """Write the HTML report of a store to ``out_dir`` and return the path of its index.html.

    Parameters
    ----------
    store : path or Store
        A fingerprint store (analysis variables are used where present).
    out_dir : path
        Directory for index.html, the PNG figures and report.json (created if needed).
    query : int, optional
        Row (cutout index) whose similar cutouts are shown; a seeded random valid row if None.
    n_similar : int
        Neighbours shown for the query.
    **options
        Passed to :func:`build_report` (``n_outliers``, ``grid``, ``thumb_px``,
        ``max_points``, ``max_overlays``, ``overlay_side``, ``seed`` ...).

    Returns
    -------
    pathlib.Path
        ``out_dir / "index.html"``.
    """
    return build_report(store, out_dir, query=query, n_similar=n_similar, **options).index


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "image"


def _has(st: Store, name: str) -> bool:
    try:
        st.array(name)
    except KeyError:
        return False
    return True


def build_report(
    store: str | os.PathLike | Store,
    out_dir: str | os.PathLike,
    *,
    query: int | None = None,
    n_similar: int = 9,
    n_outliers: int = 24,
    n_nearest: int = 8,
    n_random: int = 8,
    grid: int | None = None,
    thumb_px: int = 64,
    max_points: int = 5000,
    max_overlays: int = 8,
    overlay_side: int = 2048,
    metric: str = "l2",
    seed: int = 0,
) -> Report:
    """Build the report and return its index path and manifest.

    Parameters
    ----------
    n_outliers : int
        Cutouts in the outlier gallery (highest ``outlier_score``).
    n_nearest, n_random : int
        Per cluster gallery: cutouts nearest the centre, and random ones.
    grid : int, optional
        Cells per side of the embedding map (default: about sqrt(valid rows), 4 to 40).
    thumb_px : int
        Side of every thumbnail in the figures, in PNG pixels.
    max_points : int
        Most points in the interactive map (a seeded uniform sample beyond that).
    max_overlays : int
        Most source images drawn with their windows.
    overlay_side : int
        Longest side of a downsampled mosaic view.
    metric : str
        Similarity metric (``l2`` or ``cosine``) used for the query's neighbours.
    seed : int
        Seed of every random choice; the same seed gives the same report.
    """
    t0 = time.perf_counter()
    st = store if isinstance(store, Store) else Store.open(store)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    attrs = st.attrs
    reader = ThumbnailReader(attrs)
    notes: list[str] = []
    skipped: dict[str, str] = {}

    def skip(key: str, why: str) -> None:
        skipped[key] = why
        logger.info("report: %s skipped: %s", key, why)

    # ---------------------------------------------------------------- what the store holds
    have = {
        n: _has(st, n)
        for n in (
            "cluster",
            "embedding",
            "pca",
            "outlier_score",
            "cluster_centers",
            "pca_explained_variance_ratio",
            "fingerprint",
        )
    }
    emb_name = None
    axis_labels = ("embedding 1", "embedding 2")
    if (
        have["embedding"]
        and st.array("embedding").ndim == 2
        and st.array("embedding").shape[1] >= 2
    ):
        emb_name = "embedding"
        method = (
            (attrs.get("embedding") or {}).get("method")
            if isinstance(attrs.get("embedding"), dict)
            else None
        )
        if method:
            axis_labels = (f"{method} 1", f"{method} 2")
    elif have["pca"] and st.array("pca").ndim == 2 and st.array("pca").shape[1] >= 2:
        emb_name = "pca"
        axis_labels = ("PCA 1", "PCA 2")
        notes.append(
            "No embedding in the store (run `elodin embed`); the maps show PCA components 1 and 2."
        )
    else:
        for key in ("grid", "interactive"):
            skip(
                key,
                "No embedding or PCA in this store: run `elodin reduce` and `elodin embed` first.",
            )
    if not have["cluster"]:
        for key in ("clusters", "galleries"):
            skip(key, "No clusters in this store: run `elodin cluster` first.")
    if not have["outlier_score"]:
        skip("outliers", "No outlier scores in this store: run `elodin outliers` first.")
    if not have["pca_explained_variance_ratio"]:
        skip("pca", "No PCA in this store: run `elodin reduce` first.")

    centres = None
    if have["cluster"] and have["pca"]:
        if have["cluster_centers"]:
            centres = np.asarray(st.array("cluster_centers")[...], dtype=np.float64)
            if centres.ndim != 2 or centres.shape[1] != st.array("pca").shape[1]:
                logger.info("cluster_centers are not in PCA space; using PCA means per cluster")
                centres = None
    need_centre_sums = have["cluster"] and have["pca"] and centres is None

    # ---------------------------------------------------------------- overlays: canvases
    from PIL import Image

    image_ids = list(reader.sources)
    canvases: dict[str, dict] = {}
    for image in image_ids[: max(0, max_overlays)]:
        src = reader.sources[image]
        f = downsample_factor(src.shape, overlay_side)
        raw = downsampled_image(src, f)
        rgb = reader.stretch(raw[None], image)[0]
        canvases[image] = {
            "factor": f,
            "canvas": Image.fromarray(to_uint8(rgb)).convert("RGBA"),
            "n": 0,
        }
    if len(image_ids) > max_overlays:
        notes.append(
            f"Mosaic overlays are drawn for the first {max_overlays} of {len(image_ids)} images (max_overlays)."
        )

    # ---------------------------------------------------------------- pass 1
    n_valid = 0
    cluster_counts: dict[int, int] = {}
    image_counts: dict[str, int] = {}
    lo = np.full(2, np.inf)
    hi = np.full(2, -np.inf)
    sample = KSmallest(max_points)
    outliers = KSmallest(n_outliers)
    rand = KSmallest(n_random + n_nearest)
    pick_query = KSmallest(1)
    sums: dict[int, np.ndarray] = {}
    names = ["valid", "image", "x", "y", "width", "height"]
    names += [n for n in ("cluster", "outlier_score") if have[n]]
    names += [emb_name] if emb_name else []
    names += ["pca"] if need_centre_sums and emb_name != "pca" else []
    for start, b in iter_rows(st, names):
        valid = np.asarray(b["valid"], dtype=bool)
        n = len(valid)
        rows = start + np.arange(n)
        vrows = rows[valid]
        n_valid += int(valid.sum())
        cl = np.asarray(b["cluster"], dtype=np.int64) if have["cluster"] else np.zeros(n, np.int64)
        ids, counts = np.unique(cl[valid], return_counts=True)
        for c, k in zip(ids.tolist(), counts.tolist(), strict=True):
            cluster_counts[c] = cluster_counts.get(c, 0) + k
        imgs = b["image"]
        ui, uc = np.unique(imgs[valid].astype(str), return_counts=True) if valid.any() else ([], [])
        for i, k in zip(list(ui), list(uc), strict=True):
            image_counts[str(i)] = image_counts.get(str(i), 0) + int(k)
        keys = random_keys(seed, start, n)
        if emb_name:
            xy = np.asarray(b[emb_name][:, :2], dtype=np.float64)
            ok = valid & np.isfinite(xy).all(axis=1)
            if ok.any():
                lo = np.minimum(lo, xy[ok].min(axis=0))
                hi = np.maximum(hi, xy[ok].max(axis=0))
            sample.update(rows[ok], keys[ok])
        if have["outlier_score"]:
            score = np.asarray(b["outlier_score"], dtype=np.float64)
            outliers.update(vrows, -score[valid])
        if have["cluster"]:
            m = valid & (cl >= 0)
            rand.update(rows[m], random_keys(seed + 1, start, n)[m], cl[m])
        pick_query.update(vrows, random_keys(seed + 2, start, n)[valid])
        if need_centre_sums:
            pc = np.asarray(b["pca"], dtype=np.float64)
            m = valid & (cl >= 0) & np.isfinite(pc).all(axis=1)
            for c in np.unique(cl[m]).tolist():
                sel = m & (cl == c)
                acc = sums.setdefault(c, np.zeros(pc.shape[1] + 1))
                acc[:-1] += pc[sel].sum(axis=0)
                acc[-1] += sel.sum()
    if n_valid == 0:
        raise InputError(f"{st.path}: the store has no valid cutouts to report on")

    palette = figures.cluster_colours(list(cluster_counts) if have["cluster"] else [0])

    def colour_of(c: int) -> tuple[int, int, int]:
        return palette.get(int(c), figures.NOISE_COLOUR) if have["cluster"] else (255, 200, 40)

    if centres is None and sums:
        k = max(sums) + 1
        centres = np.full((k, len(next(iter(sums.values()))) - 1), np.nan)
        for c, acc in sums.items():
            centres[c] = acc[:-1] / max(1.0, acc[-1])

    # ---------------------------------------------------------------- the query
    if query is None:
        q_rows = pick_query.rows()
        query_row = int(q_rows[0]) if len(q_rows) else None
        query_chosen = "chosen at random (seeded); pass --query INDEX for another"
    else:
        query_row = int(query)
        if not 0 <= query_row < st.n_rows or not bool(st.array("valid")[query_row]):
            raise InputError(
                f"{st.path}: --query {query_row} is not a valid cutout (rows 0..{st.n_rows - 1}; empty slots have valid = False)"
            )
        query_chosen = "asked for"
    sim_rows, sim_dist, sim_how = np.zeros(0, np.int64), np.zeros(0), ""
    if query_row is not None:
        sim_rows, sim_dist, sim_how = _similar_via_analysis(st, query_row, n_similar, metric)

    # ---------------------------------------------------------------- pass 2
    n_cells = 0
    cell_pick = KSmallest(1)
    near = KSmallest(n_nearest)
    sim_space = None
    if query_row is not None and sim_how == "":
        sim_space = "pca" if have["pca"] else ("fingerprint" if have["fingerprint"] else None)
    sim_pick = KSmallest(n_similar + 1)
    qvec = None
    if sim_space:
        qvec = np.asarray(st.array(sim_space)[query_row], dtype=np.float64)
    do_grid = emb_name is not None and np.all(np.isfinite(lo))
    if do_grid:
        n_cells = int(grid or np.clip(round(np.sqrt(n_valid)), 4, 40))
    do_near = have["cluster"] and centres is not None and have["pca"]
    names = ["valid"]
    names += [emb_name] if do_grid else []
    names += ["cluster"] if do_near else []
    names += [n for n in {("pca" if do_near else None), sim_space} if n and n not in names]
    if do_grid or do_near or sim_space or canvases:
        names += [n for n in ("image", "x", "y", "width", "height") if canvases]
        if canvases and have["cluster"] and "cluster" not in names:
            names.append("cluster")
        for start, b in iter_rows(st, names):
            valid = np.asarray(b["valid"], dtype=bool)
            n = len(valid)
            rows = start + np.arange(n)
            if do_grid:
                xy = np.asarray(b[emb_name][:, :2], dtype=np.float64)
                ok = valid & np.isfinite(xy).all(axis=1)
                cells, dist = grid_cells(xy[ok], lo, hi, n_cells)
                cell_pick.update(rows[ok], dist, cells)
            if do_near:
                cl = np.asarray(b["cluster"], dtype=np.int64)
                pc = np.asarray(b["pca"], dtype=np.float64)
                m = valid & (cl >= 0) & (cl < len(centres))
                d = np.linalg.norm(pc[m] - centres[cl[m]], axis=1)
                near.update(rows[m], d, cl[m])
            if sim_space:
                v = np.asarray(b[sim_space], dtype=np.float64)
                m = valid & (rows != query_row)
                sim_pick.update(rows[m], _distance(v[m], qvec, metric))
            if canvases:
                imgs = b["image"]
                cl = (
                    np.asarray(b["cluster"], dtype=np.int64)
                    if have["cluster"]
                    else np.zeros(n, np.int64)
                )
                boxes = window_boxes(b["x"], b["y"], b["width"], b["height"])
                for image, cv in canvases.items():
                    m = valid & (imgs == image)
                    if m.any():
                        figures.overlay_windows(
                            cv["canvas"],
                            boxes[m],
                            [colour_of(c) for c in cl[m]],
                            factor=cv["factor"],
                        )
                        cv["n"] += int(m.sum())
    if sim_space:
        sim_rows, sim_dist = sim_pick.rows()[:n_similar], sim_pick.keys()[:n_similar]
        sim_how = f"{metric.upper()} distance in {sim_space} space (brute force over the store)"

    # ---------------------------------------------------------------- read the thumbnails once
    cell_res = cell_pick.result()
    grid_cells_ids = np.array(sorted(cell_res), dtype=np.int64)
    grid_rows = np.array([cell_res[c][0][0] for c in grid_cells_ids], dtype=np.int64)
    near_res = near.result()
    rand_res = rand.result()
    gallery_ids = sorted(c for c in cluster_counts if c >= 0) if have["cluster"] else []
    gallery_rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for c in gallery_ids:
        nr = near_res.get(c, (np.zeros(0, np.int64), None))[0]
        rr = rand_res.get(c, (np.zeros(0, np.int64), None))[0]
        rr = rr[~np.isin(rr, nr)][:n_random]
        gallery_rows[c] = (nr, rr)
    out_rows, out_scores = outliers.rows(), -outliers.keys()
    sample_rows = np.sort(sample.rows())
    q_rows = (
        np.array([query_row], dtype=np.int64) if query_row is not None else np.zeros(0, np.int64)
    )
    wanted = np.unique(
        np.concatenate(
            [
                grid_rows,
                out_rows,
                sample_rows,
                q_rows,
                np.asarray(sim_rows, np.int64),
                *[np.r_[a, b] for a, b in gallery_rows.values()],
                np.zeros(0, np.int64),
            ]
        ).astype(np.int64)
    )
    meta = {
        n: take_rows(st, n, wanted) for n in ("image", "x", "y", "width", "height", "ra", "dec")
    }
    meta["cluster"] = (
        take_rows(st, "cluster", wanted) if have["cluster"] else np.zeros(len(wanted), np.int64)
    )
    boxes = window_boxes(meta["x"], meta["y"], meta["width"], meta["height"])
    thumbs_all = reader.thumbnails(meta["image"], boxes, size=thumb_px)
    at = {int(r): i for i, r in enumerate(wanted)}

    def thumbs(rows) -> np.ndarray:
        return (
            thumbs_all[[at[int(r)] for r in rows]]
            if len(rows)
            else np.zeros((0, thumb_px, thumb_px, 3), np.uint8)
        )

    def frame(rows) -> list[tuple[int, int, int]]:
        return [colour_of(meta["cluster"][at[int(r)]]) for r in rows]

    manifest: dict[str, Any] = {
        "store": st.path,
        "n_rows": st.n_rows,
        "n_valid": n_valid,
        "seed": seed,
        "thumb_px": thumb_px,
        "skipped": skipped,
        "notes": notes,
    }
    ctx: dict[str, Any] = {
        "grid": None,
        "sizes": None,
        "galleries": [],
        "pca": None,
        "overlays": [],
        "similar": None,
        "outliers": None,
        "legend": [],
        "bokeh_div": "",
        "bokeh_script": "",
        "bokeh_js": "",
        "interactive_note": "",
    }

    # ---------------------------------------------------------------- the embedding map
    if do_grid and len(grid_rows):
        gm = figures.embedding_grid(
            out / "embedding-grid.png",
            grid_rows,
            grid_cells_ids,
            thumbs(grid_rows),
            frame(grid_rows),
            n_cells=n_cells,
            title=f"{axis_labels[0].rsplit(' ', 1)[0]} map: {len(grid_rows)} cutouts, one per occupied cell of {n_cells} x {n_cells}",
        )
        manifest["grid"] = {
            "file": gm.path.name,
            "count": gm.count,
            "n_cells": n_cells,
            "cell": gm.cell,
            "origin": list(gm.origin),
            "size": list(gm.size),
            "rows": grid_rows.tolist(),
            "cells": grid_cells_ids.tolist(),
            "lo": lo.tolist(),
            "hi": hi.tolist(),
            "space": emb_name,
        }
        ctx["grid"] = {
            "file": gm.path.name,
            "caption": (
                f"The {n_valid} valid cutouts placed by their {axis_labels[0].rsplit(' ', 1)[0]} "
                f"coordinates on a {n_cells} x {n_cells} grid; each occupied cell shows the cutout "
                f"nearest its centre ({gm.count} cells), framed in its cluster's colour."
            ),
        }

    # ---------------------------------------------------------------- interactive
    if emb_name and len(sample_rows):
        from bokeh.embed import components

        from .interactive import bokeh_resources, embedding_plot

        idx = [at[int(r)] for r in sample_rows]
        xy = np.asarray(take_rows(st, emb_name, sample_rows)[:, :2], dtype=np.float64)
        plot = embedding_plot(
            xy,
            rows=sample_rows,
            images=meta["image"][idx],
            x=meta["x"][idx],
            y=meta["y"][idx],
            ra=meta["ra"][idx],
            dec=meta["dec"][idx],
            clusters=meta["cluster"][idx] if have["cluster"] else np.zeros(len(idx), np.int64),
            thumbs=thumbs_all[idx],
            colours=palette if have["cluster"] else {0: (255, 200, 40)},
            title=f"{len(sample_rows)} of {n_valid} cutouts",
            axis_labels=axis_labels,
        )
        script, div = components(plot)
        ctx.update(bokeh_js=bokeh_resources(), bokeh_script=script, bokeh_div=div)
        shown = len(sample_rows)
        ctx["interactive_note"] = (
            f"All {shown} valid cutouts are shown."
            if shown >= n_valid
            else f"{shown} of {n_valid} valid cutouts are shown (a uniform random sample, seed {seed}; max_points = {max_points})."
        )
        manifest["interactive"] = {
            "n_points": shown,
            "n_valid": n_valid,
            "rows": sample_rows.tolist(),
        }

    # ---------------------------------------------------------------- clusters
    if have["cluster"]:
        ids = sorted(cluster_counts)
        figures.cluster_sizes_chart(
            out / "cluster-sizes.png", ids, [cluster_counts[c] for c in ids], palette
        )
        ctx["sizes"] = {
            "file": "cluster-sizes.png",
            "caption": f"{len(gallery_ids)} clusters"
            + (
                f"; {cluster_counts[-1]} cutouts are noise (cluster -1)"
                if -1 in cluster_counts
                else ""
            ),
        }
        ctx["legend"] = [
            (
                "noise" if c < 0 else f"cluster {c} ({cluster_counts[c]})",
                figures.hex_colour(palette[c]),
            )
            for c in ids
        ]
        manifest["clusters"] = {str(c): cluster_counts[c] for c in ids}
        if not do_near:
            notes.append(
                "Galleries show random cutouts only: the store has no PCA to find the cutouts nearest each centre."
            )
        galleries = []
        for c in gallery_ids:
            nr, rr = gallery_rows[c]
            col = [colour_of(c)]
            sheet = figures.render_sheet(
                out / f"gallery-cluster-{c}.png",
                [
                    (
                        "nearest the centre (PCA space)",
                        thumbs(nr),
                        col * len(nr),
                        [f"#{r}" for r in nr],
                    ),
                    (f"random (seed {seed})", thumbs(rr), col * len(rr), [f"#{r}" for r in rr]),
                ],
                title=f"Cluster {c}: {cluster_counts[c]} cutouts",
                columns=max(n_nearest, n_random),
            )
            galleries.append(
                {
                    "cluster": c,
                    "file": sheet.path.name,
                    "count": sheet.count,
                    "nearest": nr.tolist(),
                    "random": rr.tolist(),
                }
            )
        manifest["galleries"] = galleries
        ctx["galleries"] = [
            {**g, "caption": f"Cluster {g['cluster']} ({cluster_counts[g['cluster']]} cutouts)"}
            for g in galleries
        ]

    # ---------------------------------------------------------------- PCA
    if have["pca_explained_variance_ratio"]:
        ratio = np.asarray(st.array("pca_explained_variance_ratio")[...], dtype=np.float64)
        figures.explained_variance_chart(out / "pca-variance.png", ratio)
        ctx["pca"] = {
            "file": "pca-variance.png",
            "caption": (
                f"Explained variance of the {len(ratio)} PCA components of the fingerprints; "
                f"cumulative {np.sum(ratio):.1%}."
            ),
        }
        manifest["pca"] = {"file": "pca-variance.png", "n_components": len(ratio)}

    # ---------------------------------------------------------------- overlays
    overlays = []
    for k, (image, cv) in enumerate(canvases.items()):
        name = f"overlay-{k}-{_slug(image)}.png"
        cv["canvas"].convert("RGB").save(out / name, optimize=True)
        src = reader.sources[image]
        overlays.append(
            {
                "image": image,
                "file": name,
                "factor": cv["factor"],
                "size": list(cv["canvas"].size),
                "n_windows": cv["n"],
                "shape": list(src.shape),
            }
        )
    manifest["overlays"] = overlays
    ctx["overlays"] = [
        {
            **o,
            # Small images are shown enlarged (whole factors) so their windows stay visible.
            "display_width": o["size"][0] * max(1, min(4, 900 // max(1, o["size"][0]))),
            "caption": (
                f"{o['image']} ({o['shape'][1]} x {o['shape'][0]} pixels, shown 1:{o['factor']}) with its "
                f"{o['n_windows']} windows outlined in their cluster's colour."
            ),
        }
        for o in overlays
    ]
    if not overlays:
        skip("overlays", "No source images recorded in the store.")

    # ---------------------------------------------------------------- similarity
    if query_row is not None and len(sim_rows):
        qc = [colour_of(meta["cluster"][at[query_row]])]
        i = at[query_row]
        sheet = figures.render_sheet(
            out / "similar.png",
            [
                (
                    f"query: row {query_row} ({meta['image'][i]} x {meta['x'][i]:.0f}, y {meta['y'][i]:.0f})",
                    thumbs([query_row]),
                    qc,
                    [f"#{query_row}"],
                ),
                (
                    f"{len(sim_rows)} nearest: {sim_how}",
                    thumbs(sim_rows),
                    frame(sim_rows),
                    [f"#{r} d={d:.3g}" for r, d in zip(sim_rows, sim_dist, strict=True)],
                ),
            ],
            title=f"Cutouts similar to row {query_row}",
            columns=max(3, min(9, len(sim_rows))),
        )
        manifest["similar"] = {
            "file": sheet.path.name,
            "query": query_row,
            "rows": [int(r) for r in sim_rows],
            "distances": [float(d) for d in sim_dist],
            "how": sim_how,
            "count": len(sim_rows),
        }
        ctx["similar"] = {
            "file": sheet.path.name,
            "caption": f"Query row {query_row} ({query_chosen}) and its {len(sim_rows)} nearest cutouts by {sim_how}.",
        }
    elif query_row is not None:
        skip("similar", "No fingerprints or PCA to compare the query with.")

    # ---------------------------------------------------------------- outliers
    if have["outlier_score"] and len(out_rows):
        sheet = figures.render_sheet(
            out / "outliers.png",
            [
                (
                    "highest outlier score first",
                    thumbs(out_rows),
                    frame(out_rows),
                    [f"#{r} {s:.3g}" for r, s in zip(out_rows, out_scores, strict=True)],
                )
            ],
            title=f"Top {len(out_rows)} outliers of {n_valid} cutouts",
            columns=8,
        )
        manifest["outliers"] = {
            "file": sheet.path.name,
            "rows": out_rows.tolist(),
            "scores": out_scores.tolist(),
            "count": sheet.count,
        }
        ctx["outliers"] = {
            "file": sheet.path.name,
            "caption": f"The {len(out_rows)} cutouts with the highest outlier_score (caption: row and score).",
        }

    # ---------------------------------------------------------------- the page
    from .. import __version__
    from .html import render_index

    cut = attrs.get("cutouts") or {}
    pre = attrs.get("preprocess") or {}
    facts = [
        ("store", st.path),
        ("cutouts", f"{n_valid} valid of {st.n_rows} rows, from {len(image_counts)} image(s)"),
        (
            "images",
            ", ".join(f"{i} ({n})" for i, n in list(image_counts.items())[:12])
            + (" ..." if len(image_counts) > 12 else ""),
        ),
        ("model", f"{attrs.get('model', '?')} ({attrs.get('feature_dim', '?')} features)"),
        ("cutout method", ", ".join(f"{k} {v}" for k, v in cut.items() if v is not None)),
        ("stretch", ", ".join(f"{k} {v}" for k, v in pre.items() if v is not None)),
        (
            "analysis",
            ", ".join(n for n in ("pca", "cluster", "embedding", "outlier_score") if have[n])
            or "none yet",
        ),
        ("made", attrs.get("created", "?")),
    ]
    ctx.update(
        store_name=Path(st.path).name,
        store_path=st.path,
        facts=facts,
        notes=notes,
        skipped=skipped,
        version=__version__,
        made=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    index = render_index(out / "index.html", ctx)
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    (out / "report.json").write_text(json.dumps(manifest, indent=1, default=_json_default))
    logger.info("report: %s (%.1f s)", index, manifest["seconds"])
    return Report(index, manifest)


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def _distance(v: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        nv = np.linalg.norm(v, axis=1) * max(np.linalg.norm(q), 1e-30)
        return 1.0 - (v @ q) / np.maximum(nv, 1e-30)
    return np.linalg.norm(v - q, axis=1)


def _similar_via_analysis(st: Store, row: int, n: int, metric: str):
    """Neighbours from ``pipeline.analysis.similar`` when that package offers it; else empty
    (the caller then searches by brute force)."""
    try:
        from ..analysis import similar  # type: ignore[attr-defined]
    except ImportError:
        return np.zeros(0, np.int64), np.zeros(0), ""
    del similar, st, row, n, metric
    return np.zeros(0, np.int64), np.zeros(0), ""
