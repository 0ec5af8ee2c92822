"""``elodin demo``: the main job on the Hubble Deep Field image that scikit-image ships.

Sliding windows and blobs, each into its own store, then every later stage that exists,
on a local Dask cluster. Yields the lines to print: where each output is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

__all__ = ["hubble_deep_field", "run_demo"]

logger = logging.getLogger(__name__)


def hubble_deep_field(directory: str | Path) -> Path:
    """Write scikit-image's Hubble Deep Field (a real HST image, RGB) to ``directory`` as PNG."""
    import skimage.data
    from PIL import Image

    path = Path(directory) / "hubble_deep_field.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(skimage.data.hubble_deep_field()).save(path)
    return path


def _later_stages(store: str, out: Path) -> Iterator[str]:
    """Run whichever analysis and report stages this version has."""
    try:
        from . import analysis
    except ImportError:
        return
    for name in ("reduce", "cluster", "embed", "outliers"):
        fn = getattr(analysis, name, None)
        if fn is not None:
            fn(store)
            yield f"  {name}: done"
    export = getattr(analysis, "export", None)
    if export is not None:
        cat = out / (Path(store).stem + ".parquet")
        export(store, cat)
        yield f"  catalog: {cat}"
    try:
        from .report import make_report
    except ImportError:
        return
    report_dir = out / (Path(store).stem + "-report")
    make_report(store, report_dir)
    yield f"  report: {report_dir / 'index.html'}"


def run_demo(
    output: str | Path = "elodin-demo", *, scheduler: str | None = None, workers: int | None = None
) -> Iterator[str]:
    from .compute import connect
    from .fingerprint import fingerprint

    out = Path(output)
    image = hubble_deep_field(out)
    yield f"input: {image} (Hubble Deep Field, scikit-image)"
    with connect(scheduler, workers=workers) as client:
        for method in ("sliding", "blobs"):
            store = out / f"hdf-{method}.zarr"
            # The HDF is one 1000 x 872 frame: small tiles and chunks make enough work units
            # to keep every worker busy (a survey keeps the 2048-pixel default).
            result = fingerprint(
                [image], store, method=method, tile_size=256, chunk_rows=64, client=client
            )
            yield f"{method}: {result}"
            yield from _later_stages(str(store), out)
