"""``fingerprint()``: the whole run, one named step after another.

Each step is a function of this module or of the module that owns its idea (``settings``,
``listing``, ``probe``, ``plan``, ``submit``, ``worker``); :func:`fingerprint` reads as the
flow: listing -> compare with the store's records -> (nothing new: return) -> open and
measure the new images on the cluster -> plan -> create / grow the store -> units -> run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError, StoreError
from ..sources import ImageSource
from ..store import Store, chunk_rows_for
from ..tiling import Plan
from .listing import InputListing, compare_with_records
from .plan import _plan_sources, _record_segment
from .probe import ProbedSources, open_and_measure
from .settings import FingerprintSettings
from .submit import (
    UnitStream,
    _check_gpu_workers,
    _cluster_threads,
    _model_ref,
    _run_jobs,
    done_in,
)

__all__ = ["FingerprintResult", "fingerprint"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FingerprintResult:
    """What a run did: its store, the cutouts of its inputs, units run and already done,
    the images (listing order) and how many changed ones were fingerprinted again."""

    store: str
    n_cutouts: int
    units_run: int
    units_skipped: int
    images: tuple[str, ...]
    retired: int = 0

    def __str__(self) -> str:
        text = (
            f"{self.store}: {self.n_cutouts} cutouts from {len(self.images)} image(s); "
            f"{self.units_run} work unit(s) run, {self.units_skipped} already done"
        )
        return text + (
            f"; {self.retired} changed image(s) fingerprinted again" if self.retired else ""
        )


@dataclasses.dataclass(frozen=True)
class _Model:
    """The run's model, resolved once: its card, its ONNX file and that file's sha256."""

    card: Any
    onnx_path: Any
    sha: str


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """The listing sorted against the store: ``known`` (image id -> its segment, changed ones
    included), ``changed`` ids, the ``touched`` segments (those holding a known, unchanged
    image: they are resumed if unfinished), and listing positions to open."""

    listing: InputListing
    known: dict
    changed: list[str]
    touched: list[int]
    new: list[int]  # listing positions of the images the store does not know
    changed_positions: list[int]
    to_open: list[int]  # the new ones, and the changed ones when they are to be replaced


def fingerprint(
    inputs: Sequence[str | os.PathLike],
    store: str | os.PathLike,
    *,
    method: str | None = None,
    size: int | None = None,
    stride: int | None = None,
    edge: str | None = None,
    catalog: str | None = None,
    model: str | None = None,
    batch_size: int | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    gpu: bool | None = None,
    tile_size: int | None = None,
    chunk_rows: int | None = None,
    hdu: int | str | None = None,
    variable: str | None = None,
    progress: bool = True,
    client=None,
    replace_changed: bool = False,
) -> FingerprintResult:
    """Fingerprint every cutout of ``inputs`` into the store at ``store``.

    Parameters mirror ``elodin fingerprint``; ``None`` means the configured default. Pass a
    :class:`distributed.Client` as ``client`` to use a cluster you manage; otherwise one is
    started from ``scheduler`` (``local`` by default) and closed at the end.

    With ``replace_changed`` (``elodin run --incremental``), an input whose file changed since
    it was fingerprinted has its old rows retired (``valid = False``) and is fingerprinted again;
    without it such an input is refused.

    Returns
    -------
    FingerprintResult
        Rows written, units run and skipped.
    """
    settings = FingerprintSettings.from_config(
        method=method,
        size=size,
        stride=stride,
        edge=edge,
        model=model,
        batch_size=batch_size,
        gpu=gpu,
        tile_size=tile_size,
        chunk_rows=chunk_rows,
    )
    # A listing (globs, directories, @lists expanded; sizes and mtimes), no image opened:
    # only the images the store does not know yet are opened, under the lock, on the workers.
    listing = InputListing.of(inputs)
    if not listing.ids:
        raise InputError("no input images")
    resolved, settings = _resolve_model(settings)
    attrs = _store_attrs(resolved, settings)
    store_path = str(store)
    # One writer at a time: a second run into the same store is refused with one line naming
    # the holder; the lock is given back however this run ends (error, Ctrl-C).
    with Store.lock(store_path):
        existing = _open_existing(store_path)
        found = _sort_inputs(existing, listing, replace_changed=replace_changed)
        check_store = functools.partial(
            _check_store, existing, attrs, found, store_path, replace_changed=replace_changed
        )
        if not found.to_open:
            check_store()
            if (result := _nothing_to_do(existing, found, store_path)) is not None:
                return result  # no cluster started, no image opened, nothing written
        with _compute(client, scheduler, workers, progress, settings) as client:
            # Headers, WCS, bands and stretch limits (an all-NaN image is refused here),
            # batched tasks on the workers; recorded, so a resume and the report stretch
            # with the same limits.
            new, limits = open_and_measure(
                client,
                listing,
                found.new,
                found.changed_positions if replace_changed else [],
                hdu=hdu,
                variable=variable,
                preprocess=settings.preprocess,
                check_store=check_store if found.to_open else lambda: None,
                progress=progress,
            )
            plan = _plan_sources(client, new, settings.as_dict(), catalog, 0) if new else None
            st, touched = _grow_store(
                existing, store_path, plan, new, limits, found, settings, attrs, client, progress
            )
            # Recorded in the store, which the units read back a segment at a time: a catalog
            # or blob plan is data per window, and is not held here while they run.
            del plan, limits
            units = _units(st, touched, new, settings, resolved, client)
            _run_jobs(client, units, gpu=settings.gpu, progress=progress)
    return FingerprintResult(
        store_path,
        units.n_windows,
        units.made,
        units.n_units - units.made,
        listing.ids,
        retired=len(found.changed),
    )


# ------------------------------------------------------------------------------- the steps
def _resolve_model(settings: FingerprintSettings) -> tuple[_Model, FingerprintSettings]:
    """The model's card and ONNX file (exported once, cached). A user card may leave the
    feature length out, and a user model may have fewer classes than top-k asks for: the
    model itself is asked, once (the settings returned have top-k lowered to what it has)."""
    from ..models import resolve
    from ..models.export import ensure_onnx
    from ..models.zoo import sha256_file

    card = resolve(settings.model)
    onnx_path = ensure_onnx(card, precision=settings.precision)
    if not card.builtin:
        from ..models.runtime import Session

        probe = Session(onnx_path, providers=["CPUExecutionProvider"], threads=1, topk=1)
        out = probe.infer(np.zeros((1, 3, 64, 64), np.float32), logits=True)
        card = dataclasses.replace(card, feature_dim=int(out.features.shape[1]))
        if out.logits is not None:
            topk = min(settings.topk, int(out.logits.shape[1]))
            settings = dataclasses.replace(settings, topk=topk)
    return _Model(card, onnx_path, sha256_file(onnx_path)), settings


def _store_attrs(model: _Model, settings: FingerprintSettings) -> dict:
    """What the store records of the run, and refuses to mix with another run's."""
    from .. import __version__
    from ..models.recorded import record_name

    return {
        "model": record_name(model.card.name, settings.precision),
        "model_sha256": model.sha,
        "feature_dim": model.card.feature_dim,
        **settings.to_attrs(),
        "pipeline_version": __version__,
    }


