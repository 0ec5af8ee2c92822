"""``elodin models adapt``: adapt a built-in network to the user's own cutouts, no labels.

Two methods (``model.adapt.method``, ``--method``):

- ``head`` (the default): the encoder stays frozen and a linear head is fitted in closed form
  on its features of the cutouts and of augmented views of them (:mod:`pipeline.models.head`).
  Any built-in, variants included (``efficientnet-lite0:native:stages:zoom3:rot4``); ``--epochs`` is
  the number of augmented views of each cutout. Minutes on a CPU.
- ``simsiam``: fine-tune the network itself (below); plain built-ins only.

SimSiam (Chen & He 2021): two augmented views of each cutout go through the network, a projector
and a predictor; the loss pulls each view's prediction towards the other view's projection
(negative cosine, stop-gradient on the target). The augmentations are the ones an astronomical
cutout has no business being told apart by: rotations by 90 degrees, mirror images, shifts of a
few pixels, Gaussian noise and a Gaussian PSF blur. The cutouts are those ``elodin fingerprint``
would make of the same inputs (the ``cutouts``, ``tiling`` and ``preprocess`` settings, sliding or
full windows), a random sample of at most ``model.adapt.max-cutouts`` of them, stretched as
fingerprinting stretches them.

Either way the model goes with a card beside it into ``<model cache>/adapted/NAME.onnx`` +
``NAME.yaml``; :func:`pipeline.models.zoo.resolve` finds it by its name, and it runs through the
user-model path, so ``--model NAME`` works like a built-in name and stores record it. A
SimSiam network is exported bare (input at the base's resolution, already normalised; the
wrapper adds the resize and the ImageNet normalisation); a head model is the base's whole graph
with the head appended (its card asks for no resize and mean 0 / std 1).

A checkpoint is written atomically after every epoch (SimSiam: ``NAME.ckpt``) or view (head:
``NAME.head.npz``): the same command run again resumes after the last one finished (with more
``--epochs`` it goes on).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import config
from ..errors import ConfigError, InputError, ModelError
from .zoo import ModelCard, resolve, sha256_file

__all__ = [
    "ADAPTED_DIR",
    "METHODS",
    "Trainer",
    "adapt",
    "adapted_card_path",
    "head_settings",
    "train_settings",
    "training_cutouts",
    "training_sample",
]

logger = logging.getLogger(__name__)

ADAPTED_DIR = "adapted"
METHODS = ("head", "simsiam")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def adapted_card_path(name: str, cache: Path | None = None) -> Path:
    """Where the card of the adapted model ``name`` lives in the model cache."""
    cache = Path(cache) if cache is not None else config.cache_dir()
    return cache / ADAPTED_DIR / f"{name}.yaml"


def _checkpoint_path(card_path: Path, method: str) -> Path:
    """Where ``method`` keeps its checkpoint of the adapted model whose card is ``card_path``."""
    return card_path.with_suffix({"head": ".head.npz", "simsiam": ".ckpt"}[method])


def _check_name(name: str) -> str:
    from .zoo import _BUILTINS

    if not _NAME.fullmatch(str(name)) or str(name).endswith((".onnx", ".yaml", ".yml", ".json")):
        raise ConfigError(
            f"--name {name!r}: use letters, digits, '.', '_' and '-' (up to 64, no extension)"
        )
    if name in _BUILTINS:
        raise ConfigError(f"--name {name!r} is a built-in model's name; choose another")
    return str(name)


def _base_card(base: str, method: str) -> ModelCard:
    card = resolve(base)
    if not card.builtin:
        raise ModelError(f"adapt: base {base!r} is not a built-in model (elodin models list)")
    if method == "simsiam" and not card.plain:
        raise ModelError(
            f"adapt: base {base!r}: method simsiam adapts a plain built-in (with a resolution "
            "if you like); :multi, :stages, :zoom and :rot variants are adapted by method head"
        )
    return card


# ----------------------------------------------------------------------------- cutouts
def training_cutouts(
    inputs: Sequence[str],
    *,
    max_cutouts: int,
    seed: int = 0,
    hdu=None,
    variable: str | None = None,
) -> np.ndarray:
    """A random sample of the cutouts ``elodin fingerprint`` would make of ``inputs``,
    stretched: float32 (n, 3, size, size) in [0, 1], at most ``max_cutouts``.

    Memory: the sample, plus one tile's read box at a time.
    """
    reader, parts = training_sample(
        inputs, max_cutouts=max_cutouts, seed=seed, hdu=hdu, variable=variable
    )
    if not parts:
        return np.zeros((0, 3, 1, 1), np.float32)
    return reader.prepare_many(parts)[0]


def training_sample(
    inputs: Sequence[str],
    *,
    max_cutouts: int,
    seed: int = 0,
    hdu=None,
    variable: str | None = None,
):
    """``(reader, parts)``: the sample of :func:`training_cutouts` before the stretch, as
    ``(raw (n, bands, h, w), image id)`` parts, and the :class:`~pipeline.cutouts.CutoutReader`
    whose ``prepare_many(parts)`` stretches them as fingerprinting does."""
    # The fingerprint stage's own settings, planning and cutting: the same windows it makes.
    from ..cutouts import CutoutReader
    from ..fingerprint import fingerprint_settings, image_limits, plan_sources
    from ..sources import open_sources

    settings = fingerprint_settings()
    method = settings["cutouts"]["method"]
    if method not in ("sliding", "full"):
        raise ConfigError(
            f"adapt: cutouts.method {method!r}: adapt samples sliding or full windows; "
            "use --method sliding for training"
        )
    sources = open_sources(list(inputs), hdu=hdu, variable=variable)
    if not sources:
        raise InputError("adapt: no input images")
    plan = plan_sources(sources, settings)
    rng = np.random.default_rng(seed)
    n = min(plan.n_windows, int(max_cutouts))
    chosen = np.sort(rng.choice(plan.n_windows, n, replace=False)) if n else np.zeros(0, int)
    owner = plan.window_tiles()[chosen]
    by_id = {s.id: s for s in sources}
    fill = settings["cutouts"]["fill"]
    reader = CutoutReader(
        by_id,
        preprocess=settings["preprocess"],
        fill=np.nan if fill is None else float(fill),
        image_limits=image_limits(sources, settings["preprocess"]),
    )
    parts = []
    for t in np.unique(owner):
        tile = plan.tiles[t]
        source = by_id[plan.images[int(tile["image"])]]
        box = (int(tile["ry0"]), int(tile["ry1"]), int(tile["rx0"]), int(tile["rx1"]))
        first = int(plan.tile_start[t])
        wins = plan.tile_windows(int(t))[chosen[owner == t] - first]
        parts.append((reader.cut(source.read(*box), box, wins), source.id))
    return reader, parts


# ----------------------------------------------------------------------------- training
def _augment(x, gen):
    """Random rotations, flips, shifts of up to 3 px, noise and PSF blur, per cutout."""
    import torch

    n = x.shape[0]
    k = torch.randint(0, 4, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = []
    for i in range(n):
        v = torch.rot90(x[i], int(k[i]), dims=(1, 2))
        if flip[i]:
            v = torch.flip(v, dims=(2,))
        dy, dx = (int(t) for t in torch.randint(-3, 4, (2,), generator=gen))
        out.append(torch.roll(v, shifts=(dy, dx), dims=(1, 2)))
    x = torch.stack(out)
    # PSF blur: a Gaussian of sigma 0-1.2 px per cutout, as a depthwise 5x5 convolution.
    sigma = 0.05 + 1.15 * torch.rand(n, generator=gen)
    r = torch.arange(-2, 3, dtype=torch.float32)
    g = torch.exp(-(r[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    g = g / g.sum(dim=1, keepdim=True)
    kernel = (g[:, :, None] * g[:, None, :]).repeat_interleave(3, dim=0)[:, None]
    x = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x.reshape(1, n * 3, *x.shape[2:]), (2, 2, 2, 2), mode="reflect"),
        kernel,
        groups=n * 3,
    ).reshape(x.shape)
    noise = 0.03 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return (x + noise).clamp(0.0, 1.0)


def _heads(dim: int):
    import torch.nn as nn

    hidden, out, bottleneck = 512, 512, 128
    projector = nn.Sequential(
        nn.Linear(dim, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out, bias=False),
        nn.BatchNorm1d(out, affine=False),
    )
    predictor = nn.Sequential(
        nn.Linear(out, bottleneck, bias=False),
        nn.BatchNorm1d(bottleneck),
        nn.ReLU(inplace=True),
        nn.Linear(bottleneck, out),
    )
    return projector, predictor


def _atomic_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _export_bare(net, card: ModelCard, out: Path) -> None:
    """The adapted network alone, for the user-model path (it adds resize and normalisation)."""

    import torch

    class Bare(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            features = self.net.extract_features(x).mean(dim=(2, 3))
            return features, self.net._fc(features)

    side = 64 if card.resolution == "native" else int(card.resolution)
    tmp = out.with_suffix(".onnx.tmp")
    from .export import torch_export

    torch_export(Bare().eval(), torch.rand(2, 3, side, side), tmp)
    os.replace(tmp, out)


def train_settings(**overrides) -> dict:
    """``{"lr", "backbone-lr-factor", "tune-blocks", "freeze-bn"}`` from ``model.adapt``,
    overridden by ``overrides`` (keys with ``_`` for ``-``)."""
    out = {"lr": config.get_float("model.adapt.learning-rate", override=overrides.get("lr"))}
    out["backbone-lr-factor"] = config.get_float(
        "model.adapt.backbone-lr-factor", override=overrides.get("backbone_lr_factor")
    )
    out["tune-blocks"] = config.get_int(
        "model.adapt.tune-blocks", override=overrides.get("tune_blocks"), minimum=0
    )
    freeze = config.get("model.adapt.freeze-bn", override=overrides.get("freeze_bn"))
    if not isinstance(freeze, bool):
        raise ConfigError(f"model.adapt.freeze-bn must be true or false, got {freeze!r}")
    out["freeze-bn"] = freeze
    return out


class Trainer:
    """SimSiam on one network: the encoder as exported, the heads, the optimiser.

    ``settings`` is :func:`train_settings`'s dict. The backbone's last ``tune-blocks`` MBConv
    blocks and its head convolution train at ``lr x backbone-lr-factor`` (0 blocks: the head
    convolution alone; all of them: the stem too); the earlier ones are frozen. With ``freeze-bn`` the
    backbone's BatchNorm layers stay in eval mode: their ImageNet running statistics and
    batch-independent normalisation are kept, rather than re-estimated on small batches of
    mostly-empty sky.
    """

    def __init__(self, card: ModelCard, net, settings: dict) -> None:
        import torch

        from .export import torch_module

        self.card, self.net, self.settings = card, net, dict(settings)
        self.encoder = torch_module(card, net)  # resize + normalisation + network, as exported
        self.projector, self.predictor = _heads(card.feature_dim)
        blocks = list(net._blocks)
        k = min(int(settings["tune-blocks"]), len(blocks))
        tuned = [*blocks[len(blocks) - k :], net._conv_head, net._bn1]
        if k == len(blocks):
            tuned = [net]  # every block: the stem too
        for p in net.parameters():
            p.requires_grad_(False)
        for module in tuned:
            for p in module.parameters():
                p.requires_grad_(True)
        backbone = [p for p in net.parameters() if p.requires_grad]
        heads = [*self.projector.parameters(), *self.predictor.parameters()]
        lr = float(settings["lr"])
        groups = [{"params": heads, "base_lr": lr}]
        factor = float(settings["backbone-lr-factor"])
        if backbone and factor > 0:
            groups.append({"params": backbone, "base_lr": lr * factor})
        self.optimiser = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=1e-4)

    def train_mode(self) -> None:
        import torch

        for module in (self.encoder, self.projector, self.predictor):
            module.train()
        if self.settings["freeze-bn"]:
            for m in self.net.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def epoch(self, data, epoch: int, epochs: int, batch_size: int, gen, bar=None) -> dict:
        """One epoch over ``data`` (a tensor of cutouts); ``{"loss", "z_std"}`` means.

        ``z_std`` is the std across the batch of the L2-normalised projections, averaged over
        their dimensions: SimSiam's collapse shows as ~0, healthy as ~1/sqrt(dim).
        """
        import torch

        cos = torch.nn.functional.cosine_similarity
        self.train_mode()
        # Cosine decay over all epochs, so a resumed run follows the same schedule.
        for group in self.optimiser.param_groups:
            group["lr"] = group["base_lr"] * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        steps = len(data) // batch_size
        order = torch.randperm(len(data), generator=gen)
        total = spread = 0.0
        for s in range(steps):
            x = data[order[s * batch_size : (s + 1) * batch_size]]
            z1 = self.projector(self.encoder(_augment(x, gen))[0])
            z2 = self.projector(self.encoder(_augment(x, gen))[0])
            p1, p2 = self.predictor(z1), self.predictor(z2)
            loss = -(cos(p1, z2.detach()).mean() + cos(p2, z1.detach()).mean()) / 2
            self.optimiser.zero_grad()
            loss.backward()
            self.optimiser.step()
            value = float(loss.detach())
            total += value
            spread += float(torch.nn.functional.normalize(z1.detach(), dim=1).std(0).mean())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}")
        return {"loss": total / max(steps, 1), "z_std": spread / max(steps, 1)}

    def state(self) -> dict:
        return {
            "net": self.net.state_dict(),
            "projector": self.projector.state_dict(),
            "predictor": self.predictor.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "settings": self.settings,
        }

    def load(self, ckpt: dict, where: Path) -> None:
        if ckpt.get("settings") != self.settings:
            raise ModelError(
                f"{where}: a checkpoint made with other model.adapt settings "
                f"({ckpt.get('settings')}) exists; use another --name, or remove it"
            )
        self.net.load_state_dict(ckpt["net"])
        self.projector.load_state_dict(ckpt["projector"])
        self.predictor.load_state_dict(ckpt["predictor"])
        self.optimiser.load_state_dict(ckpt["optimiser"])


def head_settings(**overrides) -> dict:
    """``{"head-dim", "ridge"}`` from ``model.adapt``, overridden by ``overrides`` (keys with
    ``_`` for ``-``)."""
    out = {
        "head-dim": config.get_int(
            "model.adapt.head-dim", override=overrides.get("head_dim"), minimum=1
        ),
        "ridge": config.get_float("model.adapt.ridge", override=overrides.get("ridge")),
    }
    if out["ridge"] <= 0:
        raise ConfigError(f"config elodin.model.adapt.ridge: must be > 0, got {out['ridge']}")
    return out


def adapt(
    base: str,
    inputs: Sequence[str],
    name: str,
    *,
    method: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    max_cutouts: int | None = None,
    cache: Path | None = None,
    hdu=None,
    variable: str | None = None,
    progress: bool = True,
    seed: int = 0,
) -> Path:
    """Adapt ``base`` to cutouts of ``inputs`` without labels; returns the new card's path.

    ``method`` (``model.adapt.method``): ``head``, an invariant linear head on the frozen
    encoder (``epochs`` augmented views of each cutout), or ``simsiam``, fine-tuning the
    network (``epochs`` passes). Settings not given come from ``elodin.model.adapt``.
    Everything is checked before anything is written.
    """
    name = _check_name(name)
    if epochs is not None and (isinstance(epochs, bool) or int(epochs) != epochs or epochs < 1):
        raise ConfigError(f"adapt: --epochs must be an integer >= 1, got {epochs!r}")
    if method is not None and method not in METHODS:
        raise ConfigError(f"adapt: --method {method!r}: use one of {', '.join(METHODS)}")
    method = config.get_choice("model.adapt.method", METHODS, override=method)
    epochs = config.get_int("model.adapt.epochs", override=epochs, minimum=1)
    batch_size = config.get_int("model.adapt.batch-size", override=batch_size, minimum=2)
    max_cutouts = config.get_int("model.adapt.max-cutouts", override=max_cutouts, minimum=2)
    min_cutouts = config.get_int("model.adapt.min-cutouts", minimum=2)
    if max_cutouts < min_cutouts:
        raise ConfigError(
            f"config elodin.model.adapt: max-cutouts ({max_cutouts}) is below min-cutouts "
            f"({min_cutouts}): no sample could be enough"
        )
    settings = head_settings() if method == "head" else train_settings()
    card = _base_card(base, method)
    card_path = adapted_card_path(name, cache)
    (other,) = (_checkpoint_path(card_path, m) for m in METHODS if m != method)
    if other.is_file():
        raise ModelError(
            f"{other}: a checkpoint of {name!r} made by the other adapt method exists; use "
            "another --name, or remove it"
        )
    own = _checkpoint_path(card_path, method)
    if card_path.is_file() and not own.is_file():
        # Without its checkpoint this would be a new model under an old name: the stores made
        # with the old one (they record its sha256) would refuse it.
        raise ModelError(
            f"{card_path}: an adapted model {name!r} exists and its checkpoint ({own.name}) is "
            "gone; use another --name, or remove the model's files to adapt it afresh"
        )
    job = _Job(
        card=card,
        inputs=tuple(map(str, inputs)),
        name=name,
        card_path=card_path,
        settings=settings,
        epochs=epochs,
        batch_size=batch_size,
        min_cutouts=min_cutouts,
        max_cutouts=max_cutouts,
        hdu=hdu,
        variable=variable,
        progress=progress,
        seed=seed,
    )
    return _adapt_head(job) if method == "head" else _adapt_simsiam(job)


@dataclasses.dataclass(frozen=True)
class _Job:
    """One ``adapt`` call with its settings resolved and checked: what either method needs."""

    card: ModelCard
    inputs: tuple[str, ...]
    name: str
    card_path: Path
    settings: dict
    epochs: int
    batch_size: int
    min_cutouts: int
    max_cutouts: int
    hdu: object
    variable: str | None
    progress: bool
    seed: int

    @property
    def sample(self) -> dict:
        """:func:`training_sample`'s keywords."""
        return {
            "max_cutouts": self.max_cutouts,
            "seed": self.seed,
            "hdu": self.hdu,
            "variable": self.variable,
        }


