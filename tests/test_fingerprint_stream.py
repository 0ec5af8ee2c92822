"""Streaming submission: units are drawn as results come back, never all held by the client."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pipeline.fingerprint import submit
from pipeline.fingerprint.worker import ModelRef, TileJob, UnitJob


def _job(unit: int, n_windows: int = 0, n_tiles: int = 1) -> UnitJob:
    tiles = ()
    if n_windows:
        wins = np.zeros((n_windows, 4), np.int64)
        tiles = (TileJob(source=None, read_box=(0, 1, 0, 1), windows=wins),) * n_tiles
    return UnitJob(
        store="unused.zarr",
        unit=unit,
        row_start=16 * unit,
        n_rows=16,
        tiles=tiles,
        model=ModelRef("m", "m.onnx", "0" * 64),
        preprocess={},
        image_limits={},
        batch_size=16,
        fill=0.0,
        side=64,
        dtype="float32",
    )


class _Stream:
    """A stand-in for :class:`submit.UnitStream`: ``n`` units, each draw recording how many
    units had already run on the workers at that moment."""

    def __init__(self, n: int, ran: list[int], *, tiles: int = 0):
        self.n, self.ran, self.tiles = n, ran, tiles
        self.todo = [0]
        self.todo_windows = 16 * n
        self.made = 0
        self.ran_at_draw: list[int] = []

    def jobs(self, on_skip=None):
        for u in range(self.n):
            self.ran_at_draw.append(len(self.ran))
            self.made += 1
            yield _job(u, n_windows=1 if self.tiles else 0, n_tiles=self.tiles)


@pytest.fixture(scope="module")
def client():
    from pipeline.testing import local_compute

    with local_compute(n_workers=1, threads_per_worker=2, processes=False) as c:
        yield c


# Units the fake task ran; the workers are threads of this process, so the test sees them.
_RAN: list[int] = []
_LOCK = threading.Lock()


def _fake_task(job: UnitJob, probed: tuple = ()) -> int:
    with _LOCK:
        _RAN.append(job.unit)
    return job.n_rows


def _failing_task(job: UnitJob, probed: tuple = ()):
    from pipeline.errors import InputError
    from pipeline.fingerprint.worker import _UnitFailed

    if job.unit == 3:
        return _UnitFailed(InputError, "tile 3: unreadable")
    return job.n_rows


def test_units_are_drawn_on_progress_not_materialised(client, monkeypatch):
    _RAN.clear()
    ran = _RAN
    monkeypatch.setattr(submit, "_unit_task", _fake_task)
    n = 300
    stream = _Stream(n, ran)
    written = submit._run_jobs(client, stream, gpu=False, progress=False)
    assert written == 16 * n and sorted(ran) == list(range(n)) and stream.made == n
    # In flight plus the look-ahead: what the client may hold. Unit k (1-based) is drawn
    # only once k - bound units have come back, whatever the speed of the machine.
    bound = 2 * submit._in_flight_limit(client)
    assert bound < n
    assert stream.ran_at_draw[bound] >= 1, "every unit was drawn before the first one ran"
    for k, ran_then in enumerate(stream.ran_at_draw, start=1):
        assert ran_then >= k - bound, f"unit {k} drawn with only {ran_then} units run"


def test_units_of_many_tiles_are_held_within_the_tile_budget(client, monkeypatch):
    # Many small files make units of hundreds of tiles: the client holds what the tile budget
    # allows, not the usual number of units, and never fewer than two a worker thread.
    import dask.config

    _RAN.clear()
    monkeypatch.setattr(submit, "_unit_task", _fake_task)
    stream = _Stream(200, _RAN, tiles=50)
    with dask.config.set({"elodin.fingerprint.in-flight-tiles": 100}):
        written = submit._run_jobs(client, stream, gpu=False, progress=False)
    assert written == 16 * 200 and sorted(_RAN) == list(range(200))
    bound = 2 * 2 * submit._cluster_threads(client)  # in flight + look-ahead, floor of each
    assert bound < 2 * submit._in_flight_limit(client)
    for k, ran_then in enumerate(stream.ran_at_draw, start=1):
        assert ran_then >= k - bound, f"unit {k} drawn with only {ran_then} units run"


def test_an_error_cancels_what_is_in_flight_and_stops_drawing(client, monkeypatch):
    from pipeline.errors import InputError

    monkeypatch.setattr(submit, "_unit_task", _failing_task)
    stream = _Stream(10_000, [])
    with pytest.raises(InputError, match="tile 3: unreadable"):
        submit._run_jobs(client, stream, gpu=False, progress=False)
    assert stream.made < 10_000


def test_largest_first_within_the_look_ahead():
    jobs = [_job(u, n) for u, n in enumerate([1, 5, 2, 9, 3, 7, 4])]
    order = [j.unit for j in submit._largest_first(iter(jobs), lookahead=3)]
    # Four drawn, the largest leaves: unit 5 (7 windows) is not seen before units 3 and 1
    # leave, and the tail drains largest first.
    assert order == [3, 1, 5, 6, 4, 2, 0]
    assert sorted(order) == list(range(7))
    assert [j.unit for j in submit._largest_first(iter(jobs), lookahead=len(jobs))] == [
        3,
        5,
        1,
        6,
        4,
        2,
        0,
    ]
