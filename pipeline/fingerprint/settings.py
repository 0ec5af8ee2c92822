"""The settings of a fingerprint run, resolved (flags over config) and checked once, on the
client, before anything is written: also those only the workers or later steps read."""

from __future__ import annotations

from typing import Any

from .. import config
from ..errors import ConfigError

__all__ = ["CUDNN_SEARCH", "METHODS", "fingerprint_settings"]

METHODS = ("sliding", "full", "blobs", "catalog")
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


def fingerprint_settings(**flags: Any) -> dict:
    """Every setting of the run, flags over config, checked once, before anything is written:
    also those that only the workers (stretch, sessions) or later steps (detection, the task
    loop) use, so a refused run leaves no store, or the existing one as it was."""
    from ..models.zoo import with_invariance
    from ..preprocess import preprocess_settings

    method = config.get_choice("cutouts.method", METHODS, override=flags.get("method"))
    size = config.get_int("cutouts.size", override=flags.get("size"), minimum=1)
    # null (the default) means "the cutout size"; 0 is a bad stride, not null.
    stride = config.get("cutouts.stride", override=flags.get("stride"))
    stride = (
        size if stride is None else config.get_int("cutouts.stride", override=stride, minimum=1)
    )
    edge = config.get_choice("cutouts.edge", ("shift", "pad", "drop"), override=flags.get("edge"))
    _check_model_settings()
    if method == "blobs":
        from ..detect import detection_options

        detection_options()
    # Read by the task loop, after the store has grown: checked now.
    config.get_int("fingerprint.gpu-units", minimum=1)
    config.get_int("fingerprint.resubmit-killed", minimum=0)
    return {
        "cutouts": {
            "method": method,
            "size": size,
            "stride": stride if method == "sliding" else None,
            "edge": edge if method == "sliding" else None,
            "fill": None
            if config.get("cutouts.fill") is None
            else config.get_float("cutouts.fill"),
            **(
                {
                    k: config.get(f"cutouts.{k}")
                    for k in (
                        "min-size",
                        "max-size",
                        "blob-scale",
                        "detect-nsigma",
                        "detect-npixels",
                        "deblend",
                    )
                }
                if method == "blobs"
                else {}
            ),
        },
        "tiling": {
            "tile-size": config.get_int(
                "tiling.tile-size", override=flags.get("tile_size"), minimum=1
            )
        },
        # Checked whole here (the workers only apply it): a bad scope, interval, stretch or
        # number is refused before the store is made with it.
        "preprocess": preprocess_settings(),
        "batch_size": config.get_int(
            "fingerprint.batch-size", override=flags.get("batch_size"), minimum=1
        ),
        # The largest chunk; a new store for a small job gets smaller ones (chunk_rows_for).
        "chunk_rows": config.get_int(
            "fingerprint.chunk-rows", override=flags.get("chunk_rows"), minimum=1
        ),
        "min_chunk_rows": config.get_int("fingerprint.min-chunk-rows", minimum=1),
        "units_per_thread": config.get_int("fingerprint.units-per-thread", minimum=1),
        "dtype": config.get_choice(
            "fingerprint.dtype", ("float32", "float16"), override=flags.get("dtype")
        ),
        "gpu": bool(config.get("fingerprint.gpu", override=flags.get("gpu"))),
        "model": with_invariance(
            str(config.get("model.name", override=flags.get("model"))),
            config.get("model.invariance"),
        ),
        "topk": config.get_int("model.topk", minimum=1),
        "providers": config.get("model.providers"),
        "precision": config.get_choice("model.precision", ("fp32", "fp16")),
    }
