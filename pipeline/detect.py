"""Blob detection per tile (photutils): one cutout window per detected source.

Detection runs tile by tile on the tile's core plus a halo, never on the whole image:

1. background and its RMS (:class:`photutils.background.Background2D`, sigma-clipped boxes),
   subtracted;
2. smoothing with a Gaussian kernel (FWHM 3 px) through :func:`astropy.convolution.convolve`;
3. segmentation at ``nsigma`` x RMS with ``npixels`` connected pixels, then deblending;
4. one square window per source, centred on its centroid, side
   ``clip(scale * hypot(bbox width, bbox height), min_size, max_size)``.

Sources near tile borders are neither lost nor doubled. A detection tile reads its core plus a
halo (at least ``max_size``, rounded up to whole background boxes), so it sees whole every source
whose window fits, and it *claims* a source only when the source's peak pixel lies in its core.
The peak pixel is taken on the raw smoothed image (no background subtracted), which depends only
on the pixels around the source: every tile that sees the source computes the same peak, bit for
bit, so exactly one claims it, even for a source centred exactly on a tile border or corner.
(Claiming by the centroid would not do: the centroid moves by a hair with each tile's own
background estimate, and a source on a border would then be claimed by two tiles or none.)
The claimed windows, centred on the centroids, are then handed to
:func:`pipeline.tiling.assign_windows`, whose owner tile may be a neighbour of the detecting one.

Multi-band images are detected on the mean of their bands.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np

from . import config
from .geometry import shift_inside
from .tiling import Plan, assign_windows, tile_grid

__all__ = [
    "BOX_SIZE",
    "detect_plan",
    "detect_tile",
    "detect_windows",
    "detection_options",
    "detection_tiles",
]

logger = logging.getLogger(__name__)

BOX_SIZE = 64  # background box side (pixels); read boxes are aligned to this grid
KERNEL_FWHM = 3.0
_EMPTY = np.zeros((0, 4), dtype=np.int64)


def detection_options(
    *,
    nsigma: float | None = None,
    npixels: int | None = None,
    deblend: bool | None = None,
    scale: float | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
) -> dict:
    """Detection settings: explicit values, else ``elodin.cutouts.*`` config."""
    opts = {
        "nsigma": config.get_float("cutouts.detect-nsigma", override=nsigma),
        "npixels": config.get_int("cutouts.detect-npixels", override=npixels, minimum=1),
        "deblend": bool(config.get("cutouts.deblend", override=deblend)),
        "scale": config.get_float("cutouts.blob-scale", override=scale),
        "min_size": config.get_int("cutouts.min-size", override=min_size, minimum=1),
        "max_size": config.get_int("cutouts.max-size", override=max_size, minimum=1),
    }
    if opts["min_size"] > opts["max_size"]:
        from .errors import ConfigError

        raise ConfigError(
            f"config elodin.cutouts.min-size ({opts['min_size']}) is larger than "
            f"max-size ({opts['max_size']})"
        )
    return opts


def _background(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Background and RMS maps; a global sigma-clipped level where boxes cannot be used."""
    from astropy.stats import sigma_clipped_stats
    from photutils.background import Background2D

    box = (min(BOX_SIZE, data.shape[0]), min(BOX_SIZE, data.shape[1]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bkg = Background2D(data, box, mask=mask, filter_size=(3, 3))
        return bkg.background, bkg.background_rms
    except ValueError:  # too few unmasked pixels per box: one level for the whole read box
        _, median, std = sigma_clipped_stats(data[~mask], sigma=3.0)
        return np.full_like(data, median), np.full_like(data, std)


def _sources(data: np.ndarray, *, nsigma: float, npixels: int, deblend: bool):
    """Centroid ``x, y``, extent and peak pixel ``px, py`` of every source, in ``data``'s grid.

    The peak is the brightest pixel of the source in the *raw* smoothed image (no background
    subtracted): a function of the pixels around the source only, so every tile whose read box
    holds the source finds the same peak, bit for bit. The centroid and extent depend a little on
    the background, which each read box measures for itself.
    """
    from astropy.convolution import convolve
    from photutils.segmentation import (
        SourceCatalog,
        deblend_sources,
        detect_sources,
        make_2dgaussian_kernel,
    )
    from photutils.utils import NoDetectionsWarning
    from scipy import ndimage

    mask = ~np.isfinite(data)
    if (~mask).sum() < max(npixels, 3):
        return None
    background, rms = _background(np.where(mask, np.nan, data), mask)
    sub = np.where(mask, 0.0, data - background)
    kernel = make_2dgaussian_kernel(KERNEL_FWHM, size=5)
    smooth = convolve(sub, kernel, boundary="extend", normalize_kernel=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDetectionsWarning)
        segm = detect_sources(smooth, nsigma * rms, n_pixels=npixels, mask=mask)
        if segm is None:
            return None
        if deblend:
            segm = deblend_sources(smooth, segm, n_pixels=npixels, progress_bar=False)
    cat = SourceCatalog(sub, segm, convolved_data=smooth, mask=mask)
    x = np.asarray(cat.x_centroid, dtype=np.float64)
    y = np.asarray(cat.y_centroid, dtype=np.float64)
    bx = np.asarray(cat.bbox_xmax - cat.bbox_xmin + 1, dtype=np.float64)
    by = np.asarray(cat.bbox_ymax - cat.bbox_ymin + 1, dtype=np.float64)
    # A segment with no positive flux has no centroid: use the middle of its bounding box.
    bad = ~(np.isfinite(x) & np.isfinite(y))
    x[bad] = (cat.bbox_xmin[bad] + cat.bbox_xmax[bad]) / 2.0
    y[bad] = (cat.bbox_ymin[bad] + cat.bbox_ymax[bad]) / 2.0
    with warnings.catch_warnings():  # chip gaps wider than the kernel stay NaN: not in segments
        warnings.simplefilter("ignore")
        raw = convolve(data, kernel, boundary="extend", nan_treatment="interpolate")
    peaks = ndimage.maximum_position(raw, segm.data, cat.labels)
    py, px = (np.array([p[i] for p in peaks], dtype=np.int64) for i in (0, 1))
    return x, y, np.hypot(bx, by), px, py


def _windows(x, y, extent, *, offset, scale, min_size, max_size) -> np.ndarray:
    side = np.clip(np.rint(scale * extent), min_size, max_size).astype(np.int64)
    out = np.empty((x.size, 4), dtype=np.int64)
    out[:, 0] = np.floor(x + offset[1] - (side - 1) / 2.0 + 0.5)
    out[:, 1] = np.floor(y + offset[0] - (side - 1) / 2.0 + 0.5)
    out[:, 2] = out[:, 3] = side
    return out


def _detect(data2d, *, offset, **opts):
    """Windows (unsorted, image coordinates) and peak pixels (image coordinates)."""
    opts = detection_options(**opts)
    data = np.asarray(data2d, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"detection needs a 2-D array, got shape {data.shape}")
    found = _sources(data, nsigma=opts["nsigma"], npixels=opts["npixels"], deblend=opts["deblend"])
    if found is None:
        return _EMPTY.copy(), np.zeros(0, np.int64), np.zeros(0, np.int64)
    x, y, extent, px, py = found
    windows = _windows(
        x,
        y,
        extent,
        offset=offset,
        scale=opts["scale"],
        min_size=opts["min_size"],
        max_size=opts["max_size"],
    )
    return windows, px + offset[1], py + offset[0]


def detect_windows(
    data2d: np.ndarray,
    *,
    offset: tuple[int, int] = (0, 0),
    nsigma: float | None = None,
    npixels: int | None = None,
    deblend: bool | None = None,
    scale: float | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
) -> np.ndarray:
    """Detect sources in a 2-D array; one window per source, in image coordinates.

    Parameters
    ----------
    data2d : (h, w) array
        Pixels of a read box; NaN / inf are masked.
    offset : (ry0, rx0)
        Position of ``data2d[0, 0]`` in the image, added to the windows.
    nsigma, npixels, deblend, scale, min_size, max_size
        Detection settings; ``None`` takes ``elodin.cutouts.detect-nsigma``,
        ``detect-npixels``, ``deblend``, ``blob-scale``, ``min-size``, ``max-size``.

    Returns
    -------
    (N, 4) int64 windows ``x0, y0, w, h``, square, centred on the sources' centroids (they may
    pass the image edge: padded by the reader), sorted row-major.
    """
    windows, _, _ = _detect(
        data2d,
        offset=offset,
        nsigma=nsigma,
        npixels=npixels,
        deblend=deblend,
        scale=scale,
        min_size=min_size,
        max_size=max_size,
    )
    return windows[np.lexsort((windows[:, 0], windows[:, 1]))]


def _detection_band(block: np.ndarray) -> np.ndarray:
    """One 2-D array from a (bands, h, w) read: the mean of the finite bands."""
    block = np.asarray(block, dtype=np.float64)
    if block.ndim == 2:
        return block
    if block.shape[0] == 1:
        return block[0]
    finite = np.isfinite(block)
    n = finite.sum(axis=0)
    total = np.where(finite, block, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def detect_tile(source, core_box: Sequence[int], read_box: Sequence[int], **opts) -> np.ndarray:
    """Windows of the sources a tile claims.

    Reads ``read_box = (ry0, ry1, rx0, rx1)`` through ``source.read`` (nothing else), detects,
    and keeps the sources whose peak pixel lies in ``core_box = (ty0, ty1, tx0, tx1)``.
    Pure apart from that read, so the fingerprint stage can run it as one task per tile and
    hand the union to :func:`pipeline.tiling.assign_windows`. With a halo of at least
    ``max_size`` every returned window lies inside the read box, except where the image edge
    cuts it.
    """
    ty0, ty1, tx0, tx1 = (int(v) for v in core_box)
    ry0, ry1, rx0, rx1 = (int(v) for v in read_box)
    data = _detection_band(source.read(ry0, ry1, rx0, rx1))
    windows, px, py = _detect(data, offset=(ry0, rx0), **opts)
    claimed = (px >= tx0) & (px < tx1) & (py >= ty0) & (py < ty1)
    windows = windows[claimed]
    return windows[np.lexsort((windows[:, 0], windows[:, 1]))]


def detection_tiles(shape, *, tile_size: int, halo: int) -> tuple[np.ndarray, np.ndarray]:
    """Core boxes and read boxes (core grown by ``halo``, clipped), each ``(T, 4)``
    ``y0, y1, x0, x1``. ``halo`` is rounded up to whole background boxes."""
    ny, nx = (int(v) for v in tuple(shape)[-2:])
    halo = -(-int(halo) // BOX_SIZE) * BOX_SIZE
    cores = tile_grid((ny, nx), tile_size=tile_size)
    reads = cores.copy()
    reads[:, 0] = np.maximum(cores[:, 0] - halo, 0)
    reads[:, 1] = np.minimum(cores[:, 1] + halo, ny)
    reads[:, 2] = np.maximum(cores[:, 2] - halo, 0)
    reads[:, 3] = np.minimum(cores[:, 3] + halo, nx)
    return cores, reads


def detect_plan(
    sources,
    *,
    client=None,
    image_index: int = 0,
    tile_size: int | None = None,
    halo: int | None = None,
    **opts,
) -> Plan:
    """Blob plan of one image or several: the planner the fingerprint stage runs.

    One detection task per tile (:func:`detect_tile`; on ``client``'s workers when given,
    serially otherwise), then, on the caller, windows passing the image edge are shifted
    inward (:func:`shift_inside`) and each window is given to the tile that owns its centre
    (:func:`pipeline.tiling.assign_windows`).

    Parameters
    ----------
    sources : ImageSource or sequence of ImageSource
    client : distributed.Client, optional
        Where the detection tasks run; ``None`` runs them here, one after another.
    image_index : int
        Plan index of the first source (the next ones follow).
    tile_size : int, optional
        Default ``elodin.tiling.tile-size``.
    halo : int, optional
        Defaults to ``max_size`` (so a source whose window fits is seen whole); smaller values
        are raised to it.
    **opts
        Detection settings (:func:`detection_options`).
    """
    import functools

    if not isinstance(sources, Sequence):
        sources = [sources]
    tile_size = config.get_int("tiling.tile-size", override=tile_size, minimum=1)
    resolved = detection_options(**opts)
    halo = max(int(halo or 0), resolved["max_size"])
    detect = functools.partial(detect_tile, **resolved)
    boxes = [detection_tiles(s.shape, tile_size=tile_size, halo=halo) for s in sources]
    if client is not None:
        # Every image's tasks are submitted before any is gathered, so they all run at once.
        pending = [
            client.map(detect, [s] * len(c), list(map(tuple, c)), list(map(tuple, r)), pure=False)
            for s, (c, r) in zip(sources, boxes, strict=True)
        ]
    plans = []
    for i, (s, (cores, reads)) in enumerate(zip(sources, boxes, strict=True)):
        if client is not None:
            found = client.gather(pending[i])
        else:
            found = [detect(s, c, r) for c, r in zip(cores, reads, strict=True)]
        windows = shift_inside(np.concatenate(found) if found else _EMPTY, s.shape)
        logger.info("image %s: %d sources detected in %d tiles", s.id, len(windows), len(cores))
        plans.append(
            assign_windows(
                windows, s.shape, tile_size=tile_size, image_index=image_index + i, image_id=s.id
            )
        )
    return Plan.concat(plans)
