"""Survey scale with many small patches (issue 14): store metadata and incremental cost.

    ELODIN__CACHE_DIR=... nice python benchmarks/bench_survey.py --patches 1000 --big 10000

N FITS patches (``--side`` pixels, a TAN WCS each; 64-pixel windows at stride 64: one a patch
of 64^2, four a patch of 128^2), fingerprinted with ``--model`` (``efficientnet-lite0:native``,
the cheapest model, by default: the hardest case for per-file costs; ``default``: the
configured default model, what a user runs):

1. **Largest JSON document in the store** after N patches (a real ``fingerprint`` run) and
   after ``--big`` patches, beside the root document schema 1 would have written for the same
   records (every record in the root attributes). The ``--big`` store is written through the
   same store API from the real opened patches and their real plan, its units marked done
   without inference (inference is not what this measures).
2. **No-op rerun** over the N and the ``--big`` patches (nothing new: no image opened, no
   cluster started), per file beyond the fixed start-up (the slope between a tenth and all of
   the files), beside ``open_sources`` over the same files: opening every header, which every
   rerun did before.
3. **1 % new**: N/100 new patches added to the N-patch store, beside a fresh run of just those
   patches into a new store, on the same Dask cluster.
4. **Patches vs one mosaic** (``--ratio 1024,10000``; each N a square): N patches against one
   FITS mosaic of ``sqrt(N) * side`` pixels a side with the same windows, each fingerprinted
   by a client process of its own on one shared Dask cluster: the time ratio, and the client's
   peak RSS at each N.

Figures are printed as one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.testing import make_patches

# The cheapest model by default, the hardest case for per-file costs: every figure but the
# ratio is about metadata; ``--model default`` runs the configured default, as a user would.
MODEL = "efficientnet-lite0:native"
SETTINGS = {"method": "sliding", "size": 64, "stride": 64, "model": MODEL}


def largest_json(store: Path) -> tuple[int, str]:
    sizes = [(f.stat().st_size, str(f.relative_to(store))) for f in store.rglob("*.json")]
    return max(sizes)


def schema1_root_size(store: Path) -> int:
    """The root ``zarr.json`` schema 1 would hold for this store's records."""
    from pipeline.store import Store

    st = Store.open(store)
    table = st.images()
    segments = []
    for index, seg in enumerate(st.segments):
        inputs = {}
        for i in table.in_segment(index):
            rec = table.record(i)
            files = [{**f, "mtime": str(f["mtime"])} for f in rec["files"]]
            inputs[rec["id"]] = {"files": files, "source": rec["source"], "limits": rec["limits"]}
        segments.append(
            {
                "images": list(inputs),
                **{k: getattr(seg, k) for k in ("row_start", "row_stop", "unit_start")},
                "unit_stop": seg.unit_stop,
                "plan_digest": seg.plan_digest,
                "inputs": inputs,
            }
        )
    attrs = {**st.attrs, "elodin_schema": 1, "segments": segments}
    body = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
    return len(json.dumps(body, indent=2).encode())


