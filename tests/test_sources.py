"""sources.py on real files: FITS (plain, gzip, tile-compressed, HDUs, cubes, fsspec URLs),
Zarr v2 / v3, PNG / JPEG / TIFF, band files, WCS, memory of a tile read, bad inputs, pickling.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import pickle
import subprocess
import sys
import textwrap
import tracemalloc
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from operator import methodcaller
from pathlib import Path

import numpy as np
import pytest
import tifffile
import xarray as xr
import zarr
from astropy.io import fits
from astropy.wcs import WCS
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image

from pipeline.errors import InputError
from pipeline.sources import (
    ImageSource,
    clear_caches,
    expand_inputs,
    open_sources,
    sample_pixels,
)


@pytest.fixture(autouse=True)
def _fresh_handles():
    # Files in tmp dirs are rewritten between tests; handles are per thread and keyed by mtime,
    # but closing them keeps ResourceWarnings out of other tests.
    yield
    clear_caches()


def tan_header(ny: int, nx: int, *, ra: float = 150.1, dec: float = 2.2) -> fits.Header:
    h = fits.Header()
    h.update(
        CTYPE1="RA---TAN",
        CTYPE2="DEC--TAN",
        CRVAL1=ra,
        CRVAL2=dec,
        CRPIX1=nx / 2 + 0.5,
        CRPIX2=ny / 2 + 0.5,
        CD1_1=-7.3e-5,
        CD1_2=1.1e-6,
        CD2_1=1.3e-6,
        CD2_2=7.2e-5,
        RADESYS="ICRS",
    )
    return h


def sip_fk5_header(ny: int, nx: int) -> fits.Header:
    h = tan_header(ny, nx)
    h.update(
        CTYPE1="RA---TAN-SIP",
        CTYPE2="DEC--TAN-SIP",
        RADESYS="FK5",
        EQUINOX=2000.0,
        A_ORDER=2,
        B_ORDER=2,
        A_2_0=1e-6,
        A_1_1=3e-7,
        B_0_2=-2e-6,
    )
    return h


def write_fits(path: Path, data: np.ndarray, header: fits.Header | None = None) -> Path:
    fits.PrimaryHDU(data, header=header).writeto(path)
    return path


def one(inputs, **kw) -> ImageSource:
    sources = open_sources(inputs, **kw)
    assert len(sources) == 1
    return sources[0]


def assert_reads(src: ImageSource, full: np.ndarray, boxes=None) -> None:
    """read() of several sections equals the numpy slice of the full (bands, y, x) data."""
    full = np.asarray(full, dtype=np.float32)
    if full.ndim == 2:
        full = full[np.newaxis]
    ny, nx = src.shape
    assert full.shape == (src.n_bands, ny, nx)
    boxes = boxes or [
        (0, ny, 0, nx),
        (1, ny // 2 + 1, 2, nx // 3 + 2),
        (ny - 3, ny, nx - 5, nx),
        (ny // 2, ny // 2 + 1, 0, nx),
    ]
    for y0, y1, x0, x1 in boxes:
        got = src.read(y0, y1, x0, x1)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, full[:, y0:y1, x0:x1])


# ------------------------------------------------------------------------------------------
# FITS
# ------------------------------------------------------------------------------------------


def test_fits_primary_reads_sections_with_wcs(tmp_path, rng):
    data = rng.normal(size=(37, 53)).astype(np.float32)
    path = write_fits(tmp_path / "img.fits", data, tan_header(37, 53))
    src = one([path])
    assert (src.id, src.kind, src.shape, src.n_bands, src.hdu) == ("img", "fits", (37, 53), 1, 0)
    assert src.paths == (str(path),)
    assert src.variable is None
    assert src.wcs is not None and src.wcs.pixel_n_dim == 2
    assert_reads(src, data)
    assert src.read(3, 3, 0, 5).shape == (1, 0, 5)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.int64, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(37, 53), (3, 37, 53), (1, 1, 37, 53)])
def test_plain_fits_read_directly_equal_astropy(tmp_path, rng, dtype, shape):
    """Unscaled local images are read with positioned reads, not astropy's section: every
    BITPIX, band cubes and leading length-1 axes give astropy's numbers for any box."""
    data = (rng.normal(size=shape) * 100).astype(dtype)
    fits.PrimaryHDU(data).writeto(tmp_path / "plain.fits")
    src = one([tmp_path / "plain.fits"])
    with fits.open(tmp_path / "plain.fits") as hdul:
        expected = np.asarray(hdul[0].data, dtype=np.float32).reshape(-1, 37, 53)
    for _ in range(25):
        y0, x0 = rng.integers(0, 37), rng.integers(0, 53)
        y1, x1 = rng.integers(y0, 38), rng.integers(x0, 54)
        got = src.read(int(y0), int(y1), int(x0), int(x1))
        np.testing.assert_array_equal(got, expected[: src.n_bands, y0:y1, x0:x1])
    np.testing.assert_array_equal(src.read(0, 37, 0, 53), expected[: src.n_bands])


def test_fits_scaling_and_blank_applied(tmp_path, rng):
    raw = rng.integers(-1000, 1000, size=(20, 30)).astype(np.int16)
    raw[3, 4] = -32768
    hdu = fits.PrimaryHDU(raw)
    hdu.header.update(BSCALE=0.5, BZERO=100.0, BLANK=-32768)
    hdu.writeto(tmp_path / "scaled.fits")
    expected = raw.astype(np.float64) * 0.5 + 100.0
    expected[3, 4] = np.nan
    src = one([tmp_path / "scaled.fits"])
    got = src.read(0, 20, 0, 30)[0]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected.astype(np.float32), equal_nan=True)


