#!/usr/bin/env bash
# Bring onnxruntime-gpu to a device machine that cannot reach PyPI, in parts small enough to
# carry (a run carries at most 64 MiB; the wheel is about 255 MB).
#
#   benchmarks/gpu_wheel.sh split      # here: download the wheel, cut it into .whl/p1 .. .whl/pN
#   benchmarks/gpu_wheel.sh install    # there: join the parts carried so far, install into .whl/site
#
# On the device machine, while it stays warm, carry one part per run (earlier ones stay):
#   run(carry=[".whl/p1"], command="ls .whl")  ...  run(carry=[".whl/pN"], command=...)
# then:
#   benchmarks/gpu_wheel.sh install && PYTHONPATH=.whl/site python benchmarks/bench_gpu.py
# (.whl/ is git-ignored.)
set -euo pipefail
VERSION="${ORT_GPU_VERSION:-1.31.1}"
PART_MB=48  # plus the working tree, under the 64 MiB a run carries
cd "$(dirname "$0")/.."

case "${1:-}" in
split)
    rm -rf .whl && mkdir -p .whl/download
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
        -d .whl/download "onnxruntime-gpu==${VERSION}"
    wheel=$(ls .whl/download/*.whl)
    sha256sum "$wheel" | awk '{print $1}' >.whl/SHA256
    basename "$wheel" >.whl/NAME
    split -b "${PART_MB}m" -d -a 2 "$wheel" .whl/part-
    i=0
    for part in .whl/part-*; do
        i=$((i + 1))
        mkdir -p ".whl/p$i" && mv "$part" ".whl/p$i/"
    done
    cp .whl/SHA256 .whl/NAME .whl/p1/
    rm -rf .whl/download
    echo "$(cat .whl/NAME): $i parts in .whl/p1 .. .whl/p$i (carry one per run)"
    ;;
install)
    name=$(cat .whl/p1/NAME)
    printf "%s\n" .whl/p*/part-* | sort -t/ -k3 | xargs cat >".whl/$name"
    echo "$(cat .whl/p1/SHA256)  .whl/$name" | sha256sum -c -
    python3 -m pip install --no-deps --target .whl/site ".whl/$name"
    PYTHONPATH=.whl/site python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
    ;;
*)
    echo "usage: $0 split|install" >&2
    exit 2
    ;;
esac
