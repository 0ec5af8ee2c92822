"""Chaos: worker processes SIGKILLed as units start and finish, a unit killed half way through
its writes, the client SIGKILLed at moments of its progress. Every time the store ends equal to
a clean run's: every planned cutout exactly once, no row lost. Every kill is triggered by the
run's progress, never by the clock, so the same kills land on a fast or a slow machine.
(Repeated trials with figures: benchmarks/chaos.py.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.fingerprint import fingerprint
from pipeline.store import Store, pack_units
from pipeline.testing import KillOnUnits, fingerprint_command, make_mosaic, make_patches

MODEL = "efficientnet-lite0:native"
# 1024 x 1024 pixels in 32-pixel windows: 256 tiles of 64 pixels, 1024 cutouts, 16 units.
SIDE = 1024
SETTINGS = {
    "method": "sliding",
    "size": 32,
    "stride": 32,
    "tile_size": 64,
    "chunk_rows": 64,
    "model": MODEL,
}
ROW_NAMES = ("valid", "x", "y", "width", "height", "ra", "dec", "image", "top_class")


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory) -> Path:
    return make_mosaic(tmp_path_factory.mktemp("chaos") / "field.fits", ny=SIDE, nx=SIDE)


def _cluster():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    return cluster, Client(cluster)


@pytest.fixture(scope="module")
def client():
    """A cluster nobody kills: the clean run and the reruns."""
    cluster, client = _cluster()
    with cluster, client:
        yield client


@pytest.fixture(scope="module")
def clean(tmp_path_factory, mosaic, client) -> Path:
    out = tmp_path_factory.mktemp("chaos-clean") / "clean.zarr"
    fingerprint([mosaic], out, client=client, progress=False, **SETTINGS)
    return out


def assert_equal_to_clean(clean: Path, other: Path) -> None:
    """Every planned cutout exactly once, the same rows, fingerprints within 1e-4."""
    a = Store.open(clean).dataset().load()
    b = Store.open(other).dataset().load()
    valid = b.valid.values
    assert int(valid.sum()) == (SIDE // 32) ** 2, "rows lost or extra"
    centres = list(zip(b.x.values[valid], b.y.values[valid], strict=True))
    assert len(set(centres)) == len(centres), "a cutout stored twice"
    for name in ROW_NAMES:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    np.testing.assert_allclose(
        a.fingerprint.values, b.fingerprint.values, atol=1e-4, equal_nan=True
    )
    assert Store.open(other).done_units() == set(range(Store.open(other).n_units))


# Unit events (over the whole cluster, in order) at which a worker dies: at starts the unit is
# lost before it computed, at finishes after it wrote its rows and marker but before Dask heard
# of it (so it runs again and writes the same rows twice). 16 units: every event is reached.
KILL_AT_START = (2, 5, 9)
KILL_AT_FINISH = (3, 7)


def test_workers_killed_again_and_again(tmp_path, mosaic, clean):
    """Worker processes of a LocalCluster with nannies are SIGKILLed as they start or finish
    units (five kills, chosen by unit progress, not by the clock); the run completes and its
    store equals a clean run's."""
    cluster, client = _cluster()  # its own: the kills are for this run only
    log = tmp_path / "kills"
    with cluster, client:
        client.register_plugin(KillOnUnits(log, at_start=KILL_AT_START, at_finish=KILL_AT_FINISH))
        out = tmp_path / "chaos.zarr"
        result = fingerprint([mosaic], out, client=client, progress=False, **SETTINGS)
        kills = KillOnUnits.kills(log)
        planned = {("start", n) for n in KILL_AT_START} | {("finish", n) for n in KILL_AT_FINISH}
        assert {(event, n) for event, n, _ in kills} == planned, kills
        pids = [pid for *_, pid in kills]
        assert len(set(pids)) == len(pids), "each kill hit a fresh worker process"
        assert result.units_skipped == 0 and result.n_cutouts == (SIDE // 32) ** 2
        # A unit killed as it finished had written its rows, but Dask never heard: it ran again.
        n_units = Store.open(out).n_units
        assert KillOnUnits.events(log, "finish") >= n_units + len(KILL_AT_FINISH)
        assert KillOnUnits.events(log, "start") >= n_units + len(planned)
        # The nannies brought the workers back.
        client.wait_for_workers(2, timeout=60)
        assert not set(client.run(os.getpid).values()) & set(pids)
    assert_equal_to_clean(clean, out)


KILL_MID_WRITE = """
import os, signal, sys
import zarr
from distributed import Client, LocalCluster
from pipeline.fingerprint import fingerprint

mosaic, store, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
settings = dict(method="sliding", size=32, stride=32, tile_size=64, chunk_rows=64,
                model="efficientnet-lite0:native")
writes = []
setitem = zarr.Array.__setitem__

def counting(self, key, value):
    setitem(self, key, value)
    writes.append(self.path)
    if len(writes) == kill_after:
        print("killed after writing " + ",".join(writes), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

zarr.Array.__setitem__ = counting
# Worker threads in this process: the kill lands inside run_unit's own writes.
with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                  dashboard_address=None) as cluster, Client(cluster) as client:
    fingerprint([mosaic], store, client=client, progress=False, **settings)
print("finished", flush=True)
"""


def _unit_rows(store: Store, unit: int) -> tuple[int, int]:
    seg = store.segments[0]
    lay = pack_units(store.load_plan(0).tile_start, chunk_rows=store.chunk_rows)
    u = unit - seg.unit_start
    start = seg.row_start + int(lay.unit_rows[u])
    return start, start + int(lay.unit_windows[u + 1] - lay.unit_windows[u])


def _forget_unit(path: Path, unit: int) -> tuple[int, int]:
    """Put one unit back as it was before it ran: fill values in its rows, no marker."""
    import zarr

    st = Store.open(path, mode="r+")
    lo, hi = _unit_rows(st, unit)
    group = zarr.open_group(str(path), mode="r+")
    for name in group.array_keys():
        arr = group[name]
        if arr.metadata.dimension_names[:1] == ("cutout",):
            arr[lo:hi] = arr.metadata.fill_value
    st.clear_done([unit])
    return lo, hi


@pytest.mark.parametrize("kill_after", [1, 5, 12])
def test_unit_killed_half_way_through_its_writes_is_redone(
    tmp_path, mosaic, clean, client, kill_after
):
    """SIGKILL after the unit wrote some of its arrays (1, 5) or all of them but not its marker
    (12): its chunks are partly new and partly empty, it has no marker, and the next run
    rewrites it whole."""
    out = tmp_path / "half.zarr"
    shutil.copytree(clean, out)
    unit = 5
    lo, hi = _forget_unit(out, unit)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_MID_WRITE, str(mosaic), str(out), str(kill_after)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    written = proc.stdout.split("killed after writing ")[1].strip().split(",")
    assert len(written) == kill_after
    st = Store.open(out, mode="r+")  # the lock of the killed run is taken over
    assert unit not in st.done_units(), "no marker without every row written"
    # The kill left the unit half written: some arrays already hold its rows, others not.
    fp_rows = np.isfinite(st.array("fingerprint")[lo:hi]).all(axis=1)
    valid = st.array("valid")[lo:hi]
    assert fp_rows.all() == ("fingerprint" in written)
    assert valid.all() == ("valid" in written)
    assert not valid.any() or "valid" in written
    result = fingerprint([mosaic], out, progress=False, client=client, **SETTINGS)
    assert result.units_run == 1
    assert_equal_to_clean(clean, out)


def _cli(mosaic: Path, out: Path) -> list[str]:
    return fingerprint_command(mosaic, out=out, model=MODEL, size=32, tile_size=64, workers=2)


def _units_done(out: Path) -> int:
    done = out / "done"  # Store.mark_done's markers: one file per finished unit, in shards
    return (
        sum(1 for p in done.rglob("*") if p.name.isdigit() and p.is_file()) if done.is_dir() else 0
    )


# When the client dies, by the run's own progress: as soon as it holds the writer lock (the
# cluster starting, no store yet), and once a quarter of the 16 units are done.
KILL_WHEN = {
    "lock taken": lambda out: Store.lock_holder(out) is not None,
    "4 units done": lambda out: _units_done(out) >= 4,
}


@pytest.mark.parametrize("moment", list(KILL_WHEN))
def test_client_killed_then_rerun(tmp_path, mosaic, clean, moment):
    """``elodin fingerprint`` SIGKILLed with its whole process group (client, scheduler,
    nannies, workers) at a moment of its progress; the same command then resumes (taking over
    the stale lock) and the store equals a clean run's."""
    env = {**os.environ, "ELODIN__FINGERPRINT__CHUNK_ROWS": "64"}
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen(
        _cli(mosaic, out),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    reached = KILL_WHEN[moment]
    while proc.poll() is None and not reached(out):
        time.sleep(0.01)  # polling the run's progress on disk, not waiting for a time
    assert proc.poll() is None, "the run ended before it reached the moment to kill it"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert Store.lock_holder(out) is not None, "the killed run left its (stale) lock"
    rerun = subprocess.run(_cli(mosaic, out), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "Traceback" not in rerun.stderr
    assert_equal_to_clean(clean, out)
    assert Store.lock_holder(out) is None


# ----------------------------------------------------------------------- a survey of many files
# 1,024 FITS patches of 32^2, one 32-pixel window each: the mosaic's 1,024 cutouts and 16 units,
# each unit reading 64 files.
N_PATCHES = 1024


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> list[str]:
    return make_patches(tmp_path_factory.mktemp("patches"), N_PATCHES, 32, seed=4)


@pytest.fixture(scope="module")
def clean_patches(tmp_path_factory, patches, client) -> Path:
    out = tmp_path_factory.mktemp("patches-clean") / "clean.zarr"
    fingerprint(patches, out, client=client, progress=False, **SETTINGS)
    return out


def assert_each_patch_once(clean: Path, other: Path, patches: list[str]) -> None:
    a = Store.open(clean).dataset().load()
    b = Store.open(other).dataset().load()
    valid = b.valid.values
    ids = [str(v) for v in b.image.values[valid]]
    assert len(ids) == len(set(ids)) == len(patches), "a patch lost or stored twice"
    assert len(Store.open(other).images()) == len(patches)
    for name in ROW_NAMES:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    np.testing.assert_allclose(
        a.fingerprint.values, b.fingerprint.values, atol=1e-4, equal_nan=True
    )
    assert Store.open(other).done_units() == set(range(Store.open(other).n_units))


def test_workers_killed_over_a_survey_of_many_files(tmp_path, patches, clean_patches):
    """The chaos test over 1,024 files: workers SIGKILLed as units start and finish; every
    patch ends in the store exactly once, as in a clean run."""
    cluster, client = _cluster()
    log = tmp_path / "kills"
    with cluster, client:
        client.register_plugin(KillOnUnits(log, at_start=(2, 9), at_finish=(5,)))
        out = tmp_path / "chaos.zarr"
        result = fingerprint(patches, out, client=client, progress=False, **SETTINGS)
        assert {(e, n) for e, n, _ in KillOnUnits.kills(log)} == {
            ("start", 2),
            ("start", 9),
            ("finish", 5),
        }
        assert result.n_cutouts == N_PATCHES and result.units_skipped == 0
    assert_each_patch_once(clean_patches, out, patches)


def test_client_killed_over_many_files_then_rerun(tmp_path, patches, clean_patches):
    """``elodin fingerprint @list`` over 1,024 files SIGKILLed (whole process group) once a
    quarter of its units are done; the same command resumes to the clean run's store."""
    listing = tmp_path / "patches.txt"
    listing.write_text("\n".join(patches) + "\n")
    env = {**os.environ, "ELODIN__FINGERPRINT__CHUNK_ROWS": "64"}
    out = tmp_path / "killed.zarr"
    cli = fingerprint_command(f"@{listing}", out=out, model=MODEL, size=32, tile_size=64, workers=2)
    proc = subprocess.Popen(
        cli, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while proc.poll() is None and _units_done(out) < 4:
        time.sleep(0.01)  # polling the run's progress on disk, not waiting for a time
    assert proc.poll() is None, "the run ended before a quarter of its units were done"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(cli, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "Traceback" not in rerun.stderr
    assert_each_patch_once(clean_patches, out, patches)
