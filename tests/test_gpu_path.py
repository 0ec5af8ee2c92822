"""The inference paths built for GPU workers, checked here on the CPU provider.

fp16 variant against fp32, IO binding against a plain run, fixed-shape (padded) batches,
top-k inside the graph against numpy, the prefetch overlap, and a clear error when a GPU is
asked for but onnxruntime has none. GPU throughput itself is measured by
benchmarks/bench_gpu.py on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import skimage.data

from pipeline.errors import ModelError
from pipeline.models import resolve
from pipeline.models.export import ensure_onnx
from pipeline.models.runtime import Session, topk


@pytest.fixture(scope="module")
def batch():
    img = skimage.data.chelsea().astype(np.float32)[:256, :256] / 255.0
    rs = np.random.default_rng(3)
    noise = rs.random((5, 3, 64, 64), dtype=np.float32)
    cat = img[::4, ::4].transpose(2, 0, 1)[None]
    return np.concatenate([cat, noise])


def test_fp16_variant_matches_fp32(batch, model_cache):
    card = resolve("efficientnet-lite0")
    fp32 = Session(ensure_onnx(card, cache=model_cache), threads=2)
    fp16 = Session(ensure_onnx(card, cache=model_cache, precision="fp16"), threads=2)
    a, b = fp32.infer(batch), fp16.infer(batch)
    assert b.features.dtype == np.float32  # float32 in and out, float16 inside
    cos = (
        (a.features * b.features).sum(1)
        / np.linalg.norm(a.features, axis=1)
        / np.linalg.norm(b.features, axis=1)
    )
    assert cos.min() > 0.999
    assert np.abs(a.features - b.features).max() < 0.05 * np.abs(a.features).max()
    np.testing.assert_array_equal(a.top_class[:, 0], b.top_class[:, 0])


def test_io_binding_equals_plain_run(batch, lite0_onnx):
    plain = Session(lite0_onnx, threads=2, io_binding=False).infer(batch)
    bound = Session(lite0_onnx, threads=2, io_binding=True).infer(batch)
    np.testing.assert_allclose(bound.features, plain.features, atol=1e-5)
    np.testing.assert_array_equal(bound.top_class, plain.top_class)


def test_fixed_shape_batches_pad_the_last_and_drop_the_padding(batch, lite0_onnx):
    plain = Session(lite0_onnx, threads=2).infer(batch)
    fixed = Session(lite0_onnx, threads=2, fixed_batch=16).infer(batch)
    assert fixed.features.shape == plain.features.shape == (6, 1280)
    np.testing.assert_allclose(fixed.features, plain.features, atol=1e-4)


def test_topk_in_graph_equals_numpy(batch, lite0_onnx):
    out = Session(lite0_onnx, threads=2, topk=7).infer(batch, logits=True)
    cls, prob = topk(out.logits, 7)
    np.testing.assert_array_equal(out.top_class, cls)
    np.testing.assert_allclose(out.top_prob, prob, atol=1e-6)
    without = Session(lite0_onnx, threads=2, topk=7).infer(batch, logits=False)
    assert without.logits is None and without.top_class.shape == (6, 7)


def test_cpu_provider_when_no_gpu(lite0_onnx):
    s = Session(lite0_onnx, threads=1)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has a CUDA provider")
    assert s.providers == ["CPUExecutionProvider"] and not s.on_gpu


def test_gpu_requested_without_cuda_is_one_clear_error(lite0_onnx):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has a CUDA provider")
    from pipeline.fingerprint import ModelRef, _session_for
    from pipeline.models.zoo import sha256_file

    ref = ModelRef("efficientnet-lite0", str(lite0_onnx), sha256_file(lite0_onnx), require_gpu=True)
    with pytest.raises(ModelError, match="GPU was asked for"):
        _session_for(ref)
    with pytest.raises(ModelError, match="CUDAExecutionProvider"):
        Session(lite0_onnx, providers=["CUDAExecutionProvider"])


def test_prefetch_yields_the_same_batches_in_order_and_passes_errors():
    from pipeline.fingerprint import _prefetch

    assert list(_prefetch(iter(range(50)))) == list(range(50))

    def broken():
        yield 1
        raise ValueError("tile 3 unreadable")

    with pytest.raises(ValueError, match="tile 3"):
        list(_prefetch(broken()))


def test_cuda_provider_options_come_from_config():
    import dask.config

    from pipeline.models.runtime import provider_options

    assert provider_options("CPUExecutionProvider") == {}
    assert provider_options("CUDAExecutionProvider") == {"cudnn_conv_algo_search": "EXHAUSTIVE"}
    with dask.config.set(
        {
            "elodin.model.cuda": {
                "cudnn-conv-algo-search": "HEURISTIC",
                "cuda-graph": True,
                "device-id": 1,
            }
        }
    ):
        opts = provider_options("CUDAExecutionProvider")
    assert opts == {
        "cudnn_conv_algo_search": "HEURISTIC",
        "enable_cuda_graph": "1",
        "device_id": "1",
    }


def test_gpu_runs_get_one_gpu_slot_per_worker_process():
    import dask.config

    from pipeline.compute import local_cluster

    with dask.config.set({"elodin.fingerprint.gpu": True, "elodin.fingerprint.gpu-units": 3}):
        with local_cluster(workers=1, dashboard_address=":0") as cluster:
            (spec,) = cluster.worker_spec.values()
    assert spec["options"]["resources"] == {"GPU": 1}
    assert spec["options"]["nthreads"] == 3  # a thread for each unit sharing the GPU


def test_local_gpu_workers_are_one_process_per_device_each_seeing_only_its_own():
    import os

    import dask.config
    from distributed import Client

    from pipeline.compute import local_cluster

    settings = {
        "elodin.fingerprint.gpu": True,
        "elodin.fingerprint.gpu-units": 2,
        "elodin.compute.gpus": [0, 1],
    }
    with dask.config.set(settings), local_cluster(dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
            info = client.scheduler_info(n_workers=-1)["workers"].values()
    assert sorted(seen.values()) == ["0", "1"]
    assert [w["resources"] for w in info] == [{"GPU": 1}, {"GPU": 1}]
    assert {w["nthreads"] for w in info} == {2}


def test_gpu_devices_come_from_config_then_cuda_visible_devices(monkeypatch):
    import dask.config

    from pipeline.compute import gpu_devices
    from pipeline.errors import ConfigError

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert gpu_devices() == ("2", "3")
    with dask.config.set({"elodin.compute.gpus": ["GPU-5d1c", 7]}):
        assert gpu_devices() == ("GPU-5d1c", "7")  # UUIDs or indices, as CUDA takes them
    with dask.config.set({"elodin.compute.gpus": []}), pytest.raises(ConfigError, match="gpus"):
        gpu_devices()


def test_fixed_batches_reuse_their_bound_buffers_and_return_each_batch(batch, lite0_onnx):
    """With fixed-shape batches the IO binding is made once: the input is updated in place and
    the outputs land in the same buffers every run (CUDA graph replay needs fixed addresses),
    yet every batch gets its own results."""
    plain = Session(lite0_onnx, threads=2)
    fixed = Session(lite0_onnx, threads=2, io_binding=True, fixed_batch=4)
    a, b = batch[:3], batch[3:]
    first = fixed.infer(a)
    ((binding, _),) = fixed._slots.values()
    addresses = [v.data_ptr() for v in binding.get_outputs()]
    second, again = fixed.infer(b), fixed.infer(a)
    assert len(fixed._slots) == 1
    assert [v.data_ptr() for v in binding.get_outputs()] == addresses
    np.testing.assert_allclose(first.features, plain.infer(a).features, atol=1e-4)
    np.testing.assert_allclose(second.features, plain.infer(b).features, atol=1e-4)
    np.testing.assert_array_equal(again.features, first.features)  # not overwritten by b


def test_threads_sharing_a_bound_session_each_get_their_own_results(lite0_native_onnx):
    """The threads of a GPU worker share its session: their runs take turns on the shared
    buffers, so no thread reads another's batch."""
    from concurrent.futures import ThreadPoolExecutor

    rs = np.random.default_rng(11)
    batches = [rs.random((8, 3, 64, 64), dtype=np.float32) for _ in range(12)]
    shared = Session(lite0_native_onnx, threads=1, io_binding=True, fixed_batch=8)
    assert shared.exclusive
    expected = [Session(lite0_native_onnx, threads=1).infer(x).features for x in batches]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: shared.infer(x).features, batches * 3))
    for i, g in enumerate(got):
        np.testing.assert_allclose(g, expected[i % len(batches)], atol=1e-4)


