"""Stores that cannot be written: read-only, a full disk, a filesystem failing mid-run.

Each gives one clear line (no traceback); the store still opens; every unit with a done marker
has all of its rows; and once the cause is fixed, the same command finishes the job with the
rows a clean run makes.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.errors import StoreError
from pipeline.fingerprint import fingerprint
from pipeline.store import Store, pack_units
from pipeline.testing import error_lines, fingerprint_command, make_mosaic, store_digest

MODEL = "efficientnet-lite0:native"
SETTINGS = {
    "method": "sliding",
    "size": 32,
    "stride": 32,
    "tile_size": 64,
    "chunk_rows": 16,
    "model": MODEL,
}
ENV = {"ELODIN__FINGERPRINT__CHUNK_ROWS": "16"}


def _cli(mosaic: Path, out: Path | str, *extra: str, workers: int = 1) -> list[str]:
    """`elodin fingerprint` of the small-mosaic settings above."""
    return fingerprint_command(
        mosaic, out=out, model=MODEL, size=32, tile_size=64, workers=workers, extra=extra
    )


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300
    )


def _one_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    return lines[0]


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"mount {' '.join(args)} failed: {r.stderr.strip()}")


def assert_markers_consistent(path: str) -> set[int]:
    """Every unit with a done marker has all of its planned rows, valid and finite."""
    st = Store.open(path)  # opens: readable metadata, arrays agreeing with the segments
    done = st.done_units()
    valid = st.array("valid")[:]
    fp = st.array("fingerprint")
    for i, seg in enumerate(st.segments):
        plan = st.load_plan(i)
        lay = pack_units(plan.tile_start, chunk_rows=st.chunk_rows)
        for u in range(lay.n_units):
            if seg.unit_start + u not in done:
                continue
            lo = seg.row_start + int(lay.unit_rows[u])
            n = int(lay.unit_windows[u + 1] - lay.unit_windows[u])
            assert valid[lo : lo + n].all(), f"unit {u}: marker without its rows"
            assert np.isfinite(fp[lo : lo + n]).all(), f"unit {u}: marker without fingerprints"
    return done


def assert_same_rows(a: str, b: str) -> None:
    da, db = Store.open(a).dataset().load(), Store.open(b).dataset().load()
    for name in ("valid", "x", "y", "width", "height", "image", "top_class"):
        np.testing.assert_array_equal(da[name].values, db[name].values, err_msg=name)
    np.testing.assert_allclose(
        da.fingerprint.values, db.fingerprint.values, atol=1e-4, equal_nan=True
    )


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory) -> Path:
    return make_mosaic(tmp_path_factory.mktemp("wf") / "field.fits", ny=384, nx=512)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, mosaic) -> Path:
    out = tmp_path_factory.mktemp("wf-clean") / "clean.zarr"
    assert _run(_cli(mosaic, out)).returncode == 0
    return out


@pytest.fixture
def readonly(tmp_path, clean):
    """A copy of the clean store, made read-only (a read-only bind mount for root, whom file
    modes do not stop; chmod otherwise)."""
    import shutil

    path = tmp_path / "ro.zarr"
    shutil.copytree(clean, path)
    if os.geteuid() == 0:
        _mount("--bind", str(path), str(path))
        try:
            _mount("-o", "remount,bind,ro", str(path))
            yield path
        finally:
            subprocess.run(["umount", str(path)], check=False)
    else:
        for p in [path, *path.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        try:
            yield path
        finally:
            for p in [path, *path.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)


def test_read_only_store(readonly, tmp_path, mosaic):
    before = store_digest(readonly)
    other = make_mosaic(tmp_path / "other.fits", ny=128, nx=128, seed=7)
    line = _one_error(_run(_cli(other, readonly)))
    assert str(readonly) in line and "cannot write to the store" in line
    assert "Read-only file system" in line or "Permission denied" in line
    # A writing analysis stage is refused the same way; reading ones still work.
    line = _one_error(_run([sys.executable, "-m", "pipeline.cli", "reduce", str(readonly)]))
    assert "cannot write to the store" in line
    export = tmp_path / "cat.ecsv"
    r = _run([sys.executable, "-m", "pipeline.cli", "export", str(readonly), "-o", str(export)])
    assert r.returncode == 0, r.stderr
    assert store_digest(readonly) == before
    assert assert_markers_consistent(str(readonly)) == Store.open(readonly).done_units()


def test_disk_full_on_a_small_tmpfs(tmp_path, mosaic, clean):
    disk = tmp_path / "disk"
    disk.mkdir()
    # 512 KiB: the store's metadata fits, its rows do not (a clean run takes about 1 MiB of
    # tmpfs: 180 files of at least one 4 KiB page each).
    _mount("-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk))
    try:
        out = disk / "s.zarr"
        line = _one_error(_run(_cli(mosaic, out)))
        assert str(out) in line and "No space left on device" in line
        done = assert_markers_consistent(str(out))
        n_units = Store.open(out).n_units
        assert 0 < len(done) < n_units, "the disk filled up mid-run"
        assert Store.lock_holder(out) is None
        # Room again: the same command finishes the job, equal to a clean run.
        _mount("-o", "remount,size=64m", str(disk))
        r = _run(_cli(mosaic, out))
        assert r.returncode == 0, r.stderr
        assert f"{n_units - len(done)} work unit(s) run, {len(done)} already done" in r.stdout
        assert_same_rows(str(clean), str(out))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


class FullMemoryFileSystem(MemoryFileSystem):
    """An in-memory filesystem that runs out of space after ``budget`` bytes (ENOSPC), like a
    quota on object storage or a full scratch disk behind an fsspec URL."""

    protocol = "fullmem"
    store: dict = {}  # noqa: RUF012 - fsspec keeps a memory filesystem's files on the class
    pseudo_dirs = [""]  # noqa: RUF012
    budget = [1 << 62]  # noqa: RUF012

    def _spend(self, n: int) -> None:
        if n > self.budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget[0] -= n

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        self._spend(len(value))
        return super().pipe_file(path, value, mode=mode, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "r" not in mode:
            write = f.write

            def counted(data):
                self._spend(len(data))
                return write(data)

            f.write = counted
        return f


@pytest.fixture
def fullmem():
    fsspec.register_implementation("fullmem", FullMemoryFileSystem, clobber=True)
    FullMemoryFileSystem.store.clear()
    FullMemoryFileSystem.budget[0] = 1 << 62
    yield FullMemoryFileSystem
    FullMemoryFileSystem.store.clear()


def test_filesystem_failing_mid_run(fullmem, mosaic):
    """fsspec URL store on a filesystem that fills up; the cluster's workers are threads of
    this process so they see the same in-memory filesystem."""
    from pipeline.testing import local_compute

    with local_compute(n_workers=1, threads_per_worker=2, processes=False) as client:
        reference = "fullmem://reference.zarr"
        fingerprint([mosaic], reference, client=client, progress=False, **SETTINGS)
        used = (1 << 62) - fullmem.budget[0]
        fullmem.budget[0] = used // 2
        out = "fullmem://s.zarr"
        with pytest.raises(StoreError, match="No space left on device") as err:
            fingerprint([mosaic], out, client=client, progress=False, **SETTINGS)
        assert len(str(err.value).splitlines()) == 1 and out in str(err.value)
        done = assert_markers_consistent(out)
        assert len(done) < Store.open(out).n_units
        assert Store.lock_holder(out) is None
        fullmem.budget[0] = 1 << 62
        result = fingerprint([mosaic], out, client=client, progress=False, **SETTINGS)
        assert result.units_skipped == len(done)
        assert_same_rows(reference, out)
