"""Fingerprinting throughput: the pipeline against its ceiling and against the naive loop.

On one synthetic FITS mosaic and the same 64x64 windows, side by side in one run:

  (a) ceiling  the bare ONNX session on pre-cut, pre-stretched batches (all cores)
  (b) elodin   ``fingerprint()`` end to end on a LocalCluster of processes: read tiles, cut,
               stretch, infer, write Zarr (the cluster and the model export are started before
               the clock; planning, store creation and every task are inside it)
  (c) naive    the original Elodin-NN style: per cutout, skimage resize to the model's side and
               a batch-1 session call

for EfficientNet-Lite0 at 224 (resize inside the graph) and at native 64. Then the peak resident
memory of each worker for a 4k^2 and a 16k^2 mosaic (same tile and window sizes; bounded by the
tile, not the mosaic).

    .venv/bin/python benchmarks/bench_fingerprint.py [--side 2048] [--workers 2] [--skip-memory]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits


def make_mosaic(path: Path, side: int, seed: int = 0) -> Path:
    """Sky noise and Gaussian galaxies, written in strips so even 16k^2 never sits in memory."""
    from pipeline.testing import synthetic_mosaic

    return synthetic_mosaic(
        path, shape=(side, side), seed=seed, n_sources=side * side // 16384, sigma=(1.5, 6)
    )


def precut(path: Path, n_side: int, size: int) -> np.ndarray:
    """Every window cut and stretched up front, as the pipeline would (per-image limits)."""
    from pipeline.preprocess import image_limits_for, stretch_cutouts
    from pipeline.sources import open_sources

    limits = image_limits_for(open_sources([str(path)])[0])
    data = fits.getdata(path, memmap=True)
    cut = np.stack(
        [
            data[y : y + size, x : x + size]
            for y in range(0, n_side, size)
            for x in range(0, n_side, size)
        ]
    ).astype(np.float32)
    rgb, _ = stretch_cutouts(cut[:, None], image_limits=limits)
    return rgb


def ceiling(session, rgb: np.ndarray, batch: int) -> float:
    session.infer(rgb[:batch])
    t = time.perf_counter()
    for i in range(0, len(rgb), batch):
        session.infer(rgb[i : i + batch])
    return len(rgb) / (time.perf_counter() - t)


def naive(session, rgb: np.ndarray, side: int, limit: int) -> float:
    from skimage.transform import resize

    t = time.perf_counter()
    n = min(limit, len(rgb))
    for i in range(n):
        img = rgb[i]
        if side != img.shape[-1]:
            img = resize(img, (3, side, side), order=1, anti_aliasing=False).astype(np.float32)
        session.infer(img[None])
    return n / (time.perf_counter() - t)


def pipeline_rate(client, mosaic: Path, model: str, batch: int, workdir: Path) -> tuple[float, int]:
    from pipeline.fingerprint import fingerprint

    out = workdir / f"bench-{model.replace(':', '_')}-{time.monotonic_ns()}.zarr"
    t = time.perf_counter()
    result = fingerprint(
        [mosaic],
        out,
        method="sliding",
        size=64,
        stride=64,
        model=model,
        batch_size=batch,
        # 256-row chunks: 16 work units over 2 workers, so the tail of the run keeps both busy
        chunk_rows=256,
        client=client,
        progress=False,
    )
    elapsed = time.perf_counter() - t
    shutil.rmtree(out)
    return result.n_cutouts / elapsed, result.n_cutouts


def worker_peak_mb(mosaic: Path, workers: int, workdir: Path, stride: int) -> list[float]:
    from distributed import Client, LocalCluster

    from pipeline.fingerprint import fingerprint

    def peak() -> float:
        # VmHWM, not ru_maxrss: a spawned worker inherits its parent's ru_maxrss, and this
        # parent has just written the mosaic through a memory map.
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        out = workdir / f"mem-{mosaic.stem}.zarr"
        fingerprint(
            [mosaic],
            out,
            method="sliding",
            size=64,
            stride=stride,
            chunk_rows=256,
            model="efficientnet-lite0:native",
            client=client,
            progress=False,
        )
        shutil.rmtree(out)
        return sorted(client.run(peak).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=4096, help="mosaic side for the throughput runs")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--naive-limit", type=int, default=1000, help="cutouts timed in the naive loop")
    ap.add_argument("--rounds", type=int, default=3, help="pipeline runs per model (median)")
    ap.add_argument(
        "--models",
        nargs="+",
        default=["efficientnet-lite0", "efficientnet-lite0:native"],
        help="which of the two models to run",
    )
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    from pipeline.models import get_session, resolve
    from pipeline.models.export import ensure_onnx
    from pipeline.models.runtime import default_threads

    work = Path(tempfile.mkdtemp(prefix="elodin-bench-"))
    try:
        mosaic = make_mosaic(work / "mosaic.fits", args.side)
        rgb = precut(mosaic, args.side, 64)
        print(f"# load average at start: {os.getloadavg()[0]:.1f}")
        print(
            f"# {platform.machine()}, {os.cpu_count()} cores; mosaic {args.side}^2, {len(rgb)} windows of 64^2; batch {args.batch}; {args.workers} worker processes"
        )
        print(
            f"{'model':<28} {'(a) ceiling':>12} {'(b) elodin':>11} {'b/a':>6} {'(c) naive':>10} {'b/c':>6}   cutouts/s"
        )
        rates = {}
        with (
            LocalCluster(
                n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            for model, side in (("efficientnet-lite0", 224), ("efficientnet-lite0:native", 64)):
                if model not in args.models:
                    continue
                path = ensure_onnx(resolve(model))
                sess = get_session(path, threads=default_threads())
                # Ceiling and pipeline runs alternate and the medians are compared, so a load
                # that drifts during the runs (a shared machine) biases neither side; a run at
                # native 64 lasts only seconds.
                a_runs = [ceiling(sess, rgb, args.batch)]
                pipeline_rate(client, mosaic, model, args.batch, work)  # warm: sessions in workers
                b_runs = []
                for _ in range(args.rounds):
                    b_runs.append(pipeline_rate(client, mosaic, model, args.batch, work)[0])
                    a_runs.append(ceiling(sess, rgb, args.batch))
                a, b = float(np.median(a_runs)), float(np.median(b_runs))
                c = naive(get_session(path, threads=default_threads()), rgb, side, args.naive_limit)
                print(
                    f"# {model}: ceiling runs {', '.join(f'{x:.0f}' for x in a_runs)}; "
                    f"elodin runs {', '.join(f'{x:.0f}' for x in b_runs)}"
                )
                rates[model] = b
                print(
                    f"{model:<28} {a:>12.1f} {b:>11.1f} {b / a:>6.2f} {c:>10.1f} {b / c:>6.1f}",
                    flush=True,
                )
        if len(rates) == 2:
            print(
                f"elodin at native 64 / elodin at 224: {rates['efficientnet-lite0:native'] / rates['efficientnet-lite0']:.1f}x"
            )
        if not args.skip_memory:
            for side, stride in ((4096, 256), (16384, 256)):  # same window density and tiles
                m = make_mosaic(work / f"mem{side}.fits", side, seed=1)
                peaks = worker_peak_mb(m, args.workers, work, stride)
                print(
                    f"peak RSS per worker, {side}^2 mosaic ({side * side * 4 / 2**20:.0f} MiB): "
                    + ", ".join(f"{p:.0f} MiB" for p in peaks),
                    flush=True,
                )
                m.unlink()
        print(f"# load average at end: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
