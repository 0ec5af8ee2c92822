"""The store's writer lock: one writer at a time, stale locks taken over, foreign ones cleared.

Real processes throughout: the holders are real (live, killed, zombie) processes, and the runs
refused or resumed are the real ``elodin`` command.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import StoreError
from pipeline.store import LockInfo, Store
from pipeline.testing import error_lines, fingerprint_command, make_mosaic, store_digest

MODEL = "efficientnet-lite0:native"
HOLD = (
    "import sys, time\n"
    "from pipeline.store import Store\n"
    "Store.lock(sys.argv[1], command='elodin fingerprint (test holder)')\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


def _holder(store: Path) -> subprocess.Popen:
    """A live process holding the store's lock."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(store)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def _fingerprint_cmd(mosaic: Path, out: Path, *extra: str) -> list[str]:
    return fingerprint_command(mosaic, out=out, model=MODEL, size=32, tile_size=128, extra=extra)


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory) -> Path:
    return make_mosaic(tmp_path_factory.mktemp("lock") / "field.fits", ny=192, nx=256)


@pytest.fixture(scope="module")
def store(tmp_path_factory, mosaic) -> Path:
    out = tmp_path_factory.mktemp("lock-store") / "s.zarr"
    done = subprocess.run(_fingerprint_cmd(mosaic, out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def test_lock_is_a_valid_zarr_group_and_reentrant(tmp_path):
    import xarray as xr
    import zarr

    s = Store.create(tmp_path / "s.zarr", feature_dim=4, topk=2, chunk_rows=4, attrs={})
    with Store.lock(s.path, command="test") as lock:
        again = Store.lock(s.path)
        assert again is lock
        again.release()
        assert (tmp_path / "s.zarr/locks/writer.json").exists(), "inner release keeps it"
        holder = Store.lock_holder(s.path)
        assert holder.pid == os.getpid() and holder.host == socket.gethostname()
        assert holder.command == "test" and holder.state() == "live"
        group = zarr.open_group(s.path, mode="r")
        assert "locks" in dict(group.groups())
        assert xr.open_zarr(s.path, consolidated=False).sizes["feature"] == 4
        assert Store.open(s.path, mode="r+").n_rows == 0
    assert Store.lock_holder(s.path) is None
    assert not (tmp_path / "s.zarr/locks/writer.json").exists()


def test_store_without_a_locks_group_still_opens_and_gets_one(tmp_path):
    s = Store.create(tmp_path / "old.zarr", feature_dim=4, topk=2, chunk_rows=4, attrs={})
    import shutil

    shutil.rmtree(tmp_path / "old.zarr/locks")  # as stores made before the lock existed
    Store.open(s.path)
    with Store.lock(s.path):
        assert Store.lock_holder(s.path).pid == os.getpid()
    assert Store.open(s.path, mode="r+").n_rows == 0


def test_lock_on_a_store_not_yet_made_leaves_nothing_when_released(tmp_path):
    path = tmp_path / "deep" / "new.zarr"
    with Store.lock(path):
        assert (path / "locks" / "writer.json").exists()
        assert not Store.exists(path)
    assert not path.exists()


def test_second_run_is_refused_with_one_line_naming_the_holder(store, mosaic, tmp_path):
    proc = _holder(store)
    try:
        before = store_digest(store)
        other = make_mosaic(tmp_path / "other.fits", ny=128, nx=128, seed=4)
        r = subprocess.run(_fingerprint_cmd(other, store), capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        (line,) = error_lines(r.stderr)
        assert "another run is writing to this store" in line
        assert f"pid {proc.pid} on host {socket.gethostname()}" in line
        assert "elodin fingerprint (test holder)" in line
        assert store_digest(store) == before
        # Analysis stages that write take the same lock.
        r = subprocess.run(_cli("reduce", str(store)), capture_output=True, text=True)
        assert r.returncode == 2 and "another run is writing" in r.stderr
        # A live holder on this host is not cleared without --force.
        r = subprocess.run(_cli("unlock", str(store)), capture_output=True, text=True)
        assert r.returncode == 2 and "held by a running process" in r.stderr
    finally:
        proc.kill()
        proc.wait()
    assert Store.unlock(store).pid == proc.pid  # gone now: cleared without --force


def test_elodin_run_holds_the_lock_through_its_analysis_stages(store, tmp_path):
    """`elodin run` holds the lock for all its stages, analysis ones included."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"elodin:\n  run:\n    store: {store}\n    stages: [reduce, cluster]\n"
        "  analysis:\n    reduce:\n      components: 4\n    cluster:\n      n-clusters: 2\n"
    )
    proc = _holder(store)
    try:
        before = store_digest(store)
        r = subprocess.run(_cli("run", str(cfg)), capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        (line,) = error_lines(r.stderr)
        assert "another run is writing to this store" in line
        assert store_digest(store) == before
    finally:
        proc.kill()
        proc.wait()
    Store.unlock(store)


def test_lock_of_a_killed_run_is_taken_over(store, mosaic, tmp_path):
    before = store_digest(store)
    proc = _holder(store)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = subprocess.run(_fingerprint_cmd(mosaic, store), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "taking over the writer lock of a run that is gone" in r.stderr
    assert f"pid {proc.pid}" in r.stderr
    assert "0 work unit(s) run" in r.stdout
    assert Store.lock_holder(store) is None
    assert store_digest(store) == before


def test_zombie_and_reused_pids_count_as_gone(tmp_path):
    path = tmp_path / "z.zarr"
    proc = _holder(path)
    os.kill(proc.pid, signal.SIGKILL)
    time.sleep(0.3)  # killed, not yet reaped: a zombie still answers kill(pid, 0)
    assert Store.lock_holder(path).state() == "stale"
    proc.wait()
    me = LockInfo.current("x")
    assert me.state() == "live"
    assert dataclasses.replace(me, proc_start="1").state() == "stale"  # the pid was reused
    assert dataclasses.replace(me, boot_id="another-boot").state() == "stale"
    assert dataclasses.replace(me, host="elsewhere").state() == "unknown"


def test_lock_from_another_host_is_refused_until_unlocked(store, mosaic):
    lock_file = store / "locks" / "writer.json"
    info = LockInfo(
        host="node-17.cluster",
        pid=4242,
        started="2026-01-01T00:00:00Z",
        command="elodin fingerprint survey/*.fits -o s.zarr",
        token="abc",
    )
    lock_file.write_text(json.dumps(dataclasses.asdict(info)))
    r = subprocess.run(_fingerprint_cmd(mosaic, store), capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = error_lines(r.stderr)
    assert "pid 4242 on host node-17.cluster" in line
    assert f"elodin unlock {store}" in line
    r = subprocess.run(_cli("unlock", str(store)), capture_output=True, text=True)
    assert r.returncode == 0 and "removed the writer lock of pid 4242" in r.stdout
    assert not lock_file.exists()
    r = subprocess.run(_cli("unlock", str(store)), capture_output=True, text=True)
    assert r.returncode == 0 and "not locked" in r.stdout
    # A damaged lock file is refused the same way (it cannot be checked), and cleared.
    lock_file.write_text("{not json")
    with pytest.raises(StoreError, match="elodin unlock"):
        Store.lock(store)
    assert Store.unlock(store) is not None
    r = subprocess.run(_fingerprint_cmd(mosaic, store), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_lock_is_released_on_errors_ctrl_c_and_sigterm(store, mosaic, tmp_path):
    # Errors after the lock was taken: other settings than the store's; a catalog with no
    # coordinate columns, planned on a cluster before a new store is made.
    r = subprocess.run(_fingerprint_cmd(mosaic, store, "--stride", "16"), capture_output=True)
    assert r.returncode == 2 and b"store was made with cutouts" in r.stderr
    assert Store.lock_holder(store) is None
    cat = tmp_path / "cat.csv"
    cat.write_text("a,b\n1,2\n")
    new = tmp_path / "cat.zarr"
    r = subprocess.run(
        _fingerprint_cmd(mosaic, new, "--method", "catalog", "--catalog", str(cat)),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "no coordinate columns" in r.stderr
    assert not new.exists(), "nothing left behind: no store, no lock"
    # Ctrl-C and SIGTERM in the middle of a run: exit 130, the lock is gone.
    big = make_mosaic(tmp_path / "big.fits", ny=1024, nx=1024, seed=9)
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / f"int-{sig.name}.zarr"
        proc = subprocess.Popen(
            _fingerprint_cmd(big, out, "--model", "efficientnet-lite0"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "done").is_dir():
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        assert Store.lock_holder(out).pid == proc.pid
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert "interrupted; run the same command again to resume" in err
        assert Store.lock_holder(out) is None, sig.name


def test_two_runs_at_once_one_is_refused_or_both_safe(tmp_path, mosaic):
    """Two `elodin fingerprint` into one new store started together: one writes, the other is
    refused (or, if it came after the first finished, has nothing to do); the store is whole."""
    big = make_mosaic(tmp_path / "big.fits", ny=512, nx=512, seed=3)
    out = tmp_path / "both.zarr"
    cmd = _fingerprint_cmd(big, out, "--model", "efficientnet-lite0")
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    if codes == [0, 2]:
        (refused,) = [err for rc, _, err in results if rc == 2]
        (line,) = error_lines(refused)
        assert "another run is writing to this store" in line
    else:  # the second started after the first had finished
        assert codes == [0, 0]
        assert any("0 work unit(s) run" in out_ for _, out_, _ in results)
    ds = Store.open(out).dataset()
    valid = ds.valid.values
    centres = list(zip(ds.x.values[valid], ds.y.values[valid], strict=True))
    assert len(centres) == len(set(centres)) == (512 // 32) ** 2
    assert np.isfinite(ds.fingerprint.values[valid]).all()
    assert len(Store.open(out).segments) == 1
    assert Store.lock_holder(out) is None


def test_a_path_that_is_not_a_store_is_refused_before_anything_is_written(tmp_path):
    import zarr

    home = tmp_path / "notes"
    home.mkdir()
    (home / "todo.txt").write_text("x")
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w", zarr_format=3)
    a_file = tmp_path / "file.zarr"
    a_file.write_text("x")
    for path, why in (
        (home, "directory of other files"),
        (plain, "made by something else"),
        (a_file, "is a file"),
    ):
        before = sorted(p.name for p in path.parent.rglob("*"))
        with pytest.raises(StoreError, match=why):
            Store.lock(path)
        assert sorted(p.name for p in path.parent.rglob("*")) == before


def test_another_thread_of_the_same_process_is_refused(tmp_path):
    import threading

    errors = []
    with Store.lock(tmp_path / "t.zarr"):

        def other():
            try:
                Store.lock(tmp_path / "t.zarr")
            except StoreError as e:
                errors.append(str(e))

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert errors and "another run in this process" in errors[0]


@pytest.mark.parametrize(
    "argv,want",
    [
        (["/venv/bin/elodin", "fingerprint", "a b.fits"], "elodin fingerprint 'a b.fits'"),
        (["/repo/pipeline/cli/__main__.py", "report", "s.zarr"], "elodin report s.zarr"),
        (["-c", "x"], "python -c x"),
    ],
)
def test_lock_names_the_command_as_the_user_typed_it(monkeypatch, argv, want):
    from pipeline.store.lock import _command_line

    monkeypatch.setattr("sys.argv", argv)
    assert _command_line() == want
