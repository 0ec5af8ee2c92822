"""The explorer on a 10^6-row synthetic store: start-up, first map, pan/zoom renders,
thumbnail latency and the server's peak memory.

    .venv/bin/python benchmarks/bench_explore.py [--side 8192] [--window 8] [--keep DIR]

The store is every ``window`` x ``window`` sliding window of a ``side``^2 FITS mosaic
(8192 / 8: 1,048,576 rows), with analysis variables in 20 groups and no model, built by
bench_report.py's helpers. ``elodin explore`` runs as a subprocess of the real CLI; the page
is opened in Debian's chromium through Playwright. Baselines in the same run:

- start-up: a process that only imports what the server imports;
- first map / zoom: datashader's aggregation alone of the same 10^6 points at the map's size
  (the floor of any datashader render), and the explorer's render in-process (no browser);
- thumbnails: one window read and stretched in-process by ``ThumbnailReader`` (no HTTP);
- memory: the peak RSS of the import-only process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

IMPORTS = (
    "import pipeline.explore.server, pipeline.explore.app, pipeline.explore.api, "
    "bokeh.server.server, datashader, pandas, sklearn.linear_model"
)


def peak_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def import_baseline() -> tuple[float, float]:
    code = (
        "import time; t = time.perf_counter(); " + IMPORTS + "; "
        "s = open('/proc/self/status').read(); "
        "print(time.perf_counter() - t, int(s.split('VmHWM:')[1].split()[0]) / 1024)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    ).stdout.split()  # fmt: skip
    return float(out[0]), float(out[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=8192)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--keep", type=Path, help="build / reuse the store in this directory")
    ap.add_argument("--views", type=int, default=20)
    args = ap.parse_args()

    from bench_report import make_mosaic, make_store

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-explore-"))
    work.mkdir(parents=True, exist_ok=True)
    mosaic, store = (
        work / f"mosaic-{args.side}.fits",
        work / f"explore-{args.side}-{args.window}.zarr",
    )
    t = time.perf_counter()
    if not mosaic.exists():
        make_mosaic(mosaic, args.side)
    if not store.exists():
        make_store(store, mosaic, args.side, args.window)
    print(f"store: {store} (built in {time.perf_counter() - t:.0f} s)", flush=True)
    out: dict = {"date": time.strftime("%Y-%m-%d"), "side": args.side, "window": args.window}

    # -- baselines in-process ------------------------------------------------------------
    out["import_s"], out["import_peak_mib"] = import_baseline()
    import datashader as ds

    from pipeline import config
    from pipeline.explore.data import Explorer
    from pipeline.explore.render import MapRenderer

    ex = Explorer(store, read_only=True)
    out["rows"] = ex.n_valid
    w, h = config.get_int("explore.map-width"), config.get_int("explore.map-height")
    r = MapRenderer(ex, width=w, height=h)
    x0, x1, y0, y1 = ex.extent
    rng = np.random.default_rng(0)
    views = []
    for _ in range(args.views):
        f = 10 ** rng.uniform(-2, 0)  # zoom factors 1 to 100
        cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
        views.append(((cx - f * (x1 - x0) / 2, cx + f * (x1 - x0) / 2),
                      (cy - f * (y1 - y0) / 2, cy + f * (y1 - y0) / 2)))  # fmt: skip
    r.render("cluster", (x0, x1), (y0, y1))  # compile (numba) once
    r.render("density", (x0, x1), (y0, y1))
    for by in ("density", "cluster"):
        times = []
        for xr, yr in views:
            t = time.perf_counter()
            r.render(by, xr, yr)
            times.append(time.perf_counter() - t)
        out[f"render_{by}_ms"] = 1000 * statistics.median(times)
    times = []
    for xr, yr in views:
        canvas = ds.Canvas(plot_width=w, plot_height=h, x_range=xr, y_range=yr)
        t = time.perf_counter()
        canvas.points(r.frame, "x", "y", ds.count())
        times.append(time.perf_counter() - t)
    out["aggregate_only_ms"] = 1000 * statistics.median(times)
    rows = rng.choice(ex.rows, 40, replace=False)
    from pipeline.report.thumbnails import ThumbnailReader, window_boxes

    reader = ThumbnailReader(ex.store)
    st = ex.store
    times = []
    for row in rows[20:]:
        box = window_boxes([st.array("x")[row]], [st.array("y")[row]], [st.array("width")[row]], [st.array("height")[row]])  # fmt: skip
        t = time.perf_counter()
        reader.thumbnails([ex.image_names[0]], box, size=config.get_int("explore.thumb-px"))
        times.append(time.perf_counter() - t)
    out["thumb_inprocess_ms"] = 1000 * statistics.median(times[1:])  # the first measures limits
    del ex, r, reader

    # -- the server --------------------------------------------------------------------------
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "explore", str(store), "--port", "0", "--no-browser"],
        stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    try:
        url = None
        for line in proc.stdout:
            if line.startswith("Explorer: "):
                url = line.split(" ", 1)[1].strip()
                break
        out["startup_s"] = time.perf_counter() - t
        out["after_start_mib"] = peak_mib(proc.pid)

        def get(path: str) -> float:
            t = time.perf_counter()
            with urllib.request.urlopen(url + path, timeout=300) as resp:
                resp.read()
            return time.perf_counter() - t

        cold = [get(f"api/cutout/{int(row)}.png") for row in rows[:20]]
        warm = [get(f"api/cutout/{int(row)}.png") for row in rows[:20]]
        out["thumb_cold_ms"] = 1000 * statistics.median(cold[1:])
        out["thumb_warm_ms"] = 1000 * statistics.median(warm)
        print(json.dumps(out), flush=True)  # so far, in case the browser part fails

        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            b = p.chromium.launch(
                executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox", "--disable-gpu"]
            )  # fmt: skip
            page = b.new_page(viewport={"width": 1400, "height": 1300})
            t = time.perf_counter()
            page.goto(url, timeout=600000)
            page.wait_for_function(
                "() => window.Bokeh && Bokeh.documents.length && "
                "Bokeh.documents[0].get_model_by_name('map-image') && "
                "Bokeh.documents[0].get_model_by_name('map-image').data.image[0].length > 0",
                timeout=300000,
            )
            out["first_map_s"] = time.perf_counter() - t
            box = page.evaluate(
                "() => { const v = Object.values(Bokeh.index)[0].owner.get_one("
                "Bokeh.documents[0].get_model_by_name('map')); const r = v.canvas_view.el"
                ".getBoundingClientRect(); return [r.left + v.frame.bbox.left + v.frame.bbox.width / 2,"
                " r.top + v.frame.bbox.top + v.frame.bbox.height / 2]; }"
            )
            page.mouse.move(*box)
            zooms = []
            for i in range(8):
                dw = page.evaluate(
                    "() => Bokeh.documents[0].get_model_by_name('map-image').data.dw[0]"
                )
                t = time.perf_counter()
                page.mouse.wheel(0, -300 if i < 4 else 300)
                cmp = "<" if i < 4 else ">"
                page.wait_for_function(
                    f"() => Bokeh.documents[0].get_model_by_name('map-image').data.dw[0] {cmp} {dw}",
                    timeout=120000,
                )
                zooms.append(time.perf_counter() - t)
            out["zoom_roundtrip_ms"] = 1000 * statistics.median(zooms)
            b.close()
        out["server_peak_mib"] = peak_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(json.dumps(out, indent=1))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
