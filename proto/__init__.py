"""gRPC API definition and stubs (issue 6)."""
