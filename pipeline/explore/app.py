"""The explorer's page: one Bokeh document per browser session.

The map is one ``image_rgba`` that the server re-renders (datashader) after every pan or zoom;
when few cutouts are in view they are also drawn as points whose hover shows the thumbnail
from ``/api/cutout/ROW.png``. A click anywhere picks the nearest cutout within a few screen
pixels. Galleries are HTML (``<img>`` tags on the cutout API), so the browser fetches, caches
and lays them out; the server only sends row numbers.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import config
from ..errors import ElodinError
from .api import Exports
from .data import Explorer
from .labels import LabelRefused
from .render import MapRenderer

__all__ = ["ExplorerPage", "page_factory"]

logger = logging.getLogger(__name__)

_TOOLTIP = """
<div style="width: 140px">
  <img src="@thumb" width="128" height="128" style="image-rendering: pixelated; display: block">
  <div style="font: 11px monospace">row @row</div>
</div>
"""

# Keys label the picked cutout: i interesting, n not interesting, c clear.
_KEYS_JS = """
document.addEventListener('keydown', (e) => {
  const t = e.composedPath ? e.composedPath()[0] : e.target;
  if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' || t.isContentEditable)) return;
  if (e.ctrlKey || e.metaKey || e.altKey || !['i', 'n', 'c'].includes(e.key)) return;
  keys.data = {key: [e.key], t: [Date.now()]};
});
"""
_KEY_LABELS = {"i": "interesting", "n": "not_interesting", "c": "none"}
_STYLE = "font: 13px sans-serif"


def _gallery(items: Sequence[dict[str, Any]], caption, *, kind: str, empty: str) -> str:
    if not items:
        return f'<div class="gallery" data-kind="{kind}" style="{_STYLE}"><i>{html.escape(empty)}</i></div>'
    cells = "".join(
        f'<figure data-row="{int(it["row"])}" style="display:inline-block;margin:3px;text-align:center">'
        f'<img src="/api/cutout/{int(it["row"])}.png" width="96" height="96" loading="lazy" '
        f'style="image-rendering:pixelated;display:block">'
        f'<figcaption style="font:11px monospace">{html.escape(caption(it))}</figcaption></figure>'
        for it in items
    )
    return f'<div class="gallery" data-kind="{kind}" data-count="{len(items)}">{cells}</div>'


def _values(v) -> np.ndarray:
    """A list or typed array from Bokeh's event geometry as float64."""
    if isinstance(v, dict):  # an encoded typed array: {"0": x0, "1": x1, ...}
        v = [v[k] for k in sorted(v, key=int)]
    return np.asarray(v, np.float64)