def test_primary_probe_equals_the_full_probe(tmp_path, rng, monkeypatch):
    """A primary image is probed from its header alone (no HDU list): the same part and WCS
    text as astropy's HDU list gives, and anything it cannot vouch for goes the full way."""
    from pipeline.sources import fits as fits_source

    cube = rng.normal(size=(3, 16, 21)).astype(np.float32)
    wave = tan_header(16, 21)
    wave.update(CTYPE3="WAVE", CRVAL3=5e-7, CDELT3=1e-7, CRPIX3=1, CUNIT3="m")
    scaled = fits.PrimaryHDU(rng.integers(-9, 9, size=(20, 30)).astype(np.int16))
    scaled.header.update(BSCALE=0.5, BZERO=100.0, BLANK=-32768)
    scaled.writeto(tmp_path / "scaled.fits")
    fits.PrimaryHDU(np.zeros((5, 7), np.uint16)).writeto(tmp_path / "uint16.fits")
    # Cards the structural scan passes over: HIERARCH, a long string (CONTINUE), comments.
    busy = tan_header(12, 14)
    busy["HIERARCH ESO DET CHIP NAME"] = "ccd / 3"
    busy["ORIGIN"] = "x" * 120
    busy.add_comment("BITPIX = 8 in a comment is not a card")
    busy.add_history("NAXIS1 = 3")
    fast = [
        write_fits(tmp_path / "busy.fits", np.zeros((12, 14), np.float32), busy),
        write_fits(tmp_path / "tan.fits", np.zeros((37, 53), np.float32), tan_header(37, 53)),
        write_fits(tmp_path / "sip.fits", np.zeros((60, 80), np.float32), sip_fk5_header(60, 80)),
        write_fits(tmp_path / "cube.fits", cube, wave),
        write_fits(tmp_path / "radio.fits", cube[:1, np.newaxis]),
        write_fits(tmp_path / "f64.fits", np.zeros((9, 11), np.float64)),
        tmp_path / "scaled.fits",
        tmp_path / "uint16.fits",
    ]
    got = {str(p): fits_source._probe_primary(str(p)) for p in fast}
    monkeypatch.setattr(fits_source, "_probe_primary", lambda path: None)
    for p, g in got.items():
        assert g is not None, p
        assert g == fits_source._probe_fits(p, None), p
    monkeypatch.undo()
    # Not for the header alone: an empty primary, a short file, a table's extension.
    mef = tmp_path / "mef.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((4, 4), np.float32))]).writeto(mef)
    short = tmp_path / "short.fits"
    short.write_bytes((tmp_path / "tan.fits").read_bytes()[:4000])
    assert fits_source._probe_primary(str(mef)) is None
    assert fits_source._probe_primary(str(short)) is None
    # Nor a structural card out of fixed format, nor bytes that are not printable ASCII:
    # astropy reads those (its answer stands, whatever it is).
    tan = (tmp_path / "tan.fits").read_bytes()
    bitpix = tan[80:160]
    assert bitpix.startswith(b"BITPIX  =                  -32 /")

    def card(text: str) -> bytes:
        return text.encode("latin-1").ljust(80)

    odd = {
        "free": tan.replace(bitpix, card("BITPIX  = -32 / array data type")),
        "float": tan.replace(bitpix, card("BITPIX  =                -32.0")),
        "latin1": tan.replace(bitpix, bitpix[:-1] + "\xe9".encode("latin-1")),
    }
    for name, body in odd.items():
        (tmp_path / f"{name}.fits").write_bytes(body)
        path = str(tmp_path / f"{name}.fits")
        if name == "free":  # still a plain number: taken, to astropy's answer
            taken = fits_source._probe_primary(path)
            monkeypatch.setattr(fits_source, "_probe_primary", lambda path: None)
            assert taken is not None and taken == fits_source._probe_fits(path, None)
            monkeypatch.undo()
            continue
        assert fits_source._probe_primary(path) is None, name
    with pytest.raises(InputError, match="short.fits.*truncated"):
        fits_source._probe_fits(str(short), None)


_VALUE_FORMS = (
    lambda v: f"{v:>20}",  # the standard's fixed format
    lambda v: f"{v:<20}",  # free format, still a plain value
    lambda v: f"{v:>20} / a comment",
    lambda v: f"+{v}" if str(v)[0] != "-" else str(v),
    lambda v: f"{v}.0",  # a real where an integer belongs
    lambda v: f"{v}E0",
    lambda v: "'" + str(v) + "'",  # a string
    lambda v: "",  # no value
    lambda v: f"{v} {v}",
)


@given(
    dtype=st.sampled_from(["u1", ">i2", ">i4", ">f4", ">f8"]),
    card=st.sampled_from(["SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "BZERO", "BSCALE"]),
    form=st.integers(0, len(_VALUE_FORMS) - 1),
    equals=st.sampled_from(["= ", "=  ", " =", "  "]),
)
def test_the_structural_scan_agrees_with_astropy_or_steps_aside(
    tmp_path_factory, dtype, card, form, equals
):
    """Whatever the form of a structural card, the primary probe either gives what astropy's
    HDU list gives or leaves the file to it (None); never another answer."""
    from pipeline.sources import fits as fits_source

    hdu = fits.PrimaryHDU(np.zeros((6, 9), np.dtype(dtype)), header=tan_header(6, 9))
    hdu.header["BSCALE"], hdu.header["BZERO"] = 1, 0
    raw = bytearray(hdu.header.tostring().encode("ascii"))
    cards = [bytes(raw[i : i + 80]) for i in range(0, len(raw), 80)]
    k = next(i for i, c in enumerate(cards) if c[:8].rstrip() == card.encode())
    value = hdu.header[card]
    value = "T" if value is True else value
    text = (card.ljust(8) + equals + _VALUE_FORMS[form](value))[:80].ljust(80)
    raw[k * 80 : (k + 1) * 80] = text.encode("ascii")
    path = tmp_path_factory.mktemp("scan") / "p.fits"
    path.write_bytes(bytes(raw) + np.zeros((6, 9), np.dtype(dtype)).tobytes().ljust(2880, b"\0"))
    fast = fits_source._probe_primary(str(path))
    real = fits_source._probe_primary
    try:
        fits_source._probe_primary = lambda path: None
        try:
            full = fits_source._probe_fits(str(path), None)
        except InputError:
            full = None
    finally:
        fits_source._probe_primary = real
    event("taken" if fast is not None else "left to astropy")
    assert fast is None or fast == full


@pytest.fixture
def mef(tmp_path, rng) -> tuple[Path, np.ndarray, np.ndarray]:
    sci = rng.normal(size=(24, 31)).astype(np.float32)
    err = rng.normal(size=(24, 31)).astype(np.float64)
    table = fits.BinTableHDU.from_columns(
        [fits.Column(name="a", format="E", array=np.zeros(3))], name="CAT"
    )
    path = tmp_path / "mef.fits"
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            table,
            fits.ImageHDU(sci, header=tan_header(24, 31), name="SCI"),
            fits.ImageHDU(err, name="ERR"),
        ]
    ).writeto(path)
    return path, sci, err


