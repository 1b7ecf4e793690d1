"""Tiered chunk-KV store (issue 4)."""
