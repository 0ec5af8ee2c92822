"""The run's inputs as a listing, and which of them the store already holds.

Expanding globs, directories and ``@lists`` and one ``stat`` per file is all the client does
per input: no image is opened here. :func:`compare_with_records` then tells the known images
from the new and the changed in one vectorised pass over the store's images table.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from ..store import Store

__all__ = ["InputListing", "compare_with_records"]


@dataclasses.dataclass(frozen=True)
class InputListing:
    """The run's inputs as a listing: image ids, their input specs and their files' size and
    mtime, found without opening any image. Image ``k`` owns files
    ``file_start[k]:file_start[k + 1]``."""

    ids: tuple[str, ...]
    specs: tuple[tuple[str, ...], ...]
    file_start: np.ndarray
    paths: np.ndarray
    sizes: np.ndarray
    mtimes: np.ndarray

    @classmethod
    def of(cls, inputs: Sequence[str | os.PathLike]) -> InputListing:
        from ..sources import list_images, spec_path

        listed = list_images(list(inputs))
        paths = [spec_path(spec) for _, specs in listed for spec in specs]
        sizes, mtimes = _stat_files(paths)
        counts = [len(specs) for _, specs in listed]
        return cls(
            ids=tuple(sid for sid, _ in listed),
            specs=tuple(specs for _, specs in listed),
            file_start=np.r_[0, np.cumsum(counts)].astype(np.int64),
            paths=np.asarray(paths, dtype=object),
            sizes=sizes,
            mtimes=mtimes,
        )

    def files(self, k: int) -> list[dict]:
        """Image ``k``'s files as the store records them."""
        lo, hi = int(self.file_start[k]), int(self.file_start[k + 1])
        return [
            {"path": str(self.paths[j]), "size": int(self.sizes[j]), "mtime": float(self.mtimes[j])}
            for j in range(lo, hi)
        ]


def _stat_files(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Size (-1: unknown) and mtime (POSIX seconds, NaN: unknown) of each file: a stat each,
    no file opened. Local paths go through ``os.stat`` (what fsspec's local ``info`` reports)."""
    from ..store import parse_mtime

    sizes = np.full(len(paths), -1, np.int64)
    mtimes = np.full(len(paths), np.nan)
    for j, p in enumerate(paths):
        try:
            if "://" not in p:
                st = os.stat(p)
                sizes[j], mtimes[j] = st.st_size, st.st_mtime
                continue
            import fsspec

            fs, root = fsspec.core.url_to_fs(p)
            info = fs.info(root)
            sizes[j] = int(info.get("size") or 0)
            mtimes[j] = parse_mtime(info.get("mtime") or info.get("LastModified"))
        except (OSError, ValueError):
            pass
    return sizes, mtimes


def compare_with_records(store: Store | None, listing: InputListing) -> tuple[dict, list[str]]:
    """Which listed images the store knows, and which of those changed.

    One vectorised comparison of (id, path, size, mtime) with the records in use: returns
    ``known`` (image id -> its segment) and ``changed`` (known ids whose files differ in number,
    path, size or mtime), in listing order.
    """
    if store is None or not listing.ids:
        return {}, []
    table = store.images()
    cur = table.current()
    if not len(cur):
        return {}, []
    rec_ids = table.ids[cur].astype(str)
    order = np.argsort(rec_ids, kind="stable")
    ids = np.asarray(listing.ids)
    pos = np.clip(np.searchsorted(rec_ids[order], ids), 0, len(order) - 1)
    found = rec_ids[order][pos] == ids
    rec = np.where(found, cur[order[pos]], -1)  # table row of each listed image
    f0, f1 = table.column("file_start"), table.column("file_stop")
    n_listed = np.diff(listing.file_start)
    same_count = found & ((f1[rec] - f0[rec]) == n_listed)
    # File j of listed image k against file j - file_start[k] of its record.
    owner = np.repeat(np.arange(len(ids)), n_listed)
    check = same_count[owner]
    j = np.flatnonzero(check)
    k = owner[j]
    rj = f0[rec[k]] + (j - listing.file_start[k])
    differs = np.zeros(len(owner), bool)
    if len(j):
        r_path, r_size = table.column("file_path")[rj], table.column("file_size")[rj]
        r_mtime = table.column("file_mtime")[rj]
        m = listing.mtimes[j]
        same_mtime = (r_mtime == m) | (np.isnan(r_mtime) & np.isnan(m))
        differs[j] = (r_path != listing.paths[j]) | (r_size != listing.sizes[j]) | ~same_mtime
    changed_files = np.bincount(owner, weights=differs, minlength=len(ids)) > 0
    changed = found & (~same_count | changed_files)
    segment = table.column("segment")
    known = {listing.ids[i]: int(segment[rec[i]]) for i in np.flatnonzero(found)}
    return known, [listing.ids[i] for i in np.flatnonzero(changed)]
