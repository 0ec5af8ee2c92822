"""Synthetic sky for tests, benchmarks and trying Elodin out (like ``numpy.testing``).

:func:`synthetic_mosaic` writes a FITS mosaic of sky noise and Gaussian galaxies with a
celestial TAN WCS, strip by strip through a memory map, so a 16k x 16k mosaic never sits in
memory; :func:`store_digest` hashes every file of a store, so "the store is unchanged" is one
comparison. :func:`fingerprint_command` and :func:`error_lines` run the CLI as a user would
and read its one-line errors. :func:`make_mosaic` is the small mosaic most tests cut, :func:`make_patches` a survey of many
small files,
:func:`fingerprinted_store` a store made by the real fingerprint and reduce stages, and
:func:`tiny_onnx` (with :data:`TINY_CARD`) a small real user ONNX model, and
:func:`local_compute` the suite's compute (a LocalCluster and its Client). :class:`KillOnUnits` SIGKILLs Dask worker processes at chosen
work-unit starts and finishes, so chaos tests kill on progress, not on the clock.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

__all__ = [
    "TINY_CARD",
    "CrashOnOpen",
    "KillOnUnits",
    "error_lines",
    "fingerprint_command",
    "fingerprinted_store",
    "local_compute",
    "make_mosaic",
    "make_patches",
    "store_digest",
    "synthetic_mosaic",
    "tiny_onnx",
]


@contextlib.contextmanager
def local_compute(
    n_workers: int = 2,
    *,
    threads_per_worker: int = 1,
    processes: bool = True,
    dashboard_address: str | None = None,
    **cluster_kwargs,
) -> Iterator:
    """A :class:`distributed.LocalCluster` (worker processes by default) and a Client on it,
    both closed on exit; ``cluster_kwargs`` (``resources``, ``env``...) go to the cluster.

    Yields the :class:`distributed.Client`.
    """
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=processes,
            dashboard_address=dashboard_address,
            **cluster_kwargs,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def synthetic_mosaic(
    path: str | os.PathLike,
    *,
    shape: tuple[int, int],
    seed: int = 1,
    n_sources: int | None = None,
    flux: tuple[float, float] = (50.0, 2000.0),
    sigma: tuple[float, float] = (1.5, 8.0),
    sky: float = 100.0,
    noise: float = 5.0,
    crval: tuple[float, float] = (150.1, 2.2),
    pixel_scale: float = 0.03,
    strip: int = 512,
) -> Path:
    """Write a float32 FITS mosaic of noise and elliptical Gaussian sources with a TAN WCS.

    Parameters
    ----------
    path : path-like
        File to write (overwritten).
    shape : (ny, nx)
        Image size in pixels.
    seed : int
        Seed of everything random: the same arguments give the same bytes.
    n_sources : int, optional
        Number of sources; default one per 6,500 pixels.
    flux, sigma : (low, high)
        Uniform ranges of peak amplitude and of the Gaussian sigma along each axis (pixels).
    sky, noise : float
        Sky level and its Gaussian noise.
    crval : (ra, dec)
        Sky position (degrees) of the image centre.
    pixel_scale : float
        Arcseconds per pixel.
    strip : int
        Rows written at a time (memory is about ``strip * nx * 8`` bytes).
    """
    from astropy.io import fits
    from astropy.wcs import WCS

    ny, nx = (int(v) for v in shape)
    path = Path(path)
    rs = np.random.default_rng(seed)
    n = ny * nx // 6500 if n_sources is None else int(n_sources)
    xs, ys = rs.uniform(0, nx, n), rs.uniform(0, ny, n)
    sx, sy = rs.uniform(*sigma, n), rs.uniform(*sigma, n)
    amp = rs.uniform(*flux, n)

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = [nx / 2, ny / 2]
    w.wcs.cdelt = [-pixel_scale / 3600, pixel_scale / 3600]
    header = fits.Header()
    header["SIMPLE"] = True
    header["BITPIX"] = -32
    header["NAXIS"] = 2
    header["NAXIS1"] = nx
    header["NAXIS2"] = ny
    header.update(w.to_header())
    if path.exists():
        path.unlink()
    header.tofile(path)
    start = path.stat().st_size
    data_bytes = ny * nx * 4
    with open(path, "rb+") as f:  # data plus FITS padding to a 2880-byte block, sparse at first
        f.seek(start + data_bytes + (-data_bytes) % 2880 - 1)
        f.write(b"\0")
    image = np.memmap(path, dtype=">f4", mode="r+", offset=start, shape=(ny, nx))
    reach_y = 4 * sy
    for y0 in range(0, ny, strip):
        y1 = min(ny, y0 + strip)
        block = rs.normal(sky, noise, (y1 - y0, nx))
        near = np.flatnonzero((ys + reach_y >= y0) & (ys - reach_y < y1))
        for i in near:  # each source only on the pixels within 4 sigma of it
            bx0, bx1 = int(max(0, xs[i] - 4 * sx[i])), int(min(nx, xs[i] + 4 * sx[i] + 1))
            by0, by1 = int(max(y0, ys[i] - 4 * sy[i])), int(min(y1, ys[i] + 4 * sy[i] + 1))
            if bx1 <= bx0 or by1 <= by0:
                continue
            yy, xx = np.mgrid[by0:by1, bx0:bx1]
            block[by0 - y0 : by1 - y0, bx0:bx1] += amp[i] * np.exp(
                -(((xx - xs[i]) / sx[i]) ** 2 + ((yy - ys[i]) / sy[i]) ** 2) / 2
            )
        image[y0:y1] = block
    image.flush()
    del image
    return path


def store_digest(path: str | os.PathLike) -> str:
    """sha256 over every file of a store (names and bytes): equal digests, identical stores."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def fingerprint_command(
    *inputs: str | os.PathLike,
    out: str | os.PathLike,
    model: str,
    size: int,
    tile_size: int,
    stride: int | None = None,
    workers: int = 1,
    progress: bool = False,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """``elodin fingerprint`` as a subprocess argument list, run by this interpreter."""
    cmd = [sys.executable, "-m", "pipeline.cli", "fingerprint", *map(str, inputs), "-o", str(out)]
    cmd += ["--size", str(size)]
    cmd += ["--stride", str(stride)] if stride is not None else []
    cmd += ["--tile-size", str(tile_size), "--model", model, "--workers", str(workers)]
    return cmd + ([] if progress else ["--no-progress"]) + list(extra)


