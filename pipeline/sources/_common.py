"""Shared by every format: extensions, paths and specs (``file.fits[1]``, ``a+b``), labels, the
picklable part of a file (:class:`_Part`) and WCS headers.

Part of :mod:`pipeline.sources` (moved from ``sources.py`` unchanged).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError

logger = logging.getLogger(__name__)


FITS_EXTENSIONS = (
    ".fits",
    ".fit",
    ".fts",
    ".fz",
    ".fits.fz",
    ".fit.fz",
    ".fts.fz",
    ".fits.gz",
    ".fit.gz",
    ".fts.gz",
    ".fits.bz2",
    ".fit.bz2",
    ".fts.bz2",
)


ZARR_EXTENSIONS = (".zarr",)


_PIL_EXTENSIONS = (".png", ".jpg", ".jpeg")


_TIFF_EXTENSIONS = (".tif", ".tiff")


IMAGE_EXTENSIONS = _PIL_EXTENSIONS + _TIFF_EXTENSIONS


LIST_EXTENSIONS = (".txt", ".lst")


# Longest first so that ".fits.gz" wins over ".gz"-less ".fits" checks.
_ALL_EXTENSIONS = tuple(
    sorted(FITS_EXTENSIONS + ZARR_EXTENSIONS + IMAGE_EXTENSIONS, key=len, reverse=True)
)


_GLOB_CHARS = re.compile(r"[*?\[]")


_HDU_SUFFIX = re.compile(r"^(.*)\[([^\[\]]+)\]$")


# Zarr / xarray dimension names that mean "bands" when they come last.
_BAND_DIM_NAMES = {"band", "bands", "channel", "channels", "c", "rgb", "color", "colour"}


# PIL modes read as one band; every other mode is converted to RGB.
_PIL_GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}


_WCS_CACHE = 64


def _is_url(path: str) -> bool:
    return "://" in path


def _kind_of(path: str) -> str | None:
    """``fits`` / ``zarr`` / ``image`` from a path's extension (or a Zarr directory)."""
    name = path.rstrip("/").lower()
    if name.endswith(FITS_EXTENSIONS):
        return "fits"
    if name.endswith(ZARR_EXTENSIONS):
        return "zarr"
    if name.endswith(IMAGE_EXTENSIONS):
        return "image"
    if not _is_url(path) and os.path.isdir(path) and _is_zarr_dir(path):
        return "zarr"
    return None


def _is_zarr_dir(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, m)) for m in ("zarr.json", ".zgroup", ".zarray"))


