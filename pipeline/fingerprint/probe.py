"""Opening and measuring the new images on the cluster, a batch of images per task.

Opening an image (its headers, its WCS, its bands checked against the settings) and measuring
its stretch limits cost a few milliseconds each; at 10^5 new files that is minutes of serial
client work. Here they are Dask tasks of :data:`BATCH` images each, on the workers. A task
never raises for a user's problem: it returns, per image, the one-line error (as
:class:`~.worker._UnitFailed`), and the client raises the first of them, in the order the
checks ran in when they ran on the client (opening every new image, then the store, then the
changed images, then the limits), before anything is written.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ElodinError, InputError
from ..progress import bar
from ..sources import ImageSource
from .listing import InputListing
from .worker import ProbedRef, _UnitFailed

__all__ = ["BATCH", "Probed", "ProbedById", "ProbedSources", "probe_images"]

# Probe batches a walk over ProbedSources brings at once (8 x 128 = one images-table chunk).
_GATHER = 8

# Images per task: enough that the task's overhead (a few ms) is small beside its work, few
# enough that 10^3 new images still spread over every worker thread.
BATCH = 128


@dataclasses.dataclass(frozen=True)
class Probed:
    """What the tasks found, in listing order: the opened ``sources`` (those that opened),
    each failed image's error (``errors``: listing position -> error), and the stretch
    ``limits`` (image id -> limits) with the first image whose limits could not be measured
    (``limits_error``)."""

    sources: Sequence[ImageSource]
    errors: dict
    limits: dict
    limits_error: _UnitFailed | None = None
    ids: tuple[str, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()

    def summary(self) -> Probed:
        """All but the sources (ids and shapes kept): what the client gathers of a batch."""
        return dataclasses.replace(self, sources=())

    def raise_first(self, positions: Sequence[int]) -> None:
        """Raise the error of the first of the images at listing ``positions`` that failed."""
        for k in positions:
            if k in self.errors:
                raise self.errors[k].error()

    def raise_limits(self) -> None:
        if self.limits_error is not None:
            raise self.limits_error.error()


def _probe_task(
    items: Sequence[tuple[int, str, tuple[str, ...]]],
    *,
    hdu,
    variable,
    preprocess: dict,
) -> Probed:
    """Open the batch's images ``(listing position, id, specs)`` and, when all opened,
    measure their stretch limits."""
    from ..preprocess import check_bands
    from ..sources import open_listed
    from .plan import _image_limits

    sources, errors = [], {}
    for k, sid, specs in items:
        try:
            s = open_listed(sid, specs, hdu=hdu, variable=variable)
            check_bands(s.n_bands, preprocess, image="+".join(s.paths))
        except ElodinError as e:
            errors[k] = _UnitFailed(type(e), str(e))
            continue
        sources.append(s)
    found = functools.partial(
        Probed,
        tuple(sources),
        ids=tuple(s.id for s in sources),
        shapes=tuple(tuple(s.shape) for s in sources),
    )
    if errors:  # the run stops at an image that did not open: its limits are not needed
        return found(errors, {})
    try:
        limits = _image_limits(sources, preprocess)
    except ElodinError as e:
        return found(errors, {}, _UnitFailed(type(e), str(e)))
    return found(errors, limits)


def _summary(probed: Probed) -> Probed:
    return probed.summary()


class ProbedSources(Sequence):
    """The opened sources of :func:`probe_images`, in listing order, left on the workers.

    Their ``ids`` and ``shapes`` are on the client (a grid plan needs no more); a source comes
    when asked for, with the rest of its batch and the next few (:data:`_GATHER` batches, one
    round trip), and those are all that is kept: a walk in order (the records, then the
    units) brings each batch once, and the client never holds every
    source of 10^5 new images (1.7 kB each). Batches probed again one image at a time (their
    workers died) are held here as they are.

    Once :meth:`ref` has handed out every image of a batch, this object lets go of the batch's
    future: the unit jobs given it hold it while they run, and the workers drop the batch when
    the last of them is done, so the workers do not hold every new image's source until the
    run ends either."""

    def __init__(self, client, batches: Sequence, found: Sequence[Probed]):
        self._client = client
        self._batches = list(batches)  # a future, or a Probed already on the client
        self.ids = tuple(i for p in found for i in p.ids)
        self.shapes = tuple(sh for p in found for sh in p.shapes)
        self._ends = np.cumsum([len(p.ids) for p in found]).tolist()
        self._held: dict[int, tuple[ImageSource, ...]] = {}
        # Images of each batch not handed out by ref() yet; a batch at 0 is let go.
        self._left = [len(p.ids) for p in found]
        self._handed = bytearray(len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        b = bisect.bisect_right(self._ends, k)
        if b not in self._held:
            # The batches from b on come together: one round trip for a table chunk's worth.
            # (Up to the first batch let go: every image of it is in a unit already.)
            ahead = [self._batch(b)]
            for n in range(b + 1, min(b + _GATHER, len(self._batches))):
                if (f := self._batch(n, needed=False)) is None:
                    break
                ahead.append(f)
            got = self._client.gather([f for f in ahead if not isinstance(f, Probed)])
            at = iter(got)
            self._held = {
                b + n: (f if isinstance(f, Probed) else next(at)).sources
                for n, f in enumerate(ahead)
            }
        return self._held[b][k - (self._ends[b - 1] if b else 0)]

    def _batch(self, b: int, *, needed: bool = True):
        batch = self._batches[b]
        if isinstance(batch, weakref.ref):
            batch = batch()
            if batch is None and needed:  # a bug, not a user's problem: fail loudly
                raise RuntimeError(f"probe batch {b} was let go while still needed")
        return batch

    def ref(self, k: int) -> ImageSource | tuple[Any, ProbedRef]:
        """Where source ``k`` is, without bringing it over: the source itself when its batch
        is on the client, else its batch's future and a :class:`~.worker.ProbedRef` to it (a
        unit task given that future finds the source in the batch)."""
        b = bisect.bisect_right(self._ends, k)
        batch, at = self._batch(b), k - (self._ends[b - 1] if b else 0)
        if isinstance(batch, Probed):
            return batch.sources[at]
        if not self._handed[k]:
            self._handed[k] = 1
            self._left[b] -= 1
            if not self._left[b]:
                # The jobs made from here on hold the future; a job made again for the same
                # image (after a lost worker) still finds it while one of them is alive.
                self._batches[b] = weakref.ref(batch)
        return batch, ProbedRef(self.ids[k], self.shapes[k], at)

    def by_id(self) -> ProbedById:
        """The same sources by image id."""
        return ProbedById(self)


class ProbedById(Mapping):
    """:class:`ProbedSources` by image id; :meth:`ref` as there."""

    def __init__(self, sources: ProbedSources):
        self._sources = sources
        self._at = {img: k for k, img in enumerate(sources.ids)}

    def __getitem__(self, img: str) -> ImageSource:
        return self._sources[self._at[img]]

    def __contains__(self, img: object) -> bool:  # Mapping's would bring the source over
        return img in self._at

    def ref(self, img: str) -> ImageSource | tuple[Any, ProbedRef]:
        return self._sources.ref(self._at[img])

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources.ids)

    def __len__(self) -> int:
        return len(self._sources)


def probe_images(
    client,
    listing: InputListing,
    positions: Sequence[int],
    *,
    hdu,
    variable,
    preprocess: dict,
    batch: int | None = None,
    progress: bool = False,
) -> Probed:
    """Open (headers, WCS, bands) and measure the listed images at ``positions`` (ascending),
    ``batch`` (default :data:`BATCH`) a task on ``client``'s workers; the batches' findings
    merged in order, their sources left on the workers (:class:`ProbedSources`). With
    ``progress``, a bar counts the images opened (10^6 new files are minutes of it)."""
    batch = batch or BATCH
    items = [(k, listing.ids[k], listing.specs[k]) for k in positions]
    if not items:
        return Probed(ProbedSources(client, [], []), {}, {})
    batches = [items[i : i + batch] for i in range(0, len(items), batch)]
    run = functools.partial(_probe_task, hdu=hdu, variable=variable, preprocess=preprocess)
    token = os.urandom(4).hex()
    futures = _submit(client, run, batches, f"elodin-probe-{token}")
    summaries = client.map(_summary, futures, key=[f"{f.key}-summary" for f in futures])
    try:
        with bar(len(items), desc="open", unit="image", enabled=progress) as shown:
            found, killed = _results(summaries, on_done=lambda i: shown.update(len(batches[i])))
    except BaseException:
        client.cancel(futures + summaries)
        raise
    held: list = list(futures)
    for i in killed:
        found[i] = held[i] = _narrowed(client, run, batches[i], f"elodin-probe1-{i}-{token}")
    merged = _merged(found)
    return dataclasses.replace(merged, sources=ProbedSources(client, held, found))


def _submit(client, run, batches, prefix: str) -> list:
    keys = [f"{prefix}-{i}" for i in range(len(batches))]
    return client.map(run, batches, key=keys, pure=False)


def _results(futures, on_done: Callable[[int], Any] = lambda i: None) -> tuple[list, list[int]]:
    """Each future's result, and the positions of those whose workers kept dying;
    ``on_done(i)`` as each comes back."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    at = {fut.key: i for i, fut in enumerate(futures)}
    found: list = [None] * len(futures)
    killed = []
    for fut in as_completed(futures):
        i = at[fut.key]
        try:
            found[i] = fut.result()
        except KilledWorker:
            killed.append(i)
        on_done(i)
    return found, sorted(killed)