def _open_existing(store_path: str) -> Store | None:
    """The store at ``store_path`` opened for writing, or None when there is none yet (or only
    an interrupted creation, which is made again)."""
    exists = Store.exists(store_path) and not Store.incomplete(store_path)
    return Store.open(store_path, mode="r+") if exists else None


def _sort_inputs(
    existing: Store | None, listing: InputListing, *, replace_changed: bool
) -> _Inputs:
    """Known, changed and new images, from the listing and the store's records alone."""
    known, changed = compare_with_records(existing, listing)
    # A changed input is fingerprinted again as new, after its old rows are retired; the
    # segments holding the other known images are resumed if they are unfinished.
    touched = sorted({seg for img, seg in known.items() if img not in changed})
    new = [k for k, img in enumerate(listing.ids) if img not in known]
    again = set(changed)
    changed_positions = [k for k, img in enumerate(listing.ids) if img in again]
    to_open = sorted([*new, *changed_positions]) if replace_changed else new
    return _Inputs(listing, known, changed, touched, new, changed_positions, to_open)


def _check_store(
    existing: Store | None, attrs: dict, found: _Inputs, store_path: str, *, replace_changed: bool
) -> None:
    """Refuse a store made with another model or settings, and changed inputs unless they are
    to be replaced."""
    if existing is not None:
        existing.check_compatible(attrs)
    if found.changed and not replace_changed:
        img = found.changed[0]
        listing = found.listing
        k = listing.ids.index(img)
        raise StoreError(
            f"{store_path}: input {img} ({listing.paths[listing.file_start[k]]}) "
            "changed since it was fingerprinted; use a new store or `elodin run --incremental`"
        )


