"""Survey inputs as lazy, picklable image sources.

:func:`open_sources` turns paths, globs, directories, list files and fsspec URLs of FITS, Zarr
and PNG / JPEG / TIFF images into :class:`ImageSource` objects. A source holds only paths and
header facts (shape, bands, HDU, variable, celestial WCS as a header string), so it pickles to
any worker; :meth:`ImageSource.read` opens the file in the worker and reads only the section it
is asked for, never a whole mosaic:

- FITS (plain, ``.gz``, tile-compressed ``.fz``): astropy ``HDU.section`` on a lazily loaded
  local or fsspec (URL) file, so a tile read touches only the bytes / compressed tiles under
  it (row by row for a narrow section; in strips of rows for row-tiled ``.fz``).
  BSCALE / BZERO / BLANK are applied by astropy. Local files are deliberately not
  memory-mapped: see :func:`_fits_open`.
- Zarr / xarray: ``xarray.open_zarr(chunks=None)`` gives lazily indexed variables (no dask
  inside a worker's task), so a read fetches only the chunks under it. Stores that xarray
  cannot open (a bare array, arrays without dimension names) fall back to zarr itself.
- TIFF: tifffile finds the layout; uncompressed contiguous data is read directly with
  ``os.preadv`` row by row (not memory-mapped, for the reason given for FITS), anything else
  through tifffile's Zarr view, which decodes only the strips / tiles under the section.
- PNG / JPEG (and TIFF flavours tifffile cannot map, such as palette images): PIL decodes the
  whole file on the first read; these formats have no random access and such images are small.
  The decoded array is kept per thread (one image) so the tiles of one image decode it once.

Open files are kept in a small per-thread LRU (never pickled, keyed by path, size and mtime so
a rewritten file is reopened), which keeps reads in Dask worker threads free of locks.

Every problem the user can cause raises :class:`~pipeline.errors.InputError` with one line
naming the file (and HDU / variable).

The package, one module a job: ``inputs`` (expansion of paths, globs, directories, list files
and URLs; :func:`open_sources`), ``source`` (:class:`ImageSource`, probing, the ``_READERS``
table that dispatches a read to its format, sampling, :func:`clear_caches`), one module per
format (``fits``, ``zarrs``, ``rasters``), ``caches`` (the per-thread handle LRU) and
``_common`` (extensions, specs, labels, the picklable ``_Part``, WCS headers).
"""

from ._common import FITS_EXTENSIONS, IMAGE_EXTENSIONS, LIST_EXTENSIONS, ZARR_EXTENSIONS

# Private names the tests reach for (the rule of file.fits[N], the TIFF direct reader).
from ._common import _hdu_value as _hdu_value
from .inputs import expand_inputs, list_images, open_listed, open_sources, spec_path
from .rasters import _ContiguousArray as _ContiguousArray
from .source import ImageSource, clear_caches, sample_pixels

__all__ = [
    "FITS_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "LIST_EXTENSIONS",
    "ZARR_EXTENSIONS",
    "ImageSource",
    "clear_caches",
    "expand_inputs",
    "list_images",
    "open_listed",
    "open_sources",
    "sample_pixels",
    "spec_path",
]