def _stem(path: str) -> str:
    """File name without its (possibly double) image extension: ``a.fits.gz`` -> ``a``."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if not _is_url(path):
        name = os.path.basename(path.rstrip(os.sep)) or name
    lower = name.lower()
    for ext in _ALL_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0] or name


def _parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """Split ``file.fits[SCI]`` / ``store.zarr:var`` into (path, hdu text, variable)."""
    m = _HDU_SUFFIX.match(spec)
    if m and m.group(1).lower().endswith(FITS_EXTENSIONS):
        return m.group(1), m.group(2).strip().strip("'\""), None
    if ":" in spec:
        base, var = spec.rsplit(":", 1)
        if var and "/" not in var and base.rstrip("/").lower().endswith(ZARR_EXTENSIONS):
            return base, None, var
    return spec, None, None


def _hdu_value(text: str | int | None) -> int | str | None:
    if text is None or isinstance(text, int):
        return text
    text = str(text).strip()
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else text


def _split_combo(spec: str) -> list[str]:
    """Split ``g.fits+r.fits+i.fits`` into its band files.

    Survey file names often contain ``+`` (``J1234+5678.fits``), so pieces are joined until they
    end with a known image extension, and a spec that exists on disk as-is is never split.
    """
    if "+" not in spec:
        return [spec]
    path = _parse_spec(spec)[0]
    if not _is_url(path) and os.path.exists(path):
        return [spec]
    parts: list[str] = []
    acc = ""
    for piece in spec.split("+"):
        acc = f"{acc}+{piece}" if acc else piece
        if _kind_of(_parse_spec(acc)[0]) is not None:
            parts.append(acc)
            acc = ""
    if acc or len(parts) < 2:
        return [spec]
    return parts


def _label(path: str, hdu: Any = None, variable: str | None = None) -> str:
    if hdu is not None:
        return f"{path}[{hdu}]"
    if variable is not None:
        return f"{path}:{variable}"
    return path


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _local_stat_key(path: str) -> tuple:
    """Cache key that changes when a local file is rewritten."""
    if _is_url(path):
        return (path,)
    try:
        st = os.stat(path)
    except OSError:
        return (path,)
    return (path, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class _Part:
    """One file of a source and how to index it; pickles, holds no pixels or handles.

    ``raw_shape`` is the array as stored; ``y_axis``, ``x_axis`` and ``band_axis`` locate the
    image axes in it, every other axis has length 1 and is indexed with 0. ``n_bands`` of the
    band axis are read (the rest, e.g. alpha, dropped).
    """

    path: str
    kind: str  # fits | zarr | image
    reader: str  # fits | xarray | zarr | tiff | pil
    raw_shape: tuple[int, ...]
    y_axis: int
    x_axis: int
    band_axis: int | None
    n_bands: int
    hdu: int | None = None
    variable: str | None = None
    compressed: bool = False
    # (dtype, byte offset of the data) of a plain local FITS image, found when it was probed:
    # its boxes are read with positioned reads, without opening it through astropy again.
    plain: tuple[str, int] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.raw_shape[self.y_axis], self.raw_shape[self.x_axis])

    @property
    def label(self) -> str:
        return _label(self.path, self.hdu, self.variable)

    def key(self, y0: int, y1: int, x0: int, x1: int) -> tuple:
        key: list[Any] = [0] * len(self.raw_shape)
        key[self.y_axis] = slice(y0, y1)
        key[self.x_axis] = slice(x0, x1)
        if self.band_axis is not None:
            key[self.band_axis] = slice(0, self.n_bands)
        return tuple(key)

    def to_bands(self, data: Any) -> np.ndarray:
        """Array indexed with :meth:`key` (integer-indexed axes gone) -> (n_bands, h, w)."""
        data = np.asarray(data)
        kept = sorted(a for a in (self.band_axis, self.y_axis, self.x_axis) if a is not None)
        want = [a for a in (self.band_axis, self.y_axis, self.x_axis) if a is not None]
        data = np.transpose(data, [kept.index(a) for a in want])
        return data if self.band_axis is not None else data[np.newaxis]


def _squeeze_layout(
    shape: tuple[int, ...], *, label: str, band_last: bool = False
) -> tuple[int, int, int | None]:
    """(y_axis, x_axis, band_axis) of a stored array, last two axes being y and x.

    Leading length-1 axes (radio images' Stokes / frequency axes, a time axis of 1) are
    dropped; what is left must be (y, x) or (band, y, x). ``band_last``: (y, x, band).
    """
    if len(shape) < 2:
        raise InputError(
            f"{label}: {len(shape)}-D data of shape {shape}; need 2-D (y, x) or 3-D (band, y, x)"
        )
    if band_last and len(shape) >= 3:
        y_axis, x_axis, band_axis = len(shape) - 3, len(shape) - 2, len(shape) - 1
        lead = shape[: len(shape) - 3]
    else:
        y_axis, x_axis = len(shape) - 2, len(shape) - 1
        band_axis = len(shape) - 3 if len(shape) >= 3 else None
        lead = shape[: len(shape) - 3] if len(shape) >= 3 else ()
    if any(n != 1 for n in lead):
        raise InputError(
            f"{label}: {len(shape)}-D data of shape {shape}; need 2-D (y, x) or 3-D (band, y, x)"
        )
    if any(n == 0 for n in shape):
        raise InputError(f"{label}: empty image (shape {shape})")
    return y_axis, x_axis, band_axis


def _celestial_header(header: Any, *, label: str, raw: bytes | None = None) -> str | None:
    """Celestial WCS of a FITS header as a header string, or None (logged when unusable).

    ``raw``, the header's own block as read from the file, lets a plain 2-D RA/Dec WCS take
    wcslib's path (:func:`_fast_celestial_header`), to the same text; with ``raw``,
    ``header`` may be None, and astropy's is then parsed from ``raw`` only when wcslib's path
    does not take it."""
    if raw is not None and (text := _fast_celestial_header(raw)) is not None:
        return text  # wcslib wrote it: workers rebuild it the same way (tested)
    from astropy.wcs import WCS, FITSFixedWarning
    from astropy.wcs.utils import wcs_to_celestial_frame

    if header is None:
        from astropy.io import fits

        header = fits.Header.fromstring(raw.decode("ascii"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            w = WCS(header)
            if not w.has_celestial:
                return None
            # A 2-D RA/Dec image is its own celestial part (``celestial`` deep-copies the WCS).
            cel = w if w.naxis == 2 and (w.wcs.lng, w.wcs.lat) == (0, 1) else w.celestial
            wcs_to_celestial_frame(cel)  # refuses frames astropy cannot turn into ICRS
            text = _unpadded(cel.to_header(relax=True).tostring())
            _sky_transform(text)  # what workers will rebuild must build
    except Exception as exc:
        logger.warning(
            "%s: celestial WCS not usable (%s); RA/Dec will be NaN", label, _one_line(exc)
        )
        return None
    return text


def _fast_celestial_header(raw: bytes) -> str | None:
    """:func:`_celestial_header`'s text, through wcslib alone, for the header block ``raw``
    of a 2-D image whose WCS is all wcslib's: ICRS RA/Dec axes, no distortion astropy applies
    on top (SIP, lookup tables). None for anything else, which goes through astropy.

    Building :class:`astropy.wcs.WCS` from a parsed header costs about 3 ms (the cards'
    Python checks, then its fixes), most of the probe of a small patch; wcslib parses, fixes
    and writes the same header in C (what astropy does inside, without the cards' checks),
    and the text is assembled as astropy's ``to_header(relax=True).tostring()`` does, less
    the padding after END (tested equal on the headers this path takes)."""
    # WCSHDO_P14 | WCSHDO_all: the flags astropy's to_header(relax=True) writes with.
    from astropy.wcs import WCSHDO_P14, WCSHDO_all, Wcsprm

    if _has_distortion(raw.decode("ascii", errors="replace")):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = Wcsprm(header=raw, relax=True)
            p.fix()
            p.set()
    except Exception:
        return None  # astropy says why, or is more forgiving
    if p.naxis != 2 or (p.lng, p.lat) != (0, 1) or p.radesys.strip() != "ICRS":
        return None
    ctype = [c.upper() for c in p.ctype]
    if not (ctype[0].startswith("RA") and ctype[1].startswith("DEC")):
        return None
    out = p.to_header(WCSHDO_P14 | WCSHDO_all)
    kept = [
        c
        for i in range(0, len(out), 80)
        if (c := out[i : i + 80])[:8].strip() not in ("", "COMMENT")
    ]
    kept.append("END".ljust(80))
    return "".join(kept)  # unpadded, as _celestial_header keeps astropy's text


def _unpadded(text: str) -> str:
    """A header string without the blanks after its END card: FITS pads a header to blocks
    of 2880 bytes, which for a WCS of a dozen cards is most of what every image record, and
    every source sent between client and workers, would carry."""
    end = text.rfind("END" + " " * 77)
    return text[: end + 80] if end >= 0 and end % 80 == 0 else text


def _header_from_string(text: str) -> Any:
    from astropy.io import fits

    sep = "\n" if "\n" in text else ""
    return fits.Header.fromstring(text, sep=sep)


def _per_thread(local: threading.local, key: str, make) -> Any:
    """``make(key)``, kept in an LRU of :data:`_WCS_CACHE` entries per thread: wcslib
    structures are not safe to share between threads."""
    cache = getattr(local, "cache", None)
    if cache is None:
        cache = local.cache = OrderedDict()
    value = cache.get(key)
    if value is None:
        value = cache[key] = make(key)
        while len(cache) > _WCS_CACHE:
            cache.popitem(last=False)
    return value


_wcs_local = threading.local()


def _build_wcs(text: str) -> Any:
    from astropy.wcs import WCS, FITSFixedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(_header_from_string(text)).celestial


def _wcs_from_header(text: str) -> Any:
    return _per_thread(_wcs_local, text, _build_wcs)


# Keywords of distortions that wcslib's own parser does not apply (astropy adds SIP, lookup
# tables and detector-to-image corrections on top of it).
_DISTORTION = re.compile(r"A_ORDER|B_ORDER|AP_ORDER|BP_ORDER|CPDIS|CQDIS|D2IMDIS|D2IMERR|DP\d|DQ\d")


def _has_distortion(text: str) -> bool:
    """Whether a header (80-character cards, with or without newlines between them) has a
    card of a distortion astropy applies on top of wcslib, or a ``-SIP`` axis type."""
    if "-SIP" in text:
        return True
    if "\n" in text:
        return any(
            m.start() == 0 or text[m.start() - 1] == "\n" for m in _DISTORTION.finditer(text)
        )
    return any(m.start() % 80 == 0 for m in _DISTORTION.finditer(text))


def _fast_wcsprm(text: str) -> Any | None:
    """wcslib's own transform of a celestial header already normalised by astropy (the
    probe's ``to_header``), when it is all there is to it: ICRS equatorial axes and no
    distortion astropy applies on top (SIP, lookup tables). Else None.

    Building :class:`astropy.wcs.WCS` costs about 2.5 ms (Python header checks and fixes) and
    ``pixel_to_world(...).icrs`` another 1 ms through SkyCoord; over 10^5 small patches that is
    most of the per-file work. ``Wcsprm`` parses the same header in C in under 0.1 ms and
    ``p2s`` gives the same RA/Dec (tested against astropy)."""
    from astropy.wcs import Wcsprm

    if _has_distortion(text):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = Wcsprm(header=text.encode("ascii"), relax=True)
        p.set()
    if p.naxis != 2 or p.lng < 0 or p.lat < 0 or p.radesys.strip() != "ICRS":
        return None
    ctype = [c.upper() for c in p.ctype]
    if not (ctype[p.lng].startswith("RA") and ctype[p.lat].startswith("DEC")):
        return None
    return p


_sky_local = threading.local()


def _sky_transform(text: str) -> Any:
    """The pixel -> ICRS transform of a celestial header, per thread: a ``Wcsprm``
    (:func:`_fast_wcsprm`) or else the astropy WCS."""
    return _per_thread(_sky_local, text, lambda t: _fast_wcsprm(t) or _wcs_from_header(t))


def _pixel_to_icrs(text: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ICRS RA, Dec (degrees) of 0-based pixels ``x``, ``y`` (same shape) under a celestial
    header."""
    from astropy.wcs import Wcsprm

    t = _sky_transform(text)
    if isinstance(t, Wcsprm):
        pix = np.stack([x.ravel(), y.ravel()], axis=1)
        if not len(pix):
            return np.empty(x.shape), np.empty(x.shape)
        world = t.p2s(pix, 0)["world"]  # pixels outside the projection come back NaN
        ra = world[:, t.lng].reshape(x.shape)
        dec = world[:, t.lat].reshape(x.shape)
        return np.mod(ra, 360.0), dec
    sky = t.pixel_to_world(x, y).icrs
    return np.asarray(sky.ra.deg, dtype=np.float64), np.asarray(sky.dec.deg, dtype=np.float64)


def _supported() -> str:
    return ", ".join(FITS_EXTENSIONS + ZARR_EXTENSIONS + IMAGE_EXTENSIONS)
