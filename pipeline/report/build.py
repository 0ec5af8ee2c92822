"""Build the report: choose rows (streaming), read their thumbnails, draw, write index.html.

Two passes over the store's per-row variables, block by block:

1. counts (valid rows, cluster sizes, rows per image), the embedding's extent, the interactive
   sample, the top outliers, a random few per cluster, the query when none is given, and PCA
   cluster centres when the store has none;
2. the cutout nearest each map cell's centre, the cutouts nearest each cluster's centre, the
   query's nearest neighbours when the analysis package offers no search, and the windows
   drawn on each mosaic overlay (their colours need every cluster id, known after pass 1).

Then only the chosen rows' windows are read back from the source images (thumbnails.py), once
each, and the figures are drawn (sections.py; the query's neighbours come from query.py). Memory follows the number of rows shown, never the store.
Missing analysis variables skip their figures with a note on the page and in the log; they
never stop the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import config
from ..analysis.similar import METRICS, distances
from ..errors import ConfigError, InputError
from ..store import Store
from . import figures
from .query import _similar_via_analysis
from .sections import _UNCLUSTERED, _Sections
from .select import KSmallest, grid_cells, iter_rows, random_keys, take_rows
from .thumbnails import (
    ThumbnailReader,
    downsample_factor,
    to_uint8,
    window_boxes,
)

__all__ = ["Report", "ReportOptions", "build_report", "make_report"]

logger = logging.getLogger(__name__)

_ANALYSIS_VARIABLES = (
    "cluster",
    "embedding",
    "pca",
    "outlier_score",
    "cluster_centers",
    "pca_explained_variance_ratio",
    "fingerprint",
    "top_class",
)


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """What the report shows; ``None`` takes ``elodin.report.*`` (and ``analysis.similar``)
    from the configuration."""

    query: int | None = None
    n_similar: int | None = None
    n_outliers: int | None = None
    n_nearest: int | None = None
    n_random: int | None = None
    grid: int | None = None
    thumb_px: int | None = None
    max_points: int | None = None
    max_overlays: int | None = None
    overlay_side: int | None = None
    metric: str | None = None
    seed: int | None = None

    def resolved(self) -> ReportOptions:
        def num(key: str, value, minimum: int) -> int:
            return config.get_int(f"report.{key}", override=value, minimum=minimum)

        grid = config.get("report.grid", override=self.grid)
        if grid is not None and (not isinstance(grid, int) or grid < 1):
            raise ConfigError(
                f"config elodin.report.grid: expected null or an integer >= 1, got {grid!r}"
            )
        # The report's similarity settings default to those of `elodin similar`.
        n_similar = self.n_similar
        if n_similar is None:
            n_similar = config.get("report.n-similar", None)
        if n_similar is None:
            n_similar = config.get("analysis.similar.n", 9)
        metric = (
            self.metric
            or config.get("report.metric", None)
            or config.get("analysis.similar.metric", "l2")
        )
        if metric not in METRICS:
            raise ConfigError(
                f"config elodin.report.metric: {metric!r} is not one of {', '.join(METRICS)}"
            )
        return ReportOptions(
            query=self.query,
            n_similar=num("n-similar", n_similar, 0),
            n_outliers=num("n-outliers", self.n_outliers, 0),
            n_nearest=num("n-nearest", self.n_nearest, 0),
            n_random=num("n-random", self.n_random, 0),
            grid=grid,
            thumb_px=num("thumb-px", self.thumb_px, 8),
            max_points=num("max-points", self.max_points, 0),
            max_overlays=num("max-overlays", self.max_overlays, 0),
            overlay_side=num("overlay-side", self.overlay_side, 16),
            metric=metric,
            seed=config.get_int("report.seed", override=self.seed),
        )


@dataclasses.dataclass
class Report:
    """What was made: ``index`` (the page) and ``manifest`` (also in ``report.json``: every
    figure's file and the rows it shows)."""

    index: Path
    manifest: dict


def make_report(
    store: str | os.PathLike | Store,
    out_dir: str | os.PathLike,
    *,
    query: int | None = None,
    n_similar: int | None = None,
    **options: Any,
) -> Path:
    """Write the HTML report of a store to ``out_dir`` and return the path of its index.html.

    Parameters
    ----------
    store : path or Store
        A fingerprint store; analysis variables (``pca``, ``cluster``, ``embedding``,
        ``outlier_score`` ...) are used where present.
    out_dir : path
        Directory for index.html, the PNG figures and report.json (created if needed).
    query : int, optional
        Row (cutout index) whose similar cutouts are shown; a seeded random valid row if None.
    n_similar : int, optional
        Neighbours shown for the query (default ``analysis.similar.n``).
    **options
        Any field of :class:`ReportOptions` (``n_outliers``, ``grid``, ``thumb_px``,
        ``max_points``, ``max_overlays``, ``overlay_side``, ``metric``, ``seed`` ...).

    Returns
    -------
    pathlib.Path
        ``out_dir / "index.html"``.
    """
    return build_report(store, out_dir, query=query, n_similar=n_similar, **options).index


def build_report(
    store: str | os.PathLike | Store, out_dir: str | os.PathLike, **options: Any
) -> Report:
    """Build the report (see :func:`make_report`) and return its index path and manifest."""
    t0 = time.perf_counter()
    st = store if isinstance(store, Store) else Store.open(store)
    builder = _Builder(st, Path(out_dir), ReportOptions(**options).resolved())
    report = builder.run()
    report.manifest["seconds"] = round(time.perf_counter() - t0, 3)
    (builder.out / "report.json").write_text(
        json.dumps(report.manifest, indent=1, default=_json_default)
    )
    logger.info("report: %s (%.1f s)", report.index, report.manifest["seconds"])
    return report


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


class _Builder(_Sections):
    """One report's state, filled stage by stage by :meth:`run`: the passes over the store and
    the thumbnails here, the figures and the page in :class:`.sections._Sections`."""

    def __init__(self, st: Store, out: Path, opts: ReportOptions) -> None:
        self.st, self.out, self.o = st, out, opts
        out.mkdir(parents=True, exist_ok=True)
        self.attrs = st.attrs
        self.reader = ThumbnailReader(st)
        self.notes: list[str] = []
        self.skipped: dict[str, str] = {}
        self.page: dict[str, Any] = {
            "grid": None, "sizes": None, "galleries": [], "pca": None, "overlays": [],
            "similar": None, "outliers": None, "legend": [], "bokeh_div": "",
            "bokeh_script": "", "bokeh_js": "", "interactive_note": "",
        }  # fmt: skip
        self.manifest: dict[str, Any] = {}

    def skip(self, key: str, why: str) -> None:
        self.skipped[key] = why
        logger.info("report: %s skipped: %s", key, why)

    def run(self) -> Report:
        self.inspect()
        self.open_overlays()
        self.first_pass()
        self.choose_query()
        self.second_pass()
        self.load_thumbnails()
        self.manifest.update(
            store=self.st.path,
            n_rows=self.st.n_rows,
            n_valid=self.n_valid,
            seed=self.o.seed,
            thumb_px=self.o.thumb_px,
            skipped=self.skipped,
            notes=self.notes,
        )
        self.embedding_map()
        self.interactive()
        self.clusters()
        self.pca()
        self.overlays()
        self.similar()
        self.outliers()
        return Report(self.write_page(), self.manifest)

    # ------------------------------------------------------------------ what the store holds
    def _has(self, name: str) -> bool:
        try:
            self.st.array(name)
        except KeyError:
            return False
        return True

    def inspect(self) -> None:
        st, have = self.st, {n: self._has(n) for n in _ANALYSIS_VARIABLES}
        self.have = have
        self.emb_name: str | None = None
        self.axis_labels = ("embedding 1", "embedding 2")
        method = (self.attrs.get("embedding") or {}).get("method") if isinstance(
            self.attrs.get("embedding"), dict
        ) else None  # fmt: skip
        if (
            have["embedding"]
            and st.array("embedding").ndim == 2
            and st.array("embedding").shape[1] >= 2
        ):
            self.emb_name = "embedding"
            if method:
                self.axis_labels = (f"{method.upper()} 1", f"{method.upper()} 2")
        elif have["pca"] and st.array("pca").ndim == 2 and st.array("pca").shape[1] >= 2:
            self.emb_name = "pca"
            self.axis_labels = ("PCA 1", "PCA 2")
            self.notes.append(
                "No embedding in the store (run `elodin embed`); the maps show PCA components 1 and 2."
            )
        else:
            why = "No embedding or PCA in this store: run `elodin reduce` and `elodin embed` first."
            self.skip("grid", why)
            self.skip("interactive", why)
        if not have["cluster"]:
            self.skip("clusters", "No clusters in this store: run `elodin cluster` first.")
            self.skip("galleries", "No clusters in this store: run `elodin cluster` first.")
        if not have["outlier_score"]:
            self.skip("outliers", "No outlier scores in this store: run `elodin outliers` first.")
        if not have["pca_explained_variance_ratio"]:
            self.skip("pca", "No PCA in this store: run `elodin reduce` first.")
        self.centres = None
        if have["cluster"] and have["pca"] and have["cluster_centers"]:
            c = np.asarray(st.array("cluster_centers")[...], dtype=np.float64)
            if c.ndim == 2 and c.shape[1] == st.array("pca").shape[1]:
                self.centres = c
            else:
                logger.info("cluster_centers are not in PCA space; using PCA means per cluster")

    # ------------------------------------------------------------------ overlays: the images
    def open_overlays(self) -> None:
        from PIL import Image

        ids = list(self.reader.sources)
        self.canvases: dict[str, dict] = {}
        for image in ids[: self.o.max_overlays]:
            src = self.reader.sources[image]
            f = downsample_factor(src.shape, self.o.overlay_side)
            rgb = self.reader.stretch(self.reader.downsampled(image, f)[None], image)[0]
            self.canvases[image] = {
                "factor": f,
                "canvas": Image.fromarray(to_uint8(rgb)).convert("RGBA"),
                "n": 0,
            }
        if len(ids) > self.o.max_overlays:
            self.notes.append(
                f"Mosaic overlays are drawn for the first {self.o.max_overlays} of {len(ids)} "
                "images (report.max-overlays)."
            )

    # ------------------------------------------------------------------ pass 1
    def first_pass(self) -> None:
        o, have, emb = self.o, self.have, self.emb_name
        self.n_valid = 0
        self.cluster_counts: dict[int, int] = {}
        self.image_counts: dict[str, int] = {}
        self.lo, self.hi = np.full(2, np.inf), np.full(2, -np.inf)
        self.sample = KSmallest(o.max_points)
        self.top_outliers = KSmallest(o.n_outliers)
        self.random_pick = KSmallest(o.n_random + o.n_nearest)
        self.query_pick = KSmallest(1)
        need_sums = have["cluster"] and have["pca"] and self.centres is None
        sums: dict[int, np.ndarray] = {}
        names = ["valid", "image"]
        names += [n for n in ("cluster", "outlier_score") if have[n]]
        names += [emb] if emb else []
        names += ["pca"] if need_sums and emb != "pca" else []
        for start, b in iter_rows(self.st, names):
            valid = np.asarray(b["valid"], dtype=bool)
            n = len(valid)
            rows = start + np.arange(n)
            self.n_valid += int(valid.sum())
            cl = np.asarray(b["cluster"], np.int64) if have["cluster"] else np.zeros(n, np.int64)
            for c, k in zip(*np.unique(cl[valid], return_counts=True), strict=True):
                self.cluster_counts[int(c)] = self.cluster_counts.get(int(c), 0) + int(k)
            for i, k in zip(
                *np.unique(b["image"][valid].astype(str), return_counts=True), strict=True
            ):
                self.image_counts[str(i)] = self.image_counts.get(str(i), 0) + int(k)
            if emb:
                xy = np.asarray(b[emb][:, :2], dtype=np.float64)
                ok = valid & np.isfinite(xy).all(axis=1)
                if ok.any():
                    self.lo = np.minimum(self.lo, xy[ok].min(axis=0))
                    self.hi = np.maximum(self.hi, xy[ok].max(axis=0))
                self.sample.update(rows[ok], random_keys(o.seed, start, n)[ok])
            if have["outlier_score"]:
                score = np.asarray(b["outlier_score"], dtype=np.float64)
                self.top_outliers.update(rows[valid], -score[valid])
            if have["cluster"]:
                m = valid & (cl >= 0)
                self.random_pick.update(rows[m], random_keys(o.seed + 1, start, n)[m], cl[m])
            self.query_pick.update(rows[valid], random_keys(o.seed + 2, start, n)[valid])
            if need_sums:
                pc = np.asarray(b["pca"], dtype=np.float64)
                m = valid & (cl >= 0) & np.isfinite(pc).all(axis=1)
                for c in np.unique(cl[m]).tolist():
                    sel = m & (cl == c)
                    acc = sums.setdefault(c, np.zeros(pc.shape[1] + 1))
                    acc[:-1] += pc[sel].sum(axis=0)
                    acc[-1] += sel.sum()
        if self.n_valid == 0:
            raise InputError(f"{self.st.path}: the store has no valid cutouts to report on")
        if sums:
            dim = len(next(iter(sums.values()))) - 1
            self.centres = np.full((max(sums) + 1, dim), np.nan)
            for c, acc in sums.items():
                self.centres[c] = acc[:-1] / max(1.0, acc[-1])
        self.palette = figures.cluster_colours(list(self.cluster_counts) if have["cluster"] else [])

    def colour_of(self, c: int) -> tuple[int, int, int]:
        if not self.have["cluster"]:
            return _UNCLUSTERED
        return self.palette.get(int(c), figures.NOISE_COLOUR)

    # ------------------------------------------------------------------ the query
    def choose_query(self) -> None:
        st, q = self.st, self.o.query
        if q is None:
            rows = self.query_pick.rows()
            self.query_row = int(rows[0]) if len(rows) else None
            self.query_why = (
                f"chosen at random with seed {self.o.seed}; --query INDEX picks another"
            )
        else:
            self.query_row = int(q)
            if not 0 <= self.query_row < st.n_rows or not bool(st.array("valid")[self.query_row]):
                raise InputError(
                    f"{st.path}: --query {self.query_row} is not a valid cutout "
                    f"(rows 0..{st.n_rows - 1}; empty slots have valid = False)"
                )
            self.query_why = "as asked"
        self.sim_rows, self.sim_dist, self.sim_how = _similar_via_analysis(
            st, self.query_row, self.o.n_similar, self.o.metric
        )
        # No analysis search: brute force over the store in pass 2.
        self.sim_space = None
        if self.query_row is not None and self.sim_rows is None and self.o.n_similar:
            if self.o.metric == "jaccard":
                self.sim_space = "top_class" if self.have["top_class"] else None
            elif self.have["pca"]:
                self.sim_space = "pca"
            elif self.have["fingerprint"]:
                self.sim_space = "fingerprint"

    # ------------------------------------------------------------------ pass 2
    def second_pass(self) -> None:
        o, have, emb = self.o, self.have, self.emb_name
        self.do_grid = emb is not None and bool(np.all(np.isfinite(self.lo)))
        self.n_cells = int(o.grid or np.clip(round(np.sqrt(self.n_valid)), 4, 40))
        self.do_near = have["cluster"] and have["pca"] and self.centres is not None
        cell_pick, near, sim_pick = KSmallest(1), KSmallest(o.n_nearest), KSmallest(o.n_similar)
        qvec = None
        if self.sim_space:
            qvec = np.asarray(self.st.array(self.sim_space)[self.query_row])
        names = ["valid"]
        names += [emb] if self.do_grid else []
        names += ["cluster", "pca"] if self.do_near else []
        names += ["image", "x", "y", "width", "height"] if self.canvases else []
        names += ["cluster"] if self.canvases and have["cluster"] else []
        names += [self.sim_space] if self.sim_space else []
        names = list(dict.fromkeys(names))
        if names == ["valid"]:
            return self._finish_second_pass(cell_pick, near, sim_pick)
        for start, b in iter_rows(self.st, names):
            valid = np.asarray(b["valid"], dtype=bool)
            n = len(valid)
            rows = start + np.arange(n)
            if self.do_grid:
                xy = np.asarray(b[emb][:, :2], dtype=np.float64)
                ok = valid & np.isfinite(xy).all(axis=1)
                cells, dist = grid_cells(xy[ok], self.lo, self.hi, self.n_cells)
                cell_pick.update(rows[ok], dist, cells)
            if self.do_near:
                cl = np.asarray(b["cluster"], dtype=np.int64)
                pc = np.asarray(b["pca"], dtype=np.float64)
                m = valid & (cl >= 0) & (cl < len(self.centres))
                near.update(rows[m], np.linalg.norm(pc[m] - self.centres[cl[m]], axis=1), cl[m])
            if self.sim_space:
                m = valid & (rows != self.query_row)
                sim_pick.update(rows[m], distances(b[self.sim_space][m], qvec, o.metric))
            if self.canvases:
                cl = (
                    np.asarray(b["cluster"], np.int64) if have["cluster"] else np.zeros(n, np.int64)
                )
                boxes = window_boxes(b["x"], b["y"], b["width"], b["height"])
                for image, cv in self.canvases.items():
                    m = valid & (b["image"] == image)
                    if m.any():
                        colours = [self.colour_of(c) for c in cl[m]]
                        figures.overlay_windows(
                            cv["canvas"], boxes[m], colours, factor=cv["factor"]
                        )
                        cv["n"] += int(m.sum())
        self._finish_second_pass(cell_pick, near, sim_pick)

    def _finish_second_pass(self, cell_pick, near, sim_pick) -> None:
        cells = cell_pick.result()
        self.grid_cell_ids = np.array(sorted(cells), dtype=np.int64)
        self.grid_rows = np.array([cells[c][0][0] for c in self.grid_cell_ids], dtype=np.int64)
        if self.sim_space:
            self.sim_rows, self.sim_dist = sim_pick.rows(), sim_pick.keys()
            what = {"jaccard": "1 - Jaccard index of the top-k ImageNet classes"}.get(
                self.o.metric, f"{self.o.metric.upper()} distance in {self.sim_space} space"
            )
            self.sim_how = f"{what} (brute force over the store)"
        near_res, rand_res = near.result(), self.random_pick.result()
        empty = (np.zeros(0, np.int64), None)
        self.gallery_rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for c in sorted(c for c in self.cluster_counts if c >= 0) if self.have["cluster"] else []:
            nr = near_res.get(c, empty)[0]
            rr = rand_res.get(c, empty)[0]
            self.gallery_rows[c] = (nr, rr[~np.isin(rr, nr)][: self.o.n_random])

    # ------------------------------------------------------------------ thumbnails, once
    def load_thumbnails(self) -> None:
        sample = np.sort(self.sample.rows())
        self.sample_rows = sample
        parts = [
            self.grid_rows,
            self.top_outliers.rows(),
            sample,
            np.zeros(0, np.int64) if self.sim_rows is None else np.asarray(self.sim_rows),
            np.array([] if self.query_row is None else [self.query_row]),
            *[np.r_[a, b] for a, b in self.gallery_rows.values()],
        ]
        wanted = np.unique(np.concatenate(parts).astype(np.int64))
        cols = ("image", "x", "y", "width", "height", "ra", "dec")
        self.meta = {n: take_rows(self.st, n, wanted) for n in cols}
        self.meta["cluster"] = (
            take_rows(self.st, "cluster", wanted).astype(np.int64)
            if self.have["cluster"]
            else np.zeros(len(wanted), np.int64)
        )
        m = self.meta
        boxes = window_boxes(m["x"], m["y"], m["width"], m["height"])
        self.thumbs_all = self.reader.thumbnails(m["image"], boxes, size=self.o.thumb_px)
        self.at = {int(r): i for i, r in enumerate(wanted)}

    def thumbs(self, rows) -> np.ndarray:
        px = self.o.thumb_px
        if not len(rows):
            return np.zeros((0, px, px, 3), np.uint8)
        return self.thumbs_all[[self.at[int(r)] for r in rows]]

    def frames(self, rows) -> list[tuple[int, int, int]]:
        return [self.colour_of(self.meta["cluster"][self.at[int(r)]]) for r in rows]
