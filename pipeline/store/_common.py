"""Small helpers every part of the store package uses: an fsspec path, JSON as stored."""

from __future__ import annotations

import json
from typing import Any

__all__: list[str] = []


def _fs(path: str):
    """``(filesystem, root without a trailing slash)`` of a local path or fsspec URL."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    return fs, root.rstrip("/")


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON so comparisons see what the store holds (tuples -> lists)."""
    return json.loads(json.dumps(value, default=str))


def _json_text(value: Any) -> str:
    """A record field as canonical JSON text (``""`` for None).

    Plain values (what records hold: str keys, lists, numbers, strings) are written in one
    pass; anything else (numpy numbers, paths) is first made JSON-able as stored. The round
    trip for every record was a third of a 10^4-image append's client time."""
    if value is None:
        return ""
    try:
        return json.dumps(value, sort_keys=True)
    except TypeError:
        return json.dumps(_jsonable(value), sort_keys=True)