def error_lines(stderr: str) -> list[str]:
    """The ``elodin: error: ...`` lines of a command's standard error."""
    return [line for line in stderr.splitlines() if line.startswith("elodin: error:")]


def make_patches(
    directory: str | os.PathLike, n: int, side: int, *, seed: int, start: int = 0
) -> list[str]:
    """``n`` FITS patches ``patch{start..}.fits`` of ``side``^2 sky noise, one bright source
    each and a TAN WCS each (neighbouring patches on a 100-wide grid of 36 arcsec steps): a
    survey of many small files."""
    from astropy.io import fits
    from astropy.wcs import WCS

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(start, start + n):
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [150.0 + (i % 100) * 0.01, 2.0 + (i // 100) * 0.01]
        w.wcs.crpix = [side / 2, side / 2]
        w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
        data = rng.normal(100.0, 3.0, (side, side)).astype(np.float32)
        y, x = rng.integers(4, side - 4, 2)
        data[y - 2 : y + 3, x - 2 : x + 3] += 500.0
        p = directory / f"patch{i:06d}.fits"
        fits.PrimaryHDU(data, header=w.to_header()).writeto(p, overwrite=True)
        paths.append(str(p))
    return paths


def make_mosaic(path: str | os.PathLike, *, ny: int = 640, nx: int = 768, seed: int = 1) -> Path:
    """The tests' small FITS mosaic with a TAN WCS: sky noise plus 60 Gaussian galaxies."""
    return synthetic_mosaic(path, shape=(ny, nx), seed=seed, n_sources=60)


def fingerprinted_store(
    path: str | os.PathLike,
    inputs: Iterable[str],
    *,
    client,
    model: str = "efficientnet-lite0:native",
    chunk_rows: int,
    components: int,
    pixels: bool = False,
) -> str:
    """A store of real fingerprints: ``inputs`` cut whole (``method full``) by the real
    fingerprint stage on ``client``, then PCA of ``components`` (and of the pixel baseline with
    ``pixels``). Returns the store's path."""
    from . import analysis
    from .fingerprint import fingerprint

    inputs = list(inputs)
    fingerprint(
        inputs,
        path,
        method="full",
        model=model,
        client=client,
        progress=False,
        chunk_rows=chunk_rows,
    )
    analysis.reduce(path, components=components, client=client)
    if pixels:
        analysis.reduce(path, components=components, features="pixels", client=client)
    return str(path)


def tiny_onnx(
    path: str | os.PathLike, *, channels_in=3, rank=4, feature_name="pool", opset=17
) -> Path:
    """A small real ONNX CNN: conv 3->8, ReLU, global pooling -> (N, 8), Gemm -> (N, 10).

    Its model card (for a ``.yaml`` beside it) is :data:`TINY_CARD`.
    """
    import onnx
    from onnx import TensorProto, helper

    rs = np.random.default_rng(0)
    w = helper.make_tensor(
        "w", TensorProto.FLOAT, [8, channels_in, 3, 3], rs.normal(size=8 * channels_in * 9).tolist()
    )
    fc = helper.make_tensor("fc", TensorProto.FLOAT, [8, 10], rs.normal(size=80).tolist())
    shape = ["N", channels_in, 224, 224] if rank == 4 else ["N", 224, 224]
    nodes = [
        helper.make_node("Conv", ["data", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], [feature_name], axis=1),
        helper.make_node("MatMul", [feature_name, "fc"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, shape)],
        [
            helper.make_tensor_value_info(feature_name, TensorProto.FLOAT, ["N", 8]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10]),
        ],
        initializer=[w, fc],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return Path(path)


TINY_CARD = """\
name: tiny
input: data
resolution: 224
mean: [0.5, 0.5, 0.5]
std: [0.25, 0.25, 0.25]
outputs: {features: pool, logits: scores}
"""


class CrashOnOpen(WorkerPlugin):
    """A worker plugin that SIGKILLs its own worker whenever it opens an input whose file
    name ends with ``suffix``: a file that crashes a reader (a segfault in a C library), so
    every worker that tries it dies. Register it with ``client.register_plugin``; the
    scheduler gives it to restarted workers too."""

    name = "elodin-crash-on-open"
    idempotent = False

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    def setup(self, worker) -> None:
        import pipeline.sources as sources

        real, suffix = sources.open_listed, self.suffix

        def open_listed(sid, specs, **kwargs):
            if any(str(s).endswith(suffix) for s in specs):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(sid, specs, **kwargs)

        sources.open_listed = open_listed


class KillOnUnits(WorkerPlugin):
    """A worker plugin that SIGKILLs its own worker process at chosen work-unit events.

    Unit events are numbered in the order they happen over the whole cluster (restarted
    workers included): the n-th time any worker starts executing an ``elodin-unit`` task is
    start n, the n-th time one finishes (its rows and marker written, its result not yet
    reported) is finish n. The worker dies at the starts in ``at_start`` and the finishes in
    ``at_finish``, so how many kills land, and where, does not depend on the machine's speed.
    Register it with ``client.register_plugin``; the scheduler gives it to restarted workers.

    Parameters
    ----------
    log_dir : path-like
        Directory (shared by the worker processes) for the event counters and the kill log.
    at_start, at_finish : iterable of int
        Event numbers (from 1) at which the worker kills itself.
    """

    name = "elodin-kill-on-units"
    idempotent = False

    def __init__(
        self,
        log_dir: str | os.PathLike,
        *,
        at_start: Iterable[int] = (),
        at_finish: Iterable[int] = (),
    ) -> None:
        self.log_dir = str(log_dir)
        self.at = {"start": frozenset(at_start), "finish": frozenset(at_finish)}

    def transition(self, key, start: str, finish: str, **kwargs) -> None:
        if not str(key).startswith("elodin-unit"):
            return
        if finish == "executing":
            event = "start"
        elif start == "executing" and finish == "memory":
            event = "finish"  # the worker state machine calls us before the result is sent
        else:
            return
        n = _claim_number(Path(self.log_dir) / event)
        if n in self.at[event]:
            kills = Path(self.log_dir) / "kills"
            kills.mkdir(exist_ok=True)
            (kills / f"{event}-{n}").write_text(f"{os.getpid()} {key}")
            os.kill(os.getpid(), signal.SIGKILL)

    @staticmethod
    def kills(log_dir: str | os.PathLike) -> list[tuple[str, int, int]]:
        """The kills that landed: ``(event, number, pid)``, sorted by number."""
        root = Path(log_dir) / "kills"
        rows = []
        for f in root.glob("*-*") if root.is_dir() else ():
            event, number = f.name.split("-")
            rows.append((event, int(number), int(f.read_text().split()[0])))
        return sorted(rows, key=lambda r: (r[1], r[0]))

    @staticmethod
    def events(log_dir: str | os.PathLike, event: str) -> int:
        """How many unit ``event`` s ("start", "finish") happened."""
        root = Path(log_dir) / event
        return len(os.listdir(root)) if root.is_dir() else 0


def _claim_number(directory: Path) -> int:
    """The next number in ``directory``, claimed atomically across processes (O_EXCL files)."""
    directory.mkdir(parents=True, exist_ok=True)
    n = len(os.listdir(directory)) + 1
    while True:
        try:
            os.close(os.open(directory / str(n), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return n
        except FileExistsError:
            n += 1
