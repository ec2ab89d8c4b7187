"""Signed model versions with OpenSSF's ``model-signing`` (key-based, no online service).

Publish signs the SavedModel directory with ``MNIST_SIGNING_KEY`` (a PEM private key,
elliptic curve) and stores the signature with the version as ``assets.extra/model.sig``,
one more file in the manifest. With ``MNIST_VERIFY_KEY`` (the PEM public key) set, the
sync and ``registry verify`` refuse a version that is unsigned or whose signature does not
verify over the files as downloaded. The keys' paths and contents never go into a
manifest, a parameter, a log or an artifact.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from storage.layout import MANIFEST, SIGNATURE  # the manifest is written after signing: not signed
from storage.s3 import VerificationFailed


class SignatureRefused(VerificationFailed):
    """A version that is unsigned, or whose signature does not verify with the configured key."""


def hashing_config(directory: Path):
    import model_signing

    return model_signing.hashing.Config().set_ignored_paths(
        paths=[directory / MANIFEST, directory / SIGNATURE], ignore_git_paths=True)


def readable_key(path: Path, setting: str) -> Path:
    if not path.is_file():
        raise VerificationFailed(f"{setting} names {path}, which is not a readable key file")
    return path


def sign_directory(directory: Path, private_key: Path) -> None:
    """Sign every file of ``directory`` (but the manifest and an old signature) into SIGNATURE."""
    import model_signing

    (directory / SIGNATURE).unlink(missing_ok=True)
    (directory / SIGNATURE).parent.mkdir(parents=True, exist_ok=True)
    try:
        (model_signing.signing.Config()
         .use_elliptic_key_signer(private_key=readable_key(private_key, "MNIST_SIGNING_KEY"))
         .set_hashing_config(hashing_config(directory))
         .sign(directory, directory / SIGNATURE))
    except ValueError as error:  # a key that is not an EC private key in PEM
        raise VerificationFailed(f"cannot sign with MNIST_SIGNING_KEY: {str(error).splitlines()[0]}") from None


def verify_directory(directory: Path, public_key: Path, what: str) -> None:
    """Raise SignatureRefused unless ``directory`` carries a signature that verifies with ``public_key``."""
    import model_signing

    if not (directory / SIGNATURE).is_file():
        raise SignatureRefused(f"{what}: unsigned (no {SIGNATURE}), and MNIST_VERIFY_KEY requires a signature")
    try:
        (model_signing.verifying.Config()
         .use_elliptic_key_verifier(public_key=readable_key(public_key, "MNIST_VERIFY_KEY"))
         .set_hashing_config(hashing_config(directory))
         .verify(directory, directory / SIGNATURE))
    except ValueError as error:
        raise SignatureRefused(f"{what}: signature does not verify with MNIST_VERIFY_KEY "
                               f"({str(error).splitlines()[0][:200]})") from None


def verify_stored_version(store, version: int, public_key: Path) -> None:
    """Download ``version`` (streamed, confined, hash-checked) and verify its signature."""
    with tempfile.TemporaryDirectory() as scratch:
        store.download(version, Path(scratch) / "version")
        verify_directory(Path(scratch) / "version", public_key, f"version {version}")