def test_cuda_graph_without_fixed_batches_is_refused(tmp_path):
    import dask.config

    from pipeline.errors import ConfigError
    from pipeline.fingerprint import fingerprint
    from pipeline.testing import synthetic_mosaic

    mosaic = synthetic_mosaic(tmp_path / "m.fits", shape=(128, 128), seed=2, n_sources=3)
    settings = {"elodin.model.cuda.cuda-graph": True, "elodin.model.fixed-batches": False}
    with dask.config.set(settings), pytest.raises(ConfigError, match="cuda-graph needs"):
        fingerprint(
            [mosaic], tmp_path / "s.zarr", model="efficientnet-lite0:native", progress=False
        )
    assert not (tmp_path / "s.zarr").exists()


@pytest.fixture(scope="module")
def one_gpu_worker():
    """One worker process offering GPU=1 with two threads (the CPU provider stands in for the
    device: what is checked is how units share the worker, not CUDA)."""
    from pipeline.testing import local_compute

    with local_compute(
        n_workers=1, threads_per_worker=2, dashboard_address=":0", resources={"GPU": 1}
    ) as client:
        yield client


@pytest.mark.parametrize("units", [1, 2])
def test_units_share_a_gpu_worker_as_configured(tmp_path, one_gpu_worker, units):
    import dask.config
    from distributed.diagnostics.plugin import WorkerPlugin

    from pipeline.fingerprint import fingerprint
    from pipeline.store import Store
    from pipeline.testing import synthetic_mosaic

    class PeakUnits(WorkerPlugin):
        """The most work units executing at once on the worker (defined here so that it
        travels to the worker by value)."""

        def setup(self, worker):
            self.running = self.peak = 0

        def transition(self, key, start, finish, **kwargs):
            if str(key).startswith("elodin-unit"):
                self.running += (finish == "executing") - (start == "executing")
                self.peak = max(self.peak, self.running)

    client = one_gpu_worker
    name = f"elodin-test-peak-units-{units}"
    client.register_plugin(PeakUnits(), name=name)
    mosaic = synthetic_mosaic(tmp_path / "m.fits", shape=(512, 512), seed=4, n_sources=30)
    kw = dict(
        method="sliding", size=64, tile_size=128, chunk_rows=16, model="efficientnet-lite0:native"
    )
    gpu_run = {
        "elodin.fingerprint.gpu-units": units,
        "elodin.model.providers": ["CPUExecutionProvider"],  # no CUDA here: see the docstring
    }
    with dask.config.set(gpu_run):
        fingerprint([mosaic], tmp_path / "gpu.zarr", client=client, progress=False, gpu=True, **kw)
    peak = client.run(lambda dask_worker: dask_worker.plugins[name].peak)
    client.unregister_worker_plugin(name)
    assert list(peak.values()) == [units]
    fingerprint([mosaic], tmp_path / "cpu.zarr", client=client, progress=False, **kw)
    got, want = (Store.open(tmp_path / f"{n}.zarr").dataset() for n in ("gpu", "cpu"))
    assert int(got.valid.sum()) == int(want.valid.sum()) == 64
    np.testing.assert_allclose(got.fingerprint.values, want.fingerprint.values, atol=1e-4)
    np.testing.assert_array_equal(got.x.values, want.x.values)


