"""ONNX Runtime sessions: one per worker process, cached, never pickled.

A :class:`Session` runs the contract graph of :mod:`pipeline.models.export` on float32 NCHW RGB
batches in [0, 1] and returns the features, the logits and the top-k ImageNet classes with
their probabilities (the Elodin-NN style fingerprint used by Jaccard similarity).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ModelError
from .export import ORIENTATIONS_METADATA, TOPK_METADATA
from .zoo import MIN_SIDE, sha256_file

__all__ = [
    "Outputs",
    "Session",
    "available_providers",
    "default_threads",
    "get_session",
    "provider_options",
    "topk",
]

logger = logging.getLogger(__name__)

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@dataclasses.dataclass
class Outputs:
    """What a batch gives: ``features`` (n, D) float32, ``logits`` (n, C) float32 or None,
    ``top_class`` (n, k) int32 and ``top_prob`` (n, k) float32 (softmax probabilities, descending)."""

    features: np.ndarray
    logits: np.ndarray | None
    top_class: np.ndarray
    top_prob: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[Outputs]) -> Outputs:
        logits = None if parts[0].logits is None else np.concatenate([p.logits for p in parts])
        return cls(
            np.concatenate([p.features for p in parts]),
            logits,
            np.concatenate([p.top_class for p in parts]),
            np.concatenate([p.top_prob for p in parts]),
        )


def topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k classes (descending probability) and their softmax probabilities."""
    k = min(k, logits.shape[1])
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    idx = np.argpartition(-p, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(p, idx, axis=1)
    order = np.argsort(-part, axis=1, kind="stable")
    return (
        np.take_along_axis(idx, order, axis=1).astype(np.int32),
        np.take_along_axis(part, order, axis=1).astype(np.float32),
    )


def available_providers(requested: str | Sequence[str] = "auto") -> list[str]:
    """Execution providers to use: ``auto`` picks GPU ones the installed onnxruntime offers."""
    import onnxruntime as ort

    offered = ort.get_available_providers()
    if requested == "auto" or requested is None:
        chosen = [p for p in ("CUDAExecutionProvider",) if p in offered]
        return [*chosen, "CPUExecutionProvider"]
    wanted = [requested] if isinstance(requested, str) else list(requested)
    missing = [p for p in wanted if p not in offered]
    if missing:
        raise ModelError(
            f"execution provider(s) {', '.join(missing)} not offered by this onnxruntime "
            f"(offered: {', '.join(offered)})"
        )
    return wanted


def default_threads() -> int:
    """Cores this process may use (its CPU affinity), the default intra-op thread count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Session:
    """A cached ONNX Runtime session on one model file.

    Parameters
    ----------
    path : path-like
        ONNX file following the export contract (input ``input``; outputs ``features``,
        optionally ``logits``).
    providers : str or list of str
        ``"auto"`` or explicit execution providers.
    threads : int, optional
        Intra-op threads; default: all cores this process may use.
    topk : int
        Classes kept per cutout.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        providers="auto",
        threads: int | None = None,
        topk: int = 20,
        io_binding: bool | None = None,
        fixed_batch: int | None = None,
    ):
        import onnxruntime as ort

        self.path = Path(path)
        self.providers = available_providers(providers)
        self.threads = threads or default_threads()
        self.k = int(topk)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self._sess = ort.InferenceSession(
                str(self.path),
                sess_options=opts,
                providers=[(p, provider_options(p)) for p in self.providers],
            )
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            first = str(e).splitlines()[0][:200]
            raise ModelError(f"{self.path}: onnxruntime cannot load it ({first})") from None
        outs = [o.name for o in self._sess.get_outputs()]
        if "features" not in outs:
            raise ModelError(f"{self.path}: has no 'features' output (outputs: {', '.join(outs)})")
        self._has_logits = "logits" in outs
        inputs = {i.name for i in self._sess.get_inputs()}
        # Files of export version 3 take k as a required input; later ones rank a constant
        # number of classes, recorded in their metadata, of which the first k are kept.
        self._feed_k = "k" in inputs
        meta = self._sess.get_modelmeta().custom_metadata_map
        ranked = meta.get(TOPK_METADATA, "0")
        # Views the graph averages per cutout (the :rot4 / :rot8 variants): square inputs only.
        self.orientations = int(meta.get(ORIENTATIONS_METADATA, "1"))
        self._graph_topk = "top_class" in outs and (self._feed_k or self.k <= int(ranked))
        self.feature_dim = self._sess.get_outputs()[outs.index("features")].shape[1]
        used = self._sess.get_providers()
        self.on_gpu = any(p in used for p in _GPU_PROVIDERS)
        self.io_binding = self.on_gpu if io_binding is None else bool(io_binding)
        # Fixed-shape batches (the last one padded) let CUDA graphs replay one captured shape.
        self.fixed_batch = fixed_batch
        cuda_id = provider_options("CUDAExecutionProvider").get("device_id", 0)
        self.device_id = int(cuda_id) if self.on_gpu else 0
        # With fixed-shape batches the bound input and outputs are allocated once and reused:
        # a captured CUDA graph replays on the same device addresses, so they must not move.
        self._slots: dict[tuple, tuple] = {}
        # Runs that share those buffers, or the one GPU of this process, go one at a time;
        # the threads of a GPU worker overlap their reading and stretching, not their runs.
        self.exclusive = bool(self.on_gpu or (self.io_binding and fixed_batch))
        self._run_lock = threading.Lock()

    def __reduce__(self):
        raise TypeError(
            "Session objects are per process and never pickled; call get_session() in the worker"
        )

    @staticmethod
    def check_batch(batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 4:
            raise ModelError(f"model input must have rank 4 (N, 3, H, W), got shape {batch.shape}")
        if batch.shape[1] != 3:
            more = "; pick three bands" if batch.shape[1] > 3 else ""
            raise ModelError(f"model input needs 3 channels (RGB), got {batch.shape[1]}{more}")
        if min(batch.shape[2:]) < MIN_SIDE:
            raise ModelError(
                f"model input sides must be >= {MIN_SIDE} pixels, got {batch.shape[2:]}"
            )
        return np.ascontiguousarray(batch, dtype=np.float32)

    def _pad(self, batch: np.ndarray) -> np.ndarray:
        if self.fixed_batch and len(batch) < self.fixed_batch:
            pad = np.zeros((self.fixed_batch - len(batch), *batch.shape[1:]), np.float32)
            return np.concatenate([batch, pad])
        return batch

    def infer(self, batch: np.ndarray, *, logits: bool = True) -> Outputs:
        """Run one batch: float32 (N, 3, H, W) RGB in [0, 1].

        With ``logits=False`` the 1000 logits are not fetched, only the features and the
        top-k (what the fingerprint stage stores); with IO binding on a GPU they never leave
        the device.
        """
        batch = self.check_batch(batch)
        if self.orientations > 1 and batch.shape[2] != batch.shape[3]:
            raise ModelError(
                f"{self.path.name}: a model averaged over {self.orientations} orientations needs "
                f"square cutouts, got {batch.shape[2]} x {batch.shape[3]}"
            )
        n = len(batch)
        feeds = {"input": self._pad(batch)}
        names = ["features"]
        if self._graph_topk:
            if self._feed_k:
                feeds["k"] = np.array([self.k], np.int64)
            names += ["top_class", "top_prob"]
        if self._has_logits and (logits or not self._graph_topk):
            names.append("logits")
        with self._run_lock if self.exclusive else contextlib.nullcontext():
            if self.io_binding:
                got = self._run_bound(feeds, names)
            else:
                got = dict(zip(names, self._sess.run(names, feeds), strict=True))
        got = {k: v[:n] for k, v in got.items()}
        features = np.asarray(got["features"], dtype=np.float32)
        lg = np.asarray(got["logits"], dtype=np.float32) if "logits" in got else None
        if "top_class" in got:
            cls = got["top_class"][:, : self.k].astype(np.int32)
            prob = got["top_prob"][:, : self.k].astype(np.float32)
        elif lg is not None:
            cls, prob = topk(lg, self.k)
        else:
            cls, prob = np.zeros((n, 0), np.int32), np.zeros((n, 0), np.float32)
        return Outputs(features, lg if logits else None, cls, prob)

    def _run_bound(self, feeds: dict, names: list[str]) -> dict:
        """Run through IO binding: the batch goes to the device once, the outputs stay there
        and only the named ones are copied back to the host.

        With ``fixed_batch`` the binding of each (shape, outputs) is kept: the input is
        updated in place and the outputs ORT allocated on the first run are bound again, so
        every later run uses the same device buffers (what CUDA graph replay needs).
        """
        import onnxruntime as ort

        device = "cuda" if self.on_gpu else "cpu"
        key = (feeds["input"].shape, tuple(names))
        slot = self._slots.get(key)
        if slot is not None:
            binding, value = slot
            value.update_inplace(feeds["input"])
            self._sess.run_with_iobinding(binding)
            return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))
        binding = self._sess.io_binding()
        if self.fixed_batch:
            # Its own buffer: on the CPU an OrtValue made from a numpy array wraps that array,
            # and updating it in place would write into the caller's batch.
            x = feeds["input"]
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                x.shape, x.dtype, device, self.device_id
            )
            value.update_inplace(x)
        else:
            value = ort.OrtValue.ortvalue_from_numpy(feeds["input"], device, self.device_id)
        binding.bind_ortvalue_input("input", value)
        if "k" in feeds:
            binding.bind_cpu_input("k", feeds["k"])
        for name in names:
            binding.bind_output(name, device, self.device_id)
        self._sess.run_with_iobinding(binding)
        if self.fixed_batch:
            for name, out in zip(names, binding.get_outputs(), strict=True):
                binding.bind_ortvalue_output(name, out)
            self._slots[key] = (binding, value)
        return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))

    def infer_batched(self, images: np.ndarray, batch_size: int) -> Outputs:
        """Run ``images`` (N, 3, H, W) in batches of ``batch_size``."""
        if len(images) == 0:
            raise ModelError("no images to run")
        parts = [self.infer(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return Outputs.concat(parts)


def provider_options(provider: str) -> dict:
    """Execution-provider options from config (``elodin.model.cuda``)."""
    if provider != "CUDAExecutionProvider":
        return {}
    from .. import config

    cuda = dict(config.get("model.cuda", {}) or {})
    opts = {"cudnn_conv_algo_search": str(cuda.get("cudnn-conv-algo-search", "EXHAUSTIVE"))}
    device = cuda.get("device-id")
    if device is None:
        device = _worker_device()
    if device is not None:
        opts["device_id"] = str(device)
    if cuda.get("cuda-graph"):
        opts["enable_cuda_graph"] = "1"
    return opts


def _worker_device() -> int | None:
    """The GPU of this Dask worker process when it sees several: the n-th worker process of
    a job (``dask worker --nworkers N`` names them ``NAME-0`` .. ``NAME-{N-1}``, as
    dask-jobqueue does with ``processes: N``) takes the n-th visible device, so that the
    processes of a multi-GPU SLURM job do not all share device 0. None outside a worker or with
    one visible device (local GPU workers and Kubernetes pods each see only their own)."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) <= 1:
        return None
    try:
        from distributed import get_worker

        name = str(get_worker().name)
    except (ImportError, ValueError):  # not in a worker
        return None
    match = re.search(r"(?:^|-)(\d+)$", name)
    return int(match.group(1)) % len(visible) if match else None


_SESSIONS: dict[tuple, Session] = {}
_SESSIONS_LOCK = threading.Lock()
_SHA_CACHE: dict[tuple[str, float, int], str] = {}


def _file_sha(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_mtime, st.st_size)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def get_session(
    path: str | os.PathLike,
    *,
    providers="auto",
    threads: int | None = None,
    topk: int = 20,
    sha256: str | None = None,
    io_binding: bool | None = None,
    fixed_batch: int | None = None,
) -> Session:
    """The process's session for this model file, created on first use.

    Cached by (file sha256, providers, threads, k), so every task of a worker shares one
    session. With ``sha256`` given, the file must match it (a worker never runs a different
    model than the one the store records).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found on this worker")
    digest = _file_sha(path)
    if sha256 is not None and digest != sha256:
        raise ModelError(
            f"{path}: sha256 {digest[:12]}... differs from the expected {sha256[:12]}..."
        )
    key = (digest, tuple(available_providers(providers)), threads, topk, io_binding, fixed_batch)
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            _SESSIONS[key] = Session(
                path,
                providers=providers,
                threads=threads,
                topk=topk,
                io_binding=io_binding,
                fixed_batch=fixed_batch,
            )
        return _SESSIONS[key]
