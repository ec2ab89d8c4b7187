"""The files of a model version beside TF Serving's own (``<name>/<version>/...``), named once for
the registry that writes and reads them and for the signing that covers them."""

MANIFEST = "assets.extra/manifest.json"  # written last: a version without it is not published
SIGNATURE = "assets.extra/model.sig"  # OpenSSF model signature; the manifest is written after it, unsigned
