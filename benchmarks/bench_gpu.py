"""GPU inference: the bare ONNX Runtime ceiling and ``elodin fingerprint`` end to end, one run.

For EfficientNet-Lite0 at 224 (resize in the graph) and at native 64, fp32 and fp16, batch
sizes 64 to 1024:

  ceiling   the bare CUDA session with IO binding and fixed-shape batches on pre-cut,
            pre-stretched cutouts already in host memory (what the model alone can do)
  elodin    ``fingerprint()`` on a synthetic mosaic stored as Zarr on local disk, one worker
            process holding the GPU (resource GPU=1), reading, cutting and stretching on its
            CPU threads while the GPU runs the previous batch

and the GPU utilisation sampled by nvidia-smi while each runs. Prints the GPU, driver and
library versions first. Needs onnxruntime-gpu with a working CUDA provider; refuses to run
(and prints nothing as a figure) without one.

First, on any machine, the feed: how many native-size cutouts per second the CPU side of a GPU
worker (read a tile of the Zarr mosaic, cut, stretch; no model) produces with 1, 2, 4 ...
threads at once. A GPU worker runs ``fingerprint.gpu-units`` units at once, so this is the rate
it can hand the GPU; ``--feed-only`` measures just that (no GPU needed).

    python benchmarks/bench_gpu.py [--side 8192] [--batches 64 256 1024] [--seconds 10]
    python benchmarks/bench_gpu.py --feed-only [--side 4096]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def smi(query: str, *, units: bool = False, timeout: float = 30) -> str | None:
    """One ``nvidia-smi --query-gpu`` answer (CSV, no header); None without nvidia-smi."""
    fmt = "csv,noheader" if units else "csv,noheader,nounits"
    try:
        return subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", f"--format={fmt}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_facts() -> str:
    return smi("name,driver_version,memory.total", units=True) or "nvidia-smi not available"


class Utilisation:
    """Mean GPU utilisation (%) reported by nvidia-smi while the block runs."""

    def __init__(self, period: float = 0.2):
        self.period, self.samples = period, []
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append(float((smi("utilization.gpu", timeout=5) or "").split()[0]))
            except (ValueError, IndexError):
                pass
            self._stop.wait(self.period)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples)) if self.samples else float("nan")


def make_zarr_mosaic(path: Path, side: int, seed: int = 0) -> Path:
    """Sky noise and Gaussian galaxies in a 2-D Zarr array, written chunk by chunk."""
    import zarr

    rs = np.random.default_rng(seed)
    chunk = 1024  # the feed's tiles: each tile decodes its own chunk once
    arr = zarr.create_array(
        str(path),
        shape=(side, side),
        chunks=(chunk, chunk),
        dtype="float32",
        dimension_names=("y", "x"),
    )
    yy, xx = np.mgrid[0:chunk, 0:chunk]
    for y0 in range(0, side, chunk):
        for x0 in range(0, side, chunk):
            h, w = min(chunk, side - y0), min(chunk, side - x0)
            block = rs.normal(100.0, 5.0, (h, w)).astype(np.float32)
            for _ in range(h * w // 4096):
                cx, cy, s = rs.uniform(0, w), rs.uniform(0, h), rs.uniform(1.5, 6)
                lo_y, hi_y = int(max(0, cy - 4 * s)), int(min(h, cy + 4 * s + 1))
                lo_x, hi_x = int(max(0, cx - 4 * s)), int(min(w, cx + 4 * s + 1))
                sub = (slice(lo_y, hi_y), slice(lo_x, hi_x))
                block[sub] += rs.uniform(50, 2000) * np.exp(
                    -(((xx[sub] - cx) ** 2 + (yy[sub] - cy) ** 2) / (2 * s * s))
                )
            arr[y0 : y0 + h, x0 : x0 + w] = block
    return path


def feed_jobs(mosaic: Path, *, tile: int = 1024, size: int = 64, batch: int = 256) -> list:
    """Work units of one tile each over the whole mosaic, as ``fingerprint()`` would give its
    workers (no store, no model: only what the CPU side reads, cuts and stretches)."""
    from pipeline import config
    from pipeline.fingerprint import TileJob, UnitJob
    from pipeline.preprocess import image_limits_for
    from pipeline.sources import open_sources

    (src,) = open_sources([str(mosaic)])
    preprocess = dict(config.get("preprocess"))
    limits = {src.id: image_limits_for(src, preprocess)}
    ny, nx = src.shape
    jobs = []
    for y0 in range(0, ny, tile):
        for x0 in range(0, nx, tile):
            ys = np.arange(y0, min(ny, y0 + tile) - size + 1, size)
            xs = np.arange(x0, min(nx, x0 + tile) - size + 1, size)
            gx, gy = np.meshgrid(xs, ys)
            wins = np.stack([gx.ravel(), gy.ravel(), *([np.full(gx.size, size)] * 2)], 1)
            box = (int(y0), int(min(ny, y0 + tile)), int(x0), int(min(nx, x0 + tile)))
            tiles = (TileJob(src, box, wins.astype(np.int64)),)
            jobs.append(
                UnitJob(
                    "",
                    len(jobs),
                    0,
                    len(wins),
                    tiles,
                    None,
                    preprocess,
                    limits,
                    batch,
                    np.nan,
                    size,
                    "float32",
                )
            )
    return jobs


def feed_rates(jobs: list, threads: list[int]) -> list[tuple[int, float]]:
    """Cutouts/s that ``threads`` units prepared at once give (the GPU worker's feed)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.fingerprint import _prepared_batches

    def prepare(job) -> int:
        return sum(len(rgb) for _, rgb, _ in _prepared_batches(job))

    prepare(jobs[0])  # warm: imports, first Zarr open
    out = []
    for n in threads:
        with ThreadPoolExecutor(n) as pool:
            t0 = time.perf_counter()
            total = sum(pool.map(prepare, jobs))
            out.append((n, total / (time.perf_counter() - t0)))
    return out


def print_feed(mosaic: Path, threads: list[int]) -> None:
    jobs = feed_jobs(mosaic)
    n = sum(len(t.windows) for j in jobs for t in j.tiles)
    print(f"# feed: {len(jobs)} units of one 1024^2 tile, {n} cutouts of 64^2 (read, cut, stretch)")
    print(f"{'threads':>7} {'cutouts/s':>10} {'per thread':>10}")
    for k, rate in feed_rates(jobs, threads):
        print(f"{k:>7} {rate:>10.0f} {rate / k:>10.0f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--side", type=int, default=8192, help="mosaic side (8192: 16384 windows of 64^2)"
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--seconds", type=float, default=10.0, help="time per ceiling measurement")
    ap.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="worker threads for the end-to-end run (at least --gpu-units)",
    )
    ap.add_argument(
        "--gpu-units",
        type=int,
        default=4,
        help="units the GPU worker runs at once (fingerprint.gpu-units)",
    )
    ap.add_argument(
        "--feed-only",
        action="store_true",
        help="measure only the CPU-side feed (read, cut, stretch); no GPU needed",
    )
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    feed_threads = sorted({1, *[2**i for i in range(1, 8) if 2**i <= cores], cores})
    if args.feed_only:
        work = Path(tempfile.mkdtemp(prefix="elodin-feed-bench-"))
        try:
            print(f"# {platform.machine()}, {cores} CPU cores, numpy {np.__version__}")
            print_feed(make_zarr_mosaic(work / "mosaic.zarr", args.side), feed_threads)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return 0

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(
            "no CUDA provider in this onnxruntime (install onnxruntime-gpu on a GPU machine); nothing measured",
            file=sys.stderr,
        )
        return 1
    from distributed import Client, LocalCluster

    from pipeline.fingerprint import fingerprint
    from pipeline.models import resolve
    from pipeline.models.export import ensure_onnx
    from pipeline.models.runtime import Session

    print(f"# GPU: {gpu_facts()}")
    print(
        f"# onnxruntime {ort.__version__}, numpy {np.__version__}, python {platform.python_version()}, {os.cpu_count()} CPU cores"
    )
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="elodin-gpu-bench-"))
    try:
        mosaic = make_zarr_mosaic(work / "mosaic.zarr", args.side)
        print_feed(mosaic, feed_threads)
        n_windows = (args.side // 64) ** 2
        print(f"# mosaic {args.side}^2 in Zarr on local disk, {n_windows} windows of 64^2")
        print(
            f"{'model':<26} {'prec':>5} {'batch':>6} {'ceiling/s':>10} {'gpu%':>5} {'elodin/s':>9} {'gpu%':>5} {'e2e/ceil':>8}"
        )
        with (
            LocalCluster(
                n_workers=1,
                threads_per_worker=max(args.threads, args.gpu_units),
                processes=True,
                resources={"GPU": 1},
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
        ):
            for name in ("efficientnet-lite0", "efficientnet-lite0:native"):
                for precision in ("fp32", "fp16"):
                    path = ensure_onnx(resolve(name), precision=precision)
                    for bs in args.batches:
                        sess = Session(
                            path,
                            providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                            io_binding=True,
                            fixed_batch=bs,
                        )
                        batch = rng.random((bs, 3, 64, 64), dtype=np.float32)
                        for _ in range(3):
                            sess.infer(batch, logits=False)
                        with Utilisation() as u:
                            n, t0 = 0, time.perf_counter()
                            while time.perf_counter() - t0 < args.seconds:
                                sess.infer(batch, logits=False)
                                n += bs
                            ceiling = n / (time.perf_counter() - t0)
                        import dask.config

                        run_settings = {
                            "elodin.model.precision": precision,
                            "elodin.fingerprint.gpu-units": args.gpu_units,
                        }
                        with dask.config.set(run_settings):
                            out = work / f"s-{time.monotonic_ns()}.zarr"
                            with Utilisation() as ue:
                                t0 = time.perf_counter()
                                res = fingerprint(
                                    [str(mosaic)],
                                    out,
                                    method="sliding",
                                    size=64,
                                    model=name,
                                    batch_size=bs,
                                    gpu=True,
                                    client=client,
                                    progress=False,
                                )
                                e2e = res.n_cutouts / (time.perf_counter() - t0)
                            shutil.rmtree(out)
                        print(
                            f"{name:<26} {precision:>5} {bs:>6} {ceiling:>10.0f} {u.mean:>5.0f} {e2e:>9.0f} {ue.mean:>5.0f} {e2e / ceiling:>8.2f}",
                            flush=True,
                        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