def test_cli_gpu_without_cuda_is_one_line_before_anything_is_written(tmp_path):
    """`elodin fingerprint --gpu` starts GPU workers (before, the flag did not reach the local
    cluster and its tasks waited forever for a GPU no worker offered) and, finding no CUDA
    provider on them, stops with one line before the store exists."""
    import subprocess

    from pipeline.testing import error_lines, fingerprint_command, synthetic_mosaic

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has a CUDA provider")
    mosaic = synthetic_mosaic(tmp_path / "m.fits", shape=(128, 128), seed=2, n_sources=3)
    out = tmp_path / "s.zarr"
    cmd = fingerprint_command(
        mosaic, out=out, model="efficientnet-lite0:native", size=64, tile_size=128, extra=("--gpu",)
    )
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "has no CUDA provider" in errors[0]
    assert not out.exists()


def test_gpu_run_on_workers_without_the_gpu_resource_is_refused(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.fingerprint import fingerprint
    from pipeline.testing import local_compute, synthetic_mosaic

    mosaic = synthetic_mosaic(tmp_path / "m.fits", shape=(128, 128), seed=2, n_sources=3)
    with (
        local_compute(n_workers=1, dashboard_address=":0") as client,
        pytest.raises(ConfigError, match="no Dask worker offers the resource GPU"),
    ):
        fingerprint(
            [mosaic],
            tmp_path / "s.zarr",
            model="efficientnet-lite0:native",
            gpu=True,
            client=client,
            progress=False,
        )
    assert not (tmp_path / "s.zarr").exists()


def test_worker_processes_of_a_multi_gpu_job_take_one_device_each():
    """Processes of one job that all see the job's GPUs (a SLURM job with gres gpu:2 and
    processes: 2) take the device matching their place in the job; config still wins."""
    import dask.config

    from pipeline.models.runtime import provider_options
    from pipeline.testing import local_compute

    def device():
        return provider_options("CUDAExecutionProvider").get("device_id")

    with local_compute(
        n_workers=2, dashboard_address=":0", env={"CUDA_VISIBLE_DEVICES": "0,1"}
    ) as client:
        workers = list(client.scheduler_info(n_workers=-1)["workers"])

        def on_each(fn):  # as tasks, where sessions are made
            return sorted(
                client.gather([client.submit(fn, workers=[w], pure=False) for w in workers])
            )

        assert on_each(device) == ["0", "1"]

        def pinned():
            with dask.config.set({"elodin.model.cuda.device-id": 1}):
                return device()

        assert on_each(pinned) == ["1", "1"]
    assert device() is None  # outside a worker: onnxruntime's default
