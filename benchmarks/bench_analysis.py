"""Analysis at survey scale: time and peak memory of each stage on 10^6 x 1280 fingerprints.

For each size (default 5 x 10^5 and 10^6 rows) and feature length (``--dims``, default 1280,
EfficientNet-Lite0's head; 2304 is the default model's) a store of synthetic fingerprints
(1280 float32 features: 5 GB at 10^6 rows) is generated block by block straight
into a real Zarr store under ``--work`` (never all in memory), with work units and empty slots
as the fingerprint stage makes them. Then every stage runs in its own subprocess, so its wall
time and peak resident memory (``ru_maxrss`` of that child) are its own:

    reduce (20 components) -> cluster (k-means, 8) -> embed (UMAP) -> similar (one query,
    L2) -> outliers (k = 10)

(``reduce-scaled``, not run by default: reduce standardising each feature, as
``analysis.reduce.scale: auto`` does for the default model.)

with the default configuration (blocks of 65536 rows, samples of 20000, local threads: no
``--scheduler``). The baseline, in the same run, is scikit-learn on an in-memory slice
of ``--baseline-rows`` rows (PCA, KMeans, brute-force numpy similarity, exact k-NN outliers):
what one would do without the store, and what no longer fits in memory at survey scale.

    .venv/bin/python benchmarks/bench_analysis.py [--rows 500000 1000000] [--work /tmp/elodin-bench]
    .venv/bin/python benchmarks/bench_analysis.py --rows 1000000 --dims 1280 2304 --stages reduce reduce-scaled
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

D = 1280
LATENT = 64
N_GROUPS = 12
STAGES = ("reduce", "cluster", "embed", "similar", "outliers")
# The in-memory baseline of each stage.
BASELINES = {
    "reduce": "pca",
    "cluster": "kmeans",
    "embed": "umap",
    "similar": "similar",
    "outliers": "outliers",
}


# ------------------------------------------------------------------------------- generating
def _model(seed: int = 0, dim: int = D):
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(LATENT, dim)).astype(np.float32) / np.sqrt(LATENT)
    centers = rng.normal(size=(N_GROUPS, LATENT)).astype(np.float32) * 2.0
    return basis, centers


def _rows(rng, n: int, basis, centers) -> np.ndarray:
    """Non-negative, low-rank-plus-noise rows in groups: the shape of pooled CNN features."""
    z = centers[rng.integers(0, N_GROUPS, n)] + rng.normal(size=(n, LATENT)).astype(np.float32)
    x = z @ basis + 0.3 * rng.normal(size=(n, basis.shape[1])).astype(np.float32)
    return np.maximum(x, 0.0, out=x)


def generate(path: Path, n: int, *, seed: int = 0, tile: int = 1000, dim: int = D) -> float:
    from pipeline.store import Store, pack_units

    t0 = time.perf_counter()
    st = Store.create(
        path,
        feature_dim=dim,
        topk=20,
        chunk_rows=1024,
        attrs={
            "model": "synthetic",
            "model_sha256": "0" * 64,
            "feature_dim": dim,
            "topk": 20,
            "cutouts": {"size": 64},
            "preprocess": {},
        },
    )
    tile_start = np.r_[np.arange(0, n, tile), n].astype(np.int64)
    layout = pack_units(tile_start, chunk_rows=st.chunk_rows)
    seg = st.append_segment(images=["synthetic"], layout=layout, plan_digest="bench", inputs={})
    rng = np.random.default_rng(seed)
    basis, centers = _model(seed, dim)
    for u in range(layout.n_units):
        w0, w1 = int(layout.unit_windows[u]), int(layout.unit_windows[u + 1])
        r0, r1 = int(layout.unit_rows[u]), int(layout.unit_rows[u + 1])
        m, size = w1 - w0, r1 - r0
        i = np.arange(w0, w1)
        fp = np.full((size, dim), np.nan, np.float32)
        fp[:m] = _rows(rng, m, basis, centers)
        tc = np.full((size, 20), -1, np.int32)
        tc[:m] = np.argsort(rng.random((m, 1000)), axis=1)[:, :20]

        def pad(values, fill, dtype, size=size, m=m):
            out = np.full(size, fill, dtype=dtype)
            out[:m] = values
            return out

        st.write_rows(
            seg.row_start + r0,
            {
                "fingerprint": fp,
                "top_class": tc,
                "valid": np.arange(size) < m,
                "image": pad(np.full(m, "synthetic", dtype=object), "", object),
                "x": pad(32.0 + 64 * (i % 4096), np.nan, np.float64),
                "y": pad(32.0 + 64 * (i // 4096), np.nan, np.float64),
                "width": pad(np.full(m, 64), 0, np.int32),
                "height": pad(np.full(m, 64), 0, np.int32),
                "ra": pad(150 + (i % 4096) * 64 * 0.2 / 3600, np.nan, np.float64),
                "dec": pad(2 + (i // 4096) * 64 * 0.2 / 3600, np.nan, np.float64),
            },
        )
        st.mark_done(seg.unit_start + u)
    return time.perf_counter() - t0


def store_path(work: Path, n: int, dim: int) -> Path:
    return work / (f"bench-{n}.zarr" if dim == D else f"bench-{n}-d{dim}.zarr")


# ---------------------------------------------------------------------------------- stages
def run_stage(stage: str, store: str) -> dict:
    """Run one stage in this process; returns what it reports."""
    from pipeline import analysis

    if stage in ("reduce", "reduce-scaled"):
        # A full pass, even on a kept store.
        r = analysis.reduce(store, components=20, refit=True, scale=stage == "reduce-scaled")
        return {"components": r.n_components, "variance": float(np.sum(r.explained_variance_ratio))}
    if stage == "cluster":
        r = analysis.cluster(store, algorithm="kmeans", n_clusters=8)
        return {"iterations": r.params["n_iter"], "silhouette": r.silhouette}
    if stage == "embed":
        r = analysis.embed(store, method="umap")
        return {"sample": r.sample_size}
    if stage == "similar":
        import zarr

        valid = zarr.open_group(store, mode="r")["valid"][12345:14345]
        t = analysis.similar(store, cutout=12345 + int(np.argmax(valid)), n=10)
        return {"nearest": int(t["index"][0])}
    if stage == "outliers":
        t = analysis.outliers(store, n=50)
        return {"top": int(t["index"][0])}
    if stage.startswith("baseline-"):
        return run_baseline(stage.split("-", 1)[1], store)
    raise ValueError(stage)


def run_baseline(what: str, store: str) -> dict:
    """scikit-learn / numpy on ``ELODIN_BENCH_BASELINE_ROWS`` rows held in memory."""
    import zarr

    n = int(os.environ["ELODIN_BENCH_BASELINE_ROWS"])
    g = zarr.open_group(store, mode="r")
    valid = g["valid"][:n]
    if what == "pca":
        from sklearn.decomposition import PCA

        X = g["fingerprint"][:n][valid]
        PCA(20).fit(X)
    else:
        Y = g["pca"][:n][valid]
        if what == "kmeans":
            from sklearn.cluster import KMeans

            KMeans(8, n_init=1, random_state=0).fit(Y)
        elif what == "similar":
            d = np.linalg.norm(Y - Y[0], axis=1)
            np.argpartition(d, 10)[:10]
        elif what == "outliers":
            from sklearn.neighbors import NearestNeighbors

            NearestNeighbors(n_neighbors=11).fit(Y).kneighbors(Y)
        elif what == "umap":
            import warnings

            import umap

            warnings.simplefilter("ignore")
            umap.UMAP(random_state=0, n_jobs=1).fit(Y)
    return {"rows": int(valid.sum())}


def child(stage: str, store: str) -> dict:
    """Run ``stage`` in a fresh interpreter; wall time, peak RSS and its report."""
    code = (
        "import json, resource, sys, time; sys.path.insert(0, 'benchmarks'); import bench_analysis as b; "
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        f"t = time.perf_counter(); out = b.run_stage({stage!r}, {store!r}); "
        "print('RESULT ' + json.dumps({'seconds': time.perf_counter() - t, "
        "'peak_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'import_mib': base / 1024, **out}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    if proc.returncode:
        raise RuntimeError(f"{stage} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[7:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[500_000, 1_000_000])
    ap.add_argument("--work", default="/tmp/elodin-bench")
    ap.add_argument("--baseline-rows", type=int, default=100_000)
    ap.add_argument("--keep", action="store_true", help="keep the generated stores")
    ap.add_argument("--stages", nargs="+", default=list(STAGES))
    ap.add_argument("--dims", type=int, nargs="+", default=[D], help="features a row")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["ELODIN_BENCH_BASELINE_ROWS"] = str(args.baseline_rows)
    print(f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at start")
    table = {}
    for dim in args.dims:
        if len(args.dims) > 1:
            print(f"\n{dim} features a row:")
        for n in sorted(args.rows):
            store = store_path(work, n, dim)
            if not store.exists():
                secs = generate(store, n, dim=dim)
                size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2**30
                print(f"{n} rows: generated in {secs:.0f} s, {size:.2f} GiB on disk", flush=True)
            for stage in args.stages:
                table[(dim, n, stage)] = r = child(stage, str(store))
                extra = {
                    k: v for k, v in r.items() if k not in ("seconds", "peak_mib", "import_mib")
                }
                print(
                    f"{n:>9} {stage:<13} {r['seconds']:8.1f} s  peak RSS {r['peak_mib']:6.0f} MiB  {extra}",
                    flush=True,
                )
        if len(args.rows) > 1:
            lo, hi = sorted(args.rows)[:2]
            print(f"\ngrowth from {lo} to {hi} rows (x{hi / lo:g}):")
            for stage in args.stages:
                a, b = table[(dim, lo, stage)], table[(dim, hi, stage)]
                print(
                    f"  {stage:<13} time x{b['seconds'] / a['seconds']:.2f}  peak RSS x{b['peak_mib'] / a['peak_mib']:.2f}"
                )
        store = store_path(work, sorted(args.rows)[0], dim)
        baselines = [BASELINES[s] for s in args.stages if s in BASELINES]
        if baselines:
            print(f"\nbaselines on {args.baseline_rows} rows in memory (scikit-learn / numpy):")
        for what in baselines:
            r = child(f"baseline-{what}", str(store))
            print(
                f"  {what:<9} {r['seconds']:8.1f} s  peak RSS {r['peak_mib']:6.0f} MiB  ({r['rows']} rows)",
                flush=True,
            )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if not args.keep:
        for n in args.rows:
            for dim in args.dims:
                shutil.rmtree(store_path(work, n, dim), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
