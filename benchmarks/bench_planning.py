"""Cost of planning a survey: time and peak memory to plan 10^4, 10^5 and 10^6 tiles.

Tiles are 2048 x 2048 pixels over one virtual square mosaic (no pixels exist: planning is pure).

- sliding, window 64, stride 64: 1024 windows per tile. At 10^6 tiles that is 10^9 windows, 32 GB
  of int64 boxes, which does not fit this machine; it is measured up to 10^5 tiles (10^8 windows)
  and at 10^6 tiles with 512-pixel windows (16 per tile) instead.
- formula (what ``elodin fingerprint`` plans for sliding windows): the same sliding plan as a
  :class:`pipeline.windowgrid.WindowGrid` (tiles and counts, nothing per window), with the work
  units packed and the plan's digest, over the one mosaic and over a survey of 4096^2 patches
  (4 tiles each): 10^9 windows at 10^6 tiles. Its baseline is the listed sliding plan above.
- sparse (catalog or blob style): 20 windows per tile at random positions and sizes 32..128,
  assigned with the generic sort-based :func:`pipeline.tiling.assign_windows`.

Baseline, same run: a naive per-window Python loop (owner tile per window into a dict of lists,
then read boxes) on the smallest cases.

    .venv/bin/python benchmarks/bench_planning.py [--max-tiles 1000000] [--no-baseline]
"""

from __future__ import annotations

import argparse
import math
import platform
import time
import tracemalloc

import numpy as np

from pipeline.store import pack_units
from pipeline.tiling import assign_windows, plan_image, sliding_windows
from pipeline.windowgrid import plan_grid

TILE = 2048


def side_for(n_tiles: int) -> int:
    return round(math.sqrt(n_tiles)) * TILE


def measure(fn):
    """(seconds, peak MiB, result): time untraced, then peak with tracemalloc (numpy reports to it)."""
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    del result
    tracemalloc.start()
    result = fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak, result


def sliding(side: int, size: int):
    return lambda: plan_image((side, side), method="sliding", size=size, tile_size=TILE)


def formula(shapes: np.ndarray, size: int):
    """Plan as the fingerprint stage does: the grid, its work units, its digest."""

    def run():
        plan = plan_grid(shapes, method="sliding", size=size, tile_size=TILE)
        pack_units(plan.tile_start, chunk_rows=4096)
        plan.digest()
        return plan

    return run


def sparse_windows(side: int, per_tile: int, seed: int = 0) -> np.ndarray:
    n_tiles = (side // TILE) ** 2
    rng = np.random.default_rng(seed)
    n = n_tiles * per_tile
    s = rng.integers(32, 129, n)
    w = np.empty((n, 4), dtype=np.int64)
    w[:, 0] = rng.integers(0, side, n) - s // 2
    w[:, 1] = rng.integers(0, side, n) - s // 2
    w[:, 2] = w[:, 3] = s
    return w


def naive(windows: np.ndarray, shape) -> int:
    """What a straightforward implementation does: one Python step per window."""
    ny, nx = shape
    tiles: dict[tuple[int, int], list] = {}
    for x0, y0, w, h in windows.tolist():
        px = min(max(x0 + w // 2, 0), nx - 1)
        py = min(max(y0 + h // 2, 0), ny - 1)
        tiles.setdefault((py // TILE, px // TILE), []).append((x0, y0, w, h))
    boxes = {}
    for key, ws in sorted(tiles.items()):
        ws.sort(key=lambda r: (r[1], r[0]))
        boxes[key] = (
            max(min(r[1] for r in ws), 0),
            min(max(r[1] + r[3] for r in ws), ny),
            max(min(r[0] for r in ws), 0),
            min(max(r[0] + r[2] for r in ws), nx),
        )
    return len(boxes)


def row(label: str, n_tiles: int, n_windows: int, seconds: float, peak: float) -> None:
    print(f"| {label:<34} | {n_tiles:>9,} | {n_windows:>13,} | {seconds:>8.2f} | {peak:>9.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tiles", type=int, default=1_000_000)
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, numpy {np.__version__}, tile {TILE}")
    print("| case | tiles | windows | seconds | peak MiB |")
    print("|---|---:|---:|---:|---:|")
    for n in (10**4, 10**5, 10**6):
        if n > args.max_tiles:
            break
        side = side_for(n)
        if n <= 10**5:
            s, peak, plan = measure(sliding(side, 64))
            row(f"sliding 64/64, side {side}", plan.n_tiles, plan.n_windows, s, peak)
        else:
            print(
                f"| sliding 64/64, side {side} | {n:,} | ~10^9 | - | ~32 GB of windows: does not fit |"
            )
            s, peak, plan = measure(sliding(side, 512))
            row(f"sliding 512/512, side {side}", plan.n_tiles, plan.n_windows, s, peak)
        del plan
        s, peak, plan = measure(formula(np.array([[side, side]]), 64))
        row(f"formula 64/64, side {side}", plan.n_tiles, plan.n_windows, s, peak)
        del plan
        patches = np.tile([[2 * TILE, 2 * TILE]], (n // 4, 1))
        s, peak, plan = measure(formula(patches, 64))
        row(f"formula 64/64, {n // 4:,} patches 4096^2", plan.n_tiles, plan.n_windows, s, peak)
        del plan
        windows = sparse_windows(side, 20)
        s, peak, plan = measure(
            lambda w=windows, sd=side: assign_windows(w, (sd, sd), tile_size=TILE)
        )
        row(f"sparse 20/tile, side {side}", plan.n_tiles, plan.n_windows, s, peak)
        del plan
        if n == 10**4 and not args.no_baseline:
            start = time.perf_counter()
            n_t = naive(windows, (side, side))
            row(
                "  baseline: naive loop, sparse",
                n_t,
                len(windows),
                time.perf_counter() - start,
                float("nan"),
            )
            slide = sliding_windows((side, side), size=64, stride=64)
            start = time.perf_counter()
            n_t = naive(slide, (side, side))
            row(
                "  baseline: naive loop, sliding 64",
                n_t,
                len(slide),
                time.perf_counter() - start,
                float("nan"),
            )
            del slide
        del windows


if __name__ == "__main__":
    main()
