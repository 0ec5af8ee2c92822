"""Shared, seeded fixtures.

- ``model_cache``: a session-wide cache dir for exported ONNX models (the export runs once per
  test session; set ELODIN_TEST_CACHE to reuse one across sessions).
- ``lite0_onnx``: path of the real EfficientNet-Lite0 export (224 input).
- ``rng``: a numpy Generator seeded per test (seed 12345).
"""

from __future__ import annotations

import os
from pathlib import Path

import dask.config
import numpy as np
import pytest


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