def test_fits_named_and_numbered_hdus(mef):
    path, sci, err = mef
    first = one([path])  # the first HDU with image data, past an empty primary and a table
    assert first.hdu == 2 and first.id == "mef" and first.wcs is not None
    assert_reads(first, sci)
    by_name = one([f"{path}[ERR]"])
    assert by_name.hdu == 3 and by_name.id == "mef[ERR]" and by_name.wcs is None
    assert_reads(by_name, err.astype(np.float32))
    assert one([f"{path}[3]"]).id == "mef[3]"
    assert_reads(one([path], hdu="err"), err.astype(np.float32))
    assert_reads(one([path], hdu=3), err.astype(np.float32))
    # The same file twice, through two HDUs: two sources with distinct ids.
    ids = [s.id for s in open_sources([f"{path}[SCI]", f"{path}[ERR]"])]
    assert ids == ["mef[SCI]", "mef[ERR]"]


def test_fits_cube_is_bands_and_keeps_celestial_wcs(tmp_path, rng):
    cube = rng.normal(size=(3, 16, 21)).astype(np.float32)
    header = tan_header(16, 21)
    header.update(CTYPE3="WAVE", CRVAL3=5e-7, CDELT3=1e-7, CRPIX3=1, CUNIT3="m")
    write_fits(tmp_path / "cube.fits", cube, header)
    src = one([tmp_path / "cube.fits"])
    assert src.n_bands == 3 and src.shape == (16, 21)
    assert src.wcs.pixel_n_dim == 2 and src.wcs.has_celestial
    assert_reads(src, cube)

    # Radio-style degenerate leading axes (Stokes, frequency of length 1) are dropped.
    write_fits(tmp_path / "radio.fits", cube[:1, np.newaxis])
    radio = one([tmp_path / "radio.fits"])
    assert radio.n_bands == 1 and radio.shape == (16, 21)
    assert_reads(radio, cube[:1])


def test_tile_compressed_fz_is_exact(tmp_path, rng):
    ints = rng.integers(-500, 500, size=(70, 90)).astype(np.int32)
    floats = rng.normal(size=(70, 90)).astype(np.float32)
    path = tmp_path / "comp.fits.fz"
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.CompImageHDU(ints, compression_type="RICE_1", tile_shape=(16, 16), name="SCI"),
            # quantize_level=0 keeps floats lossless
            fits.CompImageHDU(
                floats, compression_type="GZIP_2", quantize_level=0.0, tile_shape=(8, 90), name="F"
            ),
        ]
    ).writeto(path)
    src = one([path])
    assert (src.id, src.hdu, src.shape) == ("comp", 1, (70, 90))
    assert_reads(src, ints)
    assert_reads(one([f"{path}[F]"]), floats)


def test_gzip_fits(tmp_path, rng):
    data = rng.normal(size=(19, 23)).astype(np.float32)
    write_fits(tmp_path / "plain.fits", data)
    (tmp_path / "z.fits.gz").write_bytes(gzip.compress((tmp_path / "plain.fits").read_bytes()))
    src = one([tmp_path / "z.fits.gz"])
    assert src.id == "z"
    assert_reads(src, data)


def test_fits_fsspec_urls(tmp_path, rng):
    import fsspec

    data = rng.normal(size=(3, 18, 25)).astype(np.float32)
    path = write_fits(tmp_path / "remote.fits", data, tan_header(18, 25))
    src = one([f"file://{path}"])
    assert src.id == "remote" and src.paths == (f"file://{path}",)
    assert src.wcs is not None
    assert_reads(src, data)

    with fsspec.open("memory://survey/mem.fits", "wb") as f:
        f.write(path.read_bytes())
    try:
        mem = one(["memory://survey/mem.fits[0]"])
        assert mem.id == "mem[0]"
        assert_reads(mem, data)
        with fsspec.open("memory://survey/mem2.fits", "wb") as f:
            f.write(path.read_bytes())
        found = expand_inputs(["memory://survey/*.fits"])
        assert [u.rsplit("/", 1)[-1] for u in found] == ["mem.fits", "mem2.fits"]
        assert [s.id for s in open_sources(found)] == ["mem", "mem2"]
        with pytest.raises(InputError, match="no files match"):
            expand_inputs(["memory://survey/*.png"])
    finally:
        fsspec.filesystem("memory").rm("/survey", recursive=True)


# ------------------------------------------------------------------------------------------
# Zarr / xarray
# ------------------------------------------------------------------------------------------


def test_zarr_v3_2d_with_wcs_and_v2_3d(tmp_path, rng):
    img = rng.normal(size=(40, 50)).astype(np.float32)
    header = tan_header(40, 50)
    ds = xr.Dataset({"image": (("y", "x"), img)}, attrs={"wcs": header.tostring()})
    ds.to_zarr(
        tmp_path / "mosaic.zarr",
        zarr_format=3,
        consolidated=False,
        encoding={"image": {"chunks": (16, 16)}},
    )
    src = one([tmp_path / "mosaic.zarr"])
    assert (src.id, src.kind, src.variable, src.shape, src.n_bands) == (
        "mosaic",
        "zarr",
        "image",
        (40, 50),
        1,
    )
    assert_reads(src, img)
    ref = WCS(header)
    sky = ref.pixel_to_world(np.array([3.0, 17.5]), np.array([4.0, 30.25])).icrs
    ra, dec = src.pixel_to_radec([3.0, 17.5], [4.0, 30.25])
    np.testing.assert_allclose(ra, sky.ra.deg, atol=1e-9, rtol=0)
    np.testing.assert_allclose(dec, sky.dec.deg, atol=1e-9, rtol=0)

    cube = rng.normal(size=(3, 30, 20)).astype(np.float32)
    mask = np.zeros((30, 20), np.uint8)
    ds2 = xr.Dataset({"flux": (("band", "y", "x"), cube), "mask": (("y", "x"), mask)})
    ds2.to_zarr(tmp_path / "cube.zarr", zarr_format=2, consolidated=False)
    # Two image variables: the store must say which.
    with pytest.raises(InputError, match=r"cube\.zarr.*several image variables.*flux, mask"):
        open_sources([tmp_path / "cube.zarr"])
    by_suffix = one([f"{tmp_path / 'cube.zarr'}:flux"])
    assert by_suffix.id == "cube:flux" and by_suffix.n_bands == 3 and by_suffix.wcs is None
    assert_reads(by_suffix, cube)
    by_kw = one([tmp_path / "cube.zarr"], variable="mask")
    assert by_kw.id == "cube" and by_kw.variable == "mask"
    assert_reads(by_kw, mask)


