"""Chaos study: fingerprinting survives dying workers and killed clients, losing no row.

Two experiments, each against a clean run of the same inputs made in the same process:

``workers``  ``fingerprint()`` on a LocalCluster of worker processes with nannies, while a killer
             thread SIGKILLs a worker that is running a work unit every 1-2 s (random), for the
             whole run; or, with ``--unit-kills N``, N workers die at seeded random unit starts
             and finishes (``pipeline.testing.KillOnUnits``, as tests/test_chaos.py does: the
             same kills on a fast or a slow machine). The nanny starts a new worker; the
             scheduler gives lost units to others; a unit that Dask gives up on
             (``KilledWorker``) is submitted again by Elodin.
``client``   ``elodin fingerprint`` (the real CLI, with its own LocalCluster) is SIGKILLed with its
             whole process group at a random moment between start and the clean run's duration,
             then the same command is run again (taking over the stale writer lock).

Each trial checks the store against the clean one: every planned cutout exactly once (rows
lost = planned windows missing, duplicates = windows stored twice), coordinates equal, and the
largest absolute fingerprint difference. Figures go to benchmarks/README.md, "Chaos".

    .venv/bin/python benchmarks/chaos.py [--mode workers|client|both] [--trials 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = "efficientnet-lite0:native"
COORDS = ("valid", "x", "y", "width", "height", "ra", "dec", "image", "top_class")


def make_mosaic(path: Path, *, ny: int, nx: int, seed: int = 1) -> Path:
    """Sky noise plus Gaussian galaxies, with a TAN WCS (as tests/test_fingerprint.py)."""
    rs = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:ny, 0:nx]
    data = rs.normal(100.0, 5.0, (ny, nx))
    for _ in range(max(10, ny * nx // 8000)):
        x0, y0 = rs.uniform(0, nx), rs.uniform(0, ny)
        sx, sy = rs.uniform(1.5, 8), rs.uniform(1.5, 8)
        data += rs.uniform(50, 2000) * np.exp(-(((xx - x0) / sx) ** 2 + ((yy - y0) / sy) ** 2) / 2)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.1, 2.2]
    w.wcs.crpix = [nx / 2, ny / 2]
    w.wcs.cdelt = [-0.03 / 3600, 0.03 / 3600]
    fits.PrimaryHDU(data.astype(np.float32), header=w.to_header()).writeto(path)
    return path


def compare(clean: Path, other: Path) -> dict:
    """Rows lost / duplicated / extra against the clean store, and the fingerprint difference."""
    import dask

    from pipeline.store import Store

    with dask.config.set(scheduler="sync"):  # not a Client closed meanwhile
        a = Store.open(clean).dataset().load()
        b = Store.open(other).dataset().load()
    va, vb = a.valid.values, b.valid.values
    key = lambda ds, v: list(  # noqa: E731
        zip(ds.image.values[v], ds.x.values[v], ds.y.values[v], strict=True)
    )
    planned, stored = key(a, va), key(b, vb)
    lost = len(set(planned) - set(stored))
    dup = len(stored) - len(set(stored))
    extra = len(set(stored) - set(planned))
    same = a.sizes == b.sizes and all(
        np.array_equal(a[n].values, b[n].values, equal_nan=n not in ("image", "valid"))
        for n in COORDS
    )
    diff = (
        float(np.nanmax(np.abs(a.fingerprint.values[va] - b.fingerprint.values[va])))
        if same
        else float("nan")
    )
    return {
        "planned": len(planned),
        "lost": lost,
        "dup": dup,
        "extra": extra,
        "same": same,
        "maxdiff": diff,
    }


# ------------------------------------------------------------------------------ worker kills
class _Resubmits(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "submitting it again" in record.getMessage():
            self.count += 1


def kill_workers(client, stop: threading.Event, kills: list, rng: random.Random, interval):
    """SIGKILL a worker that is running a work unit, every ``interval`` seconds (uniform)."""
    while not stop.wait(rng.uniform(*interval)):
        try:
            busy = client.processing()
        except Exception:  # the scheduler is busy removing a worker: try at the next tick
            continue
        targets = sorted(
            w for w, keys in busy.items() if any(str(k).startswith("elodin-unit") for k in keys)
        )
        if not targets:
            continue
        worker = rng.choice(targets)
        try:
            pid = client.run(os.getpid, workers=[worker], on_error="return").get(worker)
        except Exception:
            continue
        if isinstance(pid, int):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            kills.append((time.monotonic(), worker, list(busy[worker])))


def local_cluster(workers: int):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
    )
    return cluster, Client(cluster)


def unit_killer(log: Path, n: int, n_units: int, rng: random.Random):
    """KillOnUnits dying at ``n`` distinct random unit events among the first ``n_units``
    starts and finishes (every one of them happens in any run)."""
    from pipeline.testing import KillOnUnits

    events = rng.sample([(e, i) for e in ("start", "finish") for i in range(1, n_units + 1)], n)
    return KillOnUnits(
        log,
        at_start=[i for e, i in events if e == "start"],
        at_finish=[i for e, i in events if e == "finish"],
    )


def workers_trials(args, work: Path) -> list[dict]:
    from pipeline.fingerprint import fingerprint
    from pipeline.store import Store

    mosaic = make_mosaic(work / "field.fits", ny=args.side, nx=args.side)
    settings = {
        "method": "sliding",
        "size": args.size,
        "stride": args.size,
        "tile_size": args.tile_size,
        "chunk_rows": args.chunk_rows,
        "model": MODEL,
    }
    cluster, client = local_cluster(args.workers)
    t0 = time.perf_counter()
    clean = work / "clean.zarr"
    fingerprint([mosaic], clean, client=client, progress=False, **settings)
    t_clean = time.perf_counter() - t0
    client.close()
    cluster.close()
    n_tiles = (args.side // args.tile_size) ** 2
    n_units = len(Store.open(clean).done_units())
    print(f"clean run: {n_tiles} tiles, {t_clean:.1f} s on {args.workers} workers", flush=True)
    rows = []
    resubmits = _Resubmits()
    log = logging.getLogger("pipeline.fingerprint")
    log.addHandler(resubmits)
    log.setLevel(logging.WARNING)
    log.propagate = False
    for trial in range(args.trials):
        rng = random.Random(args.seed * 1000 + trial)
        cluster, client = local_cluster(args.workers)
        out = work / f"chaos-{trial}.zarr"
        stop, kills = threading.Event(), []
        before = resubmits.count
        killer = threading.Thread(
            target=kill_workers, args=(client, stop, kills, rng, args.interval), daemon=True
        )
        log = work / f"kills-{trial}"
        if args.unit_kills:
            client.register_plugin(unit_killer(log, args.unit_kills, n_units, rng))
        t0 = time.perf_counter()
        if not args.unit_kills:
            killer.start()
        try:
            fingerprint([mosaic], out, client=client, progress=False, **settings)
            ok = True
        except Exception as e:
            ok = False
            print(f"trial {trial}: run stopped: {type(e).__name__}: {e}", flush=True)
        finally:
            stop.set()
            if killer.is_alive():
                killer.join()
        elapsed = time.perf_counter() - t0
        if args.unit_kills:
            from pipeline.testing import KillOnUnits

            kills = KillOnUnits.kills(log)
        if not ok:
            # What a user does next: the same command again (here without the killer).
            fingerprint([mosaic], out, client=client, progress=False, **settings)
        client.close()
        cluster.close()
        row = {
            "trial": trial,
            "completed": ok,
            "clean_s": t_clean,
            "kills": len(kills),
            "resubmits": resubmits.count - before,
            "seconds": elapsed,
            **compare(clean, out),
        }
        rows.append(row)
        print(row, flush=True)
    return rows


# ------------------------------------------------------------------------------- client kills
def _cli(mosaic: Path, out: Path, args) -> list[str]:
    from pipeline.testing import fingerprint_command

    return fingerprint_command(
        mosaic,
        out=out,
        model=MODEL,
        size=args.size,
        stride=args.size,
        tile_size=args.tile_size,
        workers=args.workers,
    )


def _phase(out: Path) -> str:
    from pipeline.store import Store

    if not out.exists():
        return "starting (no lock yet)"
    if not Store.exists(out):
        return "lock taken, no store yet (cluster starting)"
    if Store.incomplete(out):
        return "creating the store"
    try:
        st = Store.open(out)
    except Exception:
        return "growing the store"
    total = st.n_units
    done = len(st.done_units())
    if total == 0:
        return "planning"
    return f"{done}/{total} units done"


def client_trials(args, work: Path) -> list[dict]:
    mosaic = make_mosaic(work / "field-c.fits", ny=args.side, nx=args.side, seed=2)
    env = {**os.environ, "ELODIN__FINGERPRINT__CHUNK_ROWS": str(args.chunk_rows)}
    clean = work / "clean-c.zarr"
    t0 = time.perf_counter()
    subprocess.run(_cli(mosaic, clean, args), env=env, check=True, capture_output=True)
    t_clean = time.perf_counter() - t0
    print(f"clean CLI run: {t_clean:.1f} s", flush=True)
    rows = []
    rng = random.Random(args.seed)
    for trial in range(args.trials):
        out = work / f"killed-{trial}.zarr"
        delay = rng.uniform(0.2, t_clean)
        proc = subprocess.Popen(
            _cli(mosaic, out, args),
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        finished_first = proc.poll() is not None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        phase = "finished before the kill" if finished_first else _phase(out)
        t1 = time.perf_counter()
        rerun = subprocess.run(_cli(mosaic, out, args), env=env, capture_output=True, text=True)
        row = {
            "trial": trial,
            "kill_at_s": round(delay, 2),
            "phase": phase,
            "rerun_rc": rerun.returncode,
            "took_over_lock": "taking over the writer lock" in rerun.stderr,
            "rerun_s": time.perf_counter() - t1,
            **(compare(clean, out) if rerun.returncode == 0 else {"error": rerun.stderr[-300:]}),
        }
        rows.append(row)
        print(row, flush=True)
    return rows


def summary(name: str, rows: list[dict]) -> None:
    ok = [r for r in rows if r.get("same") and r.get("lost") == 0 and r.get("dup") == 0]
    print(f"\n== {name}: {len(rows)} trials, {len(ok)} with a store equal to the clean run's")
    if not rows:
        return
    if name == "workers":
        done = sum(r["completed"] for r in rows)
        print(f"runs completed under the kills: {done} of {len(rows)} (the others: after a rerun)")
        print(
            f"kills survived: {sum(r['kills'] for r in rows)} "
            f"(per trial {min(r['kills'] for r in rows)}-{max(r['kills'] for r in rows)}); "
            f"units resubmitted after KilledWorker: {sum(r['resubmits'] for r in rows)}"
        )
        secs = [r["seconds"] for r in rows]
        print(f"seconds per trial: {min(secs):.1f}-{max(secs):.1f}")
    lost = sum(r.get("lost", 0) for r in rows)
    dup = sum(r.get("dup", 0) for r in rows)
    diffs = [r["maxdiff"] for r in rows if "maxdiff" in r]
    print(
        f"rows lost: {lost}; rows duplicated: {dup}; max |fingerprint diff|: {max(diffs, default=float('nan')):.2e}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["workers", "client", "both"], default="both")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side", type=int, default=1024, help="mosaic side in pixels")
    p.add_argument("--size", type=int, default=32, help="cutout side (stride equal)")
    p.add_argument("--tile-size", type=int, default=64)
    p.add_argument("--chunk-rows", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--interval", type=float, nargs=2, default=(1.0, 2.0), metavar=("MIN", "MAX"))
    p.add_argument(
        "--unit-kills",
        type=int,
        metavar="N",
        help="instead of the clock: N workers die at seeded random unit starts / finishes",
    )
    p.add_argument("--keep", action="store_true", help="keep the stores (printed path)")
    p.add_argument(
        "--resubmit-killed",
        type=int,
        help="elodin.fingerprint.resubmit-killed for the run (default: the packaged value)",
    )
    args = p.parse_args()
    if args.resubmit_killed is not None:
        import dask.config

        dask.config.set({"elodin.fingerprint.resubmit-killed": args.resubmit_killed})
    import faulthandler

    faulthandler.register(signal.SIGUSR1)  # kill -USR1 PID prints every thread's stack
    logging.basicConfig(level=logging.ERROR)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}"
    )
    work = Path(tempfile.mkdtemp(prefix="elodin-chaos-"))
    try:
        results = {}
        if args.mode in ("workers", "both"):
            results["workers"] = workers_trials(args, work)
        if args.mode in ("client", "both"):
            results["client"] = client_trials(args, work)
        for name, rows in results.items():
            summary(name, rows)
    finally:
        if args.keep:
            print(f"stores kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