def simulated_store(path: Path, files: list[str], like: Path) -> float:
    """A store of ``files`` written through the store API (real headers, real plan, real
    records), units marked done without inference; returns the seconds it took."""
    from pipeline.fingerprint import (
        InputListing,
        _image_limits,
        _plan_sources,
        _record_segment,
        fingerprint_settings,
    )
    from pipeline.sources import open_sources
    from pipeline.store import Store

    t0 = time.perf_counter()
    ref = Store.open(like)
    attrs = {
        k: v
        for k, v in ref.attrs.items()
        if k not in ("elodin_schema", "chunk_rows", "segments", "created")
    }
    settings = fingerprint_settings(**{k: v for k, v in SETTINGS.items()})
    sources = open_sources(files)
    listing = InputListing.of(files)
    limits = _image_limits(sources, settings["preprocess"])
    plan = _plan_sources(None, sources, settings, None, 0)
    st = Store.create(
        path,
        feature_dim=int(attrs["feature_dim"]),
        topk=int(attrs["topk"]),
        chunk_rows=ref.chunk_rows,
        attrs=attrs,
        dtype=attrs["fingerprint_dtype"],
    )
    seg = _record_segment(st, 0, plan, sources, listing, limits)
    for u in range(seg.unit_start, seg.unit_stop):
        st.mark_done(u)
    return time.perf_counter() - t0


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def no_op(files: list[str], store: Path) -> dict:
    """No-op rerun over all and over a tenth of ``files``; the slope is the per-file cost."""
    from pipeline.fingerprint import fingerprint
    from pipeline.sources import clear_caches, open_sources

    tenth = files[: max(1, len(files) // 10)]
    fingerprint(tenth, store, progress=False, **SETTINGS)  # warm: imports, model hash
    t_all, r = timed(fingerprint, files, store, progress=False, **SETTINGS)
    assert r.units_run == 0, r
    t_tenth, _ = timed(fingerprint, tenth, store, progress=False, **SETTINGS)
    clear_caches()
    t_open, _ = timed(open_sources, files)
    per_file = (t_all - t_tenth) / (len(files) - len(tenth))
    return {
        "files": len(files),
        "no_op_s": round(t_all, 3),
        "no_op_tenth_s": round(t_tenth, 3),
        "no_op_ms_per_file": round(1e3 * per_file, 4),
        "baseline_open_sources_s": round(t_open, 3),
        "baseline_open_ms_per_file": round(1e3 * t_open / len(files), 4),
    }


# A client process of its own per run: its peak RSS is that run's alone.
_CHILD = """
import json, sys, time
from pipeline.fingerprint import fingerprint
settings = json.loads(sys.argv[4])
t0 = time.perf_counter()
# Through compute.connect, as `elodin fingerprint --scheduler ADDRESS` joins a cluster.
r = fingerprint([sys.argv[3]], sys.argv[2], scheduler=sys.argv[1], progress=False, **settings)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec (the parent's size at fork).
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"s": time.perf_counter() - t0, "cutouts": r.n_cutouts, "rss_mib": hwm / 1024}))
"""


def client_run(address: str, store: Path, inputs: list[str]) -> dict:
    """Fingerprint ``inputs`` (through an @list) from a fresh client process."""
    import subprocess
    import sys

    listing = store.with_suffix(".list")
    listing.write_text("\n".join(inputs) + "\n")
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, address, str(store), f"@{listing}", json.dumps(SETTINGS)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_mosaic_like(path: Path, n: int, side: int) -> str:
    """One mosaic of ``sqrt(n) * side`` pixels a side: the windows of ``n`` patches."""
    from pipeline.testing import synthetic_mosaic

    k = round(n**0.5)
    if k * k != n:
        raise SystemExit(f"--ratio: {n} is not a square")
    return str(synthetic_mosaic(path, shape=(k * side, k * side), seed=5, n_sources=n // 50 + 1))


def patches_vs_mosaic(work: Path, sizes: list[int], side: int, workers: int) -> dict:
    from distributed import LocalCluster

    out = {}
    with LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        # A first run warms the workers (sessions, imports) for both cases alike.
        warm = make_patches(work / "warm", 4, side, seed=9)
        client_run(cluster.scheduler_address, work / "warm.zarr", warm)
        for n in sizes:
            files = make_patches(work / f"ratio{n}", n, side, seed=11)
            mosaic = make_mosaic_like(work / f"mosaic{n}.fits", n, side)
            p = client_run(cluster.scheduler_address, work / f"patches{n}.zarr", files)
            m = client_run(cluster.scheduler_address, work / f"mosaic{n}.zarr", [mosaic])
            out[str(n)] = {
                "patches_s": round(p["s"], 2),
                "patches_cutouts": p["cutouts"],
                "patches_client_rss_mib": round(p["rss_mib"]),
                "baseline_mosaic_s": round(m["s"], 2),
                "mosaic_cutouts": m["cutouts"],
                "mosaic_client_rss_mib": round(m["rss_mib"]),
                "ratio": round(p["s"] / m["s"], 2),
            }
            shutil.rmtree(work / f"ratio{n}", ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patches", type=int, default=1000)
    ap.add_argument("--big", type=int, default=10000, help="0: skip the large store")
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--model",
        default=MODEL,
        help=f"the model of every run ({MODEL}; 'default': the configured default)",
    )
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument(
        "--ratio", default="", help="N,N,...: patches vs one mosaic only (e.g. 1024,10000)"
    )
    args = ap.parse_args()
    if args.model == "default":
        from pipeline import config

        args.model = config.get("model.name")
    SETTINGS["model"] = args.model
    if args.ratio:
        work = Path(args.work or tempfile.mkdtemp(prefix="bench-survey-"))
        try:
            sizes = [int(v) for v in args.ratio.split(",")]
            ratio = patches_vs_mosaic(work, sizes, args.side, args.workers)
        finally:
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
        print(
            json.dumps(
                {
                    "side": args.side,
                    "model": args.model,
                    "workers": args.workers,
                    "patches_vs_mosaic": ratio,
                }
            )
        )
        return

    from distributed import Client, LocalCluster

    from pipeline.fingerprint import fingerprint

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-survey-"))
    out: dict = {
        "side": args.side,
        "model": args.model,
        "workers": args.workers,
        "cpus": os.cpu_count(),
    }
    try:
        n = args.patches
        t_make, files = timed(make_patches, work / "patches", n, args.side, seed=1)
        out["make_patches_s"] = round(t_make, 2)
        store = work / "survey.zarr"
        with (
            LocalCluster(
                n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            t_fp, r = timed(fingerprint, files, store, client=client, progress=False, **SETTINGS)
            out["fingerprint"] = {"files": n, "s": round(t_fp, 2), "cutouts": r.n_cutouts}
            size, name = largest_json(store)
            out["json"] = {
                str(n): {"largest": size, "file": name, "schema1_root": schema1_root_size(store)}
            }
            # 1 % new files, beside a fresh run of just them on the same cluster.
            k = max(1, n // 100)
            new = make_patches(work / "patches", k, args.side, seed=2, start=n)
            grown = work / "grown.zarr"
            shutil.copytree(store, grown)
            t_add, r_add = timed(
                fingerprint, files + new, grown, client=client, progress=False, **SETTINGS
            )
            t_fresh, _ = timed(
                fingerprint, new, work / "fresh.zarr", client=client, progress=False, **SETTINGS
            )
            out["one_percent_new"] = {
                "new_files": k,
                "added_s": round(t_add, 2),
                "units_run": r_add.units_run,
                "baseline_fresh_run_of_new_s": round(t_fresh, 2),
                "ratio": round(t_add / t_fresh, 2),
            }
            shutil.rmtree(grown)
        out["no_op"] = {str(n): no_op(files, store)}
        if args.big:
            big_files = files + make_patches(
                work / "patches", args.big - n, args.side, seed=3, start=n + k
            )
            big = work / "big.zarr"
            t_sim = simulated_store(big, big_files, like=store)
            size, name = largest_json(big)
            out["json"][str(args.big)] = {
                "largest": size,
                "file": name,
                "schema1_root": schema1_root_size(big),
                "written_s": round(t_sim, 2),
            }
            out["no_op"][str(args.big)] = no_op(big_files, big)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