def _too_few(inputs: Sequence[str], n: int, min_cutouts: int) -> None:
    if n < min_cutouts:
        raise InputError(
            f"adapt: {', '.join(map(str, inputs))}: {n} cutout(s) with these cutout "
            f"settings; adapting needs at least {min_cutouts} (model.adapt.min-cutouts)"
        )


def _chunks(parts: list, size: int):
    """Consecutive runs of ``parts`` holding at least ``size`` cutouts each (the last fewer)."""
    run, count = [], 0
    for part in parts:
        run.append(part)
        count += len(part[0])
        if count >= size:
            yield run
            run, count = [], 0
    if run:
        yield run


def _adapt_head(job: _Job) -> Path:
    """Method ``head``: the base's features of the cutouts and of ``epochs`` augmented views
    of each, summed view by view (a checkpoint after each), then the closed-form fit."""
    from ..fingerprint import fingerprint_settings
    from ..progress import bar
    from . import head
    from .export import ensure_onnx
    from .runtime import get_session

    reader, parts = training_sample(job.inputs, **job.sample)
    n = sum(len(raw) for raw, _ in parts)
    _too_few(job.inputs, n, job.min_cutouts)
    ckpt_path = _checkpoint_path(job.card_path, "head")
    base_onnx = ensure_onnx(job.card)
    # Everything a view's features depend on: the same views, or a refusal (never a mix).
    meta = {
        "base": job.card.name,
        "base_sha256": sha256_file(base_onnx),
        "sample": head.sample_digest(parts),
        "preprocess": fingerprint_settings()["preprocess"],
        "seed": job.seed,
        "augment": {"shift": head.SHIFT, "blur": head.BLUR, "flux": head.FLUX, "noise": head.NOISE},
    }
    # Tuples as lists, as a loaded checkpoint has them.
    meta = json.loads(json.dumps(meta, sort_keys=True, default=str))
    stats = None
    if ckpt_path.is_file():
        stats, saved = head.ViewStats.load(ckpt_path)
        if saved != meta:
            raise ModelError(
                f"{ckpt_path}: a checkpoint of {job.name!r} made from other cutouts or settings "
                f"(base {saved.get('base')!r}) exists; use another --name, or remove it"
            )
    session = get_session(base_onnx)
    views = 1 + job.epochs  # the cutouts as they are, then one augmented view per epoch
    done = stats.views if stats is not None else 0
    if done > views:
        logger.warning(
            "adapt %s: the checkpoint holds %d augmented views, more than --epochs %d; "
            "fitting on all of them",
            job.name,
            done - 1,
            job.epochs,
        )
    job.card_path.parent.mkdir(parents=True, exist_ok=True)
    with bar(
        max(views - done, 0) * n, desc=f"adapt {job.name}", unit="cutout", enabled=job.progress
    ) as b:
        for view in range(done, views):
            rng = np.random.default_rng([job.seed, view])
            features = []
            for chunk in _chunks(parts, 8 * job.batch_size):
                if view:
                    chunk = [(head.augment(raw, rng), image) for raw, image in chunk]
                rgb = reader.prepare_many(chunk)[0]
                for i in range(0, len(rgb), job.batch_size):
                    features.append(
                        session.infer(rgb[i : i + job.batch_size], logits=False).features
                    )
                    b.update(len(features[-1]))
            features = np.concatenate(features)
            if stats is None:
                stats = head.ViewStats(n, features.shape[1])
            stats.add(features)
            stats.save(ckpt_path, meta)
            logger.info("adapt %s: view %d/%d of %d cutouts", job.name, view + 1, views, n)
    mean, projection = head.fit_head(
        stats, dim=job.settings["head-dim"], ridge=job.settings["ridge"]
    )
    onnx_path = job.card_path.with_suffix(".onnx")
    head.append_head(base_onnx, mean, projection, onnx_path)
    # The base's graph already resizes and normalises: the card asks for neither again.
    return _write_card(
        job.card_path,
        onnx_path,
        resolution="native",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        feature_dim=int(projection.shape[1]),
        comment=f"Adapted from {job.card.name} by `elodin models adapt --method head` on {n} "
        f"cutouts, {stats.views - 1} augmented view(s) each",
    )


