"""A corpus of malformed inputs through the real command line, against an existing store.

Every case: exit status 2, exactly one ``elodin: error:`` line naming the file (and the HDU,
row or key) and the problem, no traceback, and the store left byte-identical. The corpus is
generated here (``CASES``), each file as small as its flaw allows.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from pipeline.testing import make_mosaic, store_digest

MODEL = "efficientnet-lite0:native"
BASE_FLAGS = ("--size", "32", "--tile-size", "128", "--model", MODEL, "--workers", "1")


def _fits(path: Path, data, header=None) -> Path:
    fits.PrimaryHDU(data, header=header).writeto(path, overwrite=True)
    return path


# Each builder writes its file(s) under `d` and returns (extra CLI args, words the error line must
# hold: the file's name first, then the problem).
Case = Callable[[Path, Path], tuple[list[str], list[str]]]


def truncated_fits(d, good):
    raw = good.read_bytes()
    (d / "truncated.fits").write_bytes(raw[: len(raw) // 2])
    return [str(d / "truncated.fits")], ["truncated.fits", "truncated"]


def lying_header(d, good):
    # NAXIS1 / NAXIS2 promise 4096 x 4096 float32 pixels; the file holds 64 x 64.
    hdu = fits.PrimaryHDU(np.ones((64, 64), np.float32))
    header = hdu.header.tostring().replace(
        "NAXIS1  =                   64", "NAXIS1  =                 4096"
    )
    header = header.replace("NAXIS2  =                   64", "NAXIS2  =                 4096")
    (d / "lying.fits").write_bytes(header.encode() + np.ones((64, 64), ">f4").tobytes())
    return [str(d / "lying.fits")], ["lying.fits", "truncated"]


def wrong_bitpix(d, good):
    hdu = fits.PrimaryHDU(np.ones((64, 64), np.float32))
    header = hdu.header.tostring().replace(
        "BITPIX  =                  -32", "BITPIX  =                   12"
    )
    (d / "bitpix.fits").write_bytes(header.encode() + np.ones((64, 64), ">f4").tobytes())
    return [str(d / "bitpix.fits")], ["bitpix.fits", "BITPIX"]


def nan_only(d, good):
    _fits(d / "nan.fits", np.full((128, 128), np.nan, np.float32))
    return [str(d / "nan.fits")], ["nan.fits", "NaN"]


def inf_only(d, good):
    _fits(d / "inf.fits", np.full((128, 128), np.inf, np.float32))
    return [str(d / "inf.fits")], ["inf.fits", "inf"]


def one_pixel(d, good):
    _fits(d / "pixel.fits", np.ones((1, 1), np.float32))
    return [str(d / "pixel.fits")], ["pixel.fits", "smaller than"]


def table_hdu(d, good):
    from astropy.table import Table

    Table({"ra": [1.0, 2.0]}).write(d / "table.fits")
    return [str(d / "table.fits") + "[1]"], ["table.fits[1]", "not an image"]


def no_image_at_all(d, good):
    fits.HDUList([fits.PrimaryHDU()]).writeto(d / "header-only.fits")
    return [str(d / "header-only.fits")], ["header-only.fits", "no HDU holds"]


def missing_hdu(d, good):
    return [str(good) + "[SCI]"], ["good.fits", "no HDU named 'SCI'"]


def cube_4d(d, good):
    _fits(d / "cube.fits", np.ones((2, 3, 64, 64), np.float32))
    return [str(d / "cube.fits")], ["cube.fits", "2-D"]


def gzip_not_gzip(d, good):
    (d / "plain.fits.gz").write_bytes(good.read_bytes())
    return [str(d / "plain.fits.gz")], ["plain.fits.gz", "not gzip"]


def gzip_truncated(d, good):
    raw = gzip.compress(good.read_bytes())
    (d / "cut.fits.gz").write_bytes(raw[: len(raw) // 3])
    return [str(d / "cut.fits.gz")], ["cut.fits.gz", "FITS"]


def empty_file(d, good):
    (d / "empty.fits").write_bytes(b"")
    return [str(d / "empty.fits")], ["empty.fits", "FITS"]


def text_as_fits(d, good):
    (d / "notes.fits").write_text("observing notes, not a FITS file\n" * 100)
    return [str(d / "notes.fits")], ["notes.fits", "FITS"]


def text_as_png(d, good):
    (d / "image.png").write_text("<html>404 not found</html>")
    return [str(d / "image.png")], ["image.png", "not a readable image"]


def truncated_jpeg(d, good):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), np.uint8)).save(d / "full.jpg")
    raw = (d / "full.jpg").read_bytes()
    (d / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    return [str(d / "cut.jpg")], ["cut.jpg", "image"]


def garbage_tiff(d, good):
    (d / "scan.tiff").write_bytes(b"II*\x00" + os.urandom(200))
    return [str(d / "scan.tiff")], ["scan.tiff", "TIFF"]


def broken_zarr(d, good):
    (d / "mosaic.zarr").mkdir()
    (d / "mosaic.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": ')
    return [str(d / "mosaic.zarr")], ["mosaic.zarr", "Zarr"]


def missing_file(d, good):
    return [str(d / "nowhere.fits")], ["nowhere.fits", "no such file"]


def _catalog(d, good, name: str, text: str, *words: str):
    import shutil

    # A catalog is read when new images are planned: an image the store does not hold yet.
    image = shutil.copy(good, d / "second.fits")
    (d / name).write_text(text)
    return [str(image), "--method", "catalog", "--catalog", str(d / name)], [name, *words]


def catalog_nan(d, good):
    return _catalog(d, good, "nan.csv", "ra,dec\n150.1,2.2\nnan,2.2\n", "row 1", "NaN")


def catalog_text(d, good):
    return _catalog(d, good, "text.csv", "ra,dec\n150.1,2.2\n150.1,north\n", "row 1", "'north'")


def catalog_no_columns(d, good):
    return _catalog(d, good, "cols.csv", "alpha,beta\n1,2\n", "no coordinate columns")


def catalog_ragged(d, good):
    return _catalog(d, good, "ragged.csv", "ra,dec\n150.1,2.2,9\n150.1\n", "cannot read")


def catalog_garbage_parquet(d, good):
    args, _ = _catalog(d, good, "cat.parquet", "")
    (d / "cat.parquet").write_bytes(os.urandom(300))
    return args, ["cat.parquet", "cannot read"]


def catalog_off_image(d, good):
    return _catalog(d, good, "far.csv", "ra,dec\n10.0,-40.0\n11.0,-41.0\n", "none of the 2 rows")


def _config(d, good, name: str, text: str, *words: str):
    (d / name).write_text(text)
    return ["--config", str(d / name), str(good)], [name, *words]


def config_unknown_key(d, good):
    return _config(
        d, good, "typo.yaml", "elodin:\n  fingerprint:\n    batch_sise: 8\n", "batch_sise"
    )


def config_wrong_type(d, good):
    return _config(
        d, good, "type.yaml", "elodin:\n  fingerprint:\n    batch-size: many\n", "batch-size"
    )


def config_not_yaml(d, good):
    return _config(d, good, "broken.yaml", "elodin:\n  model: [unclosed\n", "not valid YAML")


def config_python_tag(d, good):
    sentinel = d / "pwned"
    text = f"elodin: !!python/object/apply:os.system ['touch {sentinel}']\n"
    return _config(d, good, "evil.yaml", text, "not valid YAML", "only plain YAML")


def config_not_a_mapping(d, good):
    return _config(d, good, "list.yaml", "- a\n- b\n", "mapping")


def _card(d: Path, onnx: Path, **extra) -> Path:
    card = {
        "input": "input",
        "resolution": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "outputs": {"features": "features"},
        **extra,
    }
    path = onnx.with_suffix(".yaml")
    path.write_text(json.dumps(card))  # JSON is YAML
    return path


class _Exploit:
    """Unpickling this runs a shell command: a model file must never be unpickled."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def model_pickle(d, good):
    onnx = d / "weights.onnx"
    onnx.write_bytes(pickle.dumps(_Exploit(d / "pwned")))
    _card(d, onnx)
    return [str(good), "--model", str(onnx)], ["weights.onnx", "not a valid ONNX model"]


