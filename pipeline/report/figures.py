"""The report's PNG figures.

Thumbnail figures (the embedding map, galleries, the similarity and outlier sheets, the mosaic
overlays) are composed pixel by pixel with Pillow: exact sizes, one frame per thumbnail in its
cluster's colour, and fast for thousands of thumbnails. Charts (cluster sizes, PCA explained
variance) use matplotlib's Agg backend.
"""

from __future__ import annotations

import colorsys
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "BACKGROUND",
    "NOISE_COLOUR",
    "GridMap",
    "Sheet",
    "cluster_colours",
    "cluster_sizes_chart",
    "embedding_grid",
    "explained_variance_chart",
    "hex_colour",
    "overlay_windows",
    "render_sheet",
]

BACKGROUND = (17, 17, 17)
TEXT = (230, 230, 230)
NOISE_COLOUR = (128, 128, 128)
_TAB10 = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def cluster_colours(cluster_ids: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    """One RGB colour per cluster id: matplotlib's tab10 for up to 10 clusters, evenly spread
    hues otherwise; noise (-1) is grey."""
    ids = sorted({int(c) for c in cluster_ids})
    real = [c for c in ids if c >= 0]
    out: dict[int, tuple[int, int, int]] = {-1: NOISE_COLOUR}
    if len(real) <= 10 and (not real or max(real) < 10):
        for c in real:
            out[c] = _TAB10[c] if c != 7 else (23, 100, 60)  # tab10's grey looks like noise
        return out
    for c in real:
        # Golden-ratio hue steps keep neighbouring ids apart; two lightness levels add contrast.
        h = (c * 0.618033988749895) % 1.0
        r, g, b = colorsys.hls_to_rgb(h, 0.5 if c % 2 == 0 else 0.62, 0.75)
        out[c] = (round(r * 255), round(g * 255), round(b * 255))
    return out


def hex_colour(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb[:3]))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


# --------------------------------------------------------------------------- thumbnail sheets
@dataclasses.dataclass
class Sheet:
    """A rendered sheet: where each thumbnail went (``boxes``: x0, y0 of the thumbnail's
    frame, in PNG pixels) and the PNG's size."""

    path: Path
    size: tuple[int, int]
    boxes: list[tuple[int, int]]
    cell: int
    count: int


