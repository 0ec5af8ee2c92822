"""The interactive embedding: a Bokeh scatter whose hover shows each cutout and its row.

Everything is inline (Bokeh's JavaScript and the thumbnails as PNG data URIs), so the page
works from disk on an offline machine. Only Bokeh's core bundle is inlined (about 1.3 MB;
widgets, tables, WebGL and MathJax are not used).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np

from .figures import hex_colour

__all__ = ["bokeh_resources", "embedding_plot", "png_bytes", "png_data_uri"]

_TOOLTIP = """
<div style="max-width: 230px">
  <img src="@thumb" width="@thumb_px" height="@thumb_px"
       style="image-rendering: pixelated; border: 3px solid @colour; display: block"></img>
  <div style="font: 12px monospace; margin-top: 3px">
    row @row &middot; cluster @cluster<br>
    @image<br>
    x @x{0.0}, y @y{0.0}<br>
    RA @ra{0.000000}, Dec @dec{0.000000}
  </div>
</div>
"""


def png_bytes(thumb: np.ndarray, *, optimize: bool = True) -> bytes:
    """A uint8 ``(h, w, 3)`` image as PNG bytes (grey when the three channels are equal)."""
    from PIL import Image

    img = Image.fromarray(thumb)
    if (
        thumb.ndim == 3
        and np.array_equal(thumb[..., 0], thumb[..., 1])
        and np.array_equal(thumb[..., 0], thumb[..., 2])
    ):
        img = img.convert("L")  # one-band images: a third of the bytes
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=optimize)
    return buf.getvalue()


def png_data_uri(thumb: np.ndarray) -> str:
    """A uint8 ``(h, w, 3)`` image as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(thumb)).decode("ascii")


def embedding_plot(
    xy: np.ndarray,
    *,
    rows: np.ndarray,
    images: Sequence[str],
    x: np.ndarray,
    y: np.ndarray,
    ra: np.ndarray,
    dec: np.ndarray,
    clusters: np.ndarray,
    thumbs: np.ndarray,
    colours: Mapping[int, tuple[int, int, int]],
    title: str,
    axis_labels: tuple[str, str] = ("embedding 1", "embedding 2"),
    clustered: bool = True,
):
    """A Bokeh figure: one point per row at ``xy``, coloured by cluster, hover = thumbnail."""
    from bokeh.models import ColumnDataSource, HoverTool
    from bokeh.plotting import figure

    clusters = np.asarray(clusters, dtype=np.int64)
    data = {
        "px": np.asarray(xy[:, 0], dtype=np.float64),
        "py": np.asarray(xy[:, 1], dtype=np.float64),
        "row": np.asarray(rows, dtype=np.int64),
        "image": [str(i) for i in images],
        "x": np.asarray(x, dtype=np.float64),
        "y": np.asarray(y, dtype=np.float64),
        "ra": np.asarray(ra, dtype=np.float64),
        "dec": np.asarray(dec, dtype=np.float64),
        "cluster": [("noise" if c < 0 else str(c)) if clustered else "none yet" for c in clusters],
        "colour": [hex_colour(colours.get(int(c), (128, 128, 128))) for c in clusters],
        "thumb": [png_data_uri(t) for t in thumbs],
        "thumb_px": [max(96, int(thumbs.shape[1]) if len(thumbs) else 96)] * len(clusters),
    }
    source = ColumnDataSource(data)
    p = figure(
        title=title,
        width=860,
        height=640,
        tools="pan,wheel_zoom,box_zoom,reset,save",
        active_scroll="wheel_zoom",
        background_fill_color="#fafafa",
        x_axis_label=axis_labels[0],
        y_axis_label=axis_labels[1],
    )
    renderers = []
    # One renderer per cluster gives a legend whose entries hide / show their points.
    for c in sorted(set(clusters.tolist())):
        idx = np.flatnonzero(clusters == c)
        sub = ColumnDataSource({k: _subset(v, idx) for k, v in data.items()})
        r = p.scatter(
            "px",
            "py",
            source=sub,
            size=7,
            fill_color="colour",
            line_color="black",
            line_width=0.3,
            fill_alpha=0.85,
            legend_label=("noise" if c < 0 else f"cluster {c}") if clustered else "cutouts",
        )
        renderers.append(r)
    del source
    p.add_tools(HoverTool(renderers=renderers, tooltips=_TOOLTIP))
    legend = p.legend[0]
    legend.click_policy = "hide"
    legend.label_text_font_size = "9pt"
    if len(renderers) > 30:
        legend.visible = False
    else:
        # Beside the plot, not over the points.
        p.add_layout(legend, "right")
    return p


def _subset(values, idx: np.ndarray):
    if isinstance(values, np.ndarray):
        return values[idx]
    return [values[i] for i in idx]


def bokeh_resources() -> str:
    """The ``<script>`` tags of Bokeh's core bundle, inline (no CDN)."""
    from bokeh.resources import Resources

    return Resources(mode="inline", components=["bokeh"]).render()