def test_zarr_band_last_fill_value_and_bare_array(tmp_path, rng):
    rgb = rng.normal(size=(12, 14, 3)).astype(np.float32)
    ds = xr.Dataset({"rgb": (("y", "x", "band"), rgb)})
    ds.to_zarr(tmp_path / "last.zarr", zarr_format=3, consolidated=False)
    assert_reads(one([tmp_path / "last.zarr"]), np.moveaxis(rgb, -1, 0))

    ints = rng.integers(0, 100, size=(10, 11)).astype(np.int16)
    ints[2, 3] = -1
    ds = xr.Dataset({"counts": (("y", "x"), ints)})
    ds["counts"].encoding["_FillValue"] = -1
    ds.to_zarr(tmp_path / "fill.zarr", zarr_format=3, consolidated=False)
    expected = ints.astype(np.float32)
    expected[2, 3] = np.nan
    got = one([tmp_path / "fill.zarr"]).read(0, 10, 0, 11)[0]
    np.testing.assert_array_equal(got, expected)

    # A bare Zarr array (no xarray dimension names) falls back to zarr itself.
    arr = zarr.create_array(tmp_path / "bare.zarr", shape=(2, 9, 13), dtype="f4", chunks=(1, 4, 4))
    arr[:] = rng.normal(size=(2, 9, 13)).astype(np.float32)
    bare = one([tmp_path / "bare.zarr"])
    assert bare.n_bands == 2 and bare.variable is None
    assert_reads(bare, arr[:])


def test_zarr_fsspec_memory_url(rng):
    import fsspec

    img = rng.normal(size=(8, 9)).astype(np.float32)
    xr.Dataset({"v": (("y", "x"), img)}).to_zarr(
        "memory://mem-store.zarr", zarr_format=3, consolidated=False
    )
    try:
        src = one(["memory://mem-store.zarr:v"])
        assert src.id == "mem-store:v"
        assert_reads(src, img)
    finally:
        fsspec.filesystem("memory").rm("/mem-store.zarr", recursive=True)


# ------------------------------------------------------------------------------------------
# PNG / JPEG / TIFF
# ------------------------------------------------------------------------------------------


