"""Planning the new images: their windows (a :class:`~pipeline.tiling.Plan`), their stretch
limits, and the segment that records both in the store.

Sliding and full-frame plans are formulas (:func:`pipeline.windowgrid.plan_grid`: nothing per
window), catalog plans data; both are made here; blob plans run detection as one Dask task
per tile (:func:`pipeline.detect.detect_plan`). ``plan_sources`` and ``image_limits`` are the
public doors other stages (``models adapt``) use to sample cutouts as this stage would.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from ..errors import ConfigError, ImageInputError, InputError
from ..progress import bar
from ..sources import ImageSource
from ..store import Store, pack_units
from ..tiling import Plan
from .listing import InputListing

__all__ = ["image_limits", "plan_sources"]


def _plan_digest(plan: Plan) -> str:
    return plan.digest()


def _plan_sources(
    client, sources: Sequence[ImageSource], settings: dict, catalog: str | None, first_index: int
) -> Plan:
    from ..windowgrid import GRID_METHODS, plan_grid

    cut = settings["cutouts"]
    ts = settings["tiling"]["tile-size"]
    method = cut["method"]
    if method in GRID_METHODS:
        # A formula: each image's shape and the settings, nothing per window.
        try:
            return plan_grid(
                [shape[-2:] for shape in _shapes(sources)],
                image_ids=list(_ids(sources)),
                method=method,
                size=cut["size"],
                stride=cut["stride"],
                edge=cut["edge"] or "shift",
                tile_size=ts,
            )
        except ImageInputError as e:  # planning is pure and knows ids; the user knows files
            s = sources[e.image_index]
            raise InputError(f"{'+'.join(s.paths)}: {e}") from None
    # Sparse plans look at every source's WCS and pixels: they are brought to the client.
    sources = list(sources)
    if method == "catalog":
        from ..catalog import plan_catalog

        if not catalog:
            raise ConfigError("--method catalog needs --catalog FILE")
        return plan_catalog(catalog, sources, size=cut["size"], tile_size=ts)
    return _plan_blobs(client, sources, tile_size=ts, first_index=first_index)


def _ids(sources: Sequence[ImageSource]) -> Sequence[str]:
    # Probed sources (``probe.ProbedSources``) know their ids and shapes without the sources.
    return getattr(sources, "ids", None) or [s.id for s in sources]


def _shapes(sources: Sequence[ImageSource]) -> Sequence[tuple[int, ...]]:
    return getattr(sources, "shapes", None) or [s.shape for s in sources]


def _plan_blobs(
    client, sources: Sequence[ImageSource], *, tile_size: int, first_index: int
) -> Plan:
    """Blob plan: :func:`pipeline.detect.detect_plan` (one detection task per tile on the
    Dask workers, windows shifted inside the image, ownership on the client)."""
    from ..detect import detect_plan

    return detect_plan(sources, client=client, tile_size=tile_size, image_index=first_index)


def plan_sources(
    sources: Sequence[ImageSource], settings: dict, *, catalog: str | None = None
) -> Plan:
    """The plan ``elodin fingerprint`` makes of ``sources`` with ``settings``
    (:func:`fingerprint_settings`), planned here: sliding, full or catalog windows (blob
    detection needs a cluster and is not offered here)."""
    if settings["cutouts"]["method"] == "blobs":
        raise ConfigError("plan_sources: blob plans are made on a cluster, by fingerprint()")
    return _plan_sources(None, sources, settings, catalog, 0)


def image_limits(sources: Sequence[ImageSource], preprocess: dict) -> dict:
    """Per-image stretch limits ``{image id: [[vmin, vmax], ...]}`` as ``elodin fingerprint``
    records them (empty unless ``preprocess.scope`` is ``image``)."""
    return _image_limits(sources, preprocess)


def _image_limits(sources: Sequence[ImageSource], preprocess: dict) -> dict:
    if preprocess.get("scope") != "image":
        return {}
    from ..preprocess import image_limits_for

    # Errors name the file, which is what the user can go and look at.
    return {
        s.id: image_limits_for(s, preprocess, image="+".join(s.paths)).tolist() for s in sources
    }


def _record_segment(
    st: Store,
    index: int,
    plan: Plan,
    sources: Sequence[ImageSource],
    listing: InputListing,
    limits: dict,
    *,
    progress: bool = False,
):
    """Save segment ``index``'s ``plan`` and append the segment: its units, and a record per
    image (its files' size and mtime from ``listing``, its source, its stretch limits), with
    a bar of the records written when ``progress``. Returns the new segment."""
    st.save_plan(index, plan)
    images = list(_ids(sources))
    with bar(len(images), desc="record", unit="image", enabled=progress) as shown:
        return st.append_segment(
            images=images,
            layout=pack_units(plan.tile_start, chunk_rows=st.chunk_rows),
            plan_digest=_plan_digest(plan),
            inputs=_Records(sources, listing, limits),
            plan=plan,
            on_records=shown.update,
        )


class _Records(Mapping):
    """Image id -> its record (files from the listing, source, limits), made when asked for:
    the store writes its table a chunk at a time, in image order, so no segment's records
    (nor, for probed sources, its sources) are all held."""

    def __init__(self, sources: Sequence[ImageSource], listing: InputListing, limits: dict):
        self._sources = sources
        self._at = {img: k for k, img in enumerate(_ids(sources))}
        self._position = {img: k for k, img in enumerate(listing.ids)}
        self._listing, self._limits = listing, limits

    def __getitem__(self, img: str) -> dict:
        s = self._sources[self._at[img]]
        return {
            "files": self._listing.files(self._position[img]),
            "source": s.to_record(),
            "limits": self._limits.get(img),
        }

    def __iter__(self) -> Iterator[str]:
        return iter(self._at)

    def __len__(self) -> int:
        return len(self._at)