def render_sheet(
    path: Path,
    sections: Sequence[tuple[str, np.ndarray, Sequence[tuple[int, int, int]], Sequence[str]]],
    *,
    title: str,
    columns: int = 8,
    frame: int = 3,
    gap: int = 6,
) -> Sheet:
    """A titled sheet of framed thumbnails, one labelled block of rows per section.

    Parameters
    ----------
    sections : sequence of (label, thumbs (n, s, s, 3) uint8, frame colours, captions)
    """
    from PIL import Image, ImageDraw

    thumbs = [s[1] for s in sections if len(s[1])]
    side = thumbs[0].shape[1] if thumbs else 64
    cell = side + 2 * frame
    cap_h = 14
    title_font, label_font, cap_font = _font(16), _font(13), _font(10)
    cols = max(1, min(columns, max((len(s[1]) for s in sections), default=1)))
    width = gap + cols * (cell + gap)
    width = max(width, 360)
    height = 30
    for _, th, _, _ in sections:
        rows = -(-len(th) // cols)
        height += 20 + max(1, rows) * (cell + cap_h + gap)
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.text((gap, 7), title, fill=TEXT, font=title_font)
    y = 30
    boxes: list[tuple[int, int]] = []
    for label, th, colours, captions in sections:
        draw.text((gap, y + 3), label, fill=(170, 170, 170), font=label_font)
        y += 20
        if not len(th):
            draw.text((gap, y + 4), "(none)", fill=(120, 120, 120), font=cap_font)
        for i in range(len(th)):
            r, c = divmod(i, cols)
            x0 = gap + c * (cell + gap)
            y0 = y + r * (cell + cap_h + gap)
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=tuple(colours[i]))
            img.paste(Image.fromarray(th[i]), (x0 + frame, y0 + frame))
            if captions and captions[i]:
                draw.text((x0, y0 + cell + 1), str(captions[i])[:18], fill=TEXT, font=cap_font)
            boxes.append((x0, y0))
        y += max(1, -(-len(th) // cols)) * (cell + cap_h + gap)
    img.save(path)
    return Sheet(Path(path), img.size, boxes, cell, len(boxes))


# --------------------------------------------------------------------------- embedding map
@dataclasses.dataclass
class GridMap:
    """The embedding map as drawn: ``cells[i]`` is the (row, col) where ``rows[i]`` was placed;
    cell (r, c) spans ``origin + (c, r) * cell`` to that plus ``cell - 1`` pixels (its last
    ``gap`` pixels are background)."""

    path: Path
    size: tuple[int, int]
    n_cells: int
    cell: int
    origin: tuple[int, int]
    rows: np.ndarray
    cells: np.ndarray

    @property
    def count(self) -> int:
        return len(self.rows)


def embedding_grid(
    path: Path,
    rows: np.ndarray,
    cells: np.ndarray,
    thumbs: np.ndarray,
    colours: Sequence[tuple[int, int, int]],
    *,
    n_cells: int,
    title: str,
    frame: int = 2,
    gap: int = 2,
) -> GridMap:
    """Thumbnails on an ``n_cells x n_cells`` grid over the embedding, one per occupied cell,
    framed in their cluster's colour (the Elodin-NN / "t-SNE grid" picture).

    ``cells`` are row-major cell indices (row 0 at the top), ``thumbs`` uint8 (n, s, s, 3).
    """
    from PIL import Image, ImageDraw

    side = thumbs.shape[1] if len(thumbs) else 48
    cell = side + 2 * frame + gap
    width = gap + n_cells * cell
    # The title grows with the map so it stays readable when the PNG is shown scaled down.
    size = max(15, width // 70)
    top = size + 14
    origin = (gap, top)
    img = Image.new("RGB", (width, top + n_cells * cell), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.text((6, 6), title, fill=TEXT, font=_font(size))
    rc = np.stack(np.divmod(np.asarray(cells, dtype=np.int64), n_cells), axis=1).reshape(-1, 2)
    for i, (r, c) in enumerate(rc):
        x0, y0 = origin[0] + c * cell, origin[1] + r * cell
        draw.rectangle([x0, y0, x0 + cell - gap - 1, y0 + cell - gap - 1], fill=tuple(colours[i]))
        img.paste(Image.fromarray(thumbs[i]), (x0 + frame, y0 + frame))
    img.save(path)
    return GridMap(Path(path), img.size, n_cells, cell, origin, np.asarray(rows), rc)


# --------------------------------------------------------------------------- mosaic overlay
def overlay_windows(
    canvas,
    windows: np.ndarray,
    colours: Sequence[tuple[int, int, int]],
    *,
    factor: int,
    min_outline: int = 6,
) -> None:
    """Draw windows ``(x0, y0, w, h)`` in source pixels on an RGBA Pillow ``canvas`` downsampled
    by ``factor``: outlines where a window is at least ``min_outline`` pixels on the canvas,
    translucent fills where it is smaller (outlines would merge into a solid sheet)."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(canvas, "RGBA")
    f = float(factor)
    for (x0, y0, w, h), col in zip(np.asarray(windows).reshape(-1, 4), colours, strict=True):
        a, b = x0 / f, y0 / f
        c, d = (x0 + w) / f - 1, (y0 + h) / f - 1
        if min(w, h) / f >= min_outline:
            draw.rectangle([a, b, c, d], outline=(*col, 255), width=1)
        else:
            draw.rectangle([a, b, max(a, c), max(b, d)], fill=(*col, 90))


# --------------------------------------------------------------------------- charts
def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def cluster_sizes_chart(
    path: Path, ids: Sequence[int], counts: Sequence[int], colours: dict[int, tuple]
) -> Path:
    """Bar chart of cutouts per cluster (noise, id -1, drawn grey and labelled so)."""
    ids = list(ids)
    fig = _figure(max(5.0, 0.35 * len(ids) + 2), 3.4)
    ax = fig.subplots()
    labels = ["noise" if c < 0 else str(c) for c in ids]
    ax.bar(
        range(len(ids)),
        counts,
        color=[hex_colour(colours.get(c, NOISE_COLOUR)) for c in ids],
        edgecolor="black",
        linewidth=0.4,
    )
    ax.set_xticks(range(len(ids)), labels, rotation=90 if len(ids) > 25 else 0)
    ax.set_xlabel("cluster")
    ax.set_ylabel("cutouts")
    ax.set_title(f"Cluster sizes ({sum(counts)} cutouts)")
    fig.savefig(path)
    return Path(path)


def explained_variance_chart(path: Path, ratio: np.ndarray) -> Path:
    """Explained variance per PCA component (bars) and cumulative (line, right axis)."""
    ratio = np.asarray(ratio, dtype=np.float64)
    k = np.arange(1, len(ratio) + 1)
    cum = np.cumsum(ratio)
    fig = _figure(6.0, 3.4)
    ax = fig.subplots()
    ax.bar(k, ratio, color="#8c9db5", label="per component")
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("component")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("explained variance ratio")
    ax2 = ax.twinx()
    ax2.plot(k, cum, "o-", color="#d62728", ms=3, label="cumulative")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("cumulative", color="#d62728")
    for level in (0.9, 0.99):
        ax2.axhline(level, color="#d62728", lw=0.6, ls=":")
        ax2.annotate(f"{level:.0%}", (k[-1] + 0.4, level), xytext=(0, -9), ha="right",
                     textcoords="offset points", color="#d62728", fontsize=7)  # fmt: skip
    ax.set_title(f"PCA: {len(ratio)} components keep {cum[-1]:.1%} of the variance")
    fig.savefig(path)
    return Path(path)
