"""Cost of the stretch per cutout: batched zscale against astropy's per-cutout call.

Prints milliseconds per 64 x 64 cutout for
- the zscale limits alone: astropy ``ZScaleInterval.get_limits`` in a loop (the baseline) and
  :func:`pipeline.preprocess.zscale_limits` on the batch;
- the whole :func:`pipeline.preprocess.stretch_cutouts` with the default settings (per-image
  percentile limits, asinh) and with zscale per cutout, on 1 and 3 bands.

    .venv/bin/python benchmarks/bench_preprocess.py [--n 2048] [--batch 64] [--size 64]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from astropy.visualization import ZScaleInterval

from pipeline.preprocess import image_limits_for, stretch_cutouts, zscale_limits


def cutouts(n: int, bands: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    out = rng.normal(100.0, 3.0, (n, bands, size, size)).astype(np.float32)
    x, y = rng.uniform(0, size, (2, n))
    flux = 10 ** rng.uniform(1, 3.5, n)
    r = np.hypot(xx[None] - x[:, None, None], yy[None] - y[:, None, None])
    out += (flux[:, None, None] * np.exp(-r / 2.0))[:, None].astype(np.float32)
    return out


def per_cutout_ms(fn, n: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {args.n} cutouts of {args.size}^2")
    print("| what | ms per cutout |")
    print("|---|---:|")
    one = cutouts(args.n, 1, args.size)
    z = ZScaleInterval()
    base = per_cutout_ms(lambda: [z.get_limits(c[0]) for c in one], args.n)
    print(f"| zscale limits, astropy loop (baseline) | {base:.3f} |")
    print(
        f"| zscale limits, batched | {per_cutout_ms(lambda: zscale_limits(one[:, 0]), args.n):.3f} |"
    )
    for bands in (1, 3):
        data = one if bands == 1 else cutouts(args.n, 3, args.size)
        lim = image_limits_for(data.transpose(1, 0, 2, 3).reshape(bands, -1))

        def run(cfg, lim=lim, data=data):
            for b in range(0, len(data), args.batch):
                stretch_cutouts(data[b : b + args.batch], config=cfg, image_limits=lim)

        default = per_cutout_ms(lambda run=run: run(None), args.n)
        zsc = per_cutout_ms(lambda run=run: run({"interval": "zscale", "scope": "cutout"}), args.n)
        print(
            f"| stretch_cutouts, {bands} band(s), defaults (image percentile, asinh) | {default:.3f} |"
        )
        print(f"| stretch_cutouts, {bands} band(s), zscale per cutout, asinh | {zsc:.3f} |")


if __name__ == "__main__":
    main()
