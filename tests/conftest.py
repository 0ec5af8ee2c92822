"""Shared, seeded fixtures.

- ``model_cache``: a session-wide cache dir for exported ONNX models (the export runs once per
  test session; set ELODIN_TEST_CACHE to reuse one across sessions).
- ``lite0_onnx``: path of the real EfficientNet-Lite0 export (224 input).
- ``rng``: a numpy Generator seeded per test (seed 12345).
- ``client``: a module-wide Dask LocalCluster of two single-thread worker processes (a module
  needing another cluster defines its own ``client``).
- ``explorer_store`` / ``explorer_copy``: the explorer tests' store (tests/explore_store.py),
  built once per module, and a fresh copy of it per test (labels change it).

Helpers that are not fixtures (mosaics, stores of real fingerprints, a tiny ONNX model) live in
:mod:`pipeline.testing`; synthetic analysis stores in tests/analysis_store.py.

Hypothesis profiles: ``ci`` (the default) is derandomized, with no example database and 100
examples a test, so every run, here or in CI, tries the same examples and a red test is red
again on a rerun; ``HYPOTHESIS_PROFILE=deep`` draws 2,000 random examples a test (and saves
failing ones in ``.hypothesis/``) for a search on demand. A failure found either way goes into
its test as an ``@example``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dask.config
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "deep",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    cache = os.environ.get("ELODIN_TEST_CACHE")
    path = Path(cache) if cache else tmp_path_factory.mktemp("model-cache")
    with dask.config.set({"elodin.cache-dir": str(path)}):
        yield path


@pytest.fixture(autouse=True)
def _pristine_dask_config():
    # Config files a test applies (elodin --config, elodin run) change dask.config's `elodin`
    # section in place; every test starts from the same settings. (Only that section: other
    # packages add their own defaults when they are first imported.)
    import copy

    saved = copy.deepcopy(dask.config.config.get("elodin"))
    yield
    dask.config.config["elodin"] = saved


@pytest.fixture(autouse=True)
def _use_model_cache(model_cache, monkeypatch):
    # Subprocesses (CLI tests, worker processes) see the same cache through the environment.
    monkeypatch.setenv("ELODIN__CACHE_DIR", str(model_cache))
    with dask.config.set({"elodin.cache-dir": str(model_cache)}):
        yield


@pytest.fixture(scope="session")
def lite0_onnx(model_cache) -> Path:
    from pipeline.models import resolve
    from pipeline.models.export import ensure_onnx

    return ensure_onnx(resolve("efficientnet-lite0"), cache=model_cache)


@pytest.fixture(scope="session")
def lite0_native_onnx(model_cache) -> Path:
    from pipeline.models import resolve
    from pipeline.models.export import ensure_onnx

    return ensure_onnx(resolve("efficientnet-lite0:native"), cache=model_cache)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture(scope="module")
def client():
    from pipeline.testing import local_compute

    with local_compute(n_workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def explorer_store(tmp_path_factory) -> Path:
    from explore_store import make_store

    return make_store(tmp_path_factory.mktemp("explore"))


@pytest.fixture
def explorer_copy(explorer_store, tmp_path) -> Path:
    """A copy of the explorer store (labels change it)."""
    out = tmp_path / "copy.zarr"
    shutil.copytree(explorer_store, out)
    return out
