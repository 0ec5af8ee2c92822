"""Report on a large synthetic store: time and peak memory against the mosaic it points into.

    .venv/bin/python benchmarks/bench_report.py [--sides 4096 8192] [--window 32] [--keep DIR]

For each side, writes a FITS mosaic (sky noise + Gaussian sources) of side^2 float32 pixels, a
store whose rows are every ``window`` x ``window`` sliding window of it (no model: random
fingerprint-space variables in 20 groups, written the way the analysis stages write them), then
times ``make_report`` in a fresh process and reports its peak RSS. Baselines in the same run:

- the peak RSS of a process that only imports the report's modules (the fixed part), and of
  one that only reads the whole mosaic (what a report that loaded the image would need at
  least): the report's peak should stay flat as the mosaic grows;
- thumbnails read one window per ``ImageSource.read`` call versus ``read_windows`` (grouped
  bounding-box reads), for the same windows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_mosaic(path: Path, side: int, seed: int = 0) -> None:
    from pipeline.testing import synthetic_mosaic

    synthetic_mosaic(
        path,
        shape=(side, side),
        seed=seed,
        n_sources=side * side // 4000,
        flux=(50, 3000),
        sigma=(1.0, 4.0),
        crval=(150.0, 2.0),
        pixel_scale=0.1,
    )


def make_store(path: Path, mosaic: Path, side: int, window: int, seed: int = 0) -> int:
    from pipeline.sources import open_sources
    from pipeline.store import Store, pack_units

    (src,) = open_sources([str(mosaic)])
    n_side = side // window
    n = n_side * n_side
    chunk = 4096
    st = Store.create(
        path,
        feature_dim=4,
        topk=2,
        chunk_rows=chunk,
        attrs={
            "model": "synthetic",
            "feature_dim": 4,
            "cutouts": {"method": "sliding", "size": window, "stride": window, "fill": 0.0},
            "preprocess": {},
        },
    )
    layout = pack_units(np.array([0, n]), chunk_rows=chunk)
    record = {
        "id": src.id,
        "paths": list(src.paths),
        "kind": src.kind,
        "shape": list(src.shape),
        "n_bands": src.n_bands,
        "hdu": src.hdu,
        "variable": src.variable,
        "wcs_header": src.wcs_header,
    }
    st.append_segment(
        images=[src.id], layout=layout, plan_digest="bench", inputs={src.id: {"source": record}}
    )
    rows = st.n_rows
    rs = np.random.default_rng(seed)
    iy, ix = np.divmod(np.arange(n), n_side)
    x = ix * window + (window - 1) / 2
    y = iy * window + (window - 1) / 2
    ra, dec = src.pixel_to_radec(x, y)
    group = rs.integers(0, 20, n)
    centres = rs.normal(0, 5, (20, 8))
    pca = (centres[group] + rs.normal(0, 1, (n, 8))).astype(np.float32)

    def full(a, fill):
        out = np.full((rows, *a.shape[1:]), fill, dtype=a.dtype)
        out[:n] = a
        return out

    st.write_rows(
        0,
        {
            "valid": full(np.ones(n, bool), False),
            "image": full(np.array([src.id] * n, dtype=object), ""),
            "x": full(x, np.nan),
            "y": full(y, np.nan),
            "width": full(np.full(n, window, np.int32), 0),
            "height": full(np.full(n, window, np.int32), 0),
            "ra": full(ra, np.nan),
            "dec": full(dec, np.nan),
        },
    )
    for name, data, tail, dims, fill in (
        ("pca", pca, (8,), ("component",), np.nan),
        ("cluster", group.astype(np.int32), (), (), -1),
        ("embedding", pca[:, :2] * 3, (2,), ("embedding_dim",), np.nan),
        ("outlier_score", rs.gamma(2, 1, n).astype(np.float32), (), (), np.nan),
    ):
        st.create_row_array(name, tail=tail, dims=dims, dtype=str(data.dtype), fill=fill)
        st.write_rows(0, {name: full(data, fill)})
    st.write_array("cluster_centers", centres, dims=("cluster_id", "component"))
    ratio = np.sort(rs.random(8))[::-1]
    st.write_array("pca_explained_variance_ratio", ratio / ratio.sum() * 0.9, dims=("component",))
    return n


# VmHWM, not ru_maxrss: the latter survives exec and would report the parent's peak.
PEAK = """
def peak_mib():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024
"""
CHILD_REPORT = (
    PEAK
    + """