def _num(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


class ExplorerPage:
    """The widgets and callbacks of one session (see the module docstring)."""

    def __init__(self, explorer: Explorer, renderer: MapRenderer, exports: Exports, doc) -> None:
        from bokeh.events import RangesUpdate, SelectionGeometry, Tap
        from bokeh.layouts import column, row
        from bokeh.models import (
            BoxSelectTool,
            Button,
            ColumnDataSource,
            CustomJS,
            Div,
            HoverTool,
            LassoSelectTool,
            Select,
            TabPanel,
            Tabs,
        )
        from bokeh.plotting import figure

        self.ex, self.renderer, self.exports, self.doc = explorer, renderer, exports, doc
        self.max_points = config.get_int("explore.max-points", minimum=0)
        self.n_similar = config.get_int("explore.n-similar", minimum=1)
        self.per_page = config.get_int("explore.gallery", minimum=1)
        self.by = "cluster" if explorer.cluster is not None else "density"
        self.picked: int | None = None
        self.selection = np.zeros(0, np.int64)
        self.outlier_page = 0
        self._pending: tuple | None = None
        self._ranked_shown = False

        x0, x1, y0, y1 = explorer.extent
        px, py = 0.04 * (x1 - x0 or 1.0), 0.04 * (y1 - y0 or 1.0)
        self.view = (x0 - px, x1 + px, y0 - py, y1 + py)
        p = figure(
            x_range=self.view[:2],
            y_range=self.view[2:],
            frame_width=renderer.width,
            frame_height=renderer.height,
            tools="pan,wheel_zoom,reset",
            active_scroll="wheel_zoom",
            toolbar_location="above",
            title=f"{explorer.space} of {explorer.n_valid:,} cutouts",
            x_axis_label=f"{explorer.space} 1",
            y_axis_label=f"{explorer.space} 2",
            background_fill_color="#ffffff",
        )
        p.grid.visible = False
        p.name = "map"
        r = renderer.render(self.by, self.view[:2], self.view[2:])
        self.image = ColumnDataSource(
            {"image": [r.image], "x": [r.x0], "y": [r.y0], "dw": [r.dw], "dh": [r.dh]}
        )
        self.image.name = "map-image"
        p.image_rgba(image="image", x="x", y="y", dw="dw", dh="dh", source=self.image)
        self.points = ColumnDataSource(
            {"px": [], "py": [], "row": [], "thumb": []}, name="map-points"
        )
        pts = p.scatter(
            "px", "py", source=self.points, size=9, fill_alpha=0.0, line_color="#222222",
            line_alpha=0.7, selection_line_color="#222222", nonselection_line_alpha=0.7,
        )  # fmt: skip
        p.add_tools(HoverTool(renderers=[pts], tooltips=_TOOLTIP))
        # Box and lasso: both end in _on_selection, one selection for the gallery, the
        # export and the labels.
        p.add_tools(BoxSelectTool(renderers=[pts], name="box-select"))
        p.add_tools(LassoSelectTool(renderers=[pts], name="lasso-select"))
        p.on_event(RangesUpdate, self._on_ranges)
        p.on_event(Tap, self._on_tap)
        p.on_event(SelectionGeometry, self._on_selection)
        self.figure = p

        self.colour = Select(title="Colour by", value=self.by, options=explorer.colour_options())
        self.colour.on_change("value", lambda attr, old, new: self._set_colour(new))
        self.legend = Div(css_classes=["elodin-legend"])
        self.view_info = Div(css_classes=["elodin-view"], text=self._view_text(r.in_view))
        header = Div(
            css_classes=["elodin-header"],
            text=(
                f'<h2 style="margin:4px 0">Elodin explorer</h2><div style="{_STYLE}">'
                f"{html.escape(explorer.path)}: {explorer.n_valid:,} cutouts in "
                f"{len(explorer.image_names):,} image(s). Click a point for its cutout and "
                "neighbours; box or lasso select (toolbar) to make a selection; keys i / n / c "
                "label the picked cutout interesting / not interesting / none.</div>"
            ),
        )

        self.details = Div(
            css_classes=["elodin-details"], width=330, text="<i>Click a point on the map.</i>"
        )
        self.neighbours = Div(css_classes=["elodin-neighbours"], width=330)
        buttons = []
        for name, text in (
            ("interesting", "Interesting (i)"),
            ("not_interesting", "Not interesting (n)"),
            ("none", "Clear (c)"),
        ):
            b = Button(label=text, css_classes=[f"elodin-label-{name}"], width=len(text) * 8 + 24)
            b.on_click(lambda _e=None, name=name: self._label(name))
            buttons.append(b)
        _, why = explorer.labels.writable()
        self.status = Div(css_classes=["elodin-status"], width=330, text=html.escape(why))
        self.keys = ColumnDataSource({"key": [], "t": []}, name="keys")
        self.keys.on_change("data", self._on_key)
        doc.js_on_event("document_ready", CustomJS(args={"keys": self.keys}, code=_KEYS_JS))

        self.outliers = Div(css_classes=["elodin-outliers"])
        self.outlier_nav = Div(css_classes=["elodin-outlier-page"])
        prev_b = Button(label="< Previous", css_classes=["elodin-outliers-prev"], width=100)
        next_b = Button(label="Next >", css_classes=["elodin-outliers-next"], width=100)
        prev_b.on_click(lambda: self._outlier_step(-1))
        next_b.on_click(lambda: self._outlier_step(1))
        self.selected = Div(css_classes=["elodin-selection"])
        export_b = Button(label="Export selection", css_classes=["elodin-export"], width=150)
        export_b.on_click(self._export)
        sel_buttons = []
        for name, text in (
            ("interesting", "Label all interesting"),
            ("not_interesting", "Label all not interesting"),
            ("none", "Clear their labels"),
        ):
            b = Button(label=text, css_classes=[f"elodin-select-label-{name}"], width=190)
            b.on_click(lambda _e=None, name=name: self._label_selection(name))
            sel_buttons.append(b)
        self.select_status = Div(css_classes=["elodin-select-status"])
        self.export_status = Div(css_classes=["elodin-export-status"])
        ranked_b = Button(label="More like my labels", css_classes=["elodin-rank"], width=170)
        ranked_b.on_click(self._show_ranked)
        self.ranked = Div(css_classes=["elodin-ranked"])

        tabs = Tabs(
            tabs=[
                TabPanel(
                    title="Outliers",
                    child=column(row(prev_b, next_b, self.outlier_nav), self.outliers),
                ),
                TabPanel(
                    title="Selection",
                    child=column(
                        row(export_b, self.export_status),
                        row(*sel_buttons, self.select_status),
                        self.selected,
                    ),
                ),
                TabPanel(title="More like my labels", child=column(ranked_b, self.ranked)),
            ]
        )
        self._render_outliers()
        self._render_selection()
        self._update_legend()
        if 0 < r.in_view <= self.max_points:
            self._draw()  # few enough cutouts: points (and hover thumbnails) from the start
        side = column(
            self.details,
            row(*buttons),
            self.status,
            Div(text=f"<b>Neighbours</b> ({self.n_similar})"),
            self.neighbours,
        )
        doc.add_root(
            column(
                header,
                row(column(row(self.colour, self.view_info), p, self.legend), side),
                tabs,
            )
        )
        doc.add_root(self.keys)  # not drawn; a root so that the key listener's source syncs
        doc.title = "Elodin explorer"

    # -- the map -------------------------------------------------------------------------
    def _view_text(self, in_view: int) -> str:
        drawn = (
            " (drawn one by one: hover for thumbnails)"
            if 0 < in_view <= self.max_points
            else f"; zoom in below {self.max_points:,} to see single points"
        )
        return f'<div style="{_STYLE}; padding-top: 22px">{in_view:,} cutouts in view{drawn}</div>'

    def _on_ranges(self, event) -> None:
        self._pending = (event.x0, event.x1, event.y0, event.y1)
        self.doc.add_next_tick_callback(self._render)

    def _render(self) -> None:
        if self._pending is None:
            return  # several range events, one render
        self.view, self._pending = self._pending, None
        self._draw()

    def _draw(self) -> None:
        x0, x1, y0, y1 = self.view
        r = self.renderer.render(self.by, (x0, x1), (y0, y1))
        self.image.data = {"image": [r.image], "x": [r.x0], "y": [r.y0], "dw": [r.dw], "dh": [r.dh]}
        if 0 < r.in_view <= self.max_points:
            m = self.renderer.in_view(x0, x1, y0, y1)
            rows = self.ex.rows[m]
            self.points.data = {
                "px": self.ex.xy[m, 0].astype(np.float64),
                "py": self.ex.xy[m, 1].astype(np.float64),
                "row": rows,
                "thumb": [f"/api/cutout/{int(v)}.png" for v in rows],
            }
        elif len(self.points.data["row"]):
            self.points.data = {"px": [], "py": [], "row": [], "thumb": []}
        self.view_info.text = self._view_text(r.in_view)

    def _set_colour(self, by: str) -> None:
        self.by = by
        self._draw()
        self._update_legend()

    def _update_legend(self) -> None:
        if self.by == "density":
            text = "colour: number of cutouts per pixel (log scale)"
        elif self.by == "outlier_score":
            text = "colour: mean outlier score per pixel, blue (low) to red (high)"
        elif self.by not in ("cluster", "image", "label"):
            v = self.ex.column(self.by)
            lo, hi = (float(np.nanmin(v)), float(np.nanmax(v))) if np.isfinite(v).any() else (0, 0)
            text = (
                f"colour: mean {html.escape(self.by)} per pixel, blue ({lo:.4g}) to red ({hi:.4g})"
            )
        else:
            items = list(self.renderer.legend(self.by).items())
            text = " ".join(
                f'<span style="white-space:nowrap"><span style="display:inline-block;width:10px;'
                f'height:10px;background:{c}"></span> {html.escape(n)}</span>'
                for n, c in items[:24]
            )
            if len(items) > 24:
                text += f" ... ({len(items)} in all)"
        self.legend.text = f'<div style="{_STYLE}">{text}</div>'

    def _on_tap(self, event) -> None:
        x0, x1, y0, y1 = self.view
        # Within 8 screen pixels of the click.
        rx = 8 * (x1 - x0) / self.renderer.width
        ry = 8 * (y1 - y0) / self.renderer.height
        found = self.ex.nearest(event.x, event.y, rx, ry)
        if found is not None:
            self.pick(found)

    def pick(self, row: int) -> None:
        """Show ``row``'s cutout and facts now, its neighbours when found: the query streams
        the store (seconds at 10^6 rows) on a thread, so the page and the API stay live."""
        import threading

        self.picked = row
        self._render_details()
        self.neighbours.text = '<i class="searching">finding neighbours...</i>'
        doc = self.doc

        def search() -> None:
            try:
                items, error = self.ex.similar(row, self.n_similar), None
            except ElodinError as e:
                items, error = [], str(e)
            doc.add_next_tick_callback(lambda: self._show_neighbours(row, items, error))

        threading.Thread(target=search, name=f"neighbours-{row}", daemon=True).start()

    def _show_neighbours(self, row: int, items: list, error: str | None) -> None:
        if row != self.picked:
            return  # another cutout was picked meanwhile
        if error is not None:
            self.neighbours.text = (
                f'<div class="gallery" data-kind="neighbours"><i>{html.escape(error)}</i></div>'
            )
            return
        self.neighbours.text = _gallery(
            items,
            lambda it: f"{it['row']} d={_num(it['distance'], '.3g')}",
            kind="neighbours",
            empty="no neighbours",
        )

    def _render_details(self) -> None:
        info = self.ex.info(self.picked)
        facts = [
            ("row", str(info["row"])),
            ("image", info["image"]),
            ("x, y", f"{info['x']:.1f}, {info['y']:.1f}"),
            ("RA, Dec", f"{_num(info['ra'], '.6f')}, {_num(info['dec'], '.6f')}"),
        ]
        if "cluster" in info:
            facts.append(("cluster", "noise" if info["cluster"] < 0 else str(info["cluster"])))
        if "outlier_score" in info:
            facts.append(("outlier score", _num(info["outlier_score"], ".4g")))
        facts.append(("label", info["label"].replace("_", " ")))
        table = "".join(
            f'<tr><td style="color:#666;padding-right:8px">{k}</td><td class="fact-{k.split(",")[0].replace(" ", "-")}">{html.escape(v)}</td></tr>'
            for k, v in facts
        )
        self.details.text = (
            f'<div data-row="{info["row"]}" data-label="{info["label"]}" style="{_STYLE}">'
            f'<img class="cutout" src="/api/cutout/{info["row"]}.png" width="160" height="160" '
            f'style="image-rendering:pixelated;display:block">'
            f"<table>{table}</table></div>"
        )

    # -- labels --------------------------------------------------------------------------
    def _on_key(self, attr, old, new) -> None:
        keys = new.get("key") or []
        if keys and keys[0] in _KEY_LABELS:
            self._label(_KEY_LABELS[keys[0]])

    def _set_labels(self, rows, name: str, status, saved: str) -> bool:
        """Label ``rows``; ``status`` says it was saved (``saved`` and the counts) or refused."""
        try:
            result = self.ex.labels.set(rows, name)
        except LabelRefused as e:
            status.text = f'<span class="refused" style="color:#b00">{html.escape(str(e))}</span>'
            return False
        c = result["counts"]
        status.text = saved + f"{c['interesting']} interesting, {c['not_interesting']} not.</span>"
        return True

    def _label(self, name: str) -> None:
        if self.picked is None:
            self.status.text = "Pick a cutout first (click a point on the map)."
            return
        saved = f'<span class="saved">row {self.picked}: {name.replace("_", " ")} (saved). '
        if not self._set_labels(self.picked, name, self.status, saved):
            return
        self._render_details()
        if self.by == "label":
            self._draw()
        if self._ranked_shown:
            self._show_ranked()  # fitted again on every new label

    def _show_ranked(self) -> None:
        self._ranked_shown = True
        try:
            ranked = self.ex.labels.ranked(self.per_page)
        except ElodinError as e:
            self.ranked.text = (
                f'<div class="gallery" data-kind="ranked"><i>{html.escape(str(e))}</i></div>'
            )
            return
        self.ranked.text = _gallery(
            ranked["results"],
            lambda it: f"{it['row']} p={it['score']:.2f}",
            kind="ranked",
            empty="nothing left unlabelled",
        )

    # -- outliers and selections ----------------------------------------------------------
    def _outlier_step(self, step: int) -> None:
        last = max(0, (self.ex.n_valid - 1) // self.per_page)
        self.outlier_page = min(last, max(0, self.outlier_page + step))
        self._render_outliers()

    def _render_outliers(self) -> None:
        try:
            page = self.ex.outliers(self.outlier_page, self.per_page)
        except ElodinError as e:
            self.outliers.text = f"<i>{html.escape(str(e))}</i>"
            return
        start = self.outlier_page * self.per_page
        self.outlier_nav.text = (
            f'<div style="{_STYLE}; padding-top: 6px">page {self.outlier_page + 1}: '
            f"ranks {start + 1}-{start + len(page['results'])} of {page['total']:,}</div>"
        )
        self.outliers.text = _gallery(
            page["results"],
            lambda it: f"{it['row']} s={_num(it['outlier_score'], '.3g')}",
            kind="outliers",
            empty="no outliers",
        )

    def _on_selection(self, event) -> None:
        g = event.geometry or {}
        if not event.final:
            return
        if g.get("type") == "rect":
            self.selection = self.ex.in_box(g["x0"], g["x1"], g["y0"], g["y1"])
        elif g.get("type") == "poly":
            try:
                self.selection = self.ex.in_polygon(_values(g["x"]), _values(g["y"]))
            except ElodinError:  # a click with the lasso: fewer than three vertices
                self.selection = np.zeros(0, np.int64)
        else:
            return
        self.select_status.text = ""
        self._render_selection()

    def _label_selection(self, name: str) -> None:
        if not len(self.selection):
            self.select_status.text = "Nothing selected: box or lasso select on the map first."
            return
        saved = (
            f'<span class="saved" data-rows="{len(self.selection)}" data-label="{name}">'
            f"{len(self.selection):,} rows: {name.replace('_', ' ')} (saved). "
        )
        if not self._set_labels(self.selection, name, self.select_status, saved):
            return
        if self.picked is not None:
            self._render_details()
        if self.by == "label":
            self._draw()
        if self._ranked_shown:
            self._show_ranked()

    def _render_selection(self) -> None:
        n = len(self.selection)
        shown = [{"row": int(r)} for r in self.selection[: self.per_page]]
        head = (
            f'<div class="selection-count" data-count="{n}" style="{_STYLE}">{n:,} cutouts selected'
        )
        head += f" (first {len(shown)} shown)</div>" if n > len(shown) else "</div>"
        self.selected.text = head + _gallery(
            shown,
            lambda it: str(it["row"]),
            kind="selection",
            empty="box or lasso select on the map",
        )

    def _export(self) -> None:
        if not len(self.selection):
            self.export_status.text = "Nothing selected: box or lasso select on the map first."
            return
        try:
            out = self.exports.write(self.ex, self.selection)
        except ElodinError as e:
            self.export_status.text = f'<span style="color:#b00">{html.escape(str(e))}</span>'
            return
        self.export_status.text = (
            f'<span class="exported" data-path="{html.escape(out["path"])}" data-rows="{out["rows"]}">'
            f"{out['rows']:,} rows written to {html.escape(out['path'])} "
            f'(<a href="{out["url"]}">download</a>)</span>'
        )


def page_factory(explorer: Explorer, renderer: MapRenderer, exports: Exports):
    """The Bokeh ``modify_doc`` function: one :class:`ExplorerPage` per session."""

    def modify_doc(doc) -> None:
        ExplorerPage(explorer, renderer, exports, doc)

    return modify_doc
