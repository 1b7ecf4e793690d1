"""Edges of kvblend: CLI, evaluation, benchmarks, later the gRPC server."""
