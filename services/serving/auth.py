"""Who is calling: the bearer token's tenant with auth on; the tenant header (or the default tenant)
without. One rule for the gRPC metadata (server.py) and the HTTP headers (openai_http.py)."""

from __future__ import annotations

import hmac

from services.serving import errors
from services.settings import DEFAULT_TENANT, AuthConfig, check_tenant

TENANT_HEADER = "kvblend-tenant"


class Tenants:
    """Who is calling: the bearer token's tenant with auth on; the tenant header (or default) without."""

    def __init__(self, auth: AuthConfig):
        self.auth = auth

    def of(self, context) -> str:
        metadata = {}
        for key, value in context.invocation_metadata():
            metadata.setdefault(key.lower(), value)
        return self.resolve(metadata.get("authorization", ""), metadata.get(TENANT_HEADER))

    def resolve(self, header: str, asked: str | None) -> str:
        """The tenant of an `authorization` value and a tenant asked for (None: not asked); gRPC metadata
        and HTTP headers alike."""
        if not self.auth.enabled:
            if asked is None:
                return DEFAULT_TENANT
            try:
                return check_tenant(asked)
            except ValueError as err:
                raise errors.InvalidArgument(f"{TENANT_HEADER} metadata: {err}") from None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise errors.Unauthenticated("missing bearer token (metadata 'authorization: Bearer <token>')")
        tenant = None
        for known, owner in self.auth.tokens:  # compare with every token: the time says nothing of which
            if hmac.compare_digest(known.encode(), token.strip().encode()):
                tenant = owner
        if tenant is None:
            raise errors.Unauthenticated("invalid bearer token")
        if asked is not None and asked != tenant:
            raise errors.PermissionDenied(f"the token is not valid for tenant {asked[:64]!r}")
        return tenant
