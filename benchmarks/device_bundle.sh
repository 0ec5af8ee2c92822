#!/usr/bin/env bash
# Everything benchmarks/bench_gpu.py needs on a lent GPU machine that cannot reach PyPI, in
# parts small enough to carry: a run carries at most 64 MiB with the working tree, and
# onnxruntime-gpu alone is about 255 MB.
#
#   benchmarks/device_bundle.sh pack      # here: wheels + exported models -> .whl/p1 .. .whl/pN
#   benchmarks/device_bundle.sh unpack    # there: join the parts, check, install into .whl/site
#
# The device image (python 3.12, PyTorch, numpy, scipy, scikit-learn, xarray, ...; see the
# device tool's KINDS.md) lacks onnxruntime-gpu and the Dask / Zarr / astropy stack; `pack`
# downloads cp312 wheels of Elodin's dependencies and keeps those the image does not have. The
# models are exported here (torch is not needed there). On the device, while it stays warm,
# carry one part per run (earlier ones stay), then in the last run:
#   benchmarks/device_bundle.sh unpack &&
#   PYTHONPATH=.whl/site:. ELODIN__CACHE_DIR=.whl/models python3 benchmarks/bench_gpu.py
# (.whl/ is git-ignored.)
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${DEVICE_PYTHON:-3.12}"
ORT_GPU="${ORT_GPU_VERSION:-1.31.1}"
PART_MB=48 # plus the working tree, under the 64 MiB a run carries
# In the device image already (KINDS.md, 2026-11-17): not carried.
HAVE="numpy scipy scikit-learn scikit-image pandas xarray fsspec pyyaml tqdm jinja2 markupsafe
pillow tifffile matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six
packaging cloudpickle toolz msgpack psutil click sortedcontainers pyarrow numba llvmlite
imageio lazy-loader networkx joblib threadpoolctl typing-extensions filelock protobuf onnx
certifi urllib3 requests idna charset-normalizer tzdata"

case "${1:-}" in
pack)
    py=.venv/bin/python
    rm -rf .whl && mkdir -p .whl/bundle/wheels .whl/bundle/models .whl/dl
    platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
    reqs=("onnxruntime-gpu==${ORT_GPU}" "onnxconverter-common>=1.14")
    reqs+=($($py -c 'import tomllib; print(" ".join(d.replace(" ", "") for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] if not d.startswith("onnxruntime")))'))
    for req in "${reqs[@]}"; do # one at a time: onnxruntime-gpu must not pull onnxruntime in
        $py -m pip download -q --only-binary=:all: --python-version "$PYVER" "${platforms[@]}" \
            -d .whl/dl "$req"
    done
    for w in .whl/dl/*.whl; do
        name=$(basename "$w" | cut -d- -f1 | tr '_' '-' | tr 'A-Z' 'a-z')
        case " $(echo $HAVE) onnxruntime " in # the CPU build would shadow the GPU one
        *" $name "*) ;;
        *) cp "$w" .whl/bundle/wheels/ ;;
        esac
    done
    for model in efficientnet-lite0 efficientnet-lite0:native; do
        for precision in fp32 fp16; do
            ELODIN__CACHE_DIR=.whl/bundle/models $py -c "
from pipeline.models import resolve
from pipeline.models.export import ensure_onnx
print(ensure_onnx(resolve('$model'), precision='$precision'))"
        done
    done
    tar -C .whl -cf .whl/bundle.tar bundle
    sha256sum .whl/bundle.tar | awk '{print $1}' >.whl/SHA256
    split -b "${PART_MB}m" -d -a 2 .whl/bundle.tar .whl/part-
    i=0
    for part in .whl/part-*; do
        i=$((i + 1))
        mkdir -p ".whl/p$i" && mv "$part" ".whl/p$i/"
    done
    cp .whl/SHA256 .whl/p1/
    echo "$(ls .whl/bundle/wheels | wc -l) wheels, models: $(ls .whl/bundle/models | tr '\n' ' ')"
    rm -rf .whl/dl .whl/bundle .whl/bundle.tar
    echo "$i parts in .whl/p1 .. .whl/p$i (carry one per run)"
    ;;
unpack)
    printf "%s\n" .whl/p*/part-* | sort -t/ -k3 | xargs cat >.whl/bundle.tar
    echo "$(cat .whl/p1/SHA256)  .whl/bundle.tar" | sha256sum -c -
    tar -C .whl -xf .whl/bundle.tar
    python3 -m pip install -q --no-deps --target .whl/site .whl/bundle/wheels/*.whl
    rm -rf .whl/models && mv .whl/bundle/models .whl/models
    PYTHONPATH=.whl/site python3 -c \
        "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
    ;;
*)
    echo "usage: $0 pack|unpack" >&2
    exit 2
    ;;
esac
