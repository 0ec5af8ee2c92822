"""The index in the store: chunked, uncompressed bytes, each chunk with its SHA-256.

``neighbor_index(index_byte)`` holds :func:`faiss.serialize_index`'s bytes (16 MiB chunks,
uncompressed: they barely compress and a query process must not pay for decompressing) and
``neighbor_index_ids(index_position)`` the store row of each indexed vector; an ``ivfpq``
index also keeps its IVF-PQ part alone in ``neighbor_index_base`` (codes and lists, ~24 B a
vector), which a one-off query loads instead of the whole (152 B a vector) and re-ranks its
candidates from ``pca`` (:func:`load_base`). Every byte array carries its SHA-256 and one per
chunk in its attrs (:func:`_write_bytes`), checked on load with the chunks on parallel threads
(:func:`_read_checked`): a damaged index is refused, never half-used. The attrs of
``neighbor_index`` go last, so an index cut short by a crash fails its checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...errors import StoreError
from ...store import Store
from .. import _base
from .estimator import _CACHE, NeighborIndex, _faiss

__all__ = ["BASE_VAR", "IDS_VAR", "INDEX_VAR", "load_base", "load_index", "save_index"]

INDEX_VAR = "neighbor_index"
IDS_VAR = "neighbor_index_ids"
BASE_VAR = "neighbor_index_base"
_BYTE_CHUNK = 16 << 20


def _package():
    """The package :mod:`pipeline.analysis.index`, looked up at call time: ``_BYTE_CHUNK``,
    ``_read_checked`` and ``load_index`` are read from it, so replacing them there (as the
    tests do with ``monkeypatch.setattr(index, ...)``) reaches every module of the package."""
    return sys.modules[__package__]


def _write_bytes(group, name: str, blob: np.ndarray, *, dim: str) -> tuple[Any, dict[str, Any]]:
    """``blob`` as the uncompressed byte array ``name`` (dimension ``dim``) of ``group``.

    Returns the array and its digests (``nbytes``, ``sha256``, ``chunk_bytes``,
    ``chunk_sha256``), for the caller to write into its attrs with what else belongs there.
    One SHA-256 per chunk lets :func:`_read_checked` read and check the chunks in parallel
    instead of hashing 10^8 bytes on one thread.
    """
    chunk = max(1, min(len(blob), _package()._BYTE_CHUNK))
    # Uncompressed: FAISS's bytes barely compress, and a query process must not pay for
    # decompressing them.
    arr = group.create_array(
        name,
        shape=(len(blob),),
        dtype="uint8",
        chunks=(chunk,),
        compressors=None,
        dimension_names=(dim,),
        overwrite=True,
    )
    arr[...] = blob
    view = memoryview(blob)
    return arr, {
        "nbytes": len(blob),
        "sha256": hashlib.sha256(view).hexdigest(),
        "chunk_bytes": chunk,
        "chunk_sha256": [
            hashlib.sha256(view[a : a + chunk]).hexdigest() for a in range(0, len(blob), chunk)
        ],
    }


def save_index(
    model: NeighborIndex, store: str | os.PathLike | Store, *, attrs: Mapping | None = None
) -> str:
    """Write ``model`` into ``store`` (:meth:`NeighborIndex.save`); returns its SHA-256.

    ``attrs`` join the index's own (kind, metric, parameters) in the attrs of ``neighbor_index``.
    """
    st = _base.open_store(store)
    blob = model.to_bytes()
    group = Store.zarr(st.path, mode="r+")
    # The bytes' attrs go last: an index cut short by a crash fails its checksum on load.
    ids = group.create_array(
        IDS_VAR,
        shape=(len(model.ids_),),
        dtype="int64",
        chunks=(max(1, min(len(model.ids_), 1 << 22)),),
        dimension_names=("index_position",),
        overwrite=True,
    )
    if len(model.ids_):
        ids[...] = model.ids_
    arr, digests = _write_bytes(group, INDEX_VAR, blob, dim="index_byte")
    sha = digests["sha256"]
    extra: dict[str, Any] = {}
    if model.kind_ == "ivfpq":
        # The IVF-PQ part alone (codes and ids, ~24 B a vector, no full vectors): what a
        # one-off query (`elodin similar`) loads, re-ranking its candidates from `pca`.
        f = _faiss()
        base = f.serialize_index(f.downcast_index(model.index_.base_index))
        barr, bdigests = _write_bytes(group, BASE_VAR, base, dim=f"{BASE_VAR}_byte")
        barr.attrs.update({"of": sha, **bdigests})
        extra["base_sha256"] = bdigests["sha256"]
    arr.attrs.update(
        json.loads(
            json.dumps(
                {
                    **model._meta(),
                    **dict(attrs or {}),
                    "n_rows": int(model.n_indexed),
                    **digests,
                    **extra,
                }
            )
        )
    )
    return sha


def _index_attrs(st: Store) -> dict | None:
    if INDEX_VAR not in _base.names(st):
        return None
    return dict(st.array(INDEX_VAR).attrs.asdict())


def load_index(
    store: str | os.PathLike | Store, *, cache: bool = True
) -> tuple[NeighborIndex, dict]:
    """The saved index and its attrs, checksum verified (cached per process by checksum, so
    the explorer and a Python session query it without reading it again; ``cache=False``:
    a private copy, to extend)."""
    st = _base.open_store(store)
    meta = _index_attrs(st)
    if meta is None:
        raise StoreError(f"{st.path}: no neighbour index; run `elodin index {st.path}` first")
    damaged = f"{st.path}: the neighbour index is damaged"
    fix = f"; run `elodin index {st.path} --rebuild`"
    if not meta.get("sha256") or IDS_VAR not in _base.names(st):
        raise StoreError(f"{damaged} (its write did not finish){fix}")
    key = f"{st.path}:{meta['sha256']}"
    hit = _CACHE.get(key) if cache else None
    if hit is not None:
        return hit, meta
    index = _read_index(st, meta, meta)
    if cache:
        if len(_CACHE) > 4:
            _CACHE.clear()
        _CACHE[key] = index
    return index, meta


def load_base(st: Store, meta: Mapping) -> NeighborIndex | None:
    """The IVF-PQ part of the saved ``ivfpq`` index (no exact vectors: its distances are PQ
    estimates, to be re-ranked), checksum verified; None when there is none (other kinds, an
    index saved before it was kept). Cached per process like :func:`load_index`."""
    if meta.get("kind") != "ivfpq" or not meta.get("base_sha256"):
        return None
    names = _base.names(st)
    if BASE_VAR not in names or IDS_VAR not in names:
        return None
    key = f"{st.path}:{meta['sha256']}:base"
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    bmeta = dict(st.array(BASE_VAR).attrs.asdict())
    if bmeta.get("of") != meta["sha256"] or bmeta.get("sha256") != meta["base_sha256"]:
        return None  # left by another index: not this one's
    index = _read_index(st, meta, bmeta, name=BASE_VAR)
    index.kind_ = "ivfpq-codes"
    if len(_CACHE) > 4:
        _CACHE.clear()
    _CACHE[key] = index
    return index


def _read_index(
    st: Store, meta: Mapping, saved: Mapping, *, name: str = INDEX_VAR
) -> NeighborIndex:
    """The index saved in array ``name`` (its attrs ``saved``), checksum verified and
    deserialised; anything wrong is one StoreError line saying to rebuild."""
    damaged = f"{st.path}: the neighbour index is damaged"
    fix = f"; run `elodin index {st.path} --rebuild`"
    try:
        blob, intact = _package()._read_checked(st, saved, name=name)
        ids = np.asarray(st.array(IDS_VAR)[...], np.int64)
    except Exception as e:  # zarr raises several types for a missing or corrupt chunk
        raise StoreError(f"{damaged} ({type(e).__name__}: {e}){fix}") from None
    if not intact:
        raise StoreError(f"{damaged} (its checksum does not match){fix}")
    try:
        return NeighborIndex._from(blob, ids, meta)
    except (RuntimeError, ValueError, KeyError) as e:
        raise StoreError(f"{damaged} ({' '.join(str(e).split())[:120]}){fix}") from None


def _read_checked(st: Store, meta: Mapping, *, name: str = INDEX_VAR) -> tuple[np.ndarray, bool]:
    """The saved bytes of array ``name`` and whether they are the ones saved.

    Each chunk is read and hashed on its own thread (file reads and hashlib release the
    GIL), against the per-chunk SHA-256 recorded by :func:`_write_bytes`; an index
    saved before those were recorded is checked against its one SHA-256.
    """
    from concurrent.futures import ThreadPoolExecutor

    arr = st.array(name)
    n = int(arr.shape[0])
    if n != meta.get("nbytes"):
        return np.zeros(0, np.uint8), False
    chunk, digests = meta.get("chunk_bytes"), meta.get("chunk_sha256")
    if not chunk or not digests:
        blob = np.asarray(arr[...], np.uint8)
        return blob, hashlib.sha256(blob.tobytes()).hexdigest() == meta["sha256"]
    chunk = int(chunk)
    if len(digests) != -(-n // chunk):
        return np.zeros(0, np.uint8), False
    blob = np.empty(n, np.uint8)

    def one(i: int) -> bool:
        a = i * chunk
        part = np.asarray(arr[a : a + chunk], np.uint8)
        blob[a : a + len(part)] = part
        return hashlib.sha256(part).hexdigest() == digests[i]

    with ThreadPoolExecutor(min(len(digests), os.cpu_count() or 1, 8)) as pool:
        ok = all(pool.map(one, range(len(digests))))
    return blob, ok
