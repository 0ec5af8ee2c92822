"""Expansion of inputs (paths, globs, directories, list files, URLs) and :func:`open_sources`.

Part of :mod:`pipeline.sources` (moved from ``sources.py`` unchanged).
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from ..errors import InputError
from ._common import (
    _GLOB_CHARS,
    FITS_EXTENSIONS,
    IMAGE_EXTENSIONS,
    LIST_EXTENSIONS,
    ZARR_EXTENSIONS,
    _is_url,
    _is_zarr_dir,
    _kind_of,
    _one_line,
    _parse_spec,
    _split_combo,
    _stem,
    _supported,
)
from .source import ImageSource, _probe

logger = logging.getLogger(__name__)


def _walk(directory: str) -> list[str]:
    """Supported images under a directory (Zarr stores kept whole), sorted, hidden skipped."""
    found = []
    for root, dirs, files in os.walk(directory):
        keep = []
        for d in dirs:
            if d.startswith("."):
                continue
            full = os.path.join(root, d)
            if d.lower().endswith(ZARR_EXTENSIONS) or _is_zarr_dir(full):
                found.append(full)
            else:
                keep.append(d)
        dirs[:] = sorted(keep)
        for name in files:
            if not name.startswith(".") and name.lower().endswith(
                FITS_EXTENSIONS + IMAGE_EXTENSIONS
            ):
                found.append(os.path.join(root, name))
    return sorted(os.path.abspath(p) for p in found)


def _read_list(path: str, depth: int) -> list[str]:
    if depth > 8:
        raise InputError(f"{path}: list files nest more than 8 deep")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the list of inputs ({_one_line(exc)})") from exc
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for raw in lines:
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line:
            out += _expand_one(line, base=base, depth=depth + 1)
    return out


def _expand_one(spec: str, *, base: str | None, depth: int) -> list[str]:
    spec = spec.strip()
    if not spec:
        return []
    if spec.startswith("@"):
        target = spec[1:]
        if base is not None and not os.path.isabs(target):
            target = os.path.join(base, target)
        if not os.path.isfile(target):
            raise InputError(f"{target}: no such list file")
        return _read_list(target, depth)
    combo = _split_combo(spec)
    if len(combo) > 1:
        expanded = []
        for part in combo:
            paths = _expand_one(part, base=base, depth=depth)
            if len(paths) != 1:
                raise InputError(
                    f"{spec}: each band of a '+' combination must name one image, {part!r} names {len(paths)}"
                )
            expanded.append(paths[0])
        return ["+".join(expanded)]
    path, hdu_text, var = _parse_spec(spec)
    suffix = f"[{hdu_text}]" if hdu_text is not None else f":{var}" if var is not None else ""
    if _is_url(path):
        return _expand_url(path, suffix)
    if base is not None and not os.path.isabs(path):
        path = os.path.join(base, path)
    if os.path.isdir(path):
        if path.rstrip(os.sep).lower().endswith(ZARR_EXTENSIONS) or _is_zarr_dir(path):
            return [os.path.abspath(path) + suffix]
        found = _walk(path)
        if not found:
            raise InputError(f"{path}: directory holds no supported images ({_supported()})")
        return found
    if os.path.exists(path):
        if not suffix and path.lower().endswith(LIST_EXTENSIONS):
            return _read_list(path, depth)
        return [os.path.abspath(path) + suffix]
    if _GLOB_CHARS.search(path):
        matches = sorted(glob.glob(path, recursive=True))
        if not matches:
            raise InputError(f"{path}: no files match this pattern")
        out = []
        for m in matches:
            if os.path.isdir(m):
                if m.rstrip(os.sep).lower().endswith(ZARR_EXTENSIONS) or _is_zarr_dir(m):
                    out.append(os.path.abspath(m) + suffix)
                else:
                    out += _walk(m)
            elif _kind_of(m) is not None:
                out.append(os.path.abspath(m) + suffix)
        if not out:
            raise InputError(
                f"{path}: the pattern matches {len(matches)} path(s) but no supported image ({_supported()})"
            )
        return out
    raise InputError(f"{path}: no such file or directory")


def _expand_url(url: str, suffix: str) -> list[str]:
    """A URL as is; a URL glob (``s3://bucket/tiles/*.fits``) through its fsspec filesystem."""
    if not _GLOB_CHARS.search(url.split("://", 1)[1]):
        return [url + suffix]
    import fsspec

    try:
        fs, pattern = fsspec.core.url_to_fs(url)
        matches = sorted(fs.glob(pattern))
    except Exception as exc:  # unknown protocol, missing credentials, network
        raise InputError(f"{url}: cannot list this pattern ({_one_line(exc)})") from exc
    out = [fs.unstrip_protocol(m) + suffix for m in matches if _kind_of(m) is not None]
    if not out:
        raise InputError(f"{url}: no files match this pattern")
    return out


def expand_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand paths, globs, directories, list files and URLs into one input per image.

    Parameters
    ----------
    inputs : str or path-like, or a sequence of them
        - a file (``file.fits[SCI]``, ``file.fits[1]`` and ``store.zarr:var`` name an HDU or a
          variable; the suffix is kept on the result);
        - a glob (``data/**/*.fits``), sorted; directories it matches are walked;
        - a directory: walked recursively for supported extensions, sorted, hidden entries
          skipped, Zarr stores kept whole;
        - a list file, ``@list.txt`` or any ``.txt`` / ``.lst`` file: one input per line,
          ``#`` comments, relative paths taken from the list file's directory;
        - ``g.fits+r.fits+i.fits``: band files of one image, each part expanded alone;
        - an fsspec URL (``s3://...``, ``memory://...``), kept as is.

    Returns
    -------
    list of str
        Absolute local paths (or URLs), in order, duplicates dropped.

    Raises
    ------
    InputError
        A path that does not exist, a pattern that matches nothing, an empty directory.
    """
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    out: list[str] = []
    seen: set[str] = set()
    for item in inputs:
        for p in _expand_one(os.fspath(item), base=None, depth=0):
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


def _id_base(spec: str, *, full_name: bool = False) -> str:
    path, hdu_text, var = _parse_spec(spec)
    stem = _stem(path) if not full_name else path.rstrip("/").rsplit("/", 1)[-1]
    if hdu_text is not None:
        return f"{stem}[{hdu_text}]"
    if var is not None:
        return f"{stem}:{var}"
    return stem


def _parents(path: str) -> list[str]:
    """Parent directory names, nearest first."""
    p = path.rstrip("/")
    if _is_url(p):
        p = p.split("://", 1)[1]
    parts = [s for s in re.split(r"[/\\]", p) if s]
    return list(reversed(parts[:-1]))


def _assign_ids(groups: list[list[str]]) -> list[str]:
    """Ids from stems; where they collide, prefixed with as many parent dirs as needed.

    Members of a colliding group that still collide with every parent dir (``a.fits`` and
    ``a.fits.gz`` side by side) use their full file names instead of stems. The result depends
    only on the inputs, so the same inputs give the same ids in every run.
    """
    bases = ["+".join(_id_base(s) for s in g) for g in groups]
    ids = list(bases)
    by_id: dict[str, list[int]] = {}
    for i, b in enumerate(bases):
        by_id.setdefault(b, []).append(i)
    for members in by_id.values():
        if len(members) < 2:
            continue
        parents = {i: _parents(_parse_spec(groups[i][0])[0]) for i in members}
        depth = max(len(p) for p in parents.values())
        for full_name in (False, True):
            names = {
                i: "+".join(_id_base(s, full_name=full_name) for s in groups[i]) for i in members
            }
            found = None
            for k in range(0 if full_name else 1, depth + 1):
                cand = {i: "/".join([*reversed(parents[i][:k]), names[i]]) for i in members}
                if len(set(cand.values())) == len(members):
                    found = cand
                    break
            if found is not None:
                for i in members:
                    ids[i] = found[i]
                break
    # Anything still equal (the same file listed through two spellings) gets a counter.
    seen: dict[str, int] = {}
    for i, v in enumerate(ids):
        if v in seen:
            seen[v] += 1
            ids[i] = f"{v}~{seen[v]}"
        else:
            seen[v] = 0
    return ids


def open_sources(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    hdu: int | str | None = None,
    variable: str | None = None,
    bands: Sequence[str | os.PathLike] | None = None,
) -> list[ImageSource]:
    """Open survey inputs as lazy :class:`ImageSource` objects.

    Only headers and metadata are read here; pixels are read by :meth:`ImageSource.read`.

    Parameters
    ----------
    inputs : sequence of str or path-like
        Anything :func:`expand_inputs` accepts.
    hdu : int or str, optional
        FITS HDU (index or EXTNAME) for inputs that do not name one; default: the first HDU
        with 2-D or 3-D image data.
    variable : str, optional
        Zarr / xarray variable for stores that do not name one; default: the first 2-D or 3-D
        data variable.
    bands : sequence of str or path-like, optional
        Band files combined into the channels of one image, in order (``["g.fits", "r.fits",
        "i.fits"]``). Entries may be globs or directories that expand to the same number of
        files: the i-th file of each (in sorted order) make the i-th image.

    Returns
    -------
    list of ImageSource
        In input order, then the ``bands`` images.

    Raises
    ------
    InputError
        Anything wrong with an input, naming the file (and HDU / variable).
    """
    listed = list_images(inputs, bands=bands)
    sources = [open_listed(sid, specs, hdu=hdu, variable=variable) for sid, specs in listed]
    logger.info("opened %d image source(s)", len(sources))
    return sources


def list_images(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    bands: Sequence[str | os.PathLike] | None = None,
) -> list[tuple[str, tuple[str, ...]]]:
    """The images :func:`open_sources` would open, as ``(id, specs)``, without opening any.

    A listing only (globs, directories, list files expanded; ids assigned): an incremental run
    compares it with the store's records and opens only what is new. ``specs`` are the band
    files' inputs (``file.fits[SCI]``); :func:`spec_path` gives each one's file.
    """
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    groups = [_split_combo(s) for s in expand_inputs(inputs or [])]
    if bands:
        lists = [expand_inputs([b]) for b in bands]
        counts = {os.fspath(b): len(files) for b, files in zip(bands, lists, strict=True)}
        if len(set(counts.values())) > 1:
            raise InputError(
                "band inputs expand to different numbers of files: "
                + ", ".join(f"{b} -> {n}" for b, n in counts.items())
            )
        groups += [list(t) for t in zip(*lists, strict=True)]
    if not groups:
        raise InputError("no input images given")
    return [(sid, tuple(g)) for sid, g in zip(_assign_ids(groups), groups, strict=True)]


def spec_path(spec: str) -> str:
    """The file (or URL) of one input spec, without its ``[HDU]`` / ``:variable``: the path an
    :class:`ImageSource` records for it."""
    return _parse_spec(spec)[0]


def open_listed(
    sid: str, specs: Sequence[str], *, hdu: int | str | None = None, variable: str | None = None
) -> ImageSource:
    """Open one image of :func:`list_images` (headers only)."""
    return _make_source(sid, list(specs), hdu=hdu, variable=variable)


def _make_source(sid: str, group: list[str], *, hdu: Any, variable: str | None) -> ImageSource:
    probed = [_probe(s, hdu=hdu, variable=variable) for s in group]
    parts = tuple(p for p, _ in probed)
    shapes = {p.shape for p in parts}
    if len(shapes) > 1:
        raise InputError(
            "band files differ in shape: " + ", ".join(f"{p.label} {p.shape}" for p in parts)
        )
    first = parts[0]
    return ImageSource(
        id=sid,
        paths=tuple(p.path for p in parts),
        kind=first.kind,
        shape=first.shape,
        n_bands=sum(p.n_bands for p in parts),
        hdu=first.hdu,
        variable=first.variable,
        wcs_header=probed[0][1],
        parts=parts,
    )
