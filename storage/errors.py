"""The project's one error family: every error it raises on purpose is an ``MnistError``, which says
what went wrong in one line and carries the status each transport reports it with.

``status`` is a gRPC status name (``grpc.StatusCode``'s, without importing grpc here); its HTTP status
is TF Serving's mapping of the same code (``http_rest_api_util.cc``), kept here once. The model server
and the gateway answer with these, and the ``mnist`` command prints the message on one line.

(The client for other services, ``mnist_client``, is a package of its own with its own
``ServingError``: it cannot depend on this project.)
"""

from __future__ import annotations

# TF Serving's ToHTTPStatusCode (http_rest_api_util.cc), by gRPC status name
HTTP_STATUS = {"OK": 200, "CANCELLED": 499, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404,
               "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
               "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501,
               "UNAVAILABLE": 503, "UNAUTHENTICATED": 401}
# the other way, for counting REST replies under the gRPC names metrics use (several codes share 400)
STATUS_OF_HTTP = {200: "OK", 400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 409: "ABORTED", 429: "RESOURCE_EXHAUSTED",
                  499: "CANCELLED", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def http_status(status: str) -> int:
    """The HTTP status of a gRPC status name: 500 for those TF Serving maps to none."""
    return HTTP_STATUS.get(status, 500)


class MnistError(Exception):
    """A problem said in one line, with its gRPC status name (``status``) and HTTP status.

    A subclass sets ``status`` (and, where HTTP says more than the gRPC name, ``http``) for all its
    errors; a raise may give its own."""

    status: str = "INTERNAL"
    http: int | None = None  # None: the HTTP status of ``status``

    def __init__(self, message: str = "", status: str | None = None, http: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        if http is not None:
            self.http = http

    @property
    def http_status(self) -> int:
        return self.http if self.http is not None else http_status(self.status)
