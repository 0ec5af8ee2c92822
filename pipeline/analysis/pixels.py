"""The pixel baseline: each valid row's window read back from its source image, cut and
stretched as the fingerprint stage cut and stretched it (:class:`PixelFeatures`), the
feature space ``pixels`` that ``elodin reduce --features pixels`` and ``elodin cluster
--features pixels`` compare fingerprints with."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..store import Store
from . import _base

__all__ = ["PixelFeatures"]


@dataclasses.dataclass(frozen=True)
class PixelFeatures:
    """Reads the stretched pixels of each valid row's window from its source image.

    Picklable (sources are), so each block is read on a worker. Windows are cut as the
    fingerprint stage cut them (``x0 = x - (w - 1) / 2``; parts outside the image take the
    store's ``cutouts.fill``), stretched with the store's preprocessing, and resampled to
    ``side`` x ``side``; grey (one channel) when every image has one band, RGB otherwise.
    """

    store: str
    sources: Mapping[str, Any]
    preprocess: Mapping[str, Any]
    image_limits: Mapping[str, Any]
    fill: float
    side: int
    channels: int

    @property
    def n_features(self) -> int:
        return self.channels * self.side * self.side

    @classmethod
    def from_store(cls, store: Store, *, side: int) -> PixelFeatures:
        from ..cutouts import CutoutReader

        reader = CutoutReader.from_store(store, require_sources=True)
        # Sent to the workers with the features: a plain dict, not the store's lazy mapping.
        sources = dict(reader.sources)
        bands = [int(src.n_bands) for src in sources.values()]
        channels = 1 if bands and all(b == 1 for b in bands) else 3
        limits = reader.all_limits()
        return cls(store.path, sources, reader.preprocess, limits, reader.fill, int(side), channels)

    def block(self, start: int, stop: int) -> np.ndarray:
        """Features ``(stop - start, n_features)`` float32; NaN rows for empty slots."""
        group = Store.zarr(self.store)
        valid = np.asarray(group["valid"][start:stop], bool)
        out = np.full((stop - start, self.n_features), np.nan, np.float32)
        if not valid.any():
            return out
        coords = {k: group[k][start:stop] for k in ("image", "x", "y", "width", "height")}
        images = _base.to_str(coords["image"])
        for img in np.unique(images[valid]):
            rows = np.flatnonzero(valid & (images == img))
            out[rows] = self._image_rows(img, coords, rows)
        return out

    def _image_rows(
        self, img: str, coords: Mapping[str, np.ndarray], rows: np.ndarray
    ) -> np.ndarray:
        from ..cutouts import CutoutReader
        from ..geometry import windows_from_centres

        windows = windows_from_centres(
            *(np.asarray(coords[k])[rows] for k in ("x", "y", "width", "height"))
        )
        reader = CutoutReader(
            self.sources, preprocess=self.preprocess, fill=self.fill, image_limits=self.image_limits
        )
        cut = reader.stretched(img, windows, side=self.side, channels=self.channels)
        return cut.reshape(len(rows), -1)

    def array(self, *, block: int, n_rows: int):
        """The features of every row as a lazy dask array, one task per ``block`` rows."""
        import dask.array as da
        from dask import delayed

        parts = []
        for start in range(0, n_rows, block):
            stop = min(n_rows, start + block)
            parts.append(
                da.from_delayed(
                    delayed(self.block)(start, stop),
                    shape=(stop - start, self.n_features),
                    dtype=np.float32,
                )
            )
        if not parts:
            return da.zeros((0, self.n_features), dtype=np.float32)
        return da.concatenate(parts)