def _nothing_to_do(
    existing: Store | None, found: _Inputs, store_path: str
) -> FingerprintResult | None:
    """The result of a run with nothing new and nothing left to resume (None otherwise)."""
    if existing is None:
        return None
    done = done_in(existing, found.touched)
    segs = existing.segments
    for i in found.touched:
        if not all(u in done for u in range(segs[i].unit_start, segs[i].unit_stop)):
            return None
    units = sum(segs[i].unit_stop - segs[i].unit_start for i in found.touched)
    n = sum(segs[i].n_windows for i in found.touched)
    return FingerprintResult(store_path, n, 0, units, found.listing.ids)


def _compute(client, scheduler, workers, progress: bool, settings: FingerprintSettings):
    """The cluster to run on: ``client`` as given (left open), else one started here and
    closed at the end; a GPU run is checked to be able to run at all."""

    @contextlib.contextmanager
    def ctx():
        from ..compute import connect

        outer = (
            contextlib.nullcontext(client)
            if client is not None
            else connect(scheduler, workers=workers, quiet=not progress, gpu=settings.gpu)
        )
        with outer as c:
            if settings.gpu:
                _check_gpu_workers(c, need_cuda=settings.providers in ("auto", None))
            yield c

    return ctx()


def _grow_store(
    existing: Store | None,
    store_path: str,
    plan: Plan | None,
    new: list[ImageSource],
    limits: dict,
    found: _Inputs,
    settings: FingerprintSettings,
    attrs: dict,
    client,
    progress: bool = False,
) -> tuple[Store, list[int]]:
    """The first writes: retire the changed images' rows, create the store if there is none,
    and append the new images' segment (its plan first). Returns the store and the segments
    to run: the touched ones and the new one."""
    touched = list(found.touched)
    for img in found.changed:
        with _store_writes(store_path):
            existing.retire_image(found.known[img], img)
    with _store_writes(store_path):
        st = existing or Store.create(
            store_path,
            feature_dim=attrs["feature_dim"],
            topk=settings.topk,
            chunk_rows=_new_chunk_rows(plan, settings, client),
            attrs=attrs,
            dtype=settings.dtype,
        )
        if plan is not None:
            if plan.n_windows == 0:
                logger.warning("no cutouts planned for %s", ", ".join(plan.images))
            index = len(st.segments)
            _record_segment(st, index, plan, new, found.listing, limits, progress=progress)
            touched.append(index)
    return st, touched


def _new_chunk_rows(plan: Plan | None, settings: FingerprintSettings, client) -> int:
    """The chunk size of a new store: small enough that every worker thread gets several
    units of this first job (a job of 3,465 windows at 1024 rows was 3 units for 2 workers,
    one of them idle for a third of the run). The store records it; appends and resumes keep
    it, so every chunk still has one writer."""
    n = plan.n_windows if plan is not None else 0
    threads = _cluster_threads(client)
    rows = chunk_rows_for(
        n,
        threads=threads,
        largest=settings.chunk_rows,
        smallest=settings.min_chunk_rows,
        units_per_thread=settings.units_per_thread,
        multiple=settings.batch_size,
    )
    logger.info("new store: %d rows per chunk (%d windows, %d worker threads)", rows, n, threads)
    return rows


def _units(
    st: Store,
    touched: list[int],
    new: ProbedSources,
    settings: FingerprintSettings,
    model: _Model,
    client,
) -> UnitStream:
    """The units of the touched segments without a done marker, as a lazy stream."""
    base = {
        "store": st.path,
        "model": _model_ref(model.card, model.onnx_path, model.sha, settings, client),
        "preprocess": settings.preprocess,
        "batch_size": settings.batch_size,
        "fill": np.nan if settings.cutouts.fill is None else settings.cutouts.fill,
        "side": settings.cutouts.size,
        "dtype": settings.dtype,
    }
    # The new images' sources stay on the workers: units name them by probe batch and place.
    return UnitStream(st, touched, base=base, new_sources=new.by_id(), done=done_in(st, touched))


@contextlib.contextmanager
def _store_writes(path: str):
    """The client's own writes (store creation, plans, growth): a disk that is full or
    read-only is one line. Each step is atomic or undone on the next open (Store.repair)."""
    try:
        yield
    except OSError as e:
        raise StoreError(
            f"{path}: cannot write to the store ({e.strerror or e}); fix that, then run the "
            "same command again"
        ) from None