import json, sys, time
sys.path.insert(0, {repo!r})
from pipeline.report import build_report
t = time.perf_counter()
r = build_report({store!r}, {out!r})
print(json.dumps({{"seconds": time.perf_counter() - t,
                  "peak_mib": peak_mib(),
                  "grid": r.manifest["grid"]["count"], "points": r.manifest["interactive"]["n_points"],
                  "html_mib": r.index.stat().st_size / 2**20}}))
"""
)
CHILD_BASELINE = (
    PEAK
    + """
import json, sys
sys.path.insert(0, {repo!r})
import numpy as np
import pipeline.report
from astropy.io import fits
data = fits.getdata({mosaic!r}, memmap=False)
float(np.asarray(data).sum())
print(json.dumps({{"peak_mib": peak_mib()}}))
"""
)


def _child(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        sys.exit(f"benchmark child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


CHILD_IMPORTS = (
    PEAK
    + """
import json, sys
sys.path.insert(0, {repo!r})
import bokeh.plotting, matplotlib.figure, pipeline.report, pipeline.preprocess
try:
    import pipeline.analysis
except ImportError:
    pass
print(json.dumps({{"peak_mib": peak_mib()}}))
"""
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--keep", help="directory to keep the mosaics, stores and reports in")
    args = ap.parse_args()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-report-"))
    tmp.mkdir(parents=True, exist_ok=True)
    imports = _child(CHILD_IMPORTS.format(repo=str(REPO)))
    print(f"baseline: importing the report's modules, peak RSS {imports['peak_mib']:.0f} MiB")
    print(
        "| side | mosaic MiB | rows | report s | report peak MiB | reading the mosaic whole, peak MiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for side in args.sides:
        d = tmp / str(side)
        d.mkdir(exist_ok=True)
        mosaic, store, out = d / "mosaic.fits", d / "store.zarr", d / "report"
        if not mosaic.exists():
            make_mosaic(mosaic, side)
        n = (side // args.window) ** 2
        if not store.exists():
            make_store(store, mosaic, side, args.window)
        shutil.rmtree(out, ignore_errors=True)
        rep = _child(CHILD_REPORT.format(repo=str(REPO), store=str(store), out=str(out)))
        base = _child(CHILD_BASELINE.format(repo=str(REPO), mosaic=str(mosaic)))
        print(f"| {side} | {mosaic.stat().st_size / 2**20:.0f} | {n} | {rep['seconds']:.1f} | "
              f"{rep['peak_mib']:.0f} | {base['peak_mib']:.0f} |")  # fmt: skip
        print(f"  ({rep['grid']} map cells, {rep['points']} interactive points, "
              f"index.html {rep['html_mib']:.1f} MiB)")  # fmt: skip

    from pipeline.report.thumbnails import read_windows
    from pipeline.sources import open_sources

    side = args.sides[-1]
    (src,) = open_sources([str(tmp / str(side) / "mosaic.fits")])
    rs = np.random.default_rng(1)
    k, w, per_row = 2000, args.window, side // args.window
    idx = np.sort(rs.choice(per_row**2, k, replace=False))
    cases = {
        "random": np.stack([idx % per_row * w, idx // per_row * w], axis=1),
        "adjacent": np.stack([np.arange(k) % 40 * w, np.arange(k) // 40 * w], axis=1),
    }
    for name, xy in cases.items():
        boxes = np.concatenate([xy, np.full((k, 2), w)], axis=1)
        t = time.perf_counter()
        naive = [src.read(y0, y0 + h, x0, x0 + ww) for x0, y0, ww, h in boxes]
        t_naive = time.perf_counter() - t
        t = time.perf_counter()
        grouped = read_windows(src, boxes)
        t_grouped = time.perf_counter() - t
        assert all(
            np.array_equal(a[None] if a.ndim == 2 else a, b)
            for a, b in zip(naive, grouped, strict=True)
        )
        print(f"{k} {name} {w}-pixel windows of the {side}^2 mosaic: one read each "
              f"{t_naive:.2f} s, read_windows {t_grouped:.2f} s")  # fmt: skip
    print(f"files in {tmp}")


if __name__ == "__main__":
    main()
