"""Retriever: chunker, embedder and faiss index (issue 5)."""
