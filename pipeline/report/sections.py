"""The report's sections: each figure or sheet drawn from the rows the passes chose, and the page.

:class:`_Sections` is the drawing half of the report's builder (:class:`.build._Builder`, which
holds the passes over the store that choose the rows and reads their thumbnails once): each
method draws one figure (:mod:`.figures`), records it in the manifest and captions it on the
page; :meth:`_Sections.write_page` renders ``index.html`` (:mod:`.html`).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from . import figures
from .select import take_rows
from .thumbnails import first_row_at_bottom

__all__: list[str] = []

# The frame colour of every cutout when the store has no clusters yet.
_UNCLUSTERED = (255, 200, 40)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "image"


class _Sections:
    """The figures and the page of one report; the state they read is :class:`.build._Builder`'s."""

    # ------------------------------------------------------------------ figures
    def embedding_map(self) -> None:
        if not self.do_grid or not len(self.grid_rows):
            return
        g, rows = self.n_cells, self.grid_rows
        space = self.axis_labels[0].rsplit(" ", 1)[0]
        gm = figures.embedding_grid(
            self.out / "embedding-grid.png",
            rows,
            self.grid_cell_ids,
            self.thumbs(rows),
            self.frames(rows),
            n_cells=g,
            title=f"{space} map: {len(rows)} cutouts, one per occupied cell of {g} x {g}",
        )
        self.manifest["grid"] = {
            "file": gm.path.name, "count": gm.count, "n_cells": g, "cell": gm.cell,
            "origin": list(gm.origin), "size": list(gm.size), "rows": rows.tolist(),
            "cells": self.grid_cell_ids.tolist(), "lo": self.lo.tolist(), "hi": self.hi.tolist(),
            "space": self.emb_name,
        }  # fmt: skip
        self.page["grid"] = {
            "file": gm.path.name,
            "caption": (
                f"The {self.n_valid} valid cutouts placed by their {space} coordinates on a "
                f"{g} x {g} grid; each occupied cell shows the cutout nearest its centre "
                f"({gm.count} cells), framed in its cluster's colour."
            ),
        }

    def interactive(self) -> None:
        rows = self.sample_rows
        if not self.emb_name or not len(rows):
            if self.emb_name and not self.o.max_points:
                self.skip("interactive", "report.max-points is 0.")
            return
        from bokeh.embed import components

        from .interactive import bokeh_resources, embedding_plot

        idx = [self.at[int(r)] for r in rows]
        m = self.meta
        plot = embedding_plot(
            np.asarray(take_rows(self.st, self.emb_name, rows)[:, :2], dtype=np.float64),
            rows=rows,
            images=m["image"][idx],
            x=m["x"][idx],
            y=m["y"][idx],
            ra=m["ra"][idx],
            dec=m["dec"][idx],
            clusters=m["cluster"][idx],
            thumbs=self.thumbs_all[idx],
            colours=self.palette if self.have["cluster"] else {0: _UNCLUSTERED},
            title=f"{len(rows)} of {self.n_valid} cutouts",
            axis_labels=self.axis_labels,
            clustered=self.have["cluster"],
        )
        script, div = components(plot)
        shown = len(rows)
        self.page.update(
            bokeh_js=bokeh_resources(),
            bokeh_script=script,
            bokeh_div=div,
            interactive_note=(
                f"All {shown} valid cutouts are shown."
                if shown >= self.n_valid
                else f"{shown} of {self.n_valid} valid cutouts are shown: a uniform random "
                f"sample (seed {self.o.seed}; at most report.max-points = {self.o.max_points})."
            ),
        )
        self.manifest["interactive"] = {
            "n_points": shown,
            "n_valid": self.n_valid,
            "rows": rows.tolist(),
        }

    def clusters(self) -> None:
        if not self.have["cluster"]:
            return
        counts, palette = self.cluster_counts, self.palette
        ids = sorted(counts)
        figures.cluster_sizes_chart(
            self.out / "cluster-sizes.png", ids, [counts[c] for c in ids], palette
        )
        n_real = sum(1 for c in ids if c >= 0)
        noise = f"; {counts[-1]} cutouts are noise (cluster -1)" if -1 in counts else ""
        algo = (self.attrs.get("cluster") or {}).get("algorithm") if isinstance(
            self.attrs.get("cluster"), dict
        ) else None  # fmt: skip
        self.page["sizes"] = {
            "file": "cluster-sizes.png",
            "caption": f"{n_real} clusters" + (f" ({algo})" if algo else "") + noise,
        }
        self.page["legend"] = [
            ("noise" if c < 0 else f"cluster {c} ({counts[c]})", figures.hex_colour(palette[c]))
            for c in ids
        ]
        self.manifest["clusters"] = {str(c): counts[c] for c in ids}
        if not self.do_near:
            self.notes.append(
                "Galleries show random cutouts only: the store has no PCA to find the cutouts "
                "nearest each centre."
            )
        galleries = []
        for c, (nr, rr) in self.gallery_rows.items():
            col = [self.colour_of(c)]
            sheet = figures.render_sheet(
                self.out / f"gallery-cluster-{c}.png",
                [
                    ("nearest the centre (PCA space)", self.thumbs(nr), col * len(nr),
                     [f"#{r}" for r in nr]),
                    (f"random (seed {self.o.seed})", self.thumbs(rr), col * len(rr),
                     [f"#{r}" for r in rr]),
                ],
                title=f"Cluster {c}: {counts[c]} cutouts",
                columns=max(self.o.n_nearest, self.o.n_random, 1),
            )  # fmt: skip
            galleries.append({"cluster": c, "file": sheet.path.name, "count": sheet.count,
                              "nearest": nr.tolist(), "random": rr.tolist()})  # fmt: skip
        self.manifest["galleries"] = galleries
        self.page["galleries"] = [
            {**g, "caption": f"Cluster {g['cluster']} ({counts[g['cluster']]} cutouts)"}
            for g in galleries
        ]

    def pca(self) -> None:
        if not self.have["pca_explained_variance_ratio"]:
            return
        ratio = np.asarray(self.st.array("pca_explained_variance_ratio")[...], dtype=np.float64)
        figures.explained_variance_chart(self.out / "pca-variance.png", ratio)
        standardised = (self.st.attrs.get("pca") or {}).get("scale")
        scaled = ", each feature standardised" if standardised else ""
        self.page["pca"] = {
            "file": "pca-variance.png",
            "caption": (
                f"Explained variance of the {len(ratio)} PCA components of the fingerprints"
                f"{scaled} (bars) and cumulative (line): {np.sum(ratio):.1%} kept."
            ),
        }
        self.manifest["pca"] = {"file": "pca-variance.png", "n_components": len(ratio)}

    def overlays(self) -> None:
        from PIL import Image

        overlays = []
        for k, (image, cv) in enumerate(self.canvases.items()):
            name = f"overlay-{k}-{_slug(image)}.png"
            drawn = cv["canvas"].convert("RGB")
            if first_row_at_bottom(self.reader.sources[image]):  # as its thumbnails are
                drawn = drawn.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
            drawn.save(self.out / name)
            shape = list(self.reader.sources[image].shape)
            overlays.append({"image": image, "file": name, "factor": cv["factor"],
                             "size": list(cv["canvas"].size), "n_windows": cv["n"],
                             "shape": shape})  # fmt: skip
        self.manifest["overlays"] = overlays
        outline = "outlined in their cluster's colour" if self.have["cluster"] else "outlined"
        self.page["overlays"] = [
            {
                **o,
                # Small images are shown enlarged (whole factors) so their windows stay visible.
                "display_width": o["size"][0] * max(1, min(4, 900 // max(1, o["size"][0]))),
                "caption": (
                    f"{o['image']}: {o['shape'][1]} x {o['shape'][0]} pixels, downsampled "
                    f"1:{o['factor']}, with its {o['n_windows']} windows {outline}."
                ),
            }
            for o in overlays
        ]
        if not overlays:
            self.skip("overlays", "No source images recorded in the store.")

    def similar(self) -> None:
        q = self.query_row
        rows = self.sim_rows
        if q is None or rows is None or not len(rows):
            if q is not None:
                self.skip("similar", "Nothing to compare the query with (no PCA or fingerprints).")
            return
        i = self.at[q]
        m = self.meta
        sheet = figures.render_sheet(
            self.out / "similar.png",
            [
                (f"query: row {q} ({m['image'][i]} x {m['x'][i]:.0f}, y {m['y'][i]:.0f})",
                 self.thumbs([q]), self.frames([q]), [f"#{q}"]),
                (f"{len(rows)} nearest: {self.sim_how}", self.thumbs(rows), self.frames(rows),
                 [f"#{r} d={d:.3g}" for r, d in zip(rows, self.sim_dist, strict=True)]),
            ],
            title=f"Cutouts similar to row {q}",
            columns=max(3, min(9, len(rows))),
        )  # fmt: skip
        self.manifest["similar"] = {
            "file": sheet.path.name, "query": q, "rows": [int(r) for r in rows],
            "distances": [float(d) for d in self.sim_dist], "how": self.sim_how,
            "count": len(rows),
        }  # fmt: skip
        self.page["similar"] = {
            "file": sheet.path.name,
            "caption": f"Query: row {q}, {self.query_why}. Its {len(rows)} nearest cutouts by "
            f"{self.sim_how}; captions give row and distance.",
        }

    def outliers(self) -> None:
        rows, scores = self.top_outliers.rows(), -self.top_outliers.keys()
        if not self.have["outlier_score"] or not len(rows):
            return
        sheet = figures.render_sheet(
            self.out / "outliers.png",
            [("highest outlier score first", self.thumbs(rows), self.frames(rows),
              [f"#{r} s={s:.3g}" for r, s in zip(rows, scores, strict=True)])],
            title=f"Top {len(rows)} outliers of {self.n_valid} cutouts",
            columns=8,
        )  # fmt: skip
        self.manifest["outliers"] = {"file": sheet.path.name, "rows": rows.tolist(),
                                     "scores": scores.tolist(), "count": sheet.count}  # fmt: skip
        self.page["outliers"] = {
            "file": sheet.path.name,
            "caption": f"The {len(rows)} cutouts with the highest outlier_score "
            "(captions give row and score).",
        }

    # ------------------------------------------------------------------ the page
    def write_page(self) -> Path:
        from .. import __version__
        from .html import render_index

        attrs, have = self.attrs, self.have
        cut = attrs.get("cutouts") or {}
        pre = attrs.get("preprocess") or {}
        images = list(self.image_counts.items())
        facts = [
            ("store", self.st.path),
            ("cutouts", f"{self.n_valid} valid of {self.st.n_rows} rows, from {len(images)} image(s)"),
            ("images", ", ".join(f"{i} ({n})" for i, n in images[:12]) + (" ..." if len(images) > 12 else "")),
            ("model", f"{attrs.get('model', '?')} ({attrs.get('feature_dim', '?')} features)"),
            ("cutout method", ", ".join(f"{k} {v}" for k, v in cut.items() if v is not None)),
            ("stretch", ", ".join(f"{k} {v}" for k, v in pre.items() if v is not None)),
            ("analysis", ", ".join(n for n in ("pca", "cluster", "embedding", "outlier_score") if have[n]) or "none yet"),
            ("made", attrs.get("created", "?")),
        ]  # fmt: skip
        self.page.update(
            store_name=Path(self.st.path).name,
            store_path=self.st.path,
            facts=facts,
            notes=self.notes,
            skipped=self.skipped,
            version=__version__,
            made=time.strftime("%Y-%m-%d %H:%M:%S"),
        )
        return render_index(self.out / "index.html", self.page)
