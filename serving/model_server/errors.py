"""The model server's request errors, each with the gRPC status code TF Serving answers (REST maps
the same code to its HTTP status)."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request problem with the gRPC status code it maps to."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
