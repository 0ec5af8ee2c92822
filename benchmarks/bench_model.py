"""Bare ONNX Runtime throughput of the built-in model: the ceiling every later stage is held to.

Prints cutouts/s for EfficientNet-Lite0 fed 64x64 cutouts, resized to 224 inside the graph and at
native 64x64, for the default before 2026-12-06 (``efficientnet-lite0:native:rot8``: 8 views of
each cutout at native 64) and for the configured default model (``default``; see
docs/fingerprints.md), at batch sizes 1, 32 and 128.

    .venv/bin/python benchmarks/bench_model.py [--seconds 5] [--threads N] [--models NAME ...]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import onnxruntime as ort

from pipeline.models import get_session, resolve
from pipeline.models.export import ensure_onnx
from pipeline.models.runtime import default_threads


def throughput(session, batch: np.ndarray, seconds: float) -> float:
    session.infer(batch)  # warm-up: allocations and kernel choice
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        session.infer(batch)
        n += len(batch)
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument(
        "--models",
        nargs="+",
        default=[
            "efficientnet-lite0",
            "efficientnet-lite0:native",
            "efficientnet-lite0:native:rot8",
            "default",
        ],
    )
    args = ap.parse_args()
    from pipeline import config

    args.models = [config.get("model.name") if m == "default" else m for m in args.models]
    print(
        f"# {platform.processor() or platform.machine()}, {args.threads} threads, onnxruntime {ort.__version__}"
    )
    print(f"{'model':<42} {'input':>7} {'batch':>6} {'cutouts/s':>10}")
    rng = np.random.default_rng(0)
    for name in args.models:
        card = resolve(name)
        sess = get_session(ensure_onnx(card), threads=args.threads)
        res = "64" if card.resolution == "native" else str(card.resolution)
        for bs in args.batches:
            batch = rng.random((bs, 3, 64, 64), dtype=np.float32)
            rate = throughput(sess, batch, args.seconds)
            print(f"{name:<42} {'64->' + res:>7} {bs:>6} {rate:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
