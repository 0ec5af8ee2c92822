"""An invariant head on a frozen encoder: ``elodin models adapt`` with ``model.adapt.method: head``.

The ImageNet encoder stays as it is. What is learned, without labels, is a linear map of its
features that keeps what differs between cutouts and drops what an astronomer would not tell
them apart by. Each cutout is seen as it is and in ``epochs`` augmented views, made on the raw
pixels before the stretch, as a survey would have seen it otherwise:

- shifted by up to :data:`SHIFT` pixels;
- blurred half the time by a Gaussian PSF of sigma :data:`BLUR` pixels;
- brighter or fainter by a factor in :data:`FLUX` (log-uniform), above its sky (the median);
- with fresh Gaussian noise of the cutout's own noise level (its MAD, :data:`NOISE` times).

The head solves the generalised eigenproblem ``S_between v = lambda S_within v``: the
directions along which cutouts spread most for how little their own views move (linear
discriminant analysis with every cutout its own class; the closed form of a linear
spectral/whitening self-supervised objective). ``S_within`` is ridge-regularised by
``model.adapt.ridge`` times its mean eigenvalue; the ``model.adapt.head-dim`` leading
directions are kept, scaled so that the views' (ridge-regularised) spread is 1 along each.

Only the encoder's forward passes cost time (``1 + epochs`` passes over the sample, through
the same ONNX Runtime session ``fingerprint`` uses); the fit is one ``d x d`` eigenproblem.
PyTorch is needed only where the base's ONNX file is not in the model cache yet (its export, as
for ``fingerprint``). The exported model is the base's ONNX graph with ``(features - mean) @
projection`` appended to its ``features`` output; logits and top-k are the base's.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from ..errors import ModelError

__all__ = [
    "BLUR",
    "FLUX",
    "NOISE",
    "SHIFT",
    "ViewStats",
    "append_head",
    "augment",
    "fit_head",
    "sample_digest",
]

logger = logging.getLogger(__name__)

SHIFT = 2  # pixels, each axis
BLUR = (0.3, 1.0)  # Gaussian sigma in pixels, applied to half the views
FLUX = (0.25, 4.0)  # flux scale above the sky, log-uniform
NOISE = 1.0  # added noise, in units of the cutout's own noise


def augment(raw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One augmented view of each raw ``(n, bands, h, w)`` cutout (NaN where masked stays NaN,
    moved with the shift). The shift rolls the cutout: what leaves one edge comes in at the
    other (sky, for a cutout centred on its source)."""
    from scipy.ndimage import gaussian_filter

    raw = np.asarray(raw, np.float32)
    n, bands = raw.shape[:2]
    flat = raw.reshape(n, bands, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a band masked whole: sky 0, noise 0
        sky = np.nanmedian(flat, axis=2)
        noise = 1.4826 * np.nanmedian(np.abs(flat - sky[..., None]), axis=2)
    sky = np.nan_to_num(sky)[..., None, None]
    noise = np.nan_to_num(noise)[..., None, None]
    shifts = rng.integers(-SHIFT, SHIFT + 1, (n, 2))
    blurred = rng.random(n) < 0.5
    sigma = rng.uniform(*BLUR, n)
    scale = np.exp(rng.uniform(np.log(FLUX[0]), np.log(FLUX[1]), n)).astype(np.float32)
    out = np.empty_like(raw)
    for i in range(n):
        v = np.roll(raw[i], tuple(shifts[i]), axis=(1, 2))
        bad = ~np.isfinite(v)
        v = np.where(bad, sky[i], v)
        if blurred[i]:
            v = gaussian_filter(v, (0, sigma[i], sigma[i]))
        v = sky[i] + scale[i] * (v - sky[i])
        v = v + NOISE * noise[i] * rng.standard_normal(v.shape, dtype=np.float32)
        v[bad] = np.nan
        out[i] = v
    return out


class ViewStats:
    """Running sums of the encoder's features over views of the same ``n`` cutouts: enough
    for the between- and within-cutout covariances, in ``O(n d + d^2)`` memory whatever the
    number of views.

    Saved and loaded whole (:meth:`save`, :meth:`load`) between views, so an interrupted
    ``adapt`` resumes after the last finished view.
    """

    def __init__(self, n: int, dim: int) -> None:
        self.views = 0
        self.sums = np.zeros((n, dim))  # per cutout, over views
        self.gram = np.zeros((dim, dim))  # over cutouts and views
        # The mean of the first view: the cutouts as they are, what the head centres on (the
        # augmented views' added noise shifts the features' mean).
        self.origin = np.zeros(dim)

    def add(self, features: np.ndarray) -> None:
        f = np.asarray(features, np.float64)
        if f.shape != self.sums.shape:
            raise ValueError(f"features of shape {f.shape}, expected {self.sums.shape}")
        if self.views == 0:
            self.origin = f.mean(axis=0)
        self.sums += f
        self.gram += f.T @ f
        self.views += 1

    def covariances(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mean, between, within)``: the features' mean, the covariance of the cutouts'
        mean views, and the mean covariance of each cutout's views about its own mean."""
        if self.views < 2:
            raise ValueError("the within-cutout spread needs at least two views")
        n = len(self.sums)
        means = self.sums / self.views
        mean = means.mean(axis=0)
        centred = means - mean
        between = centred.T @ centred / n
        within = self.gram / (n * self.views) - means.T @ means / n
        return mean, between, (within + within.T) / 2

    def save(self, path: Path, meta: dict) -> None:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            views=self.views,
            sums=self.sums,
            gram=self.gram,
            origin=self.origin,
            meta=json.dumps(meta, sort_keys=True),
        )
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> tuple[ViewStats, dict]:
        try:
            with np.load(path) as data:
                stats = cls(*data["sums"].shape)
                stats.views = int(data["views"])
                stats.sums[:] = data["sums"]
                stats.gram[:] = data["gram"]
                stats.origin = np.array(data["origin"], np.float64)
                meta = json.loads(str(data["meta"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ModelError(f"{path}: not a readable adapt checkpoint ({e}); remove it") from None
        return stats, meta


def fit_head(stats: ViewStats, *, dim: int, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """``(origin (d,), projection (d, k))``: the ``k = min(dim, d, n - 1)`` directions of
    largest between- over within-cutout variance, each scaled to unit within-cutout variance
    (ridge included), and the mean of the cutouts as they are (the first view), to centre on.

    Beyond ``n - 1`` directions the cutouts do not spread at all: such a direction would be
    view noise scaled up to the weight of a real one. Views that do not differ (every cutout
    blank and noiseless) leave nothing to fit: :class:`~pipeline.errors.InputError`.
    """
    from scipy.linalg import LinAlgError, eigh
    from sklearn.utils.extmath import svd_flip

    from ..errors import InputError

    mean, between, within = stats.covariances()
    d, n = len(mean), len(stats.sums)
    spread = float(np.trace(within)) / d
    if not spread > 1e-12 * max(float(np.trace(between)) / d, 1e-300):
        raise InputError(
            "adapt: the augmented views of the cutouts do not differ from the cutouts (blank, "
            "noiseless images?): nothing to fit a head on"
        )
    try:
        values, vectors = eigh(between, within + ridge * spread * np.eye(d))
    except LinAlgError as e:
        raise ModelError(f"adapt: the head's eigenproblem did not solve ({e})") from None
    keep = np.argsort(values)[::-1][: max(1, min(dim, d, n - 1))]
    # An eigenvector's sign is arbitrary: sklearn's rule (largest |loading| > 0), so the same
    # data give the same head.
    projection, _ = svd_flip(vectors[:, keep].copy(), None)
    return stats.origin.copy(), projection


def append_head(base: Path, mean: np.ndarray, projection: np.ndarray, out: Path) -> None:
    """Write the ONNX file ``base`` with ``features`` replaced by ``(features - mean) @
    projection``; every other output and the file's metadata are kept."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(base))
    graph = model.graph
    inner = "_head_base_features"
    for node in graph.node:
        node.output[:] = [inner if name == "features" else name for name in node.output]
        node.input[:] = [inner if name == "features" else name for name in node.input]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.asarray(mean, np.float32), "_head_mean"),
            numpy_helper.from_array(np.asarray(projection, np.float32), "_head_projection"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Sub", [inner, "_head_mean"], ["_head_centred"]),
            helper.make_node("MatMul", ["_head_centred", "_head_projection"], ["features"]),
        ]
    )
    for i, output in enumerate(graph.output):
        if output.name == "features":
            graph.output[i].CopyFrom(
                helper.make_tensor_value_info(
                    "features", TensorProto.FLOAT, ["batch", int(projection.shape[1])]
                )
            )
    onnx.checker.check_model(model)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, out)


def sample_digest(parts) -> str:
    """A digest of the raw training sample, so a checkpoint is resumed on the same cutouts."""
    h = hashlib.sha256()
    for raw, image in parts:
        h.update(str(image).encode())
        h.update(np.ascontiguousarray(raw, np.float32).tobytes())
    return h.hexdigest()
