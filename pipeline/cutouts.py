"""Cutouts as the fingerprint stage made them: read, cut, stretched as fingerprinted, resized.

One :class:`CutoutReader` serves everything that needs a cutout's pixels: the fingerprint worker
(which cuts tiles it has read), the pixel baseline (``reduce --features pixels``), a query by
image (``similar --image``), the report's and the explorer's thumbnails, and ``models adapt``.
Each keeps its own order of steps (the worker resamples raw windows of varying size before the
stretch, the pixel baseline resamples after it); what they share is each step's one home:

- the images a store was made from, reopened from their records in its images table
  (:func:`store_sources`, :func:`recorded_limits`, :meth:`CutoutReader.from_store`), with
  their HDU or variable;
- cutting with the store's ``cutouts.fill`` (:meth:`CutoutReader.cut`, over
  :func:`pipeline.geometry.cut_windows`), and reading windows anywhere in an image in few, small
  reads (:func:`read_windows`, grouped by :func:`plan_reads`);
- the stretch with the store's preprocessing and per-image limits, recorded when the store has
  them (:meth:`CutoutReader.prepare`);
- resampling (:func:`resize`).

Window geometry (centres, boxes) is :mod:`pipeline.geometry`'s.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import StoreError
from .geometry import clip_boxes, cut_windows, read_box
from .sources import ImageSource
from .store.images import RecordedColumn

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "MAX_READ_PIXELS",
    "ROW_COST",
    "CutoutReader",
    "image_records",
    "plan_reads",
    "read_windows",
    "recorded_limits",
    "resize",
    "store_sources",
]

logger = logging.getLogger(__name__)

# What a row of a partial-width read costs beyond its pixels, in pixels: local FITS sections
# narrower than the image are read row by row, one astropy call each (measured here: ~0.1-0.2
# ms a row; a 32 x 32 section ~3 ms, while 32 full 8192-pixel rows, one contiguous read, take
# ~0.4 ms). Zarr and tile-compressed files pay per chunk instead, which merging neighbours
# within a band also saves.
ROW_COST = 32768
# The largest single read (pixels per band): bounds memory whatever the windows.
MAX_READ_PIXELS = 1 << 22
# The pixel baseline reads the bounding box of one image's windows at once up to this many
# pixels, one read per window above it.
_BOX_READ_PIXELS = 4096 * 4096


# ------------------------------------------------------------------------------ records
def image_records(store: Store) -> dict[str, dict]:
    """Every image in use in the store, ``{image id: record}`` (its row of the images table,
    :meth:`pipeline.store.ImageTable.record`). Reads every record: for tests and small stores;
    readers use the lazy :func:`store_sources` and :func:`recorded_limits`."""
    table = store.images()
    return {str(table.ids[i]): table.record(i) for i in table.current()}


def store_sources(store: Store) -> Mapping[str, ImageSource]:
    """Every image in use in the store, by id, reopened from its record on first access
    (headers only, no pixels; exactly as fingerprinted, HDU and variable included)."""
    return store.images().sources()


class _RecordedLimits(RecordedColumn):
    """Image id -> the stretch limits the store recorded (float32, as the workers used them),
    read from the images table on first access (each record parsed at most once: the table
    memoises)."""

    column = "limits"

    def __getitem__(self, image: str) -> np.ndarray:
        return self._table.limits(self._index(image))


def recorded_limits(store: Store) -> Mapping[str, np.ndarray]:
    """The per-image stretch limits the store recorded (``scope: image``), float32 as the
    fingerprint worker used them; read lazily, per image asked for."""
    return _RecordedLimits(store.images())


# ------------------------------------------------------------------------------ reading
def _paste(out: np.ndarray, data: np.ndarray, box: Sequence[int], win: Sequence[int]) -> None:
    """Copy the part of ``win`` (x0, y0, w, h) that lies in ``data`` (read at ``box`` =
    y0, y1, x0, x1) into ``out`` (bands, h, w)."""
    by0, by1, bx0, bx1 = box
    x0, y0, w, h = (int(v) for v in win)
    ys, ye = max(y0, by0), min(y0 + h, by1)
    xs, xe = max(x0, bx0), min(x0 + w, bx1)
    if ye > ys and xe > xs:
        out[:, ys - y0 : ye - y0, xs - x0 : xe - x0] = data[
            :, ys - by0 : ye - by0, xs - bx0 : xe - bx0
        ]


def plan_reads(
    boxes: np.ndarray,
    *,
    width: int | None = None,
    row_cost: float = ROW_COST,
    band: int | None = None,
    max_pixels: int = MAX_READ_PIXELS,
) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """Group boxes ``(y0, y1, x0, x1)`` (inside the image, non-empty) into reads.

    Returns ``[(read_box, indices)]`` with every box inside its read box, each index once.
    A read of ``h`` rows and ``w`` columns is costed ``h * (row_cost + w)`` pixels, or ``h * w``
    when it spans the image's whole ``width`` (one contiguous read of a row-major file): FITS
    sections narrower than the image are read row by row, a call each, so reading the windows of
    a row band together is far cheaper than one read per window, while a wide gap between two
    windows costs more than a second read. Windows are cut into bands of ``band`` rows (4x the
    tallest window by default) by their top row; within a band they are merged left to right
    while merging costs less than reading apart, and the whole band is read full width when
    that is cheaper still. No read exceeds ``max_pixels``.
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    if not len(boxes):
        return []
    band = band or int(4 * max(1, (boxes[:, 1] - boxes[:, 0]).max()))

    def cost(y0, y1, x0, x1) -> float:
        h, w = y1 - y0, x1 - x0
        return h * w if width is not None and w >= width else h * (row_cost + w)

    order = np.lexsort((boxes[:, 2], boxes[:, 0] // band))
    keys = boxes[order, 0] // band
    reads = []
    for group in np.split(order, np.flatnonzero(np.diff(keys)) + 1):
        runs: list[tuple[list[int], tuple[int, int, int, int]]] = []
        run, box = [int(group[0])], tuple(int(v) for v in boxes[group[0]])
        for i in group[1:]:
            b = tuple(int(v) for v in boxes[i])
            m = (min(box[0], b[0]), max(box[1], b[1]), min(box[2], b[2]), max(box[3], b[3]))
            small = (m[1] - m[0]) * (m[3] - m[2]) <= max_pixels
            if small and cost(*m) <= cost(*box) + cost(*b):
                run.append(int(i))
                box = m
            else:
                runs.append((run, box))
                run, box = [int(i)], b
        runs.append((run, box))
        if width is not None and len(runs) > 1:
            g = boxes[group]
            full = (int(g[:, 0].min()), int(g[:, 1].max()), 0, int(width))
            area = (full[1] - full[0]) * width
            if area <= max_pixels and cost(*full) < sum(cost(*b) for _, b in runs):
                runs = [([int(i) for i in group], full)]
        reads.extend((b, np.array(r)) for r, b in runs)
    return reads


def read_windows(
    source: ImageSource, windows: np.ndarray, *, fill: float = 0.0
) -> list[np.ndarray]:
    """Raw pixels of each window ``(x0, y0, w, h)``, float32 ``(bands, h, w)``, in input order.

    Parts of a window outside the image are ``fill`` (the store's ``cutouts.fill``, what the
    model saw under the ``pad`` edge policy). Only the windows' neighbourhoods are read, in the
    reads :func:`plan_reads` groups them into.
    """
    windows = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
    nx = source.shape[1]
    out = [np.full((source.n_bands, int(h), int(w)), fill, np.float32) for _, _, w, h in windows]
    if not len(windows):
        return out
    # Clip to the image: pad-policy windows may reach past its edges.
    boxes = clip_boxes(windows, source.shape)
    inside = np.flatnonzero((boxes[:, 1] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 2]))
    boxes = boxes[inside]
    for box, members in plan_reads(boxes, width=nx):
        data = source.read(*box)
        for i in inside[members]:
            _paste(out[i], data, box, windows[i])
    return out


def resize(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resample ``x`` to ``shape``: bilinear with anti-aliasing, values kept (not rescaled) —
    the one resampling of cutouts, in the worker, the pixel baseline and ``similar --image``."""
    from skimage.transform import resize as _resize

    return _resize(x, tuple(shape), order=1, anti_aliasing=True, preserve_range=True)


# ------------------------------------------------------------------------------ the reader
class CutoutReader:
    """Cuts, stretches and resamples cutouts of a set of images the way the fingerprint stage did.

    Parameters
    ----------
    sources : mapping of image id to ImageSource
        The images (empty for a caller that reads its own pixels and only cuts and stretches).
    preprocess : mapping
        The store's ``preprocess`` section (what the stretch was).
    fill : float
        Value of window parts outside the image (the store's ``cutouts.fill``; NaN for ``null``,
        masked like any NaN pixel, which is what the fingerprint stage does).
    image_limits : mapping of image id to limits, optional
        Per-image stretch limits (``scope: image``), used as given (see :func:`recorded_limits`);
        an image without them has them measured once, when first needed.
    """

    def __init__(
        self,
        sources: Mapping[str, ImageSource] | None = None,
        *,
        preprocess: Mapping[str, Any] | None = None,
        fill: float = np.nan,
        image_limits: Mapping[str, Any] | None = None,
    ) -> None:
        # Mappings are kept as given: a store's are lazy (one record read per image used).
        self.sources: Mapping[str, ImageSource] = sources if sources is not None else {}
        self.preprocess = dict(preprocess or {})
        self.fill = fill
        self._recorded: Mapping[str, Any] = image_limits if image_limits is not None else {}
        self._limits: dict[str, Any] = {}

    @staticmethod
    def store_fill(attrs: Mapping[str, Any]) -> float:
        """The store's ``cutouts.fill``, NaN for ``null`` (masked, as fingerprinting does)."""
        fill = (attrs.get("cutouts") or {}).get("fill")
        return np.nan if fill is None else float(fill)

    @classmethod
    def from_store(
        cls,
        store: Store,
        *,
        fill: float | None = None,
        recorded: bool = True,
        require_sources: bool = False,
    ) -> CutoutReader:
        """A reader of every image in use in ``store``, with its preprocessing and fill.

        ``fill`` overrides the store's; ``recorded`` takes the per-image limits the store
        recorded (:func:`recorded_limits`; else they are measured again). With
        ``require_sources``, an image recorded without its source is reopened from its files
        (stores written before sources were recorded) and one with neither is a StoreError;
        without it such images are left out.
        """
        attrs = store.attrs
        sources: Mapping[str, ImageSource] = store_sources(store)
        if require_sources:
            table = store.images()
            missing = np.setdiff1d(table.current(), table.has("source"))
            if len(missing):
                sources = dict(sources)
                for i in missing:
                    sources[str(table.ids[i])] = table.source(int(i), from_files=True)
        return cls(
            sources,
            preprocess=attrs.get("preprocess") or {},
            fill=cls.store_fill(attrs) if fill is None else fill,
            image_limits=recorded_limits(store) if recorded else None,
        )

    # -------------------------------------------------------------------- per image
    def source(self, image: str) -> ImageSource:
        try:
            return self.sources[image]
        except KeyError:
            raise StoreError(
                f"store records no source for image {image!r}; it cannot be read back for thumbnails"
            ) from None

    def image_limits(self, image: str) -> np.ndarray | None:
        """Per-image stretch limits (``scope: image``): recorded, else measured once per image;
        None for ``scope: cutout``."""
        if image not in self._limits:
            from .preprocess import image_limits_for, preprocess_settings

            try:
                self._limits[image] = self._recorded[image]
            except KeyError:
                settings = preprocess_settings(self.preprocess)
                self._limits[image] = (
                    image_limits_for(self.source(image), self.preprocess)
                    if settings["scope"] == "image"
                    else None
                )
        return self._limits[image]

    def all_limits(self) -> dict[str, np.ndarray]:
        """The recorded per-image limits, and under ``scope: image`` those of every other source
        measured now: for a reader sent to workers, which should not measure again."""
        from .preprocess import preprocess_settings

        for image in self._recorded:
            self.image_limits(image)
        if preprocess_settings(self.preprocess)["scope"] == "image":
            for image in self.sources:
                self.image_limits(image)
        return {k: v for k, v in self._limits.items() if v is not None}

    # -------------------------------------------------------------------- the steps
    def cut(
        self,
        data: np.ndarray,
        box: Sequence[int],
        windows: np.ndarray,
        *,
        side: int | None = None,
    ) -> np.ndarray:
        """Raw float32 ``(n, bands, h, w)`` cutouts of ``windows`` from ``data`` read at ``box``.

        Windows of varying size (blobs, catalog sizes) are each resampled to ``side`` x
        ``side`` (NaN and inf kept masked as NaN), as the fingerprint worker does.
        """
        if np.all(windows[:, 2:] == windows[0, 2:]):
            return cut_windows(data, box, windows, fill=self.fill)
        if side is None:
            raise ValueError("windows of varying size need a common side")
        out = np.empty((len(windows), data.shape[0], side, side), dtype=np.float32)
        for i, win in enumerate(windows):
            one = cut_windows(data, box, win[None], fill=self.fill)[0]
            finite = np.where(np.isfinite(one), one, np.nan)
            out[i] = resize(finite, (one.shape[0], side, side))
        return out

    def prepare(self, raw: np.ndarray, image: str) -> tuple[np.ndarray, np.ndarray]:
        """Stretch raw ``(n, bands, h, w)`` cutouts of ``image`` as fingerprinted: RGB
        ``(n, 3, h, w)`` in [0, 1] and the masked fraction of each."""
        from .preprocess import stretch_cutouts

        return stretch_cutouts(
            raw, config=self.preprocess, image_limits=self.image_limits(image), image=image
        )

    def prepare_many(
        self, parts: Sequence[tuple[np.ndarray, str]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`prepare` of raw cutouts of several images, ``(raw, image)`` each, joined in
        order: one stretch for each run of parts with the same bands (each cutout with its
        own image's limits), the same values as a call per part. A survey of small patches
        has a window or two an image, and a stretch per image cost more than the cutting."""
        from .preprocess import preprocess_settings, stretch_cutouts

        per_image = preprocess_settings(self.preprocess)["scope"] == "image"
        rgbs, fracs = [], []
        for _, group in itertools.groupby(parts, key=lambda part: part[0].shape[1]):
            run = list(group)
            raw = run[0][0] if len(run) == 1 else np.concatenate([r for r, _ in run])
            limits = (
                np.concatenate([self._each(img, len(r)) for r, img in run]) if per_image else None
            )
            rgb, frac = stretch_cutouts(
                raw, config=self.preprocess, image_limits=limits, image=run[0][1]
            )
            rgbs.append(rgb)
            fracs.append(frac)
        if len(rgbs) == 1:
            return rgbs[0], fracs[0]
        return np.concatenate(rgbs), np.concatenate(fracs)

    def _each(self, image: str, n: int) -> np.ndarray:
        """``image``'s stretch limits for each of ``n`` cutouts: ``(n, c, 2)``."""
        one = np.asarray(self.image_limits(image), np.float64).reshape(1, -1, 2)
        return np.broadcast_to(one, (n, *one.shape[1:]))

    def read_raw(self, image: str, windows: np.ndarray) -> list[np.ndarray]:
        """Raw pixels of each window of ``image`` (any size, anywhere), in few small reads."""
        return read_windows(self.source(image), windows, fill=self.fill)

    def stretched(
        self, image: str, windows: np.ndarray, *, side: int, channels: int = 3
    ) -> np.ndarray:
        """Windows of ``image`` cut, stretched and then resampled to ``channels x side x side``:
        float32 ``(n, channels, side, side)`` (the pixel baseline's features; ``channels`` 1
        keeps the first)."""
        src = self.source(image)
        windows = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
        # One read of the windows' bounding box when it is small, else one read per window.
        box = read_box(windows, src.shape)
        small = (box[1] - box[0]) * (box[3] - box[2]) <= _BOX_READ_PIXELS
        whole = src.read(*box) if small else None
        out = np.empty((len(windows), channels, side, side), np.float32)
        for size in np.unique(windows[:, 2:], axis=0):
            sel = np.flatnonzero((windows[:, 2] == size[0]) & (windows[:, 3] == size[1]))
            if whole is not None:
                cut = cut_windows(whole, box, windows[sel], fill=self.fill)
            else:
                cut = np.stack(self.read_raw(image, windows[sel]))
            rgb, _ = self.prepare(cut, image)
            if channels == 1:
                rgb = rgb[:, :1]
            out[sel] = resize(rgb, (len(sel), channels, side, side))
        return out