def model_wrong_rank(d, good):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["features"])],
        "rank2",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, d / "rank2.onnx")
    _card(d, d / "rank2.onnx")
    return [str(good), "--model", str(d / "rank2.onnx")], ["rank2.onnx", "rank 2"]


def model_sha_mismatch(d, good):
    onnx = d / "swapped.onnx"
    onnx.write_bytes(b"not the file the card describes")
    _card(d, onnx, sha256="0" * 64)
    return [str(good), "--model", str(onnx)], ["swapped.onnx", "sha256"]


def model_card_missing_keys(d, good):
    (d / "half.onnx").write_bytes(b"")
    (d / "half.yaml").write_text("input: input\n")
    return [str(good), "--model", str(d / "half.onnx")], ["half.yaml", "missing key"]


def model_card_python_tag(d, good):
    (d / "tagged.onnx").write_bytes(b"")
    (d / "tagged.yaml").write_text(f"!!python/object/apply:os.system ['touch {d / 'pwned'}']\n")
    return [str(good), "--model", str(d / "tagged.onnx")], ["tagged.yaml", "not valid YAML"]


CASES: dict[str, Case] = {
    f.__name__: f
    for f in (
        truncated_fits,
        lying_header,
        wrong_bitpix,
        nan_only,
        inf_only,
        one_pixel,
        table_hdu,
        no_image_at_all,
        missing_hdu,
        cube_4d,
        gzip_not_gzip,
        gzip_truncated,
        empty_file,
        text_as_fits,
        text_as_png,
        truncated_jpeg,
        garbage_tiff,
        broken_zarr,
        missing_file,
        catalog_nan,
        catalog_text,
        catalog_no_columns,
        catalog_ragged,
        catalog_garbage_parquet,
        catalog_off_image,
        config_unknown_key,
        config_wrong_type,
        config_not_yaml,
        config_python_tag,
        config_not_a_mapping,
        model_pickle,
        model_wrong_rank,
        model_sha_mismatch,
        model_card_missing_keys,
        model_card_python_tag,
    )
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_mosaic(tmp_path_factory.mktemp("corpus-good") / "good.fits", ny=128, nx=128)


def _made(out: Path, good: Path, *flags: str) -> Path:
    cmd = [sys.executable, "-m", "pipeline.cli", "fingerprint", str(good), "-o", str(out)]
    r = subprocess.run([*cmd, *BASE_FLAGS, *flags, "--no-progress"], capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory, good) -> dict[str, Path]:
    """Existing stores the malformed runs go into: sliding windows, and catalog cutouts (so a
    bad catalog gets as far as being read)."""
    d = tmp_path_factory.mktemp("corpus-stores")
    (d / "first.csv").write_text("ra,dec\n150.1,2.2\n")
    return {
        "sliding": _made(d / "sliding.zarr", good),
        "catalog": _made(
            d / "catalog.zarr", good, "--method", "catalog", "--catalog", str(d / "first.csv")
        ),
    }


def _run_case(name: str, root: Path, good: Path, stores: dict[str, Path]) -> dict:
    import shutil

    d = root / name
    d.mkdir()
    args, words = CASES[name](d, good)
    store = d / "store.zarr"  # a copy of its own: cases run at the same time
    shutil.copytree(stores["catalog" if "--catalog" in args else "sliding"], store)
    before = store_digest(store)
    lead = args[:2] if args[0] == "--config" else []  # a global flag: before the subcommand
    cmd = [*lead, "fingerprint", "-o", str(store), *BASE_FLAGS, *args[len(lead) :]]
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *cmd], capture_output=True, text=True, timeout=300
    )
    return {
        "result": r,
        "words": words,
        "unchanged": store_digest(store) == before,
        "ran_code": (d / "pwned").exists(),
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, good, stores) -> dict[str, dict]:
    """Every case through the command line, four at a time (each is a fresh interpreter)."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("corpus")
    with ThreadPoolExecutor(4) as pool:
        futures = {n: pool.submit(_run_case, n, root, good, stores) for n in CASES}
    return {n: f.result() for n, f in futures.items()}


def test_corpus_is_large_enough():
    assert len(CASES) >= 20


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_input_is_one_line_and_the_store_is_untouched(outcomes, name):
    out = outcomes[name]
    r = out["result"]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("elodin: error:")]
    assert len(lines) == 1, r.stderr
    for word in out["words"]:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert out["unchanged"], "the store changed"
    assert not out["ran_code"], "a model or config file ran code"


def test_output_into_a_closed_pipe_is_no_traceback():
    # `elodin models list | head -c 10`: the reader is gone before elodin writes its lines.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "models", "list"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == ""
    assert done.returncode == 141