def test_png_jpeg_modes(tmp_path, rng):
    rgb = rng.integers(0, 256, size=(21, 34, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    gray = rng.integers(0, 256, size=(21, 34), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    rgba = np.dstack([rgb, np.full((21, 34), 7, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    deep = rng.integers(0, 65535, size=(21, 34)).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=90)

    src = one([tmp_path / "rgb.png"])
    assert (src.kind, src.n_bands, src.shape, src.wcs_header) == ("image", 3, (21, 34), None)
    assert_reads(src, np.moveaxis(rgb, -1, 0))
    g = one([tmp_path / "gray.png"])
    assert g.n_bands == 1
    assert_reads(g, gray)
    a = one([tmp_path / "alpha.png"])
    assert a.n_bands == 3  # alpha dropped
    assert_reads(a, np.moveaxis(rgb, -1, 0))
    assert_reads(one([tmp_path / "deep.png"]), deep)
    jpg = one([tmp_path / "photo.jpg"])
    decoded = np.asarray(Image.open(tmp_path / "photo.jpg"))
    assert jpg.n_bands == 3
    assert_reads(jpg, np.moveaxis(decoded, -1, 0))


def test_tiff_float_compressed_and_rgb(tmp_path, rng):
    flt = rng.normal(size=(45, 38)).astype(np.float32)
    tifffile.imwrite(tmp_path / "float.tif", flt)  # contiguous: memory-mapped
    tifffile.imwrite(tmp_path / "tiled.tiff", flt, compression="zlib", tile=(16, 16))
    rgba = rng.integers(0, 256, size=(20, 24, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    planar = np.ascontiguousarray(rgba[..., :3].transpose(2, 0, 1))
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")

    f = one([tmp_path / "float.tif"])
    assert (f.kind, f.n_bands, f.shape) == ("image", 1, (45, 38))
    assert_reads(f, flt)
    assert_reads(one([tmp_path / "tiled.tiff"]), flt)
    r = one([tmp_path / "rgba.tif"])
    assert r.n_bands == 3
    assert_reads(r, np.moveaxis(rgba[..., :3], -1, 0))
    assert_reads(one([tmp_path / "planar.tif"]), planar)


# ------------------------------------------------------------------------------------------
# Band files
# ------------------------------------------------------------------------------------------


@pytest.fixture
def gri(tmp_path, rng) -> tuple[list[Path], np.ndarray]:
    planes = rng.normal(size=(3, 22, 27)).astype(np.float32)
    paths = []
    for band, plane in zip("gri", planes, strict=True):
        header = tan_header(22, 27, ra=150.1 + 0.01 * len(paths))
        paths.append(write_fits(tmp_path / f"J1000+0210_{band}.fits", plane, header))
    return paths, planes


def test_band_files_combined(gri):
    paths, planes = gri
    by_kw = one([], bands=paths)
    by_plus = one(["+".join(str(p) for p in paths)])
    for src in (by_kw, by_plus):
        assert src.n_bands == 3 and src.shape == (22, 27)
        assert src.paths == tuple(str(p) for p in paths)
        assert src.id == "J1000+0210_g+J1000+0210_r+J1000+0210_i"
        assert_reads(src, planes)
    # The WCS is the first band's.
    assert by_kw.wcs_header == one([paths[0]]).wcs_header != one([paths[1]]).wcs_header
    # A name with '+' alone is one file, not a combination.
    assert one([paths[1]]).id == "J1000+0210_r"


def test_band_globs_pair_in_sorted_order(tmp_path, rng):
    for tile in ("t1", "t2"):
        for band in "gr":
            write_fits(tmp_path / f"{tile}_{band}.fits", rng.normal(size=(5, 6)).astype(np.float32))
    sources = open_sources([], bands=[tmp_path / "*_g.fits", tmp_path / "*_r.fits"])
    assert [s.id for s in sources] == ["t1_g+t1_r", "t2_g+t2_r"]
    assert all(s.n_bands == 2 for s in sources)
    write_fits(tmp_path / "t3_g.fits", np.zeros((5, 6), np.float32))
    with pytest.raises(InputError, match="different numbers of files"):
        open_sources([], bands=[tmp_path / "*_g.fits", tmp_path / "*_r.fits"])


def test_band_shape_mismatch_names_files_and_shapes(gri, tmp_path):
    paths, _ = gri
    odd = write_fits(tmp_path / "odd_z.fits", np.zeros((22, 28), np.float32))
    with pytest.raises(InputError) as err:
        open_sources([], bands=[paths[0], odd])
    msg = str(err.value)
    assert "J1000+0210_g.fits" in msg and "odd_z.fits" in msg
    assert "(22, 27)" in msg and "(22, 28)" in msg


# ------------------------------------------------------------------------------------------
# WCS
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(sip_fk5_header(60, 80), id="tan-sip-fk5"),
        pytest.param(
            fits.Header(
                {
                    "CTYPE1": "GLON-CAR",
                    "CTYPE2": "GLAT-CAR",
                    "CRVAL1": 30.0,
                    "CRVAL2": 1.0,
                    "CRPIX1": 10,
                    "CRPIX2": 10,
                    "CDELT1": -1e-3,
                    "CDELT2": 1e-3,
                }
            ),
            id="galactic-car",
        ),
        pytest.param(tan_header(60, 80, ra=359.99, dec=-89.9), id="tan-near-pole"),
    ],
)
def test_pixel_to_radec_matches_astropy_and_round_trips(tmp_path, rng, header):
    write_fits(tmp_path / "w.fits", np.zeros((60, 80), np.float32), header)
    src = one([tmp_path / "w.fits"])
    x = rng.uniform(-0.5, 79.5, 200)
    y = rng.uniform(-0.5, 59.5, 200)
    sky = WCS(fits.getheader(tmp_path / "w.fits")).pixel_to_world(x, y).icrs
    ra, dec = src.pixel_to_radec(x, y)
    np.testing.assert_allclose(ra, sky.ra.deg, atol=1e-9, rtol=0)
    np.testing.assert_allclose(dec, sky.dec.deg, atol=1e-9, rtol=0)
    assert np.all((ra >= 0) & (ra < 360))
    bx, by = src.radec_to_pixel(ra, dec)
    np.testing.assert_allclose(bx, x, atol=1e-6)
    np.testing.assert_allclose(by, y, atol=1e-6)
    # A source rebuilt from its pickle gives the same coordinates.
    again = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(again.pixel_to_radec(x, y)[0], ra)


def test_no_wcs_gives_nan_and_refuses_radec(tmp_path):
    Image.fromarray(np.zeros((6, 7), np.uint8)).save(tmp_path / "plain.png")
    src = one([tmp_path / "plain.png"])
    assert src.wcs is None
    ra, dec = src.pixel_to_radec(np.arange(4.0), np.arange(4.0))
    assert ra.shape == dec.shape == (4,) and np.isnan(ra).all() and np.isnan(dec).all()
    with pytest.raises(InputError, match=r"plain\.png.*no celestial WCS"):
        src.radec_to_pixel([150.0], [2.0])


# ------------------------------------------------------------------------------------------
# Memory: a tile of a mosaic costs a tile
# ------------------------------------------------------------------------------------------

BIG = 32768
TILE = 2048


def write_sparse_mosaic(path: Path) -> dict[tuple[int, int], np.ndarray]:
    """A 32768^2 float32 FITS (4 GiB, sparse on disk) with a few known rows in one tile."""
    header = fits.Header()
    header.update(SIMPLE=True, BITPIX=-32, NAXIS=2, NAXIS1=BIG, NAXIS2=BIG)
    header.update(tan_header(BIG, BIG))
    head = header.tostring().encode()
    nbytes = BIG * BIG * 4
    rows = {}
    with open(path, "wb") as f:
        f.write(head)
        for y, x0 in ((10_000, 20_000), (10_500, 21_000), (12_047, 20_000)):
            values = np.arange(1, 1001, dtype=np.float32) * (y % 97 + 1)
            f.seek(len(head) + (y * BIG + x0) * 4)
            f.write(values.astype(">f4").tobytes())
            rows[(y, x0)] = values
        f.seek(len(head) + -(-nbytes // 2880) * 2880 - 1)
        f.write(b"\0")
    return rows


def test_tile_of_a_4gib_mosaic_costs_a_tile(tmp_path):
    path = tmp_path / "mosaic.fits"
    rows = write_sparse_mosaic(path)
    src = one([path])
    assert src.shape == (BIG, BIG)
    tile_bytes = TILE * TILE * 4

    src.read(0, 1, 0, 1)  # first read opens the file: not what is measured
    tracemalloc.start()
    try:
        tile = src.read(10_000, 10_000 + TILE, 20_000, 20_000 + TILE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * tile_bytes, f"peak {peak / 2**20:.1f} MiB for a {tile_bytes / 2**20} MiB tile"

    expected = np.zeros((TILE, TILE), np.float32)
    for (y, x0), values in rows.items():
        expected[y - 10_000, x0 - 20_000 : x0 - 20_000 + values.size] = values
    np.testing.assert_array_equal(tile[0], expected)

    # The sample for per-image stretch limits is bounded too.
    tracemalloc.start()
    try:
        sample = sample_pixels(src, max_pixels=200_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sample.shape[0] == 1 and 0 < sample.shape[1] <= 200_000
    assert peak < 4 * 200_000 * 4

    # Resident memory in a fresh process (mmap'd or read-ahead pages would show here).
    script = textwrap.dedent(
        f"""
        import json, resource, sys
        from pipeline.sources import open_sources
        src = open_sources([{str(path)!r}])[0]
        src.read(0, 1, 0, 1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tile = src.read(10_000, 10_000 + {TILE}, 20_000, 20_000 + {TILE})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"delta_kib": after - before, "sum": float(tile.sum())}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["sum"] == pytest.approx(float(expected.sum(dtype=np.float64)), rel=1e-6)
    assert report["delta_kib"] * 1024 < 4 * tile_bytes
    assert report["delta_kib"] * 1024 < BIG * BIG * 4 / 64


def test_tile_of_a_4gib_tiff_costs_a_tile(tmp_path):
    path = tmp_path / "mosaic.tif"
    tifffile.imwrite(path, shape=(BIG, BIG), dtype="f4")  # sparse: no data written
    marks = np.arange(1, 301, dtype=np.float32)
    with tifffile.TiffFile(path) as tif:
        offset = tif.series[0].dataoffset
    with open(path, "r+b") as f:
        f.seek(offset + (11_000 * BIG + 20_500) * 4)
        f.write(marks.astype("<f4").tobytes())
    src = one([path])
    src.read(0, 1, 0, 1)
    tracemalloc.start()
    try:
        tile = src.read(10_000, 10_000 + TILE, 20_000, 20_000 + TILE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * tile.nbytes
    expected = np.zeros((TILE, TILE), np.float32)
    expected[1_000, 500:800] = marks
    np.testing.assert_array_equal(tile[0], expected)


def test_contiguous_reader_matches_numpy_indexing(tmp_path, rng):
    from pipeline.sources import _ContiguousArray

    for shape in [(7, 9), (7, 9, 4), (3, 7, 9), (7, 9, 3), (2, 1, 7, 9)]:
        data = rng.normal(size=shape).astype(">f4")
        path = tmp_path / "raw.bin"
        path.write_bytes(b"header!" + data.tobytes())
        arr = _ContiguousArray(str(path), 7, data.dtype, shape)
        try:
            for _ in range(25):
                key = tuple(
                    int(rng.integers(0, n))
                    if i < len(shape) - 2 and rng.random() < 0.3
                    else slice(*sorted(int(v) for v in rng.choice(n + 1, 2, replace=False)))
                    for i, n in enumerate(shape)
                )
                np.testing.assert_array_equal(arr[key], data[key])
        finally:
            arr.close()


@pytest.mark.parametrize("tile_shape", [(1, 8192), (256, 256)], ids=["row-tiles", "square-tiles"])
def test_tile_of_a_compressed_mosaic_costs_a_tile(tmp_path, rng, tile_shape):
    ny, nx = 4096, 8192  # 128 MiB as float32
    data = rng.integers(0, 8, size=(ny, nx), dtype=np.int16)
    path = tmp_path / "big.fits.fz"
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.CompImageHDU(data, compression_type="RICE_1", tile_shape=tile_shape),
        ]
    ).writeto(path)
    src = one([path])
    src.read(0, 1, 0, 1)
    box = (1000, 2024, 3000, 4024)
    tracemalloc.start()
    try:
        tile = src.read(*box)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(tile[0], data[1000:2024, 3000:4024])
    assert peak < 4 * tile.nbytes, f"peak {peak / 2**20:.1f} MiB for {tile.nbytes / 2**20} MiB"
    assert peak < ny * nx * 4 / 8


# ------------------------------------------------------------------------------------------
# Bad inputs: one clear line naming the file
# ------------------------------------------------------------------------------------------


def _bad_inputs(tmp: Path) -> dict[str, tuple[list, dict, str]]:
    """name -> (inputs, kwargs, text the message must contain besides the file name)."""
    good = tmp / "good.fits"
    write_fits(good, np.arange(200 * 100, dtype=np.float32).reshape(200, 100))
    raw = good.read_bytes()
    (tmp / "garbage.fits").write_bytes(b"this is not FITS " * 300)
    (tmp / "trunc_data.fits").write_bytes(raw[: 2880 + 4000])
    (tmp / "trunc_header.fits").write_bytes(raw[:1000])
    (tmp / "empty.fits").write_bytes(b"")
    (tmp / "fake.fits.gz").write_bytes(raw)
    (tmp / "cut.fits.gz").write_bytes(gzip.compress(raw)[:3000])
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.BinTableHDU.from_columns(
                [fits.Column(name="a", format="E", array=np.zeros(3))], name="EVENTS"
            ),
        ]
    ).writeto(tmp / "table.fits")
    write_fits(tmp / "line.fits", np.zeros(50, np.float32))
    write_fits(tmp / "hyper.fits", np.zeros((2, 2, 5, 6), np.float32))
    zero = fits.Header()
    zero.update(SIMPLE=True, BITPIX=-32, NAXIS=2, NAXIS1=0, NAXIS2=10)
    (tmp / "zero.fits").write_bytes(zero.tostring().encode())  # astropy would not write it
    (tmp / "folder.fits").mkdir()
    (tmp / "notes.csv").write_text("a,b\n")
    (tmp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp / "empty_dir").mkdir()
    xr.Dataset({"img": (("y", "x"), np.zeros((4, 5)))}).to_zarr(
        tmp / "s.zarr", zarr_format=3, consolidated=False
    )
    return {
        "garbage": ([tmp / "garbage.fits"], {}, "not a readable FITS file"),
        "truncated data": ([tmp / "trunc_data.fits"], {}, "truncated"),
        "truncated header": ([tmp / "trunc_header.fits"], {}, "FITS"),
        "empty file": ([tmp / "empty.fits"], {}, "FITS"),
        "not gzip": ([tmp / "fake.fits.gz"], {}, "not gzip"),
        "cut gzip": ([tmp / "cut.fits.gz"], {}, "FITS"),
        "table hdu": ([f"{tmp / 'table.fits'}[EVENTS]"], {}, "BinTableHDU, not an image"),
        "no image hdu": ([tmp / "table.fits"], {}, "1 EVENTS BinTableHDU"),
        "missing named hdu": ([tmp / "good.fits"], {"hdu": "SCI"}, "no HDU named 'SCI'"),
        "missing hdu number": ([f"{tmp / 'good.fits'}[4]"], {}, "0 PRIMARY PrimaryHDU (200, 100)"),
        "1-D": ([f"{tmp / 'line.fits'}[0]"], {}, "1-D"),
        "4-D": ([f"{tmp / 'hyper.fits'}[0]"], {}, "4-D"),
        "4-D auto": ([tmp / "hyper.fits"], {}, "no HDU holds"),
        "0-size": ([f"{tmp / 'zero.fits'}[0]"], {}, "empty image"),
        "missing path": ([tmp / "nowhere.fits"], {}, "no such file"),
        "directory as file": ([tmp / "folder.fits"], {}, "directory"),
        "unsupported extension": ([tmp / "notes.csv"], {}, "unsupported file type"),
        "glob matches nothing": ([tmp / "*.nothing.fits"], {}, "no files match"),
        "empty directory": ([tmp / "empty_dir"], {}, "no supported images"),
        "corrupt png": ([tmp / "broken.png"], {}, "not a readable image"),
        "missing zarr variable": ([f"{tmp / 's.zarr'}:nope"], {}, "no variable 'nope'"),
    }


def test_every_bad_input_is_one_clear_line(tmp_path):
    cases = _bad_inputs(tmp_path)
    failures = []
    for name, (inputs, kwargs, text) in cases.items():
        try:
            open_sources(inputs, **kwargs)
        except InputError as exc:
            msg = str(exc)
            named = Path(str(inputs[0]).split("[")[0].split(":nope")[0]).name
            if named not in msg or text not in msg or "\n" in msg or "Traceback" in msg:
                failures.append(f"{name}: {msg!r}")
        except Exception as exc:  # anything else is a bug: it would print a traceback
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
        else:
            failures.append(f"{name}: no error")
    assert not failures, "\n".join(failures)


def test_all_nan_image_is_accepted(tmp_path):
    write_fits(tmp_path / "nan.fits", np.full((8, 9), np.nan, np.float32))
    src = one([tmp_path / "nan.fits"])
    assert np.isnan(src.read(0, 8, 0, 9)).all()


def test_read_outside_the_image_raises_valueerror(tmp_path):
    write_fits(tmp_path / "a.fits", np.zeros((10, 12), np.float32))
    src = one([tmp_path / "a.fits"])
    for box in [(-1, 5, 0, 5), (0, 11, 0, 5), (0, 5, 3, 13), (5, 4, 0, 1), (0.5, 2, 0, 2)]:
        with pytest.raises(ValueError):
            src.read(*box)


def test_file_gone_after_open_is_an_input_error(tmp_path):
    path = write_fits(tmp_path / "gone.fits", np.zeros((10, 12), np.float32))
    src = one([path])
    path.unlink()
    with pytest.raises(InputError, match=r"gone\.fits"):
        src.read(0, 2, 0, 2)


# ------------------------------------------------------------------------------------------
# Pickling, processes, threads
# ------------------------------------------------------------------------------------------


def test_sources_pickle_and_read_the_same_in_another_process(tmp_path, rng, gri):
    data = rng.normal(size=(30, 40)).astype(np.float32)
    write_fits(tmp_path / "p.fits", data, tan_header(30, 40))
    xr.Dataset({"v": (("y", "x"), data)}).to_zarr(
        tmp_path / "p.zarr", zarr_format=3, consolidated=False
    )
    Image.fromarray((np.abs(data) * 50).astype(np.uint8)).save(tmp_path / "p.png")
    tifffile.imwrite(tmp_path / "p.tif", data, compression="zlib", tile=(16, 16))
    fz = tmp_path / "p.fits.fz"
    fits.HDUList(
        [fits.PrimaryHDU(), fits.CompImageHDU(data, compression_type="GZIP_2", quantize_level=0.0)]
    ).writeto(fz)
    sources = open_sources(
        [tmp_path / "p.fits", tmp_path / "p.zarr", tmp_path / "p.png", tmp_path / "p.tif", fz],
        bands=gri[0],
    )
    for src in sources:
        blob = pickle.dumps(src)
        assert len(blob) < 20_000  # header facts, not pixels
        assert pickle.loads(blob) == src
    box = (3, 17, 5, 25)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        remote = list(pool.map(methodcaller("read", *box), sources))
        remote_sky = pool.submit(methodcaller("pixel_to_radec", 1.5, 2.5), sources[0]).result()
    for src, got in zip(sources, remote, strict=True):
        np.testing.assert_array_equal(got, src.read(*box))
    assert remote_sky == sources[0].pixel_to_radec(1.5, 2.5)
    assert len({s.id for s in sources}) == len(sources)


def test_interface_fields_alone_are_enough_to_read(tmp_path, mef):
    path, sci, _ = mef
    full = one([path])
    bare = ImageSource(
        id="x", paths=(str(path),), kind="fits", shape=full.shape, n_bands=1, hdu=2,
        variable=None, wcs_header=full.wcs_header,
    )  # fmt: skip
    assert_reads(bare, sci)


def test_threads_read_one_source_concurrently(tmp_path, rng):
    data = rng.normal(size=(256, 300)).astype(np.float32)
    fz = tmp_path / "t.fits.fz"
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.CompImageHDU(
                data, compression_type="GZIP_2", quantize_level=0.0, tile_shape=(32, 32)
            ),
        ]
    ).writeto(fz)
    write_fits(tmp_path / "t.fits", data)
    boxes = [(y, y + 40, x, x + 50) for y in range(0, 200, 20) for x in range(0, 250, 25)]
    for src in open_sources([tmp_path / "t.fits", fz]):
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda b, s=src: s.read(*b), boxes))
        for (y0, y1, x0, x1), got in zip(boxes, results, strict=True):
            np.testing.assert_array_equal(got[0], data[y0:y1, x0:x1])


# ------------------------------------------------------------------------------------------
# Inputs and ids
# ------------------------------------------------------------------------------------------


def test_expand_directories_globs_and_lists(tmp_path):
    root = tmp_path / "survey"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    (root / ".hidden").mkdir()
    for p in [
        root / "b" / "deep" / "z.fits",
        root / "a" / "y.fits.fz",
        root / "a" / "x.png",
        root / ".hidden" / "h.fits",
        root / "a" / "notes.txt",
    ]:
        p.write_bytes(b"")
    xr.Dataset({"v": (("y", "x"), np.zeros((2, 2)))}).to_zarr(
        root / "m.zarr", zarr_format=3, consolidated=False
    )
    expected = sorted(
        str(p)
        for p in [root / "b/deep/z.fits", root / "a/y.fits.fz", root / "a/x.png", root / "m.zarr"]
    )
    assert expand_inputs([root]) == expected
    assert expand_inputs(str(root / "**" / "*.fits")) == [str(root / "b/deep/z.fits")]
    assert expand_inputs([f"{root}/a/*.fz[SCI]"]) == [f"{root / 'a/y.fits.fz'}[SCI]"]

    listing = tmp_path / "inputs.lst"
    listing.write_text(
        "# survey list\n\nsurvey/a/x.png   # relative to the list\n"
        f"{root / 'm.zarr'}:v\nsurvey/a/x.png\ns3://bucket/tile.fits\n"
    )
    want = [str(root / "a/x.png"), f"{root / 'm.zarr'}:v", "s3://bucket/tile.fits"]
    assert expand_inputs([listing]) == want
    assert expand_inputs([f"@{listing}"]) == want


def test_ids_are_stable_and_unique(tmp_path, rng):
    for d in ("night1", "night2"):
        (tmp_path / d).mkdir()
        write_fits(tmp_path / d / "field.fits", rng.normal(size=(4, 4)).astype(np.float32))
    write_fits(tmp_path / "night1" / "other.fits", np.zeros((4, 4), np.float32))
    (tmp_path / "night1" / "field.fits.gz").write_bytes(
        gzip.compress((tmp_path / "night1" / "field.fits").read_bytes())
    )
    inputs = [tmp_path / "night1", tmp_path / "night2"]
    first = [s.id for s in open_sources(inputs)]
    assert first == [s.id for s in open_sources(inputs)]
    assert len(set(first)) == len(first) == 4
    # Same stem in two dirs and twice in one dir: parent dirs, then full names tell them apart.
    assert sorted(first) == [
        "night1/field.fits",
        "night1/field.fits.gz",
        "night2/field.fits",
        "other",
    ]
    assert [s.id for s in open_sources([tmp_path / "night2"])] == ["field"]


def test_sample_pixels_is_bounded_and_from_the_image(tmp_path, rng):
    data = rng.normal(size=(300, 400)).astype(np.float32)
    write_fits(tmp_path / "s.fits", data)
    src = one([tmp_path / "s.fits"])
    small = sample_pixels(src, max_pixels=5_000)
    assert small.dtype == np.float32 and small.shape[0] == 1 and 0 < small.shape[1] <= 5_000
    assert np.isin(small, data).all()
    np.testing.assert_array_equal(np.sort(sample_pixels(src)[0]), np.sort(data.ravel()))

    rgb = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "s.png")
    png = sample_pixels(one([tmp_path / "s.png"]), max_pixels=1_000)
    assert png.shape[0] == 3 and 0 < png.shape[1] <= 1_000


def test_zarr_read_touches_only_its_chunks(tmp_path, rng):
    data = rng.normal(size=(2048, 2048)).astype(np.float32)  # 16 MiB, 64 KiB chunks
    xr.Dataset({"v": (("y", "x"), data)}).to_zarr(
        tmp_path / "big.zarr",
        zarr_format=3,
        consolidated=False,
        encoding={"v": {"chunks": (128, 128)}},
    )
    src = one([tmp_path / "big.zarr"])
    src.read(0, 1, 0, 1)
    tracemalloc.start()
    try:
        got = src.read(700, 764, 900, 964)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got[0], data[700:764, 900:964])
    assert peak < 2 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # a few chunks, not 16 MiB


def test_record_round_trip_reopens_the_same_image(tmp_path):
    import json

    from pipeline.sources import ImageSource

    path = tmp_path / "rec.fits"
    data = np.arange(40 * 50, dtype=np.float32).reshape(40, 50)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, name="SCI")]).writeto(path)
    (src,) = open_sources([f"{path}[SCI]"])
    again = ImageSource.from_record(json.loads(json.dumps(src.to_record())))
    assert (again.id, again.shape, again.hdu, again.n_bands) == (
        src.id,
        src.shape,
        src.hdu,
        src.n_bands,
    )
    np.testing.assert_array_equal(again.read(5, 15, 10, 30), src.read(5, 15, 10, 30))


def test_a_png_is_decoded_once_per_process_not_once_per_thread(tmp_path, rng, monkeypatch):
    # Each work unit's prefetch runs on a new thread; with a per-thread cache every unit of a
    # PNG mosaic decoded the whole file again (18 decodes for the 3,465-window HDF job).
    import threading

    import pipeline.sources.rasters as sources

    rgb = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "mosaic.png")
    src = one([tmp_path / "mosaic.png"])
    decodes = []
    real = sources._decode_pil
    monkeypatch.setattr(sources, "_decode_pil", lambda path: decodes.append(path) or real(path))
    got = {}

    def read(y: int) -> None:
        got[y] = src.read(y, y + 10, 0, 50)

    threads = [threading.Thread(target=read, args=(y,)) for y in (0, 10, 20, 30, 0, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(decodes) == 1
    whole = np.concatenate([got[y] for y in (0, 10, 20, 30)], axis=1)
    np.testing.assert_array_equal(whole, np.moveaxis(rgb, -1, 0))
