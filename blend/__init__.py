"""Pure compute: model adapter (per-layer step), KV cache, fusor. Tensors in, tensors out."""
