"""``elodin demo``: the main job on the Hubble Deep Field image that scikit-image ships.

Sliding windows and blobs, each into its own store, then every later stage, on a local Dask
cluster, and a query by sky position (``similar --radec``) at the field's centre. Yields the
lines to print: where each output is.

scikit-image ships the image as a PNG, without a WCS; the demo writes it as a FITS cube with an
approximate TAN WCS built from the field's published centre and pixel scale (:func:`hdf_wcs`),
so its cutouts have RA/Dec.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["STAGES", "hdf_centre", "hdf_wcs", "hubble_deep_field", "run_demo"]

logger = logging.getLogger(__name__)


# The field's published centre (J2000) and the drizzled WFPC2 frame's pixel scale. The
# orientation and the scale of scikit-image's (resampled) copy are not published with it: the
# WCS below is approximate, good to a few arcseconds at best, and for the demo only.
HDF_RA = "12h36m49.4s"
HDF_DEC = "+62d12m58s"
HDF_PIXEL_ARCSEC = 0.04


def hdf_centre() -> tuple[float, float]:
    """The field's centre, RA and Dec in degrees (ICRS)."""
    from astropy.coordinates import SkyCoord

    centre = SkyCoord(HDF_RA, HDF_DEC, frame="icrs")
    return float(centre.ra.deg), float(centre.dec.deg)


def hdf_wcs(ny: int, nx: int):
    """An approximate TAN WCS for the HDF image: centred on the field, North up, East left."""
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(hdf_centre())
    w.wcs.crpix = [(nx + 1) / 2, (ny + 1) / 2]  # FITS pixels are 1-based
    scale = HDF_PIXEL_ARCSEC / 3600
    # East left: RA grows towards smaller x; North up: Dec grows with y (FITS rows go up).
    w.wcs.cdelt = [-scale, scale]
    w.wcs.radesys = "ICRS"
    w.wcs.equinox = 2000.0
    return w


def hubble_deep_field(directory: str | Path) -> Path:
    """Write scikit-image's Hubble Deep Field (a real HST image, RGB) to ``directory`` as a
    FITS cube (band, y, x) with an approximate TAN WCS (:func:`hdf_wcs`), so the demo's
    cutouts have RA/Dec."""
    import numpy as np
    import skimage.data
    from astropy.io import fits

    path = Path(directory) / "hubble_deep_field.fits"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb = skimage.data.hubble_deep_field()  # (y, x, band), top row first
        # FITS rows run bottom-up: flip so the picture keeps North at the top in a FITS viewer.
        cube = np.ascontiguousarray(np.moveaxis(rgb[::-1], -1, 0))
        header = hdf_wcs(*rgb.shape[:2]).to_header()
        header["OBJECT"] = "Hubble Deep Field (scikit-image copy)"
        header["COMMENT"] = "Approximate WCS: field centre and 0.04 arcsec/pixel, North up."
        tmp = path.with_suffix(".fits.tmp")
        fits.PrimaryHDU(cube, header=header).writeto(tmp, overwrite=True)
        tmp.replace(path)  # never a half-written input for a later run
    return path


STAGES = ("reduce", "cluster", "embed", "outliers", "export", "report")


def _radec_query(store: str, n: int = 5) -> Iterator[str]:
    """``elodin similar --radec`` at the field's centre, as the demo shows it."""
    from .analysis import similar

    ra, dec = hdf_centre()
    table = similar(store, radec=(ra, dec), n=n)
    yield f"  elodin similar {store} --radec {ra:.5f} {dec:.5f} -n {n}"
    yield (
        f"    query: cutout {table.meta['query_index']}, "
        f"{table.meta['query_separation_arcsec']:.2f} arcsec from the position"
    )
    yield f"    {'rank':>4} {'index':>6} {'ra':>10} {'dec':>9} {'distance':>9}"
    for row in table:
        yield (
            f"    {int(row['rank']):>4} {int(row['index']):>6} {float(row['ra']):>10.5f} "
            f"{float(row['dec']):>9.5f} {float(row['distance']):>9.4g}"
        )


def _later_stages(store: str, out: Path, stages: Sequence[str]) -> Iterator[str]:
    """Run the analysis and report stages asked for, then a sky-position query."""
    from . import analysis

    for name in ("reduce", "cluster", "embed", "outliers"):
        if name in stages:
            getattr(analysis, name)(store)
            yield f"  {name}: done"
    if "export" in stages:
        cat = out / (Path(store).stem + ".parquet")
        analysis.export(store, cat)
        yield f"  catalog: {cat}"
    if "report" in stages:
        from .report import make_report

        report_dir = out / (Path(store).stem + "-report")
        make_report(store, report_dir)
        yield f"  report: {report_dir / 'index.html'}"
    if "reduce" in stages:
        yield from _radec_query(store)


def run_demo(
    output: str | Path = "elodin-demo",
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    methods: Sequence[str] = ("sliding", "blobs"),
    stages: Sequence[str] = STAGES,
) -> Iterator[str]:
    """Fingerprint the HDF with each of ``methods`` into its own store, run ``stages`` on
    each, and query it by sky position; yields the lines to print."""
    from .compute import connect
    from .fingerprint import fingerprint

    out = Path(output)
    image = hubble_deep_field(out)
    yield f"input: {image} (Hubble Deep Field, scikit-image; approximate WCS)"
    with connect(scheduler, workers=workers) as client:
        for method in methods:
            store = out / f"hdf-{method}.zarr"
            # The HDF is one 1000 x 872 frame: small tiles and chunks make enough work units
            # to keep every worker busy (a survey keeps the 2048-pixel default).
            result = fingerprint(
                [image], store, method=method, tile_size=256, chunk_rows=64, client=client
            )
            yield f"{method}: {result}"
            yield from _later_stages(str(store), out, stages)
