"""The settings of a fingerprint run, resolved (flags over config) and checked once, on the
client, before anything is written: also those only the workers or later steps read."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .. import config
from ..errors import ConfigError

__all__ = [
    "BLOB_KEYS",
    "CUDNN_SEARCH",
    "METHODS",
    "CutoutSettings",
    "FingerprintSettings",
    "fingerprint_settings",
]

METHODS = ("sliding", "full", "blobs", "catalog")
# The detection options a blob run records with its cutout settings (config names).
BLOB_KEYS = ("min-size", "max-size", "blob-scale", "detect-nsigma", "detect-npixels", "deblend")
CUDNN_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


def _optional_bool(key: str) -> bool | None:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"config elodin.{key}: expected true, false or null, got {value!r}")
    return value


def _check_model_settings() -> None:
    """The model settings that the workers read when they open their sessions: checked here,
    on the client, so that a typo is one line before the store exists, not a failed task."""
    import onnxruntime as ort

    providers = config.get("model.providers")
    if providers not in ("auto", None):
        names = [providers] if isinstance(providers, str) else providers
        if not isinstance(names, list | tuple) or not all(isinstance(p, str) for p in names):
            raise ConfigError(
                f"config elodin.model.providers: expected auto or a list of execution provider "
                f"names, got {providers!r}"
            )
        # Which ones a worker's onnxruntime offers is checked there (a GPU worker's build can
        # differ from the client's); a name that no onnxruntime knows is a typo.
        known = ort.get_all_providers()
        unknown = [p for p in names if p not in known]
        if unknown:
            raise ConfigError(
                f"config elodin.model.providers: {unknown[0]!r} is not an ONNX Runtime "
                "execution provider (such as CUDAExecutionProvider, CPUExecutionProvider)"
            )
    for key in ("model.io-binding", "model.fixed-batches"):
        _optional_bool(key)
    if config.get("model.threads") is not None:
        config.get_int("model.threads", minimum=1)
    cuda = config.get("model.cuda") or {}
    if not isinstance(cuda, dict):
        raise ConfigError(f"config elodin.model.cuda: expected a mapping, got {cuda!r}")
    search = cuda.get("cudnn-conv-algo-search", "EXHAUSTIVE")
    if search not in CUDNN_SEARCH:
        raise ConfigError(
            f"config elodin.model.cuda.cudnn-conv-algo-search: {search!r} is not one of "
            f"{', '.join(CUDNN_SEARCH)}"
        )
    device = cuda.get("device-id")
    if device is not None and (
        isinstance(device, bool) or not isinstance(device, int) or device < 0
    ):
        raise ConfigError(
            f"config elodin.model.cuda.device-id: expected null or a device number >= 0, got {device!r}"
        )
    if not isinstance(cuda.get("cuda-graph", False), bool):
        raise ConfigError(
            f"config elodin.model.cuda.cuda-graph: expected true or false, got {cuda['cuda-graph']!r}"
        )
    if cuda.get("cuda-graph") and False in (
        config.get("model.fixed-batches"),
        config.get("model.io-binding"),
    ):
        raise ConfigError(
            "config elodin.model.cuda.cuda-graph needs model.fixed-batches and model.io-binding "
            "(a captured graph replays one shape on the same device buffers); set them to "
            "true or null, or turn cuda-graph off"
        )


@dataclasses.dataclass(frozen=True)
class CutoutSettings:
    """How windows are cut: one name per idea, from config to the store's attrs.

    ``size`` is the cutout side in pixels: the sliding / full window side, and the common side
    that windows of varying size (blobs, catalog sizes) are resampled to on the workers.
    ``stride`` and ``edge`` are None unless ``method`` is sliding; ``blobs`` holds the
    detection options (config names) of a blob run.
    """

    method: str
    size: int
    stride: int | None = None
    edge: str | None = None
    fill: float | None = None
    blobs: tuple[tuple[str, Any], ...] = ()

    def to_attrs(self) -> dict:
        return {
            "method": self.method,
            "size": self.size,
            "stride": self.stride,
            "edge": self.edge,
            "fill": self.fill,
            **dict(self.blobs),
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping) -> CutoutSettings:
        known = ("method", "size", "stride", "edge", "fill")
        return cls(
            **{k: attrs.get(k) for k in known},
            blobs=tuple((k, v) for k, v in attrs.items() if k not in known),
        )


@dataclasses.dataclass(frozen=True)
class FingerprintSettings:
    """Every setting of a fingerprint run, resolved once (flags over config) and checked.

    :meth:`to_attrs` is what a store records of them (and refuses to mix with another run's);
    :meth:`from_attrs` reads that back, with what a store does not record (batch size, chunk
    rows, GPU, model name) from the config now. :meth:`as_dict` is the nested mapping
    :func:`fingerprint_settings` returns (``plan_sources`` and ``models adapt`` take it).
    """

    cutouts: CutoutSettings
    tile_size: int
    preprocess: Mapping[str, Any]
    batch_size: int
    chunk_rows: int  # the largest chunk; a new store for a small job gets smaller ones
    min_chunk_rows: int
    units_per_thread: int
    dtype: str
    gpu: bool
    model: str
    topk: int
    providers: Any
    precision: str

    @classmethod
    def from_config(cls, **flags: Any) -> FingerprintSettings:
        """Every setting of the run, flags over config, checked once, before anything is
        written: also those that only the workers (stretch, sessions) or later steps
        (detection, the task loop) use, so a refused run leaves no store, or the existing one
        as it was."""
        from ..models.zoo import with_invariance
        from ..preprocess import preprocess_settings

        method = config.get_choice("cutouts.method", METHODS, override=flags.get("method"))
        size = config.get_int("cutouts.size", override=flags.get("size"), minimum=1)
        # null (the default) means "the cutout size"; 0 is a bad stride, not null.
        stride = config.get("cutouts.stride", override=flags.get("stride"))
        stride = (
            size if stride is None else config.get_int("cutouts.stride", override=stride, minimum=1)
        )
        edge = config.get_choice(
            "cutouts.edge", ("shift", "pad", "drop"), override=flags.get("edge")
        )
        _check_model_settings()
        if method == "blobs":
            from ..detect import detection_options

            detection_options()
        # Read by the task loop, after the store has grown: checked now.
        config.get_int("fingerprint.gpu-units", minimum=1)
        config.get_int("fingerprint.resubmit-killed", minimum=0)
        config.get_int("fingerprint.in-flight-tiles", minimum=1)
        fill = config.get("cutouts.fill")
        cutouts = CutoutSettings(
            method=method,
            size=size,
            stride=stride if method == "sliding" else None,
            edge=edge if method == "sliding" else None,
            fill=None if fill is None else config.get_float("cutouts.fill"),
            blobs=tuple((k, config.get(f"cutouts.{k}")) for k in BLOB_KEYS)
            if method == "blobs"
            else (),
        )
        return cls(
            cutouts=cutouts,
            tile_size=config.get_int(
                "tiling.tile-size", override=flags.get("tile_size"), minimum=1
            ),
            # Checked whole here (the workers only apply it): a bad scope, interval, stretch
            # or number is refused before the store is made with it.
            preprocess=preprocess_settings(),
            batch_size=config.get_int(
                "fingerprint.batch-size", override=flags.get("batch_size"), minimum=1
            ),
            chunk_rows=config.get_int(
                "fingerprint.chunk-rows", override=flags.get("chunk_rows"), minimum=1
            ),
            min_chunk_rows=config.get_int("fingerprint.min-chunk-rows", minimum=1),
            units_per_thread=config.get_int("fingerprint.units-per-thread", minimum=1),
            dtype=config.get_choice(
                "fingerprint.dtype", ("float32", "float16"), override=flags.get("dtype")
            ),
            gpu=bool(config.get("fingerprint.gpu", override=flags.get("gpu"))),
            model=with_invariance(
                str(config.get("model.name", override=flags.get("model"))),
                config.get("model.invariance"),
            ),
            topk=config.get_int("model.topk", minimum=1),
            providers=config.get("model.providers"),
            precision=config.get_choice("model.precision", ("fp32", "fp16")),
        )

    def to_attrs(self) -> dict:
        """The settings a store records (in the order it records them)."""
        return {
            "topk": self.topk,
            "cutouts": self.cutouts.to_attrs(),
            "preprocess": dict(self.preprocess),
            "tiling": {"tile-size": self.tile_size},
            "fingerprint_dtype": self.dtype,
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping, **flags: Any) -> FingerprintSettings:
        """The settings a store was made with; what it does not record comes from
        :meth:`from_config` (``flags`` over config)."""
        now = cls.from_config(**flags)
        return dataclasses.replace(
            now,
            cutouts=CutoutSettings.from_attrs(attrs["cutouts"]),
            tile_size=int(attrs["tiling"]["tile-size"]),
            preprocess=dict(attrs["preprocess"]),
            topk=int(attrs["topk"]),
            dtype=str(attrs["fingerprint_dtype"]),
        )

    def as_dict(self) -> dict:
        """The nested mapping :func:`fingerprint_settings` returns."""
        return {
            "cutouts": self.cutouts.to_attrs(),
            "tiling": {"tile-size": self.tile_size},
            "preprocess": dict(self.preprocess),
            "batch_size": self.batch_size,
            "chunk_rows": self.chunk_rows,
            "min_chunk_rows": self.min_chunk_rows,
            "units_per_thread": self.units_per_thread,
            "dtype": self.dtype,
            "gpu": self.gpu,
            "model": self.model,
            "topk": self.topk,
            "providers": self.providers,
            "precision": self.precision,
        }


def fingerprint_settings(**flags: Any) -> dict:
    """:meth:`FingerprintSettings.from_config` as the nested mapping that
    :func:`plan_sources` and ``models adapt`` take."""
    return FingerprintSettings.from_config(**flags).as_dict()
