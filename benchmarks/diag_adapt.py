"""Does ``elodin models adapt``'s training help or hurt? A fast before/after on the benchmark.

Trains :class:`pipeline.models.adapt.Trainer` (the code ``elodin models adapt`` runs) on the
unlabelled stamps of :mod:`bench_quality` for a few epochs, and after each epoch prints the loss,
the projections' spread (std across the batch of the L2-normalised projector outputs, averaged
over dimensions: ~0 is SimSiam's collapse, ~1/sqrt(512) = 0.044 is healthy) and the k-NN balanced
accuracy / k-means ARI of the encoder's features (eval mode, the exported ``features`` output),
beside the untrained base's in the same run. Each setting is one ``--set`` of model.adapt keys:

    .venv/bin/python benchmarks/diag_adapt.py --per-class 40 --epochs 3 \\
        --set freeze_bn=false,backbone_lr_factor=1 --set freeze_bn=true,backbone_lr_factor=0.1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import bench_quality as bq


def encoder_features(trainer, rgb: np.ndarray, batch: int = 128) -> np.ndarray:
    """The encoder's ``features`` output in eval mode, as the exported graph computes them."""
    import torch

    trainer.encoder.eval()
    with torch.no_grad():
        return np.concatenate(
            [
                trainer.encoder(torch.from_numpy(rgb[i : i + batch]))[0].numpy()
                for i in range(0, len(rgb), batch)
            ]
        )


def _setting(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key] = {"true": True, "false": False}.get(value.lower(), None)
        if out[key] is None:
            out[key] = float(value) if "." in value or "e" in value else int(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--base", default="efficientnet-lite0:native")
    ap.add_argument("--set", action="append", default=None, metavar="KEY=VALUE,...")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--classes", choices=sorted(bq.CLASS_SETS), default="issue")
    args = ap.parse_args()

    import torch

    from pipeline.models import resolve
    from pipeline.models.adapt import Trainer, train_settings
    from pipeline.models.export import pretrained_network

    torch.set_num_threads(args.threads)
    raw, labels = bq.simulate(args.per_class, classes=bq.CLASS_SETS[args.classes])
    sample = raw.reshape(1, -1)[:, :: max(1, raw.size // 200_000)]
    rgb = np.ascontiguousarray(bq.stretched(raw[:, None], {}, sample), np.float32)
    data = torch.from_numpy(rgb)
    card = resolve(args.base)
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, load {os.getloadavg()[0]:.1f}, "
        f"{len(rgb)} stamps ({args.per_class} per class), {args.epochs} epochs, batch "
        f"{args.batch_size}, {args.threads} threads",
        flush=True,
    )
    base = None
    for text in args.set or [""]:
        torch.manual_seed(0)
        settings = train_settings(**_setting(text))
        trainer = Trainer(card, pretrained_network(card), settings)
        if base is None:
            base = bq.scores(encoder_features(trainer, rgb), labels)
            print(f"base {args.base}: b-acc {base[0]:.3f} ARI {base[1]:.3f}", flush=True)
        print(f"## {settings}", flush=True)
        gen = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for epoch in range(args.epochs):
            stats = trainer.epoch(data, epoch, args.epochs, args.batch_size, gen)
            bacc, ari = bq.scores(encoder_features(trainer, rgb), labels)
            print(
                f"epoch {epoch + 1}: loss {stats['loss']:+.3f} z-std {stats['z_std']:.4f} "
                f"b-acc {bacc:.3f} ({bacc - base[0]:+.3f}) ARI {ari:.3f} ({ari - base[1]:+.3f}) "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
