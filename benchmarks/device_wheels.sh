#!/usr/bin/env bash
# The wheels the GPU machine lacks (it has torch, triton, transformers, safetensors, tokenizers, PyYAML,
# rich, matplotlib, numpy; no network): the serving stack and its dependencies, for CPython 3.12 on
# x86-64 Linux. Run here (this machine has a package index), then carry the folder to the device call:
#
#   bash benchmarks/device_wheels.sh                # -> .whl/ (git-ignored; listed in .git/info/exclude)
#   device run, carry [".whl"], command starting with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit; ...
#
# Versions follow this project's CPU environment so both sides run the same code; fastapi >= 0.16x
# imports opentelemetry-api and annotated-doc, which must come too (a serve run failed without them).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$DEST" \
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types typing-inspection typing_extensions \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 h11 click anyio sniffio opentelemetry-api==1.45.2 annotated-doc \
  prometheus_client nvidia-ml-py httpx httpcore certifi idna
ls "$DEST"
