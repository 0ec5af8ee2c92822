"""HATS export at survey scale: time and client peak memory on 2.5 x 10^5 and 10^6 cutouts.

For each size a synthetic store is generated block by block straight into a real Zarr store
under ``--work`` (never all in memory): cutouts on a 10-arcsec grid around RA 150, Dec 2 (a
field of about 3 x 3 degrees at 10^6 rows), work units with empty slots as the fingerprint
stage makes them, 8 fingerprint features (the export does not read them) and the analysis
variables an analysed store holds: ``pca`` (20 components), ``cluster``, ``embedding`` (2),
``outlier_score``. Then, each in its own subprocess (wall time and ``ru_maxrss`` of that
child, with what the imports alone cost):

- ``hats``: ``elodin export -o out.hats`` as the CLI runs it (local threads, default blocks
  of 65536 rows and partitions of at most 250000 rows);
- ``parquet``: ``elodin export -o out.parquet``, the streamed flat catalog, for scale;
- ``baseline``: what one does without the streaming export, in the same run: every catalog
  row read into one pandas DataFrame, then ``lsdb.from_dataframe(...).write_catalog``
  (same partition size).

    .venv/bin/python benchmarks/bench_export.py [--rows 250000 1000000] [--work /tmp/elodin-bench-export]
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

FEATURES = 8
COMPONENTS = 20
PARTITION_ROWS = 250_000
SIDE = 1000  # cutouts per grid row


def generate(path: Path, n: int, *, seed: int = 0, tile: int = 1000) -> float:
    """A store of ``n`` valid cutouts with the analysis variables, written unit by unit."""
    from pipeline.store import Store, pack_units

    t0 = time.perf_counter()
    st = Store.create(
        path,
        feature_dim=FEATURES,
        topk=5,
        chunk_rows=4096,
        attrs={
            "model": "synthetic",
            "model_sha256": "0" * 64,
            "feature_dim": FEATURES,
            "topk": 5,
            "cutouts": {"size": 64},
            "preprocess": {},
        },
    )
    tile_start = np.r_[np.arange(0, n, tile), n].astype(np.int64)
    layout = pack_units(tile_start, chunk_rows=st.chunk_rows)
    seg = st.append_segment(images=["field"], layout=layout, plan_digest="bench", inputs={})
    st = Store.open(path, mode="r+")
    arrays = {
        "pca": st.create_row_array("pca", tail=(COMPONENTS,), dims=("component",)),
        "cluster": st.create_row_array("cluster", dtype="int32", fill=-1),
        "embedding": st.create_row_array("embedding", tail=(2,), dims=("embedding_dim",)),
        "outlier_score": st.create_row_array("outlier_score"),
    }
    rng = np.random.default_rng(seed)
    for u in range(layout.n_units):
        w0, w1 = int(layout.unit_windows[u]), int(layout.unit_windows[u + 1])
        r0, r1 = int(layout.unit_rows[u]), int(layout.unit_rows[u + 1])
        m, size = w1 - w0, r1 - r0
        i = np.arange(w0, w1)

        def pad(values, fill, dtype, tail=(), size=size, m=m):
            out = np.full((size, *tail), fill, dtype=dtype)
            out[:m] = values
            return out

        dec = 2 + (i // SIDE) * 10 / 3600
        ra = 150 + (i % SIDE) * 10 / 3600 / np.cos(np.radians(dec))
        st.write_rows(
            seg.row_start + r0,
            {
                "fingerprint": pad(rng.random((m, FEATURES)), np.nan, np.float32, (FEATURES,)),
                "valid": np.arange(size) < m,
                "image": pad(np.full(m, "field", dtype=object), "", object),
                "x": pad(32.0 + 50 * (i % SIDE), np.nan, np.float64),
                "y": pad(32.0 + 50 * (i // SIDE), np.nan, np.float64),
                "width": pad(np.full(m, 64), 0, np.int32),
                "height": pad(np.full(m, 64), 0, np.int32),
                "ra": pad(ra, np.nan, np.float64),
                "dec": pad(dec, np.nan, np.float64),
            },
        )
        a = seg.row_start + r0
        arrays["pca"][a : a + size] = pad(
            rng.normal(size=(m, COMPONENTS)), np.nan, np.float32, (COMPONENTS,)
        )
        arrays["cluster"][a : a + size] = pad(rng.integers(0, 8, m), -1, np.int32)
        arrays["embedding"][a : a + size] = pad(rng.normal(size=(m, 2)), np.nan, np.float32, (2,))
        arrays["outlier_score"][a : a + size] = pad(rng.random(m), np.nan, np.float32)
        st.mark_done(seg.unit_start + u)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------- runs
def run_case(case: str, store: str, out: str) -> dict:
    """Run one case in this process; returns what it reports."""
    if case == "hats":
        from pipeline.cli import main

        assert main(["export", store, "-o", out, "--no-progress"]) == 0
        return {"partitions": len(list(Path(out).rglob("Npix=*.parquet")))}
    if case == "parquet":
        from pipeline.cli import main

        assert main(["export", store, "-o", out]) == 0
        return {}
    if case == "baseline":
        import warnings

        import lsdb
        import pandas as pd
        import zarr

        warnings.simplefilter("ignore")  # from_dataframe warns that it is not for 10^6 rows
        g = zarr.open_group(store, mode="r")
        valid = g["valid"][:]
        frame = {
            "index": np.flatnonzero(valid),
            "image": np.asarray(g["image"][:])[valid].astype(object),
        }
        for name in ("x", "y", "width", "height", "ra", "dec", "cluster", "outlier_score"):
            frame[name] = g[name][:][valid]
        for name, k in (("embedding", 2), ("pca", 5)):
            values = g[name][:][valid]
            for j in range(k):
                frame[f"{name}_{j}"] = values[:, j]
        cat = lsdb.from_dataframe(
            pd.DataFrame(frame), partition_rows=PARTITION_ROWS, margin_threshold=None
        )
        cat.write_catalog(out, as_collection=False, progress_bar=False)
        return {"partitions": len(list(Path(out).rglob("Npix=*.parquet")))}
    raise ValueError(case)


def child(case: str, store: str, out: str) -> dict:
    """Run ``case`` in a fresh interpreter; wall time, peak RSS and its report."""
    code = (
        "import json, resource, sys, time; sys.path.insert(0, 'benchmarks'); import bench_export as b; "
        "import pipeline.analysis, lsdb; "  # imports counted apart
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        f"t = time.perf_counter(); r = b.run_case({case!r}, {store!r}, {out!r}); "
        "print('RESULT ' + json.dumps({'seconds': time.perf_counter() - t, "
        "'peak_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'import_mib': base / 1024, **r}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    if proc.returncode:
        raise RuntimeError(f"{case} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[7:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[250_000, 1_000_000])
    ap.add_argument("--work", default="/tmp/elodin-bench-export")
    ap.add_argument("--cases", nargs="+", default=["hats", "parquet", "baseline"])
    ap.add_argument("--keep", action="store_true", help="keep the generated stores")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at start")
    table = {}
    for n in sorted(args.rows):
        store = work / f"export-{n}.zarr"
        if not store.exists():
            secs = generate(store, n)
            print(f"{n} rows: generated in {secs:.0f} s", flush=True)
        for case in args.cases:
            out = work / f"out-{n}-{case}.{'parquet' if case == 'parquet' else 'hats'}"
            shutil.rmtree(out, ignore_errors=True)
            if out.is_file():
                out.unlink()
            table[(n, case)] = r = child(case, str(store), str(out))
            extra = {k: v for k, v in r.items() if k not in ("seconds", "peak_mib", "import_mib")}
            print(
                f"{n:>9} {case:<9} {r['seconds']:7.1f} s  peak RSS {r['peak_mib']:6.0f} MiB "
                f"(imports {r['import_mib']:.0f})  {extra}",
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)
            if out.is_file():
                out.unlink()
    if len(args.rows) > 1:
        lo, hi = sorted(args.rows)[:2]
        print(f"\ngrowth from {lo} to {hi} rows (x{hi / lo:g}), peak RSS above the imports:")
        for case in args.cases:
            a, b = table[(lo, case)], table[(hi, case)]
            grow = (b["peak_mib"] - b["import_mib"]) / max(1.0, a["peak_mib"] - a["import_mib"])
            print(f"  {case:<9} time x{b['seconds'] / a['seconds']:.2f}  peak RSS x{grow:.2f}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if not args.keep:
        for n in args.rows:
            shutil.rmtree(work / f"export-{n}.zarr", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