def _adapt_simsiam(job: _Job) -> Path:
    """Method ``simsiam``: fine-tune the network, a checkpoint after each epoch."""
    ckpt_path = _checkpoint_path(job.card_path, "simsiam")
    ckpt = None
    if ckpt_path.is_file():
        import torch

        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises pickle, zip and runtime errors for a bad file
            raise ModelError(
                f"{ckpt_path}: not a readable adapt checkpoint ({type(e).__name__}); remove it"
            ) from None
        if not isinstance(ckpt, dict) or ckpt.get("base") != job.card.name:
            raise ModelError(
                f"{ckpt_path}: a checkpoint of {job.name!r} adapted from "
                f"{ckpt.get('base') if isinstance(ckpt, dict) else None!r} "
                f"exists; use another --name, or remove it to adapt {job.card.name} afresh"
            )
    images = training_cutouts(job.inputs, **job.sample)
    _too_few(job.inputs, len(images), job.min_cutouts)
    batch_size = min(job.batch_size, len(images))

    import torch

    from ..progress import bar
    from .export import pretrained_network

    torch.manual_seed(job.seed)
    net = pretrained_network(job.card)
    trainer = Trainer(job.card, net, job.settings)
    start = 0
    if ckpt is not None:
        trainer.load(ckpt, ckpt_path)
        start = int(ckpt["epoch"])
    job.card_path.parent.mkdir(parents=True, exist_ok=True)
    data = torch.from_numpy(images)
    steps = len(images) // batch_size
    gen = torch.Generator().manual_seed(job.seed + start)
    with bar(
        max(job.epochs - start, 0) * steps,
        desc=f"adapt {job.name}",
        unit="step",
        enabled=job.progress,
    ) as b:
        for epoch in range(start, job.epochs):
            stats = trainer.epoch(data, epoch, job.epochs, batch_size, gen, b)
            logger.info(
                "adapt %s: epoch %d/%d, loss %.4f, projection std %.4f",
                job.name,
                epoch + 1,
                job.epochs,
                stats["loss"],
                stats["z_std"],
            )
            _atomic_save({"base": job.card.name, "epoch": epoch + 1, **trainer.state()}, ckpt_path)
    net.eval()
    onnx_path = job.card_path.with_suffix(".onnx")
    _export_bare(net, job.card, onnx_path)
    return _write_card(
        job.card_path,
        onnx_path,
        resolution=job.card.resolution,
        mean=job.card.mean,
        std=job.card.std,
        feature_dim=job.card.feature_dim,
        comment=f"Adapted from {job.card.name} by `elodin models adapt --method simsiam` on "
        f"{len(images)} cutouts, {job.epochs} epoch(s)",
    )


def _write_card(
    card_path: Path,
    onnx_path: Path,
    *,
    resolution,
    mean,
    std,
    feature_dim: int,
    comment: str,
) -> Path:
    """The adapted model's card beside its ONNX file, written atomically."""
    import yaml

    meta = {
        "name": card_path.stem,
        "path": onnx_path.name,
        "sha256": sha256_file(onnx_path),
        "input": "input",
        "resolution": resolution,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "outputs": {"features": "features", "logits": "logits"},
        "feature_dim": int(feature_dim),
    }
    tmp = card_path.with_suffix(".yaml.tmp")
    tmp.write_text(f"# {comment}\n" + yaml.safe_dump(meta, sort_keys=False))
    os.replace(tmp, card_path)
    return card_path
