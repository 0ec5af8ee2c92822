"""Small synthetic fingerprint stores for the analysis tests, built with the real Store API.

``build_store`` writes given feature rows into a real Zarr store the way the fingerprint stage
does: tiles packed into chunk-aligned work units (:func:`pipeline.store.pack_units`), so rows
of unit ends are empty slots (``valid == False``, NaN fingerprints), each unit's chunks written
with ``write_rows`` and marked done. ``append_rows`` adds a segment to an existing store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pipeline.store import Store, pack_units

__all__ = [
    "CLASSES",
    "append_rows",
    "build_store",
    "make_labelled_sources",
    "render_source",
    "store_digest",
]

ATTRS = {
    "model": "synthetic",
    "model_sha256": "0" * 64,
    "cutouts": {"method": "sliding", "size": 16, "fill": 0.0},
    "preprocess": {},
    "tiling": {"tile-size": 64},
    "fingerprint_dtype": "float32",
}


def store_digest(path: str | Path) -> str:
    """Hash of every file of a store: equal digests mean byte-identical stores."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _default_coords(n: int, offset: int, image: str) -> dict[str, np.ndarray]:
    # A grid of 16-pixel windows, 8 per row, on an image with a TAN-like 1"/pix scale near
    # RA 150, Dec 2: close enough to a real WCS for the footprint checks.
    i = np.arange(offset, offset + n)
    x = 8.0 + 16 * (i % 8) + 7.5 - 8
    y = 8.0 + 16 * (i // 8) + 7.5 - 8
    scale = 1.0 / 3600
    dec = 2.0 + y * scale
    ra = 150.0 - x * scale / np.cos(np.deg2rad(dec))
    return {
        "image": np.full(n, image, dtype=object),
        "x": x,
        "y": y,
        "width": np.full(n, 16, np.int32),
        "height": np.full(n, 16, np.int32),
        "ra": ra,
        "dec": dec,
    }


def append_rows(
    store: Store,
    features: np.ndarray,
    *,
    tile: int = 13,
    image: str = "img0",
    coords: Mapping[str, np.ndarray] | None = None,
    top_class: np.ndarray | None = None,
    done: bool = True,
    inputs: Mapping | None = None,
) -> np.ndarray:
    """Append ``features`` (n, D) as one new segment; returns the store row of each input row.

    Tiles of ``tile`` windows are packed into units, so unit ends hold empty slots.
    """
    features = np.asarray(features, dtype=np.float32)
    n, d = features.shape
    tile_start = np.r_[np.arange(0, n, tile), n].astype(np.int64)
    layout = pack_units(tile_start, chunk_rows=store.chunk_rows)
    offset = (
        sum(int(np.count_nonzero(v)) for _, v in store.iter_blocks("valid")) if store.n_rows else 0
    )
    seg = store.append_segment(
        images=[image],
        layout=layout,
        plan_digest=hashlib.sha256(features.tobytes()).hexdigest(),
        inputs=inputs
        or {image: {"files": [{"path": f"{image}.fits"}], "shape": [256, 256], "bands": 1}},
    )
    coords = dict(coords) if coords is not None else _default_coords(n, offset, image)
    k = store.array("top_class").shape[1]
    if top_class is None:
        top_class = np.tile(np.arange(k, dtype=np.int32), (n, 1))
    rows = layout.window_rows() + seg.row_start
    for u in range(layout.n_units):
        w0, w1 = int(layout.unit_windows[u]), int(layout.unit_windows[u + 1])
        r0, r1 = int(layout.unit_rows[u]), int(layout.unit_rows[u + 1])
        m, size = w1 - w0, r1 - r0

        def pad(values, fill, dtype, tail=(), size=size, m=m, w0=w0, w1=w1):
            out = np.full((size, *tail), fill, dtype=dtype)
            out[:m] = values[w0:w1]
            return out

        values = {
            "fingerprint": pad(features, np.nan, np.float32, (d,)),
            "top_class": pad(np.asarray(top_class, np.int32), -1, np.int32, (k,)),
            "top_prob": pad(np.full((n, k), 1.0 / k, np.float32), np.nan, np.float32, (k,)),
            "masked_fraction": pad(np.zeros(n, np.float32), np.nan, np.float32),
            "valid": np.arange(size) < m,
            "image": pad(np.asarray(coords["image"], dtype=object), "", object),
            "x": pad(np.asarray(coords["x"], np.float64), np.nan, np.float64),
            "y": pad(np.asarray(coords["y"], np.float64), np.nan, np.float64),
            "width": pad(np.asarray(coords["width"], np.int32), 0, np.int32),
            "height": pad(np.asarray(coords["height"], np.int32), 0, np.int32),
            "ra": pad(np.asarray(coords["ra"], np.float64), np.nan, np.float64),
            "dec": pad(np.asarray(coords["dec"], np.float64), np.nan, np.float64),
        }
        store.write_rows(seg.row_start + r0, values)
        if done:
            store.mark_done(seg.unit_start + u)
    return rows


def build_store(
    path: str | Path,
    features: np.ndarray,
    *,
    chunk_rows: int = 16,
    tile: int = 13,
    topk: int = 5,
    attrs: Mapping | None = None,
    **kwargs,
) -> tuple[Store, np.ndarray]:
    """A new store holding ``features`` as one segment; returns it and the row of each input row."""
    features = np.asarray(features, dtype=np.float32)
    store = Store.create(
        path,
        feature_dim=features.shape[1],
        topk=topk,
        chunk_rows=chunk_rows,
        attrs={**ATTRS, "feature_dim": features.shape[1], "topk": topk, **dict(attrs or {})},
    )
    rows = append_rows(store, features, tile=tile, **kwargs)
    return store, rows


# ----------------------------------------------------------------- labelled synthetic sources
CLASSES = ("disc", "spheroid", "point", "blank")


def render_source(
    kind: str,
    rng: np.random.Generator,
    *,
    side: int = 64,
    flux=(3e3, 3e4),
    jitter: float = 4.0,
    sky: float = 100.0,
    noise: float = 3.0,
) -> np.ndarray:
    """One ``side`` x ``side`` image of a labelled source made with astropy.modeling.

    ``disc``: Sersic n = 1 (r_eff 6-10 px, ellipticity 0.3-0.7); ``spheroid``: Sersic n = 4
    (r_eff 3-6 px, ellipticity 0-0.3); ``point``: a Gaussian PSF (sigma 1.5 px); ``blank``: sky
    only. Every source has a total flux drawn log-uniformly from ``flux`` (the same range for
    every class, so classes differ by shape, not brightness), a random orientation and a
    centre offset by up to ``jitter`` pixels; Gaussian sky noise on a flat sky.
    """
    from astropy.modeling.models import Gaussian2D, Sersic2D

    yy, xx = np.mgrid[0:side, 0:side].astype(float)
    cx, cy = side / 2 - 0.5 + rng.uniform(-jitter, jitter, 2)
    theta = rng.uniform(0, np.pi)
    if kind == "disc":
        prof = Sersic2D(
            amplitude=1,
            r_eff=rng.uniform(6, 10),
            n=1,
            x_0=cx,
            y_0=cy,
            ellip=rng.uniform(0.3, 0.7),
            theta=theta,
        )(xx, yy)
    elif kind == "spheroid":
        prof = Sersic2D(
            amplitude=1,
            r_eff=rng.uniform(3, 6),
            n=4,
            x_0=cx,
            y_0=cy,
            ellip=rng.uniform(0, 0.3),
            theta=theta,
        )(xx, yy)
    elif kind == "point":
        prof = Gaussian2D(amplitude=1, x_mean=cx, y_mean=cy, x_stddev=1.5, y_stddev=1.5)(xx, yy)
    elif kind == "blank":
        prof = np.zeros((side, side))
    else:
        raise ValueError(kind)
    if prof.sum() > 0:
        prof = prof / prof.sum() * np.exp(rng.uniform(np.log(flux[0]), np.log(flux[1])))
    return (prof + sky + rng.normal(0, noise, (side, side))).astype(np.float32)


def make_labelled_sources(
    directory: str | Path, *, per_class: int = 40, seed: int = 3, **kwargs
) -> tuple[list[str], np.ndarray]:
    """Write ``per_class`` FITS images of each class of :data:`CLASSES` into ``directory``.

    Returns the paths and the class number of each (index into :data:`CLASSES`).
    """
    from astropy.io import fits

    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    for label, kind in enumerate(CLASSES):
        for i in range(per_class):
            path = directory / f"{kind}_{i:03d}.fits"
            fits.PrimaryHDU(render_source(kind, rng, **kwargs)).writeto(path, overwrite=True)
            paths.append(str(path))
            labels.append(label)
    return paths, np.asarray(labels)
