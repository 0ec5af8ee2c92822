"""The model a store records, mapped back to the ONNX file that made it.

A store records its model as ``attrs["model"]``, the card name with ``@fp16`` appended for the
float16 variant (:func:`record_name`), and ``attrs["model_sha256"]``, the sha256 of the ONNX file
its cutouts ran through. :func:`recorded_model` turns those back into that file, so work on an
existing store (``similar --image``) runs the very model that made it: first a file of the
model cache whose sidecar records that sha256 (built-in exports and wrapped user models alike),
else, for a built-in, its export made now, checked against the sha256. A user model is known to
the store only by its card's name, so it must be in this machine's cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import config
from ..errors import ModelError
from .export import ensure_onnx
from .zoo import ModelCard, builtin_cards, resolve, sha256_file

__all__ = ["PRECISIONS", "RecordedModel", "parse_record", "record_name", "recorded_model"]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")


@dataclasses.dataclass(frozen=True)
class RecordedModel:
    """The model of a store.

    Attributes
    ----------
    name : str
        The card's name (``efficientnet-lite0:native``, a user card's name).
    precision : {"fp32", "fp16"}
    path : Path
        The ONNX file to run; its sha256 is the store's ``model_sha256`` when the store has one.
    card : ModelCard or None
        The built-in card; None for a user model (the store keeps only its name).
    """

    name: str
    precision: str
    path: Path
    card: ModelCard | None


def record_name(name: str, precision: str) -> str:
    """What a store records as its ``model``: the card name, ``@fp16`` for the fp16 variant."""
    return name if precision == "fp32" else f"{name}@{precision}"


def parse_record(recorded: str) -> tuple[str, str]:
    """``(card name, precision)`` of a recorded ``model`` (the inverse of :func:`record_name`)."""
    name, at, suffix = str(recorded).rpartition("@")
    if at and suffix in PRECISIONS:
        return name, suffix
    return str(recorded), "fp32"


def _cached_with_sha(cache: Path, sha256: str) -> Path | None:
    """A file of the model cache whose sidecar, and content, have this sha256."""
    for meta in sorted([*cache.glob("*.json"), *cache.glob("user/*.json")]):
        try:
            recorded = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(recorded, dict) or recorded.get("sha256") != sha256:
            continue
        path = meta.with_suffix(".onnx")
        if path.is_file() and sha256_file(path) == sha256:
            return path
    return None


def recorded_model(
    attrs: Mapping[str, Any], *, where: str, cache: Path | None = None
) -> RecordedModel:
    """The model a store's ``attrs`` record, with the ONNX file to run it.

    Parameters
    ----------
    attrs : mapping
        The store's attributes (``model``, ``model_sha256``).
    where : str
        Named in errors (the store's path).
    cache : Path, optional
        Model cache to look in; default :func:`pipeline.config.cache_dir`.

    Raises
    ------
    ModelError
        When no file with the recorded sha256 can be found or made here.
    """
    if not attrs.get("model"):
        raise ModelError(f"{where}: the store records no model")
    name, precision = parse_record(attrs["model"])
    sha = attrs.get("model_sha256")
    cache = Path(cache) if cache is not None else config.cache_dir()
    builtin = name.partition(":")[0] in {c.name for c in builtin_cards()}
    card = resolve(name) if builtin else None
    found = _cached_with_sha(cache, sha) if sha else None
    if found is not None:
        return RecordedModel(name, precision, found, card)
    if card is None:
        how = (
            f"`elodin models export PATH/TO/{name}.onnx`"
            if precision == "fp32"
            else f"`elodin fingerprint` with --model PATH/TO/{name}.onnx and model.precision {precision}"
        )
        raise ModelError(
            f"{where}: the store was made with the user model {attrs['model']!r} "
            f"(sha256 {str(sha)[:12]}...), which is not in the model cache {cache}; "
            f"put it there with {how}"
        )
    path = ensure_onnx(card, cache=cache, precision=precision)
    if sha:
        actual = sha256_file(path)
        if actual != sha:
            raise ModelError(
                f"{where}: the store was made with an export of {attrs['model']} with sha256 "
                f"{sha[:12]}..., and this machine's is {actual[:12]}... (another Elodin or "
                "PyTorch version); fingerprint into a new store to query it by image"
            )
    return RecordedModel(name, precision, path, card)
