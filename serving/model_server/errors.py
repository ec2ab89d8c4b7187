"""The model server's request errors, each with the gRPC status code TF Serving answers (REST maps
the same code to its HTTP status)."""

from __future__ import annotations

import grpc

from storage.errors import MnistError


class RequestError(MnistError):
    """A request problem with the gRPC status code it maps to."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message, status=code.name)
        self.code = code


def grpc_code(error: MnistError) -> grpc.StatusCode:
    """The gRPC status an error of the family ends a call with (its ``status`` by name)."""
    return grpc.StatusCode[error.status]
