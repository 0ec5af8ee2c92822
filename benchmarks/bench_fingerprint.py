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

``--hdf``: whole processes on a real image instead. The Hubble Deep Field that scikit-image
ships (872 x 1000 RGB) tiled 4 x 4 into a 3488 x 4000 PNG, 3,465 windows of 64^2 (stride 64,
default tiles and chunks), each side a fresh process timed from outside, alternating, medians:

  (a) bare     one process: read the image, per-image limits, cut, stretch, one ONNX Runtime
               session on all cores, batches of --batch (no Dask, no Zarr)
  (b) elodin   ``elodin fingerprint`` with --workers processes (cluster, store, everything)
  (b0)         (b) with ``fingerprint.units-per-thread: 1``: the work units as they were sized
               before (3 units for 2 workers), the baseline of the same run

and, apart, each side's fixed start-up: the same command on a 64 x 64 crop (one window):
interpreter and imports, for (b) the cluster start, the session in a worker and the store.

    .venv/bin/python benchmarks/bench_fingerprint.py --hdf [--workers 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
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


# ------------------------------------------------------------------ --hdf: whole processes
def hdf_mosaic(directory: Path) -> tuple[Path, Path]:
    """The HDF tiled 4 x 4 (3488 x 4000 RGB PNG) and a 64 x 64 crop of it (one window)."""
    import skimage.data
    from PIL import Image

    hdf = skimage.data.hubble_deep_field()  # as pipeline.demo reads it
    big, small = directory / "hdf4x4.png", directory / "hdf64.png"
    Image.fromarray(np.tile(hdf, (4, 4, 1))).save(big)
    Image.fromarray(np.ascontiguousarray(hdf[400:464, 400:464])).save(small)
    return big, small


def bare_loop(image: str, model: str, batch: int) -> None:
    """(a), run as its own process: every window of the plan `elodin fingerprint` makes, read,
    cut, stretched (per-image limits) and run through one session on all cores."""
    t0 = time.perf_counter()
    from pipeline import tiling
    from pipeline.fingerprint import cut_windows
    from pipeline.models import get_session, resolve
    from pipeline.models.export import ensure_onnx
    from pipeline.models.runtime import default_threads
    from pipeline.preprocess import image_limits_for, stretch_cutouts
    from pipeline.sources import open_sources

    src = open_sources([image])[0]
    plan = tiling.plan_image(
        src.shape, image_id=src.id, method="sliding", size=64, stride=64, tile_size=2048
    )
    limits = image_limits_for(src)
    data = src.read(0, src.shape[0], 0, src.shape[1])
    t1 = time.perf_counter()
    session = get_session(ensure_onnx(resolve(model)), threads=default_threads())
    t2 = time.perf_counter()
    for b in range(0, plan.n_windows, batch):
        cut = cut_windows(
            data, (0, src.shape[0], 0, src.shape[1]), plan.window_range(b, b + batch), fill=np.nan
        )
        rgb, _ = stretch_cutouts(cut, image_limits=limits)
        session.infer(rgb, logits=False)
    t3 = time.perf_counter()
    print(json.dumps({"n": plan.n_windows, "setup": t1 - t0, "session": t2 - t1, "loop": t3 - t2}))


def _timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - t
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return wall, done.stdout


def hdf_whole_process(args) -> None:
    from pipeline.models import resolve
    from pipeline.models.export import ensure_onnx

    model = args.models[0]
    ensure_onnx(resolve(model))  # exported once, before any clock
    work = Path(tempfile.mkdtemp(prefix="elodin-bench-hdf-"))
    try:
        big, small = hdf_mosaic(work)

        def bare(image: Path) -> tuple[float, dict]:
            cmd = [sys.executable, __file__, "--bare-loop", str(image), "--models", model]
            wall, out = _timed([*cmd, "--batch", str(args.batch)])
            return wall, json.loads(out.strip().splitlines()[-1])

        def elodin(image: Path, env_extra: dict | None = None) -> tuple[float, str]:
            out = work / f"s-{time.monotonic_ns()}.zarr"
            cmd = [sys.executable, "-m", "pipeline.cli", "fingerprint", str(image), "-o", str(out)]
            cmd += ["--size", "64", "--stride", "64", "--model", model, "--no-progress"]
            cmd += ["--workers", str(args.workers), "--batch-size", str(args.batch)]
            wall, text = _timed(cmd, env={**os.environ, **(env_extra or {})})
            shutil.rmtree(out)
            return wall, text.strip().splitlines()[-1]

        print(f"# load average at start: {os.getloadavg()[0]:.1f}")
        print(
            f"# {platform.machine()}, {os.cpu_count()} cores; HDF 4x4 mosaic 3488x4000 RGB PNG; "
            f"{model}; batch {args.batch}; {args.workers} worker processes; {args.rounds} rounds"
        )
        old = {"ELODIN__FINGERPRINT__UNITS_PER_THREAD": "1"}
        runs: dict[str, list[float]] = {k: [] for k in ("a", "b", "b0", "a_fix", "b_fix")}
        inner = []
        for r in range(args.rounds):
            wall, facts = bare(big)
            runs["a"].append(wall)
            inner.append(facts)
            wall, line_b = elodin(big)
            runs["b"].append(wall)
            wall, line_b0 = elodin(big, old)
            runs["b0"].append(wall)
            runs["a_fix"].append(bare(small)[0])
            runs["b_fix"].append(elodin(small)[0])
            print(
                f"# round {r + 1}: a {runs['a'][-1]:.1f} s, b {runs['b'][-1]:.1f} s, "
                f"b0 {runs['b0'][-1]:.1f} s, start-up a {runs['a_fix'][-1]:.1f} s, "
                f"b {runs['b_fix'][-1]:.1f} s (load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
        print(f"# b: {line_b}")
        print(f"# b0: {line_b0}")
        med = {k: float(np.median(v)) for k, v in runs.items()}
        n = inner[0]["n"]
        print(
            f"# bare process inside: set-up {np.median([f['setup'] for f in inner]):.1f} s, "
            f"session {np.median([f['session'] for f in inner]):.1f} s, "
            f"loop {np.median([f['loop'] for f in inner]):.1f} s"
        )
        print(f"{'':<34} {'wall s':>7} {'cutouts/s':>10} {'/ bare':>7}")
        for key, label in (
            ("a", "(a) bare loop, whole process"),
            ("b", "(b) elodin fingerprint"),
            ("b0", "(b0) elodin, units as before"),
        ):
            print(f"{label:<34} {med[key]:>7.1f} {n / med[key]:>10.1f} {med['a'] / med[key]:>7.2f}")
        print(
            f"fixed start-up (one window): bare {med['a_fix']:.1f} s, elodin {med['b_fix']:.1f} s"
        )
        a_net, b_net = med["a"] - med["a_fix"], med["b"] - med["b_fix"]
        print(
            f"without the fixed start-up: bare {a_net:.1f} s, elodin {b_net:.1f} s, "
            f"elodin / bare {a_net / b_net:.2f}"
        )
        print(f"# load average at end: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=4096, help="mosaic side for the throughput runs")
    ap.add_argument("--workers", type=int, help="worker processes (all cores; --hdf: 2)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--naive-limit", type=int, default=1000, help="cutouts timed in the naive loop")
    ap.add_argument("--rounds", type=int, help="pipeline runs per model, median (3; --hdf: 2)")
    ap.add_argument(
        "--models",
        nargs="+",
        default=["efficientnet-lite0", "efficientnet-lite0:native"],
        help="which of the two models to run",
    )
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--hdf", action="store_true", help="whole processes on the HDF mosaic")
    ap.add_argument("--bare-loop", metavar="IMAGE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_loop:
        return bare_loop(args.bare_loop, args.models[0], args.batch)
    if args.hdf:
        args.workers = args.workers or 2
        args.rounds = args.rounds or 2
        return hdf_whole_process(args)
    args.workers = args.workers or os.cpu_count() or 1
    args.rounds = args.rounds or 3

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
