"""Object storage: the S3 primitives, the embedded S3 server, and the registries on them."""
