"""A small real store for the explorer's tests, and the explorer run as a real process.

The store: a synthetic FITS mosaic cut into 16-pixel sliding windows, with fingerprints drawn
from three groups plus one far outlier (written with the real Store API, unit ends as empty
slots), then the real ``reduce``, ``cluster`` and ``outliers`` stages; the embedding is PCA 1-2
(UMAP would only add minutes here). Cutouts are read back from the mosaic like any store's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from analysis_store import build_store

from pipeline import config
from pipeline.sources import open_sources
from pipeline.testing import synthetic_mosaic

__all__ = ["NX", "NY", "SIDE", "ExplorerProcess", "http", "make_store"]

NY, NX, SIDE = 192, 256, 16
ROOT = Path(__file__).resolve().parents[1]


def make_store(directory: Path) -> Path:
    from pipeline.analysis import cluster, outliers, reduce
    from pipeline.store import Store

    directory.mkdir(parents=True, exist_ok=True)
    mosaic = synthetic_mosaic(directory / "field.fits", shape=(NY, NX), seed=5, n_sources=30)
    (src,) = open_sources([str(mosaic)])
    ny, nx = NY // SIDE, NX // SIDE
    n = ny * nx
    gy, gx = np.divmod(np.arange(n), nx)
    x0, y0 = gx * SIDE, gy * SIDE
    rng = np.random.default_rng(7)
    centres = rng.normal(0, 6, (3, 8))
    group = rng.integers(0, 3, n)
    features = centres[group] + rng.normal(0, 1, (n, 8))
    features[n // 2] += 60  # one far outlier
    coords = {
        "image": np.full(n, src.id, dtype=object),
        "x": x0 + (SIDE - 1) / 2,
        "y": y0 + (SIDE - 1) / 2,
        "width": np.full(n, SIDE, np.int32),
        "height": np.full(n, SIDE, np.int32),
    }
    ra, dec = src.pixel_to_radec(coords["x"], coords["y"])
    coords.update(ra=np.asarray(ra), dec=np.asarray(dec))
    path = directory / "explore.zarr"
    attrs = {
        "cutouts": {"method": "sliding", "size": SIDE, "fill": 0.0},
        "preprocess": dict(config.get("preprocess")),
    }
    build_store(
        path,
        features,
        chunk_rows=16,
        tile=13,
        image=src.id,
        coords=coords,
        attrs=attrs,
        inputs={src.id: {"files": [{"path": str(mosaic)}], "source": src.to_record()}},
    )
    reduce(path, components=4)
    cluster(path, n_clusters=3)
    outliers(path)
    st = Store.open(path, mode="r+")
    pcs = st.array("pca")[...]
    st.create_row_array("embedding", tail=(2,), dims=("embedding_dim",))
    st.write_rows(0, {"embedding": pcs[:, :2].astype(np.float32)})
    return path


class ExplorerProcess:
    """``elodin explore STORE --port 0 --no-browser`` as a subprocess; the URL from its output."""

    def __init__(self, store: Path, *extra: str, env: dict | None = None, user=None) -> None:
        self.cmd = [sys.executable, "-m", "pipeline.cli", "explore", str(store), "--port", "0",
                    "--no-browser", *extra]  # fmt: skip
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.user = user
        self.lines: list[str] = []

    def __enter__(self) -> ExplorerProcess:
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
            cwd=str(ROOT), user=self.user,
        )  # fmt: skip
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("Explorer: "):
                self.url = line.split(" ", 1)[1].strip()
                break
        else:
            raise RuntimeError(
                f"explorer did not start: {self.proc.wait()} {self.proc.stderr.read()}"
            )
        return self

    def stop(self) -> tuple[int, str]:
        """SIGTERM, as a job scheduler or `kill` would: (exit status, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err

    def __exit__(self, *exc) -> None:
        self.rc, self.stderr = self.stop()


def http(url: str, *, data=None, method: str | None = None, headers=None):
    """(status, content type, body) of a request; JSON bodies decoded."""
    body = json.dumps(data).encode() if data is not None and not isinstance(data, bytes) else data
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(url, data=body, method=method, headers={**hdrs, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, ctype, raw = r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        status, ctype, raw = e.code, e.headers.get("Content-Type", ""), e.read()
    if ctype.startswith("application/json"):
        return status, ctype, json.loads(raw)
    return status, ctype, raw
