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

    with dask.config.set({"elodin.fingerprint.gpu": True}):
        with local_cluster(workers=1, dashboard_address=None) as cluster:
            (spec,) = cluster.worker_spec.values()
    assert spec["options"]["resources"] == {"GPU": 1}
