#!/usr/bin/env bash
# Wheels the GPU check needs that the GPU machine lacks (it has no network; its Python 3.12 has torch, torchvision,
# timm, pyarrow, pillow, typer and rich): about 6 MB, into benchmarks/wheels/ (git-ignored). See benchmarks/README.md.
#
#   bash benchmarks/fetch_wheels.sh            # here, with network
#   pip install --no-index --no-deps benchmarks/wheels/*.whl && python benchmarks/gpu_check.py   # there
set -euo pipefail
dest="${1:-$(dirname "$0")/wheels}"
pip download --dest "$dest" --only-binary=:all: --no-deps \
    --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    open_clip_torch==3.3.0 ftfy wcwidth regex \
    segment-anything==1.0 \
    pycocotools==2.0.11 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
du -sh "$dest"
