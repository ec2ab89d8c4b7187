"""The served model: store layout and registry, sync, gRPC server and client."""
