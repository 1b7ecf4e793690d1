"""The service's request errors; the gRPC edge maps each to one status code (services/serving/server.py).

Every message names the bad value and, where there is one, the fix.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A request the service refuses or cannot finish; never a bug."""


class InvalidArgument(ServiceError, ValueError):
    pass


class NotFound(ServiceError, LookupError):
    pass


class Overloaded(ServiceError):
    """The request queue is full, or the model's device ran out of memory for a request: retry later."""


class Unavailable(ServiceError):
    """The server is draining (SIGTERM) or stopped, or Redis holding the shared catalog does not answer:
    retry (another replica, or the same one shortly)."""


class Cancelled(ServiceError):
    """The caller went away: it cancelled the call or its deadline passed."""


class Unauthenticated(ServiceError):
    pass


class PermissionDenied(ServiceError):
    pass


class DeadlineExceeded(Cancelled):
    """The call's deadline passed before its answer was complete."""