def _narrowed(client, run, items, prefix: str) -> Probed:
    """A batch whose workers kept dying (a file that crashes a reader, or one too big for a
    worker's memory) probed again one image at a time, alone on the cluster, so that a death
    is that image's: it is named in one line. A rare path; its cost is a round trip an image."""
    from distributed.scheduler import KilledWorker

    found = []
    for n, item in enumerate(items):
        (single,) = _submit(client, run, [[item]], f"{prefix}-{n}")
        try:
            found.append(single.result())
        except KilledWorker:
            _, sid, specs = item
            raise InputError(
                f"{'+'.join(specs) or sid}: the Dask workers opening it died (a file that "
                "crashes the reader, or too big for a worker's memory); set it aside and "
                "run the same command again (nothing was written)"
            ) from None
        finally:
            client.cancel([single])
    return _merged(found)


def _merged(found: Sequence[Probed]) -> Probed:
    sources, errors, limits, first_limits_error = [], {}, {}, None
    ids, shapes = [], []
    for p in found:
        sources.extend(p.sources)
        ids.extend(p.ids)
        shapes.extend(p.shapes)
        errors.update(p.errors)
        limits.update(p.limits)
        if first_limits_error is None:
            first_limits_error = p.limits_error
    return Probed(tuple(sources), errors, limits, first_limits_error, tuple(ids), tuple(shapes))


def open_and_measure(
    client,
    listing: InputListing,
    new: Sequence[int],
    changed: Sequence[int],
    *,
    hdu,
    variable,
    preprocess: dict,
    check_store: Callable[[], None],
    progress: bool = False,
) -> tuple[ProbedSources, dict]:
    """The new and ``changed`` images (listing positions) opened and measured on the
    cluster, in listing order, with their stretch limits. The first problem is raised in the
    order the client checked before: a new image that does not open or cannot take the
    settings, then ``check_store()``, then a changed image, then the limits."""
    probed = probe_images(
        client,
        listing,
        sorted([*new, *changed]),
        hdu=hdu,
        variable=variable,
        preprocess=preprocess,
        progress=progress,
    )
    probed.raise_first(new)
    check_store()
    probed.raise_first(changed)
    probed.raise_limits()
    return probed.sources, probed.limits
